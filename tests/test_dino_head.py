"""DINOHead: parity with the official head, official key names, weight-norm behaviour."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import assert_case_passes, reference_cases
from torch import nn

from dinokit.models.dino_head import DINOHead, remap_head_keys
from dinokit.reference.core import load_case
from dinokit.reference.kinds_heads_losses import RUNNERS


def test_reference_dino_headreference_cases(reference_dir: Path) -> None:
    for case in reference_cases(reference_dir, "dino_head"):
        ctx = load_case(reference_dir, case)
        RUNNERS["dino_head"](ctx)
        assert_case_passes(ctx)
        assert "out.y" in ctx.compared


def test_state_dict_keys_match_official_order_and_shapes(reference_dir: Path) -> None:
    for case in reference_cases(reference_dir, "dino_head"):
        head = DINOHead(**case["constructor"]["kwargs"])
        expected = case["weights"]["state_dict_keys_in_order"]
        actual = {k: list(v.shape) for k, v in head.state_dict().items()}
        assert list(actual) == list(expected), case["name"]
        for key, shape in expected.items():
            shape = shape[0] if len(shape) == 2 and isinstance(shape[1], str) else shape
            assert actual[key] == list(shape), (case["name"], key)


@pytest.mark.parametrize(
    ("nlayers", "use_bn", "linear_keys"),
    [(1, False, ["mlp.weight"]), (3, False, ["mlp.0.weight", "mlp.2.weight", "mlp.4.weight"]),
     (3, True, ["mlp.0.weight", "mlp.3.weight", "mlp.6.weight"])],
)
def test_sequential_indices(nlayers: int, use_bn: bool, linear_keys: list[str]) -> None:
    head = DINOHead(8, 12, use_bn=use_bn, nlayers=nlayers, hidden_dim=16, bottleneck_dim=4)
    weights = [k for k, v in head.state_dict().items() if k.startswith("mlp.") and k.endswith("weight") and v.dim() == 2]
    assert weights == linear_keys


def test_no_deprecation_warning_and_official_init() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = DINOHead(64, 128, hidden_dim=256, bottleneck_dim=32)
        head(torch.randn(3, 64))
    assert torch.equal(head.last_layer.weight_g, torch.ones(128, 1))
    for m in head.mlp.modules():
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
            assert abs(float(m.weight.detach().std()) - 0.02) < 0.004
    # Output = scores of a unit vector against unit prototypes: cosine similarities.
    assert head(torch.randn(5, 64)).abs().max() <= 1 + 1e-6


def test_norm_last_layer_freezes_weight_g() -> None:
    head = DINOHead(16, 24, hidden_dim=32, bottleneck_dim=8, norm_last_layer=True)
    assert not head.last_layer.weight_g.requires_grad
    assert head.last_layer.weight_v.requires_grad
    head(torch.randn(4, 16)).sum().backward()
    assert head.last_layer.weight_g.grad is None
    assert head.last_layer.weight_v.grad is not None and torch.isfinite(head.last_layer.weight_v.grad).all()
    free = DINOHead(16, 24, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad
    free(torch.randn(4, 16)).sum().backward()
    assert free.last_layer.weight_g.grad is not None


def test_effective_weight_is_row_normalised() -> None:
    head = DINOHead(16, 24, hidden_dim=32, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    w = head.last_layer.weight
    v = head.last_layer.weight_v
    expected = head.last_layer.weight_g * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w.norm(dim=1, keepdim=True), head.last_layer.weight_g.detach(), atol=1e-6, rtol=1e-6)


def test_new_parametrization_key_names_load_identically() -> None:
    torch.manual_seed(1)
    head = DINOHead(16, 24, hidden_dim=32, bottleneck_dim=8).eval()
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    # A real torch parametrization module, to produce genuinely new-style names.
    modern = nn.utils.parametrizations.weight_norm(nn.Linear(8, 24, bias=False))
    modern.load_state_dict(
        {
            "parametrizations.weight.original0": head.last_layer.weight_g.detach().clone(),
            "parametrizations.weight.original1": head.last_layer.weight_v.detach().clone(),
        }
    )
    new_sd = {k: v for k, v in head.state_dict().items() if not k.startswith("last_layer.")}
    new_sd.update({f"last_layer.{k}": v for k, v in modern.state_dict().items()})
    assert "last_layer.parametrizations.weight.original0" in new_sd

    x = torch.randn(5, 16)
    with torch.no_grad():
        y_ref = head(x)
        assert torch.equal(modern(head.forward_bottleneck(x)), y_ref)
        for sd in (new_sd, remap_head_keys(new_sd)):
            other = DINOHead(16, 24, hidden_dim=32, bottleneck_dim=8).eval()
            other.load_state_dict(sd, strict=True)
            assert torch.equal(other(x), y_ref)


def test_remap_head_keys_keeps_prefixes() -> None:
    sd = {
        "dino_head.last_layer.parametrizations.weight.original0": torch.ones(3, 1),
        "dino_head.last_layer.parametrizations.weight.original1": torch.ones(3, 2),
        "dino_head.mlp.0.weight": torch.ones(2, 2),
    }
    assert list(remap_head_keys(sd)) == ["dino_head.last_layer.weight_g", "dino_head.last_layer.weight_v", "dino_head.mlp.0.weight"]


def test_fp16_normalize_eps_keeps_zero_input_finite() -> None:
    head = DINOHead(4, 6, nlayers=1, bottleneck_dim=4).half()
    with torch.no_grad():
        head.mlp.weight.zero_()
        head.mlp.bias.zero_()
        y = head(torch.randn(2, 4, dtype=torch.float16))
    assert torch.isfinite(y).all() and torch.count_nonzero(y) == 0
