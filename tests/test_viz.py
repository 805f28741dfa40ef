"""Pictures: attention maps, PCA of patch features, training curves, and the `viz` commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dinokit.models.builders import vit_args
from dinokit.viz.attention import (
    attention_maps,
    attention_picture,
    panel_size,
    prepare_image,
    threshold_masks,
)
from dinokit.viz.commands import add_commands
from dinokit.viz.curves import load_records, plot_curves
from dinokit.viz.pca import (
    foreground_mask,
    pca_features,
    pca_image,
    pca_picture,
    pca_rgb,
)

R = 2  # register tokens of the tiny model


@pytest.fixture()
def vit() -> nn.Module:
    torch.manual_seed(0)
    return vit_args(
        "vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16, num_register_tokens=R
    ).build().eval()


def _has_hooks(model: nn.Module) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in model.modules()
    )


# ------------------------------------------------------------------------------------ attention


def test_attention_maps_shape_and_non_square(vit: nn.Module) -> None:
    assert attention_maps(vit, torch.randn(1, 3, 16, 16)).shape == (2, 4, 4)
    assert attention_maps(vit, torch.randn(1, 3, 16, 24)).shape == (2, 4, 6)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        attention_maps(vit, torch.randn(1, 3, 16, 18))


def test_attention_rows_sum_to_one_and_registers_are_excluded(vit: nn.Module) -> None:
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        full = vit.last_block_attention(x)  # (1, heads, T, T)
    assert full.shape == (1, 2, 1 + R + 16, 1 + R + 16)
    torch.testing.assert_close(full.sum(-1), torch.ones(1, 2, 1 + R + 16))
    maps = attention_maps(vit, x)
    # Exactly the [CLS] -> patch probabilities, not renormalised: the registers' share is missing.
    torch.testing.assert_close(maps, full[0, :, 0, 1 + R :].reshape(2, 4, 4))
    assert (maps.sum((1, 2)) < 1).all()
    torch.testing.assert_close(maps.sum((1, 2)) + full[0, :, 0, : 1 + R].sum(-1), torch.ones(2))


def test_explicit_softmax_matches_sdpa(vit: nn.Module) -> None:
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        tokens = vit.prepare_tokens_with_masks(x)
        tokens = vit.blocks[0](tokens)
        attn = vit.blocks[-1].attn
        h = vit.blocks[-1].norm1(tokens)
        q, k, v = attn._split_heads(h)
        explicit = attn.attention_probs(h) @ v
    torch.testing.assert_close(explicit, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_maps_leave_the_model_unchanged(vit: nn.Module) -> None:
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        before = vit(x).clone()
        patches_before = vit.forward_features(x)["x_norm_patchtokens"].clone()
    vit.train()
    attention_maps(vit, x)
    assert vit.training  # mode restored
    vit.eval()
    assert not _has_hooks(vit)
    with torch.no_grad():
        assert torch.equal(vit(x), before)
        assert torch.equal(vit.forward_features(x)["x_norm_patchtokens"], patches_before)


def test_threshold_masks_keep_the_given_mass() -> None:
    maps = torch.tensor([[[0.5, 0.3], [0.1, 0.1]]])
    assert threshold_masks(maps, 0.6).tolist() == [[[True, True], [False, False]]]
    assert threshold_masks(maps, 1.0).all()
    # Scale does not matter: the map is normalised first.
    assert torch.equal(threshold_masks(maps * 0.2, 0.6), threshold_masks(maps, 0.6))
    with pytest.raises(ValueError):
        threshold_masks(maps, 0.0)


def test_prepare_image_sizes() -> None:
    shown, x = prepare_image(Image.new("RGB", (640, 480), (124, 116, 104)), patch_size=14, size=224)
    assert shown.size == (294, 224) and x.shape == (1, 3, 224, 294)
    assert x.abs().max() < 0.01  # the ImageNet mean colour normalises to ~0


@pytest.mark.parametrize("threshold", [None, 0.6])
def test_attention_picture_png(vit: nn.Module, tmp_path: Path, threshold: float | None) -> None:
    shown, x = prepare_image(_square_image(), vit.patch_size, 16)
    out = attention_picture(shown, attention_maps(vit, x), tmp_path / "sub" / "att.png", threshold=threshold)
    w, h = panel_size((16, 16))
    assert (w, h) == (160, 160)
    panels, gap = 2 + 2, 2  # input, 2 heads, mean
    rows = 1 if threshold is None else 2
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (panels * w + (panels - 1) * gap, rows * h + (rows - 1) * gap)
    # Many heads wrap into balanced rows: 12 heads + 2 = 14 panels -> 2 rows of 7 per group.
    out = attention_picture(shown, torch.rand(12, 4, 4), tmp_path / "many.png", threshold=threshold)
    with Image.open(out) as im:
        assert im.size == (7 * w + 6 * gap, 2 * rows * h + (2 * rows - 1) * gap)


# ------------------------------------------------------------------------------------ PCA


def _square_image(side: int = 32, lo: int = 8, hi: int = 24, seed: int = 0) -> Image.Image:
    """Dark noisy background with a bright noisy square covering pixels [lo, hi) on both axes."""
    rng = np.random.default_rng(seed)
    img = rng.integers(10, 40, size=(side, side, 3))
    img[lo:hi, lo:hi] = rng.integers(180, 255, size=(hi - lo, hi - lo, 3))
    return Image.fromarray(img.astype(np.uint8))


class PixelPatches(nn.Module):
    """A 'backbone' whose patch features are the raw pixels of each 4 x 4 patch."""

    patch_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        patches = F.unfold(x, kernel_size=4, stride=4).transpose(1, 2)  # (B, N, 3 * 16)
        return {"x_norm_patchtokens": patches}


def test_pca_features_shapes_and_direction() -> None:
    torch.manual_seed(0)
    direction = F.normalize(torch.randn(8), dim=0)
    tokens = torch.randn(2, 50, 1) * 10 * direction + 0.1 * torch.randn(2, 50, 8)
    proj = pca_features(tokens)
    assert proj.shape == (2, 50, 3)
    assert pca_features(tokens[0]).shape == (50, 3)
    # The first component is the dominant direction (up to the sign convention).
    expected = (tokens - tokens.reshape(-1, 8).mean(0)) @ direction
    corr = torch.corrcoef(torch.stack([proj[..., 0].flatten(), expected.flatten()]))[0, 1]
    assert abs(float(corr)) > 0.999
    # Deterministic signs: the largest-magnitude projection of each component is positive.
    flat = proj.reshape(-1, 3)
    assert (flat.gather(0, flat.abs().argmax(0, keepdim=True)) > 0).all()
    # Too few patches to fit: missing components are zero.
    assert pca_features(torch.randn(2, 8), fit_mask=torch.tensor([True, False]))[:, 1:].abs().max() == 0


def test_foreground_mask_sides() -> None:
    first = torch.tensor([0.0, 0.1, 0.2, 0.9, 1.0, 0.15])
    high = foreground_mask(first, 0.5, "high")
    assert high.tolist() == [False, False, False, True, True, False]
    assert torch.equal(foreground_mask(first, 0.5, "low"), ~high)
    assert torch.equal(foreground_mask(first, 0.5, "auto"), high)  # the smaller side
    assert torch.equal(foreground_mask(-first, 0.5, "auto"), high)  # whatever the sign


def test_pca_picture_finds_the_bright_square(tmp_path: Path) -> None:
    model = PixelPatches()
    result = pca_picture(model, [_square_image()], tmp_path / "pca.png", size=32)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True  # pixels 8..24 are patches 2..5
    assert torch.equal(result.masks[0], expected)
    colours = result.colours[0]
    assert colours[~expected].eq(0).all()  # background black
    assert colours[expected].float().std() > 0  # foreground coloured, not constant
    with Image.open(result.path) as im:
        assert im.size == (160, 2 * 160 + 2)


def test_pca_picture_several_images_side_by_side(tmp_path: Path) -> None:
    images = [_square_image(seed=1), _square_image(side=48, lo=4, hi=20, seed=2).crop((0, 0, 48, 32))]
    result = pca_picture(PixelPatches(), images, tmp_path / "pca2.png", size=32)
    assert [m.shape for m in result.masks] == [(8, 8), (8, 12)]
    assert all(0 < m.float().mean() < 0.5 for m in result.masks)
    with Image.open(result.path) as im:
        assert im.size == (160 + 2 + 240, 2 * 160 + 2)


def test_pca_rgb_without_foreground_and_pca_image() -> None:
    rgb, fg = pca_rgb([torch.randn(16, 8), torch.randn(4, 8)], foreground_threshold=None)
    assert [c.shape for c in rgb] == [(16, 3), (4, 3)] and all(m.all() for m in fg)
    assert pca_image(torch.randn(12, 8), (3, 4), scale=5).size == (20, 15)


# ------------------------------------------------------------------------------------ curves


def _write_metrics(run: Path, n: int = 40) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, n + 1):
        record = {
            "step": step, "loss": 10 - step / 10, "dino_local": 5.0, "dino_global": 4.0, "ibot": 3.0,
            "koleo": -0.5, "lr": 1e-4 * step, "wd": 0.04, "momentum": 0.992, "teacher_temp": 0.04,
            "images_per_s": 100.0, "skipped_images": 0, "teacher_entropy": 8.0, "prototypes_used": 50.0,
            "feature_std": 0.05,
        }
        if step == 7:
            record["loss"] = None  # non-finite values are written as null
        if step % 10 == 0:
            record["knn_top1"] = step / 100
        lines.append(json.dumps(record))
    lines.append('{"step": 41, "loss"')  # cut by a crash
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_curves_from_run_dir_and_records(tmp_path: Path) -> None:
    _write_metrics(tmp_path / "run")
    out = plot_curves(tmp_path / "run", tmp_path / "curves.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
    records = load_records(tmp_path / "run")
    assert len(records) == 40
    # Records without most keys (a DINO v1 run without health signals) still draw.
    out2 = plot_curves([{"step": 1, "loss": 3.0, "lr": 0.1}, {"step": 2, "loss": 2.0, "lr": 0.2}], tmp_path / "c2.png")
    assert out2.is_file()


def test_plot_curves_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metrics.jsonl does not exist"):
        plot_curves(tmp_path, tmp_path / "x.png")
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl holds no metric records"):
        plot_curves(tmp_path, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no metric records"):
        plot_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="none of the known metric keys"):
        plot_curves([{"step": 1, "something": 2.0}], tmp_path / "x.png")


# ------------------------------------------------------------------------------------ commands


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dinokit")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def _tiny_run(run: Path, vit: nn.Module) -> Path:
    """A run folder as `dinokit train` leaves it, as far as `resolve_backbone` reads it."""
    from safetensors.torch import save_file

    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        "model: {arch: vit_small, patch_size: 4, img_size: 16, embed_dim: 32, depth: 2, num_heads: 2,"
        f" num_register_tokens: {R}, layerscale: null}}\ncrops: {{global_size: 16}}\n"
    )
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(run / "teacher_backbone.safetensors"))
    return run


def test_viz_commands(vit: nn.Module, tmp_path: Path) -> None:
    run = _tiny_run(tmp_path / "run", vit)
    image = tmp_path / "square.png"
    _square_image(side=48).save(image)
    out = tmp_path / "pics"
    # --size defaults to the run's global crop size (16 px: a 4 x 4 grid, 160 px panels).
    argv = ["viz", "attention", str(run), str(image), "--out", str(out), "--threshold", "0.6", "--device", "cpu"]
    assert _run(argv) == 0
    with Image.open(out / "square_attention.png") as im:
        assert im.size == (4 * 160 + 3 * 2, 2 * 160 + 2)  # input, 2 heads, mean; masks below
    assert _run(["viz", "pca", str(run), str(image), str(image), "--out", str(out / "pca.png"), "--size", "32"]) == 0
    with Image.open(out / "pca.png") as im:
        assert im.size == (2 * 160 + 2, 2 * 160 + 2)
    _write_metrics(run)
    assert _run(["viz", "curves", str(run), "--out", str(out / "curves.png")]) == 0
    assert (out / "curves.png").is_file()


def test_viz_commands_name_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.warns(Warning):  # load_image warns, the command then fails naming the file
        assert _run(["viz", "attention", "dinov2_vits14", str(broken), "--out", str(tmp_path)]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert _run(["viz", "curves", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.png")]) == 2
    assert "nowhere/metrics.jsonl" in capsys.readouterr().err


def test_random_init_baseline_is_the_same_network_every_time(vit: nn.Module, tmp_path: Path) -> None:
    from dinokit.checkpoint.resolve import resolve_backbone

    with torch.no_grad():  # "trained" weights, unlike any seed's initialisation
        for p in vit.parameters():
            p.add_(0.5)
    run = _tiny_run(tmp_path / "run", vit)
    torch.manual_seed(1)
    first = resolve_backbone(run, random_init=True).model.state_dict()
    state = torch.random.get_rng_state()
    torch.manual_seed(2)  # another global RNG state: the same random weights
    again = resolve_backbone(run, random_init=True).model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    trained = resolve_backbone(run).model.state_dict()
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], trained["blocks.0.attn.qkv.weight"])
    torch.manual_seed(1)
    resolve_backbone(run, random_init=True)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG left as it was
