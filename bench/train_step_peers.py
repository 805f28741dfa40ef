"""DINOv2 training step: dinokit against lightly's DINOv2 pipeline at equal configuration (JSON out).

    .venv/bin/python bench/train_step_peers.py --out bench/results/train_step_peers.json
    .venv/bin/python bench/train_step_peers.py --configs vit_tiny16 --precisions fp32 --malloc tuned \
        --rounds 2 --steps 1                         # a quick look

Each framework runs in its own worker process (so peak RSS, `resource.getrusage` maxrss, is per
framework) and both keep their model between rounds; the parent alternates them: round r runs
`--steps` steps of one, then of the other (who goes first alternates too), so drifts of a shared
machine hit both alike. Reported: median seconds per step over the timed rounds, images/s
(source images: one image = all its crops), peak RSS, model FLOPs per step (counted once per
framework with `FlopCounterMode`, see bench/flops.py), MFU against the GEMM peak of the step's
precision (bench/gemm_peak.py, measured at the start and the end of the run, the better one),
and the ratios dinokit / lightly.

The same work on both sides, built from one dinokit `Config` (`CONFIGS` below):
- dinokit: `dinokit.train.loop.build_model` + `train_step` (teacher, student, DINO + iBOT + KoLeo,
  backward, per-module clipping at optim.clip_grad, AdamW, EMA), optimiser from `build_optimizer`.
- lightly 1.6, as its examples/pytorch/dinov2.py: a timm `VisionTransformer` (same sizes,
  LayerScale, drop path, learned positions, `dynamic_img_size`) in `MaskedVisionTransformerTIMM`,
  `DINOv2ProjectionHead`s (shared DINO / iBOT head, same sizes and prototypes), `DINOLoss` +
  `IBOTPatchLoss` + `KoLeoLoss` (0.1), `AdamW(model.parameters())`, `update_momentum` EMA; plus
  the same gradient clipping as dinokit so the work matches.
- Teacher targets by EMA centering on both (lightly has no Sinkhorn-Knopp): `loss.centering=centering`.
- Identical synthetic crops and the same iBOT block masks (drawn by dinokit's collate) on both;
  no data loading enters the number. Autocast (bf16) wraps the forward passes and losses on both.

`--malloc`: `default` runs both workers with glibc's allocator as it comes; `tuned` raises the
mmap / trim thresholds (`TUNED_MALLOC`, environment only), which stops large activations from
being unmapped and re-faulted every step; `both` runs each. The summary compares dinokit's best
setting with lightly's best (a peer is compared at its best, allocator tuning included).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _report import emit, machine_info  # bench/ is on sys.path when a script runs

BENCH = Path(__file__).resolve().parent
FRAMEWORKS = ("dinokit", "lightly")
# name -> (preset, overrides). "vit_tiny16" and "vits14" are the peer configurations of docs/benchmarks.md.
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "tiny": ("tiny", []),
    "vit_tiny16": ("vits14", ["model.arch=vit_tiny", "model.patch_size=16", "model.img_size=96",
                              "crops.global_size=96", "crops.local_size=48", "optim.batch_size=32"]),
    "vits14": ("vits14", ["optim.batch_size=8"]),
}
COMMON = ["loss.centering=centering", "train.device=cpu"]
PRECISIONS = {"fp32": "none", "bf16": "bf16"}
TUNED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),  # serve large tensors from the heap, not fresh mmaps
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),  # and keep freed heap memory for the next step
    "MALLOC_TOP_PAD_": str(256 << 20),
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load(name: str, precision: str) -> Any:
    from dinokit.config import load_config

    preset, overrides = CONFIGS[name]
    return load_config(preset, [*overrides, *COMMON, f"train.autocast={PRECISIONS[precision]}"])


# ------------------------------------------------------------------------------ the two steps


class DinokitStep:
    """dinokit's public training step on a fixed synthetic batch."""

    def __init__(self, cfg: Any) -> None:
        from train_step import synthetic_batch

        from dinokit.config import schedule_args
        from dinokit.train.loop import build_model
        from dinokit.train.optim import build_optimizer
        from dinokit.train.schedules import build_schedules

        self.cfg, self.device = cfg, torch.device("cpu")
        self.model = build_model(cfg).train()
        self.optimizer = build_optimizer(
            self.model.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult,
            betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
        )
        self.schedules = build_schedules(**schedule_args(cfg))
        self.batch = synthetic_batch(cfg, 0)
        self.i = 0

    def __call__(self) -> None:
        from dinokit.train.loop import train_step

        train_step(self.model, self.optimizer, self.batch, self.schedules.at(self.i), self.cfg, self.device)
        self.i += 1

    def forward_backward(self) -> None:
        """What FLOPs are counted on: forward passes, losses and backward of one step."""
        with torch.autocast("cpu", torch.bfloat16, enabled=self.cfg.train.autocast == "bf16"):
            terms, _ = self.model(self.batch, self.schedules.at(0)["teacher_temp"])
        terms["total"].backward()
        self.model.zero_grad(set_to_none=True)


class LightlyStep:
    """lightly 1.6's DINOv2 example step (examples/pytorch/dinov2.py) on the same batch."""

    def __init__(self, cfg: Any) -> None:
        from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
        from lightly.models.modules import (
            DINOv2ProjectionHead,
            MaskedVisionTransformerTIMM,
        )
        from lightly.models.utils import update_drop_path_rate
        from timm.models.vision_transformer import VisionTransformer
        from train_step import synthetic_batch

        from dinokit.config import vit_args_from_config

        if cfg.head.nlayers != 3 or cfg.loss.separate_ibot_head:
            raise ValueError("lightly's DINOv2ProjectionHead has 3 layers and the example shares it with iBOT")
        self.cfg = cfg
        args = vit_args_from_config(cfg.model)
        vit = VisionTransformer(
            img_size=cfg.crops.global_size, patch_size=args.patch_size, embed_dim=args.embed_dim,
            depth=args.depth, num_heads=args.num_heads, mlp_ratio=args.mlp_ratio, qkv_bias=args.qkv_bias,
            init_values=args.init_values, num_classes=0, pos_embed="learn", dynamic_img_size=True,
        )
        self.teacher_backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")
        self.student_backbone = copy.deepcopy(self.teacher_backbone)
        if args.drop_path_rate > 0:
            mode = "uniform" if args.drop_path_uniform else "linear"
            update_drop_path_rate(self.student_backbone.vit, drop_path_rate=args.drop_path_rate, mode=mode)
        h = cfg.head
        # Two heads, as the example (the legacy weight_norm cannot be deep-copied).
        self.student_head, self.teacher_head = (
            DINOv2ProjectionHead(args.embed_dim, h.hidden_dim, h.bottleneck_dim, h.out_dim) for _ in range(2)
        )
        for module in (self.teacher_backbone, self.teacher_head):
            module.requires_grad_(False)
            module.eval()
        self.model = torch.nn.ModuleList([self.teacher_backbone, self.student_backbone, self.teacher_head, self.student_head])
        self.dino_loss = DINOLoss(output_dim=h.out_dim)
        self.ibot_loss = IBOTPatchLoss(output_dim=h.out_dim)
        self.koleo_loss = KoLeoLoss()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.001)

        batch = synthetic_batch(cfg, 0)  # the crops and block masks dinokit gets
        self.global_views, self.local_views = batch["collated_global_crops"], batch["collated_local_crops"]
        self.n_views = 2 + cfg.crops.local_number
        grid = cfg.crops.global_size // args.patch_size
        self.block_mask = batch["collated_masks"].view(-1, grid, grid)
        self.mask = torch.zeros(self.block_mask.shape[0], 1 + grid * grid, dtype=torch.bool)
        self.mask[:, 1:] = self.block_mask.flatten(1)
        self.teacher_temp = cfg.teacher.warmup_teacher_temp

    def loss(self) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16, enabled=self.cfg.train.autocast == "bf16"):
            with torch.no_grad():
                t_features = self.teacher_backbone.encode(self.global_views)
                t_cls_out = self.teacher_head(t_features[:, 0])
                t_masked_out = self.teacher_head(t_features[self.mask])
            s_features = self.student_backbone.encode(self.global_views, mask=self.mask)
            s_global_cls = s_features[:, 0]
            s_global_out = self.student_head(s_global_cls)
            s_masked_out = self.student_head(s_features[self.mask])
            s_local_out = self.student_head(self.student_backbone.encode(self.local_views)[:, 0])
            s_cls_out = torch.cat([s_global_out, s_local_out])
            dino = self.dino_loss(teacher_out=list(t_cls_out.chunk(2)), student_out=list(s_cls_out.chunk(self.n_views)),
                                  teacher_temp=self.teacher_temp)
            ibot = self.ibot_loss(teacher_out=t_masked_out, student_out=s_masked_out, mask=self.block_mask,
                                  teacher_temp=self.teacher_temp)
            koleo = 0.1 * sum(self.koleo_loss(t) for t in s_global_cls.chunk(2))
            return dino + ibot + koleo

    def __call__(self) -> None:
        from lightly.models.utils import update_momentum

        self.loss().backward()
        if self.cfg.optim.clip_grad > 0:
            for module in (self.student_backbone, self.student_head):
                torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.optim.clip_grad)
        for group in self.optimizer.param_groups:  # the example's weight-decay schedule
            group["weight_decay"] = self.cfg.optim.weight_decay
        self.optimizer.step()
        self.optimizer.zero_grad()
        update_momentum(self.student_backbone, self.teacher_backbone, m=0.992)
        update_momentum(self.student_head, self.teacher_head, m=0.992)

    def forward_backward(self) -> None:
        self.loss().backward()
        self.optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------ worker process


def worker(framework: str, config: str, precision: str, threads: int | None) -> int:
    """Build one framework's step, then serve `run K` / `flops` / `quit` lines from stdin;
    each answer is one JSON line prefixed with '@@ ' on stdout."""
    sys.path.insert(0, str(BENCH))
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    step = (DinokitStep if framework == "dinokit" else LightlyStep)(load(config, precision))

    def reply(obj: dict) -> None:
        print("@@ " + json.dumps(obj), flush=True)

    reply({"ready": True, "rss_after_build_mib": round(peak_rss_mib(), 1), "threads": torch.get_num_threads()})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            times = []
            for _ in range(int(cmd[1])):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            reply({"times": times})
        elif cmd[0] == "flops":
            from flops import count_flops

            total, by_op = count_flops(step.forward_backward)
            reply({"flops": total, "by_op": by_op})
        elif cmd[0] == "quit":
            reply({"peak_rss_mib": round(peak_rss_mib(), 1)})
            return 0
    return 1


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, framework: str, config: str, precision: str, env: dict[str, str], threads: int | None) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", framework,
               "--configs", config, "--precisions", precision]
        if threads:
            cmd += ["--threads", str(threads)]
        self.name = framework
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, command: str | None = None) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise RuntimeError(f"{self.name} worker exited with code {self.proc.wait()}")


def malloc_env(kind: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
    if kind == "tuned":
        env.update(TUNED_MALLOC)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH.parent), env.get("PYTHONPATH", "")]))
    return env


def compare(config: str, precision: str, malloc: str, rounds: int, steps: int, warmup: int,
            threads: int | None) -> dict:
    """Alternating rounds of both frameworks at one configuration, precision and allocator setting."""
    env = malloc_env(malloc)
    workers = {fw: Worker(fw, config, precision, env, threads) for fw in FRAMEWORKS}
    try:
        return _alternate(workers, config, precision, malloc, rounds, steps, warmup)
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()


def _alternate(workers: dict[str, Worker], config: str, precision: str, malloc: str, rounds: int, steps: int,
               warmup: int) -> dict:
    ready = {fw: w.ask() for fw, w in workers.items()}
    flops = {fw: w.ask("flops") for fw, w in workers.items()}  # doubles as the first warm-up step
    for w in workers.values():
        if warmup:
            w.ask(f"run {warmup}")
    times: dict[str, list[float]] = {fw: [] for fw in FRAMEWORKS}
    for r in range(rounds):
        order = FRAMEWORKS if r % 2 == 0 else FRAMEWORKS[::-1]
        for fw in order:
            times[fw] += workers[fw].ask(f"run {steps}")["times"]
    cfg = load(config, precision)
    batch = cfg.optim.batch_size
    out: dict[str, Any] = {"config": config, "precision": precision, "malloc": malloc, "batch_size": batch,
                           "crops": f"2x{cfg.crops.global_size} + {cfg.crops.local_number}x{cfg.crops.local_size}",
                           "prototypes": cfg.head.out_dim}
    for fw, w in workers.items():
        end = w.ask("quit")
        w.proc.wait()
        per_step = statistics.median(times[fw])
        achieved = flops[fw]["flops"] / per_step / 1e9
        out[fw] = {
            "seconds_per_step_median": round(per_step, 4),
            "seconds_per_step": [round(t, 4) for t in times[fw]],
            "images_per_s": round(batch / per_step, 2),
            "gflop_per_step": round(flops[fw]["flops"] / 1e9, 2),
            "gflop_per_s": round(achieved, 1),
            "rss_after_build_mib": ready[fw]["rss_after_build_mib"],
            "peak_rss_mib": end["peak_rss_mib"],
            "threads": ready[fw]["threads"],
            "gflop_by_op": {k: round(v / 1e9, 2) for k, v in flops[fw]["by_op"].items()},
        }
    out["speed_ratio"] = round(out["dinokit"]["images_per_s"] / out["lightly"]["images_per_s"], 2)
    out["memory_ratio"] = round(out["dinokit"]["peak_rss_mib"] / out["lightly"]["peak_rss_mib"], 2)
    return out


def summary(results: list[dict]) -> list[dict]:
    """Per configuration and precision: each framework's best allocator setting, and the ratio."""
    rows = []
    for key in dict.fromkeys((r["config"], r["precision"]) for r in results):
        runs = [r for r in results if (r["config"], r["precision"]) == key]
        best = {fw: max(runs, key=lambda r: r[fw]["images_per_s"]) for fw in FRAMEWORKS}
        row: dict[str, Any] = {"config": key[0], "precision": key[1]}
        for fw in FRAMEWORKS:
            row[fw] = {"images_per_s": best[fw][fw]["images_per_s"], "malloc": best[fw]["malloc"],
                       "mfu": best[fw][fw]["mfu"], "peak_rss_mib": best[fw][fw]["peak_rss_mib"]}
        row["speed_ratio_best_vs_best"] = round(row["dinokit"]["images_per_s"] / row["lightly"]["images_per_s"], 2)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["vit_tiny16", "vits14", "tiny"], choices=list(CONFIGS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS))
    parser.add_argument("--malloc", choices=["default", "tuned", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per framework")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the FLOP-counting step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.configs[0], args.precisions[0], args.threads)

    sys.path.insert(0, str(BENCH))
    from gemm_peak import gemm_peaks

    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = gemm_peaks(repeats=5)
    mallocs = ["default", "tuned"] if args.malloc == "both" else [args.malloc]
    results = []
    for config in args.configs:
        for precision in args.precisions:
            for malloc in mallocs:
                results.append(compare(config, precision, malloc, args.rounds, args.steps, args.warmup, args.threads))
                r = results[-1]
                print(f"{config} {precision} malloc={malloc}: dinokit {r['dinokit']['images_per_s']} img/s, "
                      f"lightly {r['lightly']['images_per_s']} img/s, x{r['speed_ratio']}", file=sys.stderr)
    # Measured again at the end: on a shared machine the better of the two is the chip's limit,
    # and the gap between them says how noisy the run was.
    peaks_end = gemm_peaks(repeats=5)
    for r in results:
        best = max(peaks[f"{r['precision']}_peak"], peaks_end[f"{r['precision']}_peak"])
        for fw in FRAMEWORKS:
            r[fw]["mfu"] = round(r[fw]["gflop_per_s"] / best, 3)
            r[fw]["mfu_peak_gflops"] = best
    report = {
        "machine": machine_info(),
        "gemm_peak": {"start": peaks, "end": peaks_end},
        "tuned_malloc_env": TUNED_MALLOC,
        "rounds": args.rounds, "steps_per_round": args.steps,
        "summary": summary(results),
        "results": results,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
