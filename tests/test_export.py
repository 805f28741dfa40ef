"""`dinokit export` to transformers / timm / ONNX, imports of their layouts, and the in-graph
positional resize: outputs compared at three sizes, weights compared bit for bit."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dinokit.checkpoint import CheckpointError
from dinokit.checkpoint.resolve import resolve_backbone
from dinokit.cli import main
from dinokit.config import load_config, save_config, vit_args_from_config
from dinokit.export import vit_args_of
from dinokit.export.command import check_sizes, export_backbone
from dinokit.models.pos_resample import resample_grid
from tests.conftest import require
from tests.test_export_parity import ARCHS, our_tokens, random_model

# The tiny families of the parity tests, with a stored grid of 4 x 4 and patch 4.
FAMILIES = list(ARCHS)


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _run_folder(tmp_path: Path, knn: float | None = 81.25) -> tuple[Path, torch.nn.Module]:
    """A run folder as `dinokit train` leaves it (config, EMA teacher backbone, metrics)."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("tiny", ["data.path=/data/garments", "model.depth=2"])
    save_config(cfg, run / "config.yaml")
    model = random_model(vit_args_from_config(cfg.model))
    _save(model, run / "teacher_backbone.safetensors")
    rows = [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.9, **({"knn_top1": knn} if knn else {})}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run, model


# ------------------------------------------------------------------ the positional resize


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, False), (0.0, True), (0.1, True)])
def test_resample_matrices_equal_pytorch_bicubic(offset: float, antialias: bool) -> None:
    torch.manual_seed(0)
    for side in (2, 4, 16, 37):
        grid = torch.randn(1, 8, side, side)
        targets = {(side, side), (side + 1, side), (1, 3), (2 * side, side + 3), (3 * side, 2 * side),
                   (max(1, side // 2), max(2, side // 3)), (max(1, side - 1), side)}
        for h, w in targets:
            if offset:
                ref = F.interpolate(grid, scale_factor=((h + offset) / side, (w + offset) / side), mode="bicubic",
                                    antialias=antialias)
            else:
                ref = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)
            if ref.shape[-2:] != (h, w):
                continue  # a scale factor that floors to another size: not a size the models ask for
            ours = resample_grid(grid[0], torch.tensor(h), torch.tensor(w), offset, antialias)
            torch.testing.assert_close(ours[None], ref, rtol=0, atol=5e-5, msg=f"{side} -> {h} x {w}")


def test_resample_matches_channels_last_where_pytorch_contiguous_kernel_differs() -> None:
    # PyTorch's contiguous antialiased kernel disagrees with its own separable result when the
    # output is one column wide (its channels-last kernel agrees): we follow the separable one.
    grid = torch.randn(1, 8, 4, 4)
    separable = F.interpolate(F.interpolate(grid, size=(2, 4), mode="bicubic", antialias=True), size=(2, 1),
                              mode="bicubic", antialias=True)
    channels_last = F.interpolate(grid.contiguous(memory_format=torch.channels_last), size=(2, 1), mode="bicubic",
                                  antialias=True)
    ours = resample_grid(grid[0], torch.tensor(2), torch.tensor(1), 0.0, True)[None]
    torch.testing.assert_close(ours, separable, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, channels_last, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ export + check


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_graph_matches_at_three_sizes(tmp_path: Path, family: str) -> None:
    require("onnxruntime")
    model = random_model(ARCHS[family])
    report = export_backbone(_fake_run(tmp_path, model), "onnx", tmp_path / "onnx")
    assert [(c.height, c.width) for c in report.checks] == check_sizes(model) == [(16, 16), (24, 24), (16, 24)]
    for check in report.checks:  # the graph resizes positions by the model's own rule: no excuse
        assert check.rule_diff is None and check.max_abs_diff <= 1e-4, check
    import onnx

    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    assert [o.name for o in graph.output] == (["cls_token", "patch_tokens"]
                                               + (["register_tokens"] if model.num_register_tokens else []))
    assert not any(node.op_type == "Resize" for node in graph.node)


@pytest.mark.parametrize("target", ["hf", "timm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_is_bitwise_and_outputs_match(tmp_path: Path, family: str, target: str) -> None:
    require({"hf": "transformers", "timm": "timm"}[target])
    model = random_model(ARCHS[family])
    run = _fake_run(tmp_path, model)
    report = export_backbone(run, target, tmp_path / target)
    assert report.passed, report.lines()
    for check in report.checks:
        # Where the library's resampling rule is the model's, the tokens themselves match.
        assert (check.rule_diff if check.rule_diff is not None else check.max_abs_diff) <= 1e-5, check
    back = resolve_backbone(tmp_path / target).model
    original = model.state_dict()
    assert back.state_dict().keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(back.state_dict()[key], value), key
    assert vit_args_of(back) == vit_args_of(model)  # resampling rule included
    x = torch.randn(2, 3, 16, 28)
    with torch.no_grad():
        torch.testing.assert_close(our_tokens(back, x), our_tokens(model, x), rtol=0, atol=1e-5)


def _fake_run(tmp_path: Path, model: torch.nn.Module) -> Path:
    """A run folder whose config describes `model` (any of the tiny families)."""
    run = tmp_path / "run"
    run.mkdir()
    args = vit_args_of(model)
    ffn = "swiglufused" if args.ffn_layer != "mlp" else "mlp"
    overrides = [f"model.embed_dim={args.embed_dim}", f"model.depth={args.depth}", f"model.num_heads={args.num_heads}",
                 f"model.patch_size={args.patch_size}", f"model.img_size={args.img_size}",
                 f"crops.global_size={args.img_size}", f"crops.local_size={args.patch_size * 2}",
                 f"model.ffn_layer={ffn}", f"model.num_register_tokens={args.num_register_tokens}",
                 f"model.interpolate_offset={args.interpolate_offset}",
                 f"model.interpolate_antialias={args.interpolate_antialias}",
                 f"model.layerscale={args.init_values if args.init_values else 'null'}"]
    if not args.use_mask_token:
        overrides += ["loss.mode=dino", "loss.ibot_weight=0", "loss.koleo_weight=0"]
    cfg = load_config("tiny", overrides)
    save_config(cfg, run / "config.yaml")
    _save(model, run / "teacher_backbone.safetensors")
    return run


def test_hf_folder_loads_with_auto_classes_and_states_the_run(tmp_path: Path) -> None:
    require("transformers")
    from transformers import AutoImageProcessor, AutoModel

    run, model = _run_folder(tmp_path)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--to", "hf", "--out", str(out)]) == 0
    peer = AutoModel.from_pretrained(str(out), local_files_only=True)
    assert type(peer).__name__ == "Dinov2Model"
    processor = AutoImageProcessor.from_pretrained(str(out), local_files_only=True)
    assert processor.crop_size == {"height": 28, "width": 28} and processor.size == {"shortest_edge": 32}
    assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
    card = (out / "README.md").read_text()
    assert "/data/garments" in card and "81.25 %" in card and "steps trained: 20" in card
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and len(parity["checks"]) == 3
    assert (out / "dinokit_config.yaml").read_text() == (run / "config.yaml").read_text()


def test_export_refuses_a_folder_with_files_and_fails_above_tolerance(tmp_path: Path, capsys) -> None:
    require("onnxruntime")
    run, _ = _run_folder(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--to", "onnx", "--out", str(busy)]) == 2
    assert (busy / "keep.txt").read_text() == "mine"
    assert "not an empty folder" in capsys.readouterr().err
    # A zero tolerance cannot be met by a graph that reorders float sums: the command says so.
    assert main(["export", str(run), "--to", "onnx", "--out", str(tmp_path / "strict"), "--tolerance", "0"]) == 1
    assert "differ from dinokit's beyond 0" in capsys.readouterr().err
    assert json.loads((tmp_path / "strict" / "parity.json").read_text())["passed"] is False


# ------------------------------------------------------------------ imports of foreign layouts


def test_transformers_folder_of_its_own_making_imports_with_its_outputs(tmp_path: Path) -> None:
    require("transformers")
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
                  layerscale_value=0.5)
    for peer in (Dinov2Model(Dinov2Config(**common)),
                 Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**common, num_register_tokens=2)),
                 Dinov2Model(Dinov2Config(**common, use_swiglu_ffn=True))):
        with torch.no_grad():
            for p in peer.parameters():
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
        folder = tmp_path / type(peer).__name__ / str(peer.config.use_swiglu_ffn)
        peer.eval().save_pretrained(str(folder))
        ours = resolve_backbone(folder).model
        for h, w in ((16, 16), (24, 24), (16, 28)):
            x = torch.randn(2, 3, h, w)
            with torch.no_grad():
                torch.testing.assert_close(our_tokens(ours, x), peer(pixel_values=x).last_hidden_state,
                                           rtol=1e-5, atol=1e-5)


def test_a_timm_file_of_another_depth_names_the_missing_blocks(tmp_path: Path) -> None:
    require("timm")
    import timm

    peer = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, num_classes=0, depth=2)
    file = tmp_path / "two_blocks.safetensors"
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(file))
    with pytest.raises(CheckpointError, match=r"140 missing keys: blocks\.2\.norm1"):
        resolve_backbone(file, arch="dinov2_vits14_reg")


def test_timm_files_of_the_official_depth_give_timms_outputs(tmp_path: Path) -> None:
    require("timm")
    import timm

    torch.manual_seed(0)
    for name, arch in (("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg"), ("vit_small_patch14_dinov2", "dinov2_vits14")):
        peer = timm.create_model(name, pretrained=False, img_size=28, num_classes=0, dynamic_img_size=True).eval()
        with torch.no_grad():
            for p in peer.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        file = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(file))
        ours = resolve_backbone(file, arch=arch).model
        if "reg" not in name:  # the official rule (+0.1) is not timm's; compare where no resize happens
            sizes = [(28, 28)]
        else:
            sizes = [(28, 28), (42, 42), (28, 42)]
        for h, w in sizes:
            x = torch.randn(1, 3, h, w)
            with torch.no_grad():
                torch.testing.assert_close(our_tokens(ours, x), peer.forward_features(x), rtol=1e-5, atol=1e-5)


def test_a_file_of_another_model_names_its_keys_and_loads_nothing(tmp_path: Path) -> None:
    file = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, str(file))
    with pytest.raises(CheckpointError, match=r"missing keys: .*unexpected keys: conv1\.weight, fc\.weight"):
        resolve_backbone(file, arch="dinov2_vits14")
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="config.json holds model_type 'bert', not a transformers DINOv2"):
        resolve_backbone(folder)


# ------------------------------------------------------------------ torch.hub


def test_torch_hub_loads_official_names_and_run_folders(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", repo / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert all(callable(getattr(hubconf, name)) for name in ("dinov2_vits14", "dinov2_vitg14_reg", "dino_vitb8", "from_run"))
    run, model = _run_folder(tmp_path)
    loaded = torch.hub.load(str(repo), "from_run", source="local", run=str(run))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    official = random_model(replace(vit_args_of(torch.hub.load(str(repo), "dinov2_vits14_reg", source="local")),
                                    img_size=56, depth=2))
    file = _save(official, tmp_path / "s14reg.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: blocks.2"):  # the named architecture is enforced
        torch.hub.load(str(repo), "dinov2_vits14_reg", source="local", weights=str(file))


def test_training_commands_take_library_folders_as_weights(tmp_path: Path) -> None:
    """`train --init` and `distill --teacher` read a transformers / timm folder's architecture and weights."""
    require("transformers")
    from dinokit.checkpoint.sources import read_weights
    from dinokit.config import vit_args_from_config as args_of_section
    from dinokit.train.distill import teacher_model_config

    run, model = _run_folder(tmp_path)
    for target in ("hf", "timm"):
        require({"hf": "transformers", "timm": "timm"}[target])
        out = tmp_path / target
        assert export_backbone(run, target, out).passed
        weights = read_weights(out)
        assert weights.heads == {}  # the libraries keep no DINO heads
        for key, value in model.state_dict().items():
            assert torch.equal(weights.backbone[key], value), key
        cfg = load_config("tiny", [f"distill.teacher={out}", "distill.students=[depth=2]"])
        assert args_of_section(teacher_model_config(cfg)) == vit_args_of(model)
