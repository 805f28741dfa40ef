"""`dinokit export BACKBONE --to hf|timm|onnx --out FOLDER`: write, then prove the outputs.

After writing, the target is loaded the way its users load it (`AutoModel.from_pretrained`,
`timm.create_model("local-dir:...")`, an onnxruntime session) and run on the same random images
as the dinokit backbone at three sizes: the stored grid's, a larger square one and a non-square
one. The largest absolute difference over all output tokens ([CLS], registers, patches, after
the final norm) is printed per size and written to `FOLDER/parity.json`.

Where the target resizes positions by another rule than the model's (transformers and timm
resize by output size; DINOv2 and dinokit's default add +0.1 to the target grid), its tokens at
the other sizes differ by that rule, not by the weights: the check then also compares with the
dinokit model run with the target's rule, and that difference is the one held to the tolerance.
`--img-size N` stores the grid for N px instead, so that N is exact for every target.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from dinokit.checkpoint.resolve import ResolvedBackbone, resolve_backbone
from dinokit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinokit.export import Resampling, model_resampling, state_dict_for_size, stored_img_size, vit_args_of
from dinokit.models.vision_transformer import VisionTransformer

__all__ = ["TARGETS", "TOLERANCE", "ExportReport", "export_backbone"]

TARGETS = ("hf", "timm", "onnx")
# Largest |difference| accepted, per target, on unit-scale tokens (after the final LayerNorm):
# float32 reordering across 40 blocks stays well below it, a wrong key or rule does not.
TOLERANCE = {"hf": 1e-4, "timm": 1e-4, "onnx": 1e-4}
_IMPORT_HINT = {"hf": "transformers", "timm": "timm", "onnx": "onnxruntime"}


class ExportError(Exception):
    """The export cannot be written or its outputs are not the model's; the message says why."""


@dataclass
class SizeCheck:
    height: int
    width: int
    max_abs_diff: float  # target vs the dinokit model
    rule_diff: float | None = None  # target vs the dinokit model run with the target's rule
    passed: bool = False


@dataclass
class ExportReport:
    target: str
    out: Path
    source: str
    tolerance: float
    target_resampling: Resampling
    model_resampling: Resampling
    checks: list[SizeCheck] = field(default_factory=list)
    usage: str = ""

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def lines(self) -> list[str]:
        out = [f"{self.target} export of {self.source} -> {self.out}"]
        for c in self.checks:
            extra = "" if c.rule_diff is None else f" (target's resampling rule: {c.rule_diff:.2e})"
            out.append(f"  {c.height}x{c.width}: max |diff| {c.max_abs_diff:.2e}{extra} "
                       f"{'ok' if c.passed else 'ABOVE'} tolerance {self.tolerance:g}")
        return out

    def to_json(self) -> dict:
        data = asdict(self)
        data["out"] = str(self.out)
        data["passed"] = self.passed
        return data


def check_sizes(model: VisionTransformer) -> list[tuple[int, int]]:
    """The stored grid's size, a larger square one and a non-square one (multiples of the patch)."""
    p, grid = model.patch_size, model.pos_grid
    larger = p * max(grid + 1, round(grid * 1.5))
    return [(p * grid, p * grid), (larger, larger), (p * grid, larger)]


def export_backbone(spec: str | Path, target: str, out: Path, arch: str | None = None, img_size: int | None = None,
                    tolerance: float | None = None, seed: int = 0) -> ExportReport:
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    try:
        __import__(_IMPORT_HINT[target])
    except ImportError as exc:
        raise ExportError(f"--to {target} needs {_IMPORT_HINT[target]} (pip install 'dinokit[export]')") from exc
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder; choose a new --out")
    resolved = resolve_backbone(spec, arch=arch)
    if not isinstance(resolved.model, VisionTransformer):
        raise ExportError(f"{spec}: export writes ViT backbones; {type(resolved.model).__name__} is not one "
                          "(a ResNet-50 is already in torchvision's layout: load teacher_backbone.safetensors into "
                          "torchvision.models.resnet50 with fc = Identity)")
    model = _with_grid(resolved.model, img_size) if img_size else resolved.model
    image_size = img_size or resolved.image_size
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = _write_and_check(model, resolved, target, out, image_size,
                                  TOLERANCE[target] if tolerance is None else tolerance, seed)
    except Exception:
        if created:  # a folder this command made and filled only partly
            shutil.rmtree(out, ignore_errors=True)
        raise
    (out / "parity.json").write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    return report


def _with_grid(model: VisionTransformer, img_size: int) -> VisionTransformer:
    baked = replace(vit_args_of(model), img_size=img_size).build()
    baked.load_state_dict(state_dict_for_size(model, img_size))
    return baked.eval()


def _write_and_check(model: VisionTransformer, resolved: ResolvedBackbone, target: str, out: Path,
                     image_size: int, tolerance: float, seed: int) -> ExportReport:
    resize = round(image_size * 256 / 224)
    norm = (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    if target == "hf":
        from transformers.utils import logging as hf_logging

        from dinokit.export.hf import hf_resampling, write_hf_folder

        hf_logging.disable_progress_bar()
        write_hf_folder(model, out, image_size, resize, *norm)
        rule = hf_resampling(model.num_register_tokens)
        run = _hf_runner(out)
        usage = ("from transformers import AutoModel, AutoImageProcessor\n"
                 f"model = AutoModel.from_pretrained(\"{out.resolve()}\", local_files_only=True)\n"
                 f"processor = AutoImageProcessor.from_pretrained(\"{out.resolve()}\", local_files_only=True)\n"
                 "tokens = model(**processor(images, return_tensors=\"pt\")).last_hidden_state  # [CLS, registers, patches]\n")
    elif target == "timm":
        from dinokit.export.timm import timm_resampling, write_timm_folder

        usage = write_timm_folder(model, out, image_size, resize, *norm)
        rule = timm_resampling()
        run = _timm_runner(out)
    else:
        from dinokit.export.onnx import export_onnx

        export_onnx(model, out / "model.onnx", stored_img_size(model))
        rule = model_resampling(model)
        run = _onnx_runner(out / "model.onnx")
        usage = ("import onnxruntime\n"
                 f"session = onnxruntime.InferenceSession(\"{(out / 'model.onnx').resolve()}\")\n"
                 "cls_token, patch_tokens, *registers = session.run(None, {\"images\": images})  # float32 NCHW\n")
    (out / "USAGE.py").write_text(usage)
    report = ExportReport(target, out, resolved.source, tolerance, rule, model_resampling(model), usage=usage)
    report.checks = _compare(model, run, rule, tolerance, seed)
    _write_card(report, resolved, model, image_size)
    return report


def _tokens(model: VisionTransformer, x: Tensor) -> Tensor:
    with torch.no_grad():
        o = model.forward_features(x)
    return torch.cat([o["x_norm_clstoken"][:, None], o["x_norm_regtokens"], o["x_norm_patchtokens"]], dim=1)


def _compare(model: VisionTransformer, run: Callable[[Tensor], Tensor], rule: Resampling, tolerance: float,
             seed: int) -> list[SizeCheck]:
    same_rule = rule == model_resampling(model)
    ruled = model
    if not same_rule:
        ruled = copy.deepcopy(model)
        ruled.interpolate_offset, ruled.interpolate_antialias = rule.offset, rule.antialias
    generator = torch.Generator().manual_seed(seed)
    checks = []
    for h, w in check_sizes(model):
        x = torch.randn(2, model.patch_embed.proj.in_channels, h, w, generator=generator)
        got = run(x)
        diff = float((got - _tokens(model, x)).abs().max())
        check = SizeCheck(h, w, diff)
        if same_rule or (h == w and h == stored_img_size(model)):
            check.passed = diff <= tolerance
        else:
            check.rule_diff = float((got - _tokens(ruled, x)).abs().max())
            check.passed = check.rule_diff <= tolerance
        checks.append(check)
    return checks


def _hf_runner(out: Path) -> Callable[[Tensor], Tensor]:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    peer = AutoModel.from_pretrained(str(out), local_files_only=True).eval()

    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return peer(pixel_values=x).last_hidden_state

    return run


def _timm_runner(out: Path) -> Callable[[Tensor], Tensor]:
    import timm

    peer = timm.create_model(f"local-dir:{out.resolve()}", pretrained=True).eval()

    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return peer.forward_features(x)

    return run


def _onnx_runner(path: Path) -> Callable[[Tensor], Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Tensor:
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": x.numpy()})))
        parts = [outputs["cls_token"][:, None], outputs.get("register_tokens", np.zeros((x.shape[0], 0, 1))),
                 outputs["patch_tokens"]]
        parts = [p for p in parts if p.shape[1]]
        return torch.from_numpy(np.concatenate(parts, axis=1))

    return run


def _run_facts(source: Path) -> list[str]:
    """What a run folder says about how the backbone was trained (for the model card)."""
    config = source / "config.yaml"
    if not config.is_file():
        return [f"- weights: `{source}`"]
    from dinokit.config import load_config_file

    cfg = load_config_file(config)
    facts = [f"- trained by dinokit from `{source}` (its `config.yaml` is copied here as `dinokit_config.yaml`)",
             f"- training data: `{cfg.data.path}`" + (f" ({cfg.data.dataset})" if cfg.data.dataset else ""),
             f"- model: {cfg.model.arch}, patch {cfg.model.patch_size}, {cfg.model.depth} blocks, "
             f"width {cfg.model.embed_dim}; loss {cfg.loss.mode}; global crops {cfg.crops.global_size} px"]
    metrics = source / "metrics.jsonl"
    if metrics.is_file():
        last_step, last_knn = None, None
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            last_step = row.get("step", last_step)
            if "knn_top1" in row:
                last_knn = (row["step"], row["knn_top1"])
        if last_step is not None:
            facts.append(f"- steps trained: {last_step}")
        facts.append(f"- last online k-NN top-1: {last_knn[1]:.2f} % at step {last_knn[0]}" if last_knn
                     else "- online k-NN: not recorded in this run")
    return facts


def _write_card(report: ExportReport, resolved: ResolvedBackbone, model: VisionTransformer, image_size: int) -> None:
    source = Path(resolved.source)
    run_dir = source.parent if source.name == "teacher_backbone.safetensors" else source
    if (run_dir / "config.yaml").is_file():
        shutil.copyfile(run_dir / "config.yaml", report.out / "dinokit_config.yaml")
    rows = "\n".join(f"| {c.height} x {c.width} | {c.max_abs_diff:.2e} | "
                     f"{'-' if c.rule_diff is None else f'{c.rule_diff:.2e}'} | {'yes' if c.passed else 'NO'} |"
                     for c in report.checks)
    card = f"""# DINOv2-style ViT backbone exported by dinokit ({report.target})

{chr(10).join(_run_facts(run_dir))}
- evaluation crop: {image_size} px (resize {round(image_size * 256 / 224)}, bicubic), ImageNet mean / std
- positional grid stored for {stored_img_size(model)} px; other sizes are resized by the target's rule
  (offset {report.target_resampling.offset}, antialias {report.target_resampling.antialias}); the model's own
  rule is offset {report.model_resampling.offset}, antialias {report.model_resampling.antialias}

## Use

```python
{report.usage}```

## Outputs checked against dinokit (random images, tolerance {report.tolerance:g})

| input | max abs diff | with the target's rule | within |
|---|---|---|---|
{rows}
"""
    (report.out / "README.md").write_text(card)
