"""Backbone: official parity cases, official key maps, gradients, interpolation, stochastic depth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinokit.models import OFFICIAL_ARCHS, build_official, vit_args
from dinokit.models.layers import Block
from dinokit.models.vision_transformer import VisionTransformer
from dinokit.reference.checker import check_case, read_manifest, runners

BACKBONE_KINDS = ("backbone", "backbone_chunking", "backbone_init")


def _cases(folder: Path, kinds: tuple[str, ...]) -> list[dict]:
    return [c for c in read_manifest(folder)["cases"] if c["kind"] in kinds]


def test_backbone_reference_cases(reference_dir: Path) -> None:
    table = runners()
    cases = _cases(reference_dir, BACKBONE_KINDS)
    assert len(cases) >= 8
    for case in cases:
        result = check_case(reference_dir, case, table)
        assert result.ok, result.line()
        assert result.n_checks > 0


@pytest.mark.parametrize(
    ("arch", "key_file"),
    [("dinov2_vits14", "official_vits14_keys.json"), ("dinov2_vits14_reg", "official_vits14_reg4_keys.json")],
)
def test_official_key_maps_match_key_for_key(reference_dir: Path, arch: str, key_file: str) -> None:
    official = json.loads((reference_dir / key_file).read_text())
    model = build_official(arch)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == [[k, list(shape)] for k, shape in official["keys"].items()]
    assert sum(p.numel() for p in model.parameters()) == official["num_params"]


def test_official_architectures_match_hub_summary(reference_dir: Path) -> None:
    summary = json.loads((reference_dir / "official_hub_backbones_summary.json").read_text())
    for name, info in summary.items():
        args = OFFICIAL_ARCHS[name]
        assert (args.embed_dim, args.depth, args.num_heads, args.patch_size) == (
            info["embed_dim"], info["depth"], info["num_heads"], info["patch_size"],
        ), name
        assert args.num_register_tokens == info["num_register_tokens"], name
        assert args.interpolate_antialias == info["interpolate_antialias"], name
        assert args.interpolate_offset == info["interpolate_offset"], name
        # Build at full width but two blocks: key names and shapes of a block are what matter.
        model = build_official(name, depth=2)
        block0 = {k: list(v.shape) for k, v in model.state_dict().items() if k.startswith("blocks.0.")}
        assert block0 == info["block0_keys"], name
        rest = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("blocks.")}
        assert rest == info["non_block_keys"], name


SMALL_BUILDS = {name: dict(depth=2, img_size=4 * args.patch_size) for name, args in OFFICIAL_ARCHS.items()}
SMALL_BUILDS.update(
    {
        "swiglu_ls_reg_p16": dict(patch_size=16, ffn_layer="swiglufused", init_values=1e-5, num_register_tokens=2),
        "nobias_p8": dict(patch_size=8, qkv_bias=False, proj_bias=False, ffn_bias=False, init_values=0.1),
        "subset_drop_path": dict(patch_size=14, drop_path_rate=0.4, drop_path_uniform=True),
        "per_sample_drop_path": dict(patch_size=14, drop_path_rate=0.05, init_values=1.0),
    }
)


@pytest.mark.parametrize("name", sorted(SMALL_BUILDS))
def test_every_parameter_gets_a_finite_gradient(name: str) -> None:
    torch.manual_seed(0)
    if name in OFFICIAL_ARCHS:
        model = build_official(name, **SMALL_BUILDS[name])
    else:
        overrides = SMALL_BUILDS[name]
        model = vit_args("vit_small", depth=2, img_size=4 * int(overrides["patch_size"]), **overrides).build()
    model.train()
    p = model.patch_size
    x = torch.randn(4, 3, 4 * p, 3 * p)  # non-square: pos-embed interpolation is in the graph
    masks = None
    if model.mask_token is not None:
        masks = torch.zeros(4, 12, dtype=torch.bool)
        masks[0, :5] = True
    out = model.forward_features(x, masks)
    loss = out["x_norm_clstoken"].square().mean() + out["x_norm_patchtokens"].square().mean()
    if model.num_register_tokens:
        loss = loss + out["x_norm_regtokens"].square().mean()
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


def test_full_size_builders_have_documented_sizes() -> None:
    # ViT-S / B at full depth; L / g checked by width in the hub-summary test.
    assert sum(p.numel() for p in build_official("dinov2_vitb14").parameters()) == 86_580_480
    vit_g = vit_args("vit_giant2", patch_size=14, ffn_layer="swiglufused", depth=1).build()
    assert vit_g.blocks[0].mlp.w12.weight.shape == (8192, 1536)


def test_pos_embed_returned_unchanged_only_for_square_inputs_of_native_size() -> None:
    model = vit_args("vit_small", depth=1, img_size=56, patch_size=14).build()
    tokens = torch.zeros(1, 17, 384)
    assert model.interpolate_pos_encoding(tokens, 56, 56) is model.pos_embed
    # 28 x 112 has the same 16 patches but is not square: the official code interpolates.
    other = model.interpolate_pos_encoding(tokens, 28, 112)
    assert other.shape == (1, 17, 384) and not torch.equal(other, model.pos_embed)


def test_sdpa_attention_equals_explicit_softmax_attention() -> None:
    torch.manual_seed(0)
    model = vit_args("vit_small", depth=2, img_size=28, patch_size=14, num_register_tokens=1).build().eval()
    x = torch.randn(2, 3, 28, 28)
    probs = model.last_block_attention(x)
    assert probs.shape == (2, 6, 1 + 1 + 4, 6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 6, 6))
    block = model.blocks[-1]
    tokens = model.blocks[0](model.prepare_tokens_with_masks(x))
    h = block.norm1(tokens)
    _, _, v = block.attn._split_heads(h)
    manual = block.attn.proj((probs @ v).transpose(1, 2).reshape(2, 6, 384))
    torch.testing.assert_close(block.attn(h), manual, atol=1e-5, rtol=1e-5)


def test_batch_subset_stochastic_depth_computes_branch_on_a_subset_only() -> None:
    block = Block(32, 4, drop_path=0.5).train()
    seen: list[int] = []
    block.attn.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    block(torch.randn(8, 5, 32))
    assert seen == [4]  # int(8 * (1 - 0.5)) samples went through attention


def test_masked_forward_replaces_patches_before_positional_embedding() -> None:
    torch.manual_seed(0)
    model = vit_args("vit_small", depth=1, img_size=28, patch_size=14).build().eval()
    x = torch.randn(2, 3, 28, 28)
    masks = torch.tensor([[True, False, False, True], [False] * 4])
    tokens = model.prepare_tokens_with_masks(x, masks)
    expected = model.mask_token[0] + model.pos_embed[0, 1]
    torch.testing.assert_close(tokens[0, 1], expected)
    torch.testing.assert_close(tokens[1], model.prepare_tokens_with_masks(x[1:])[0])


def test_dino_v1_architecture_rejects_masks() -> None:
    model = build_official("dino_vits16", depth=1)
    assert "mask_token" not in model.state_dict()
    with pytest.raises(ValueError, match="no mask_token"):
        model.forward_features(torch.randn(1, 3, 32, 32), torch.zeros(1, 4, dtype=torch.bool))


def test_bad_input_sizes_fail_clearly() -> None:
    model = vit_args("vit_small", depth=1, img_size=28, patch_size=14).build()
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        model(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(torch.randn(1, 3, 28, 28), n=[3])
    with pytest.raises(ValueError, match="ffn_layer"):
        VisionTransformer(ffn_layer="conv")  # type: ignore[arg-type]


def test_param_groups_follow_layer_ids() -> None:
    from dinokit.train.param_groups import param_infos

    model = vit_args("vit_small", depth=2, img_size=28, patch_size=14, init_values=1e-5).build()
    infos = {i.name: i for i in param_infos(model, lr_decay_rate=0.5, patch_embed_lr_mult=0.2)}
    assert infos["cls_token"].lr_multiplier == pytest.approx(0.125)
    assert infos["patch_embed.proj.weight"].lr_multiplier == pytest.approx(0.025)
    assert infos["blocks.1.attn.qkv.weight"].lr_multiplier == pytest.approx(0.5)
    assert infos["norm.weight"].lr_multiplier == 1.0
    # dinokit's default: no decay on tokens, biases, norms, LayerScale; decay on weights.
    assert {n for n, i in infos.items() if i.wd_multiplier == 1.0} == {
        n for n in infos if n.endswith("weight") and "norm" not in n
    }
    official = {i.name: i for i in param_infos(model, decay_tokens=True)}
    assert official["cls_token"].wd_multiplier == 1.0
