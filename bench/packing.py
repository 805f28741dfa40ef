"""Sequence packing: which block-diagonal attention, and is packing faster? (JSON out, by hand.)

    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python bench/packing.py --configs tiny \
        --out bench/results/packing_cpu_tiny.json
    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python bench/packing.py --configs vits14 \
        --candidates separate groups --rounds 3 --out bench/results/packing_cpu_vits14.json

Times the student backbone's forward + backward over all crops of a multi-crop batch (global
crops masked as in iBOT training, local crops unmasked) with each candidate, in alternating
rounds (median per candidate), and checks each candidate's outputs against separate forwards:

- `separate`: one forward per crop size (packing off).
- `groups`: packed token matrix for every per-token op, attention as one batched SDPA per group
  of equal-length crops (`dinokit.models.layers.packing`, what `packing=True` runs).
- `njt`: packed token matrix, attention through a nested jagged tensor (torch.nested, one
  sequence per crop) and SDPA.
- `flex`: packed token matrix, attention as one `flex_attention` call over all rows with a
  block-diagonal `BlockMask`, compiled by torch.compile (inductor); compile time is reported
  separately and excluded from the step times. (PyTorch 2.14 on CPU: "FlexAttention does not
  support backward on CPU", reported under `unsupported`.)

Then the whole training step (`dinokit.train.loop.train_step`: teacher, student, heads, losses,
backward, AdamW, EMA) with packing off and on. Configurations as in `bench/train_step.py`:
`tiny` (the tiny preset, batch 64, 2 x 28 + 6 x 12 px, patch 4) and `vits14` (ViT-S/14,
2 x 224 + 8 x 98 px, batch 8).

Times are CPU seconds of this process (`time.process_time`), not wall time: the project's
machines are shared, and other processes' time slices would otherwise enter the figures. Run
it single-threaded and pinned (`taskset -c 1 env OMP_NUM_THREADS=1`) so the two are the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dinokit.config import Config, load_config, schedule_args
from dinokit.models.layers import PackedLayout, attention, packed_attention
from dinokit.models.vision_transformer import VisionTransformer
from dinokit.train.loop import build_model, train_step
from dinokit.train.optim import build_optimizer
from dinokit.train.schedules import build_schedules
from train_step import CONFIGS, synthetic_batch  # bench/train_step.py: run as `python bench/packing.py`
from _report import emit, machine_info  # bench/ is on sys.path when a script runs

CANDIDATES = ("separate", "groups", "njt", "flex")


def njt_attention(qkv: Tensor, layout: PackedLayout, num_heads: int) -> Tensor:
    """Block-diagonal attention with the crops as a nested jagged tensor, one sequence per crop.

    q, k and v are made contiguous: with strided views the CPU build fails choosing a backend
    (it queries cuDNN)."""
    rows, dim = qkv.shape[0], qkv.shape[-1] // 3
    lengths = torch.tensor([t for b, t in layout.groups for _ in range(b)], device=qkv.device)
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    q, k, v = (
        torch.nested.nested_tensor_from_jagged(part.contiguous(), offsets).transpose(1, 2)
        for part in qkv.view(rows, 3, num_heads, dim // num_heads).unbind(1)
    )
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return out.values().reshape(rows, dim)


def make_flex_attention() -> Callable[[Tensor, PackedLayout, int], Tensor]:
    """flex_attention over all rows as one sequence, masked block-diagonally by crop id."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    masks: dict[PackedLayout, object] = {}

    def attend(qkv: Tensor, layout: PackedLayout, num_heads: int) -> Tensor:
        rows, dim = qkv.shape[0], qkv.shape[-1] // 3
        if layout not in masks:
            seq = torch.arange(sum(b for b, _ in layout.groups), device=qkv.device)
            crop = seq.repeat_interleave(torch.tensor([t for b, t in layout.groups for _ in range(b)], device=qkv.device))

            def same_crop(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
                return crop[q] == crop[k]

            masks[layout] = create_block_mask(same_crop, None, None, rows, rows, device=qkv.device.type)
        q, k, v = qkv.view(rows, 3, num_heads, dim // num_heads).permute(1, 2, 0, 3).unsqueeze(1).unbind(0)
        out = compiled(q, k, v, block_mask=masks[layout])
        return out[0].transpose(0, 1).reshape(rows, dim)

    return attend


def backbone_inputs(cfg: Config) -> tuple[list[Tensor], list[Tensor | None]]:
    batch = synthetic_batch(cfg, 0)
    return [batch["collated_global_crops"], batch["collated_local_crops"]], [batch["collated_masks"], None]


def fwd_bwd(model: VisionTransformer, xs: list[Tensor], masks: list[Tensor | None]) -> list[Tensor]:
    outs = model.forward_features_list(xs, masks)
    loss = sum(o["x_norm_clstoken"].square().mean() + o["x_norm_patchtokens"].square().mean() for o in outs)  # type: ignore[union-attr]
    loss.backward()  # type: ignore[union-attr]
    return [o["x_prenorm"].detach() for o in outs]  # type: ignore[union-attr]


def bench_backbone(name: str, candidates: list[str], rounds: int) -> dict:
    preset, overrides = CONFIGS[name]
    cfg = load_config(preset, [*overrides, "train.device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).student["backbone"].train()
    xs, masks = backbone_inputs(cfg)
    impls: dict[str, Callable[[Tensor, PackedLayout, int], Tensor] | None] = {
        "separate": None, "groups": packed_attention, "njt": njt_attention,
    }
    compile_s = None
    if "flex" in candidates:
        impls["flex"] = make_flex_attention()

    def run(candidate: str) -> tuple[float, list[Tensor]]:
        model.packing = candidate != "separate"
        attention.packed_attention = impls[candidate] or packed_attention  # type: ignore[assignment]
        model.zero_grad(set_to_none=True)
        t0 = time.process_time()
        outs = fwd_bwd(model, xs, masks)
        return time.process_time() - t0, outs

    # Outputs are compared without stochastic depth (the presets' drop path draws differ in
    # order between packed and separate forwards); timings run with it, as training does.
    rates = [block.sample_drop_ratio for block in model.blocks]
    for block in model.blocks:
        block.sample_drop_ratio = 0.0
    reference = run("separate")[1]
    errors, unsupported = {}, {}
    for c in list(candidates):
        try:
            seconds, outs = run(c)  # warm-up (and compilation for flex)
        except (NotImplementedError, RuntimeError) as exc:  # e.g. flex_attention has no CPU backward
            unsupported[c] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            candidates = [x for x in candidates if x != c]
            continue
        if c == "flex":
            compile_s = round(seconds, 1)
        errors[c] = max(float((a - b).abs().max()) for a, b in zip(outs, reference))
    for block, rate in zip(model.blocks, rates):
        block.sample_drop_ratio = rate
    times: dict[str, list[float]] = {c: [] for c in candidates}
    for _ in range(rounds):
        for c in candidates:
            times[c].append(run(c)[0])
    attention.packed_attention = packed_attention  # type: ignore[assignment]
    base = statistics.median(times["separate"]) if "separate" in times else None
    result = {
        "config": name,
        "crops": f"2x{cfg.crops.global_size} + {cfg.crops.local_number}x{cfg.crops.local_size}",
        "batch_size": cfg.optim.batch_size,
        "what": "student backbone forward + backward over all crops",
        "cpu_seconds_median": {c: round(statistics.median(t), 4) for c, t in times.items()},
        "speedup_vs_separate": {c: round(base / statistics.median(t), 3) for c, t in times.items()} if base else None,
        "max_abs_diff_vs_separate": errors,
    }
    if compile_s is not None:
        result["flex_first_call_seconds"] = compile_s
    if unsupported:
        result["unsupported"] = unsupported
    return result


def bench_train_step(name: str, rounds: int) -> dict:
    preset, overrides = CONFIGS[name]
    cfg = load_config(preset, [*overrides, "train.device=cpu"])
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(model.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    schedules = build_schedules(**schedule_args(cfg))
    batch = synthetic_batch(cfg, 0)
    backbone = model.student["backbone"]
    times: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(rounds + 1):
        for setting in times:
            backbone.packing = setting == "on"
            t0 = time.process_time()
            train_step(model, optimizer, batch, schedules.at(i), cfg, device)
            if i:  # round 0 warms up
                times[setting].append(time.process_time() - t0)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {
        "config": name,
        "what": "full train_step (teacher, student, losses, backward, AdamW, EMA)",
        "cpu_seconds_median": {"packing_off": round(off, 4), "packing_on": round(on, 4)},
        "images_per_s": {"packing_off": round(cfg.optim.batch_size / off, 2), "packing_on": round(cfg.optim.batch_size / on, 2)},
        "speedup": round(off / on, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-train-step", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if "separate" not in args.candidates:
        args.candidates.insert(0, "separate")
    report = {
        "machine": machine_info(),
        "backbone": [bench_backbone(name, args.candidates, args.rounds) for name in args.configs],
        "train_step": [] if args.skip_train_step else [bench_train_step(n, args.rounds) for n in args.configs],
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
