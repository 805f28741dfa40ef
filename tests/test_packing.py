"""Sequence packing: crops of two sizes through the blocks as one packed sequence equal separate
forwards (outputs and gradients), with registers, the mask token and both kinds of stochastic
depth; dropped crops skip the branches."""

from __future__ import annotations

import random

import pytest
import torch
from torch import Tensor

from dinokit.config import HeadConfig
from dinokit.data.collate import collate_data_and_cast
from dinokit.data.masking import MaskingGenerator
from dinokit.models import vit_args
from dinokit.models.layers import Attention, PackedLayout, drop_path
from dinokit.models.vision_transformer import VisionTransformer
from dinokit.train.ssl_model import LossArgs, SSLModel



def _assert_grad_close(actual: Tensor, expected: Tensor, name: str) -> None:
    # Weight gradients sum over all rows; packing changes the summation order, so compare at
    # float32 rounding relative to the gradient's scale.
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")

def _model(**overrides: object) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(embed_dim=32, depth=3, num_heads=2, patch_size=4, img_size=16, num_register_tokens=2,
                init_values=0.5)
    args.update(overrides)
    return vit_args("vit_small", **args).build().train()


def _inputs() -> tuple[list[Tensor], list[Tensor | None]]:
    g = torch.Generator().manual_seed(1)
    globs, locs = torch.randn(4, 3, 16, 16, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    masks = torch.rand(4, 16, generator=g) < 0.4
    masks[0] = False  # an unmasked image among masked ones, as in iBOT batches
    return [globs, locs], [masks, None]


def _forward_backward(model: VisionTransformer, packing: bool) -> tuple[list[dict], dict[str, Tensor]]:
    model.packing = packing
    model.zero_grad(set_to_none=True)
    xs, masks = _inputs()
    outs = model.forward_features_list(xs, masks)
    loss = sum(
        o["x_norm_clstoken"].square().sum() + o["x_norm_patchtokens"].pow(3).mean()
        + o["x_norm_regtokens"].abs().sum() + o["x_prenorm"].mean()
        for o in outs
    )
    loss.backward()
    return outs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_packed_equals_separate(model: VisionTransformer) -> None:
    separate, grads_separate = _forward_backward(model, packing=False)
    packed, grads_packed = _forward_backward(model, packing=True)
    assert len(packed) == len(separate) == 2
    for a, b in zip(separate, packed):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], Tensor):
                assert a[key].shape == b[key].shape, key
                torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert grads_separate.keys() == grads_packed.keys()
    assert "mask_token" in grads_packed
    assert ("register_tokens" in grads_packed) == (model.num_register_tokens > 0)
    for name, grad in grads_separate.items():
        _assert_grad_close(grads_packed[name], grad, name)


def test_packed_forward_equals_separate_forwards_with_registers_and_mask_token() -> None:
    _assert_packed_equals_separate(_model())


def test_packed_forward_equals_separate_with_swiglu_and_without_layerscale() -> None:
    _assert_packed_equals_separate(_model(ffn_layer="swiglufused", init_values=None, num_register_tokens=0))


def _deterministic_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed and separate forwards draw their random numbers in another order (per block for
    all crop sizes vs per crop size for all blocks); fixed draws that depend only on the group
    size make the two comparable."""

    def keep_subset(n: int, size: int, device: torch.device) -> Tensor:
        return torch.arange(n, device=device).flip(0)[:size]

    def keep_mask(n: int, keep_prob: float, like: Tensor) -> Tensor:
        return (torch.arange(n, device=like.device) % 3 != 1).to(like.dtype)

    monkeypatch.setattr(drop_path, "_keep_subset", keep_subset)
    monkeypatch.setattr(drop_path, "_keep_mask", keep_mask)


@pytest.mark.parametrize("rate", [0.4, 0.05], ids=["batch_subset", "per_sample"])
def test_packed_stochastic_depth_equals_separate_with_the_same_draws(monkeypatch: pytest.MonkeyPatch, rate: float) -> None:
    _deterministic_draws(monkeypatch)
    model = _model(drop_path_rate=rate, drop_path_uniform=True)
    _assert_packed_equals_separate(model)
    # The draws really dropped something: the training output differs from the eval output.
    train_out = model.forward_features_list(*_inputs())[1]["x_prenorm"]
    model.eval()
    eval_out = model.forward_features_list(*_inputs())[1]["x_prenorm"]
    assert not torch.allclose(train_out, eval_out)


def test_packed_batch_subset_drop_runs_the_branches_on_kept_crops_only() -> None:
    model = _model(drop_path_rate=0.5, drop_path_uniform=True)
    model.packing = True
    rows: dict[str, list[int]] = {"attn": [], "mlp": []}
    block = model.blocks[0]
    block.attn.qkv.register_forward_hook(lambda m, i, o: rows["attn"].append(i[0].shape[0]))
    block.mlp.register_forward_hook(lambda m, i, o: rows["mlp"].append(i[0].shape[0]))
    model.forward_features_list(*_inputs())
    # Half of the 4 global crops (1 + 2 + 16 tokens) and of the 6 local crops (1 + 2 + 4 tokens).
    kept = 2 * 19 + 3 * 7
    assert rows == {"attn": [kept], "mlp": [kept]}


def test_packed_attention_keeps_crops_apart() -> None:
    torch.manual_seed(0)
    attn = Attention(16, 2)
    a, b = torch.randn(3, 5, 16), torch.randn(2, 7, 16)
    layout = PackedLayout.of([a, b])
    out = layout.unpack(attn(layout.pack([a, b]), layout=layout))
    torch.testing.assert_close(out[0], attn(a))
    torch.testing.assert_close(out[1], attn(b))
    # Changing one crop leaves every other crop's output unchanged.
    b2 = b.clone()
    b2[1] += 1.0
    out2 = layout.unpack(attn(layout.pack([a, b2]), layout=layout))
    torch.testing.assert_close(out2[0], out[0])
    torch.testing.assert_close(out2[1][0], out[1][0])
    with pytest.raises(ValueError, match="attn_mask and a packed layout"):
        attn(layout.pack([a, b]), attn_mask=torch.ones(1, dtype=torch.bool), layout=layout)


def test_ssl_losses_and_gradients_equal_with_and_without_packing() -> None:
    g = torch.Generator().manual_seed(0)
    samples = [({"global_crops": [torch.randn(3, 16, 16, generator=g) for _ in range(2)],
                 "local_crops": [torch.randn(3, 8, 8, generator=g) for _ in range(3)]}, 0)
               for _ in range(4)]
    batch = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, n_tokens=16,
                                  mask_generator=MaskingGenerator((4, 4), max_num_patches=8),
                                  random_state=random.Random(0))
    torch.manual_seed(0)
    backbone = vit_args("vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16).build()
    model = SSLModel(backbone, HeadConfig(64, 32, 16), None, LossArgs()).train()
    results = []
    for packing in (False, True):
        backbone.packing = packing
        model.zero_grad(set_to_none=True)
        terms, _ = model(batch, 0.04)
        terms["total"].backward()
        results.append((terms, {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}))
    (terms_off, grads_off), (terms_on, grads_on) = results
    assert set(terms_on) == {"dino_local", "dino_global", "koleo", "ibot", "total"}
    for name in terms_off:
        torch.testing.assert_close(terms_on[name], terms_off[name], msg=lambda m, name=name: f"{name}: {m}")
    for name, grad in grads_off.items():
        _assert_grad_close(grads_on[name], grad, name)
