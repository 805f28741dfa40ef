"""Backbone inference: dinokit against timm, Hugging Face transformers and ONNX Runtime at identical
weights (JSON out).

    .venv/bin/python bench/inference_peers.py --out bench/results/inference_peers.json
    .venv/bin/python bench/inference_peers.py --rounds 2 --iters 1      # a quick look

One ViT-S/14 (`dinov2_vits14` architecture; random weights, or `--weights` for a real checkpoint)
is converted with `dinokit.export` to timm's registered `vit_small_patch14_dinov2` (built with
`timm.create_model`), to transformers' `Dinov2Model`, at the benchmark's image size, and to the
ONNX graph of `dinokit export --to onnx` run by onnxruntime's CPU execution provider (as many
intra-op threads as torch uses; fp32 only, so it is absent from the bf16 rows). Before any
timing the fp32 outputs (all tokens after the final norm) must agree with dinokit's within
`--tol` (default 1e-5; onnxruntime, whose kernels sum in another order: `--onnx-tol`, 1e-4); the
largest differences, fp32 and bf16, go into the JSON.

Timing: batches of `--batch` images at `--size` px under `torch.inference_mode()`, fp32 and bf16
autocast, in alternating rounds (the order rotates each round) of `--iters` batches per framework,
all in one process; reported are the median seconds per batch, images/s and the ratio of
dinokit to the fastest peer. `--compile` adds every framework again under `torch.compile`
(inductor with frozen weights), checked against the same tolerance.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from dinokit.export import state_dict_for_size
from dinokit.export.hf import to_hf
from dinokit.export.timm import to_timm_state_dict
from dinokit.models.builders import build_official

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, machine_info  # bench/ is on sys.path when a script runs


def build_peers(weights: Path | None, size: int, work: Path) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """dinokit, timm, transformers and onnxruntime forward functions returning (B, 1 + N, D) normed tokens."""
    import timm

    torch.manual_seed(0)
    ours = build_official("dinov2_vits14").eval()
    if weights is not None:
        from dinokit.checkpoint.loading import load_backbone

        load_backbone(ours, weights)
    theirs = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=size, num_classes=0)
    theirs.load_state_dict(to_timm_state_dict(state_dict_for_size(ours, size)), strict=True)
    theirs.eval()
    hf = to_hf(ours, image_size=size)

    def dinokit_fn(x: torch.Tensor) -> torch.Tensor:
        out = ours.forward_features(x)
        return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], 1)

    return {
        "dinokit": dinokit_fn,
        "timm": theirs.forward_features,
        "hf_transformers": lambda x: hf(pixel_values=x).last_hidden_state,
        "onnxruntime": onnx_peer(ours, size, work),
    }


def onnx_peer(model: torch.nn.Module, size: int, work: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime

    from dinokit.export.onnx import export_onnx

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    path = export_onnx(model, work / "model.onnx", size)
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        cls_token, patch_tokens = session.run(None, {"images": x.numpy()})
        return torch.cat([torch.from_numpy(cls_token)[:, None], torch.from_numpy(patch_tokens)], 1)

    return run


def max_differences(fns: dict[str, Callable], x: torch.Tensor, bf16: bool) -> dict[str, float]:
    ctx = torch.autocast("cpu", torch.bfloat16) if bf16 else nullcontext()
    with torch.inference_mode(), ctx:
        outs = {name: fn(x).float() for name, fn in fns.items()}
    return {name: float((out - outs["dinokit"]).abs().max()) for name, out in outs.items() if name != "dinokit"}


def time_round(fn: Callable, x: torch.Tensor, iters: int, bf16: bool) -> list[float]:
    ctx = torch.autocast("cpu", torch.bfloat16) if bf16 else nullcontext()
    times = []
    with torch.inference_mode(), ctx:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3, help="timed batches per framework and round")
    parser.add_argument("--tol", type=float, default=1e-5, help="largest fp32 output difference allowed")
    parser.add_argument("--onnx-tol", type=float, default=1e-4, help="the same for onnxruntime")
    parser.add_argument("--weights", type=Path, default=None, help="a DINOv2 ViT-S/14 checkpoint (default: random)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each framework under torch.compile (inductor, frozen weights)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="inference_peers_"))
    fns = build_peers(args.weights, args.size, work)
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant weights: inductor may prepack them for oneDNN
        fns.update({f"{n}_compiled": torch.compile(fn) for n, fn in list(fns.items()) if n != "onnxruntime"})
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    torch_fns = {n: fn for n, fn in fns.items() if n != "onnxruntime"}
    diffs = {"fp32": max_differences(fns, x, bf16=False), "bf16": max_differences(torch_fns, x, bf16=True)}
    bad = {k: v for k, v in diffs["fp32"].items() if not v <= (args.onnx_tol if k == "onnxruntime" else args.tol)}
    if bad:
        print(f"outputs differ from dinokit's by more than {args.tol}: {bad}; not timing", file=sys.stderr)
        return 1

    results: dict[str, Any] = {}
    for precision in args.precisions:
        bf16 = precision == "bf16"
        names = list(torch_fns if bf16 else fns)  # onnxruntime runs the fp32 graph only
        for fn in (fns[n] for n in names):  # warm-up: first-call allocations and kernel selection
            time_round(fn, x, 1, bf16)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                times[n] += time_round(fns[n], x, args.iters, bf16)
        row: dict[str, Any] = {}
        for n in names:
            per_batch = statistics.median(times[n])
            row[n] = {"seconds_per_batch_median": round(per_batch, 4), "images_per_s": round(args.batch / per_batch, 2)}
        fastest = max((n for n in names if not n.startswith("dinokit")), key=lambda n: row[n]["images_per_s"])
        row["fastest_peer"] = fastest
        row["ratio_vs_fastest_peer"] = {
            n: round(row[n]["images_per_s"] / row[fastest]["images_per_s"], 3) for n in names if n.startswith("dinokit")
        }
        results[precision] = row
        print(f"{precision}: " + ", ".join(f"{n} {row[n]['images_per_s']} img/s" for n in names), file=sys.stderr)

    report = {
        "machine": machine_info(),
        "model": "dinov2_vits14 architecture, " + (str(args.weights) if args.weights else "random weights (seed 0)"),
        "batch_size": args.batch, "image_size": args.size, "rounds": args.rounds, "iters_per_round": args.iters,
        "max_abs_difference_vs_dinokit": diffs,
        "results": results,
    }
    emit(report, args.out)
    shutil.rmtree(work)  # the temporary folder made above, nothing the user named
    return 0


if __name__ == "__main__":
    sys.exit(main())
