"""Weights converted to timm / Hugging Face transformers give our outputs (tiny random models)."""

from __future__ import annotations

import pytest
import torch

from dinokit.export.hf import to_hf, to_hf_state_dict
from dinokit.export.timm import to_timm, to_timm_state_dict
from dinokit.models.builders import ViTArgs
from tests.conftest import require

# Tiny variants of each released family; every one is evaluated at a size other than its
# stored grid, so the positional embedding goes through the official interpolation.
ARCHS = {
    "dinov2": ViTArgs(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, init_values=1.0),
    "dinov2_reg": ViTArgs(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, init_values=1.0,
                          num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0),
    "dinov2_swiglu": ViTArgs(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3, init_values=1.0,
                             ffn_layer="swiglufused"),
    "dino_v1": ViTArgs(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, init_values=None,
                       use_mask_token=False),
}
EVAL_SIZE = 24


def random_model(args: ViTArgs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = args.build().eval()
    with torch.no_grad():  # every tensor random, so a swapped or dropped key shows in the outputs
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model


def our_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], 1)


# Each peer: (module to import, how to run the converted model on x and get all its tokens).
PEERS = {
    "timm": lambda model, x: to_timm(model, img_size=EVAL_SIZE).forward_features(x),
    "transformers": lambda model, x: to_hf(model, image_size=EVAL_SIZE)(pixel_values=x).last_hidden_state,
}


@pytest.mark.parametrize("peer", list(PEERS))
@pytest.mark.parametrize("name", list(ARCHS))
def test_peer_outputs_match(name: str, peer: str) -> None:
    require(peer)
    model = random_model(ARCHS[name])
    x = torch.randn(2, 3, EVAL_SIZE, EVAL_SIZE)
    with torch.no_grad():
        expected = our_tokens(model, x)
        got = PEERS[peer](model, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_stored_grid_needs_no_resampling() -> None:
    # At the stored size the converted pos_embed is the model's own tensor, unchanged.
    model = random_model(ARCHS["dinov2"])
    state = to_timm_state_dict(model.state_dict())
    assert torch.equal(state["pos_embed"], model.pos_embed)
    assert "mask_token" not in state


def test_hf_qkv_split_follows_the_official_layout() -> None:
    model = random_model(ARCHS["dinov2"])
    state = to_hf_state_dict(model.state_dict())
    q, k, v = model.blocks[1].attn.qkv.weight.chunk(3)
    assert torch.equal(state["encoder.layer.1.attention.q_proj.weight"], q)
    assert torch.equal(state["encoder.layer.1.attention.v_proj.weight"], v)
    legacy = to_hf_state_dict(model.state_dict(), legacy_names=True)
    assert torch.equal(legacy["encoder.layer.1.attention.attention.key.weight"], k)


@pytest.mark.parametrize("convert", [to_timm_state_dict, to_hf_state_dict])
def test_unknown_keys_are_named(convert) -> None:
    state = dict(random_model(ARCHS["dinov2"]).state_dict())
    state["dino_head.mlp.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="dino_head.mlp.0.weight"):
        convert(state)
