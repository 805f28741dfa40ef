"""Training-step throughput and peak memory (JSON out). Run by hand, never in tests.

    .venv/bin/python bench/train_step.py                    # both configurations, CPU
    .venv/bin/python bench/train_step.py --configs tiny --steps 20 --out bench/results/tiny.json
    .venv/bin/python bench/train_step.py --device cuda      # on a GPU machine

Configurations:
- `tiny`: the tiny preset as shipped (batch 64, 2 x 28 px + 6 x 12 px crops).
- `vits14`: ViT-S/14 with 2 x 224 + 8 x 98 crops at batch 8, 65,536 prototypes (the vits14
  preset with batch_size=8).

Measures the full `train_step` (teacher, student, losses, backward, clipping, AdamW, EMA) on
synthetic crops, so data loading does not enter the number. Images/s counts source images
(one image = all its crops). Peak memory: `torch.cuda.max_memory_allocated` on GPU; on CPU the
growth of the process's peak resident set size over the run (model, optimiser state and
activations), read from `resource.getrusage`.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from dinokit.config import Config, load_config, schedule_args
from dinokit.data.collate import collate_data_and_cast
from dinokit.data.masking import MaskingGenerator
from dinokit.train.loop import build_model, resolve_device, train_step
from dinokit.train.optim import build_optimizer
from dinokit.train.schedules import build_schedules
from _report import emit, machine_info  # bench/ is on sys.path when a script runs

CONFIGS = {
    "tiny": ("tiny", []),
    "vits14": ("vits14", ["optim.batch_size=8", "train.autocast=none"]),
}


def synthetic_batch(cfg: Config, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = cfg.crops
    samples = [
        (
            {
                "global_crops": [torch.randn(3, c.global_size, c.global_size, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, c.local_size, c.local_size, generator=g) for _ in range(c.local_number)],
            },
            0,
        )
        for _ in range(cfg.optim.batch_size)
    ]
    grid = c.global_size // cfg.model.patch_size
    return collate_data_and_cast(
        samples, tuple(cfg.loss.mask_ratio), cfg.loss.mask_probability, torch.float32,
        n_tokens=grid * grid, mask_generator=MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid),
        random_state=random.Random(seed),
    )


def time_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device,
               steps: int, warmup: int, first_step: int = 0) -> list[float]:
    """Seconds of each of `steps` full `train_step`s on one synthetic batch, after `warmup`."""
    schedules = build_schedules(**schedule_args(cfg))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in synthetic_batch(cfg, 0).items()}
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(model, optimizer, batch, schedules.at(first_step + i), cfg, device)  # type: ignore[arg-type]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench(name: str, device: torch.device, steps: int, warmup: int) -> dict:
    preset, overrides = CONFIGS[name]
    cfg = load_config(preset, [*overrides, f"train.device={device.type}"])
    rss_before = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    optimizer = build_optimizer(model.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    times = time_steps(model, optimizer, cfg, device, steps, warmup)
    per_step = statistics.median(times)
    result = {
        "config": name,
        "device": str(device),
        "batch_size": cfg.optim.batch_size,
        "crops": f"2x{cfg.crops.global_size} + {cfg.crops.local_number}x{cfg.crops.local_size}",
        "backbone_params": sum(p.numel() for p in model.student["backbone"].parameters()),
        "steps_timed": steps,
        "seconds_per_step_median": round(per_step, 4),
        "seconds_per_step_min": round(min(times), 4),
        "images_per_s": round(cfg.optim.batch_size / per_step, 2),
    }
    if device.type == "cuda":
        result["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        result["peak_rss_growth_mib"] = round(peak_rss_mib() - rss_before, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    report = {
        "machine": {**machine_info(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        # Run small configurations first: the CPU peak-RSS growth of a later one only shows
        # what exceeds the earlier peak.
        "results": [bench(name, device, args.steps, args.warmup) for name in args.configs],
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
