"""First-contact checks for a GPU machine, one JSON out, every check PASS / FAIL / SKIP (with the
reason). Run by `bench/gpu_smoke.sh`; on a machine without CUDA the CUDA-only checks are skipped
and the rest run on the CPU at small sizes, so the script itself is proven anywhere.

Checks:
- `environment`: torch / CUDA / driver-visible GPUs, faiss and its GPUs, /dev/shm size against
  what the loader's workers need for the vits14 preset's batch.
- `attention`: scaled-dot-product attention with the flash and memory-efficient backends against
  the math backend (fp32 and bf16 tolerances), and the backbone's packed forward (both crop sizes
  in one sequence) against separate forwards.
- `train_step`: the ViT-S/14 step (2 x 224 + 8 x 98) at two batch sizes in bf16 autocast, fp32
  with TF32 and fp32 without, with peak memory (CUDA); one tiny step on CPU.
- `loader`: images/s of per-image vs batched crops against the measured step's images/s, and the
  batched crops on the GPU (`crops.batched_on=device`) against the CPU's.
- `cli_resume`: `dinokit train` on generated images, stopped and resumed: the resumed run's losses
  equal the uninterrupted run's.
- `torchrun_fsdp`: 2 processes (GPUs, or CPU gloo) with FSDP2, activation checkpointing, online
  k-NN and a resume; bf16 parameters on CUDA.
- `ddp_compile`: DDP with `train.compile=true` on CUDA, with torch's recompilation log.
- `faiss_gpu`: the curation indexes on the GPU against the CPU ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from _report import emit, machine_info  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda", 0) if CUDA else torch.device("cpu")


class Skip(Exception):
    """A check that cannot run here; the message says why."""


def check_environment(work: Path) -> dict[str, Any]:
    from dinokit.config import load_config
    from dinokit.data.loader import shared_memory_per_worker

    shm = shutil.disk_usage("/dev/shm").total if Path("/dev/shm").exists() else 0
    cfg = load_config("vits14", [])
    per_rank = cfg.optim.batch_size // max(torch.cuda.device_count(), 1)
    c = cfg.crops
    workers = cfg.data.num_workers * max(torch.cuda.device_count(), 1)  # all ranks of the machine
    need = shared_memory_per_worker(per_rank, c.global_size, c.local_size, c.local_number) * workers
    info: dict[str, Any] = {
        "torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": CUDA,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "dev_shm_mib": round(shm / 2**20), "vits14_loader_shm_need_mib": round(need / 2**20),
        "vits14_batch_per_gpu": per_rank,
    }
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        info["faiss"] = None
    if CUDA and shm < need:
        raise AssertionError(f"/dev/shm holds {shm / 2**20:.0f} MiB but the vits14 loader needs about "
                             f"{need / 2**20:.0f} MiB: run the container with --shm-size or lower data.num_workers")
    return info


def check_attention(work: Path) -> dict[str, Any]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dinokit.config import load_config, vit_args_from_config

    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 6, 257, 64, generator=g).to(DEVICE) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "mem_efficient": SDPBackend.EFFICIENT_ATTENTION}
    for name, backend in backends.items():
        if not CUDA:
            out[name] = "skipped: CUDA only"
            continue
        for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)):
            if name == "flash" and dtype == torch.float32:
                continue  # flash attention has no fp32 kernel
            with sdpa_kernel(backend):
                got = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype)).float()
            err = (got - reference).abs().max().item()
            out[f"{name}_{str(dtype)[6:]}_max_abs_err"] = err
            assert err < tol, f"{name} {dtype}: max abs error {err:.2e} > {tol}"
    # Packing: global and local crops in one sequence vs separate forwards, through the backbone.
    cfg = load_config("vits14", ["model.depth=2"])
    backbone = vit_args_from_config(cfg.model).build().to(DEVICE).eval()
    crops = [torch.randn(4, 3, 224, 224, generator=g).to(DEVICE), torch.randn(8, 3, 98, 98, generator=g).to(DEVICE)]
    with torch.no_grad():
        backbone.packing = False
        separate = backbone.forward_features_list(crops, [None, None])
        backbone.packing = True
        packed = backbone.forward_features_list(crops, [None, None])
    err = max((a["x_norm_clstoken"] - b["x_norm_clstoken"]).abs().max().item() for a, b in zip(separate, packed))
    out["packing_max_abs_err"] = err
    assert err < 1e-3, f"packed vs separate forwards: max abs error {err:.2e}"
    return out


def _step_config(preset: str, batch: int, autocast: str) -> Any:
    from dinokit.config import load_config

    return load_config(preset, [f"optim.batch_size={batch}", f"train.autocast={autocast}",
                                 f"train.device={DEVICE.type}"])


def check_train_step(work: Path) -> dict[str, Any]:
    from dinokit.train.compute import configure_float32_math
    from dinokit.train.loop import build_model
    from dinokit.train.optim import build_optimizer
    from train_step import time_steps

    if CUDA:
        runs = [(b, a, tf) for b in (32, 128) for a, tf in (("bf16", True), ("none", True), ("none", False))]
        preset, steps = "vits14", 10
    else:
        runs, preset, steps = [(16, "none", False)], "tiny", 2
    results = []
    for batch, autocast, tf32 in runs:
        cfg = _step_config(preset, batch, autocast)
        configure_float32_math(DEVICE, tf32)
        if CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(DEVICE)
        torch.manual_seed(0)
        model = build_model(cfg).to(DEVICE).train()
        optimizer = build_optimizer(model.trainable(), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
        times = time_steps(model, optimizer, cfg, DEVICE, steps, warmup=2)
        seconds = float(np.median(times))
        row = {"preset": preset, "batch": batch, "autocast": autocast, "tf32": tf32,
               "seconds_per_step": round(seconds, 4), "images_per_s": round(batch / seconds, 1)}
        if CUDA:
            row["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(DEVICE) / 2**20)
        results.append(row)
        del model, optimizer
    configure_float32_math(DEVICE, True)
    return {"runs": results}


def check_loader(work: Path, step_images_per_s: float | None) -> dict[str, Any]:
    from dinokit.data.batch_augment import BatchMultiCrop
    from dinokit.data.transforms import MultiCropAugmentation

    size, batch = (224, 64) if CUDA else (64, 16)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size + 32, size + 32, 3), dtype=np.uint8)) for _ in range(batch)]
    transform = MultiCropAugmentation(global_crops_size=size, local_crops_size=size * 7 // 16, local_crops_number=8)
    t0 = time.perf_counter()
    for im in images:
        transform(im)
    per_image = batch / (time.perf_counter() - t0)
    batched = BatchMultiCrop.from_multicrop(transform)
    sources = torch.from_numpy(np.stack([np.asarray(im.resize((size, size))) for im in images])).permute(0, 3, 1, 2)
    batched(sources, torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    batched(sources, torch.Generator().manual_seed(1))
    batched_rate = batch / (time.perf_counter() - t0)
    out = {"crop_size": size, "per_image_images_per_s_one_process": round(per_image, 1),
           "batched_images_per_s_one_process": round(batched_rate, 1),
           "cpu_cores": os.cpu_count()}
    # crops.batched_on=device: the same parameters, the pixels on the GPU.
    if CUDA:
        on_gpu = batched(sources.to(DEVICE), torch.Generator().manual_seed(1))
        on_cpu = batched(sources, torch.Generator().manual_seed(1))
        err = max((on_gpu[k].cpu() - on_cpu[k]).abs().max().item() for k in on_cpu)
        out["device_crops_max_abs_err"] = err
        assert err < 1e-3, f"batched crops on the GPU differ from the CPU's by {err:.2e}"
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(5):
            batched(sources.to(DEVICE), torch.Generator().manual_seed(i))
        torch.cuda.synchronize()
        out["device_crops_images_per_s"] = round(5 * batch / (time.perf_counter() - t0), 1)
    else:
        out["device_crops"] = "skipped: CUDA only (on CPU it equals the loader's crops, tests/test_device_and_syncs.py)"
    if step_images_per_s:
        out["step_images_per_s"] = step_images_per_s
        out["workers_needed_per_image"] = round(step_images_per_s / per_image, 1)
        out["workers_needed_batched"] = round(step_images_per_s / batched_rate, 1)
    return out


def _image_folder(work: Path, n: int = 24) -> Path:
    root = work / "images"
    if not root.exists():
        rng = np.random.default_rng(0)
        for label in ("a", "b"):
            (root / label).mkdir(parents=True)
            for i in range(n // 2):
                Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


SMALL = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "head.out_dim=128", "head.hidden_dim=64",
         "head.bottleneck_dim=32", "crops.local_number=2", "optim.batch_size=8", "optim.epoch_length=4",
         "optim.epochs=2", "data.num_workers=2", "checkpoint.every=2", "train.log_every=2"]


def _dinokit(args: list[str], torchrun: int = 0, timeout: int = 300) -> None:
    cmd = [sys.executable, "-m", "dinokit.cli", *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "dinokit.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if torchrun else dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[-8:])} exited {proc.returncode}:\n{proc.stderr[-3000:]}")


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_cli_resume(work: Path) -> dict[str, Any]:
    data = _image_folder(work)
    base = ["train", str(data), "--preset", "tiny", *SMALL, f"train.device={DEVICE.type}"]
    _dinokit([*base, "--out", str(work / "straight"), "train.max_steps=8"])
    _dinokit([*base, "--out", str(work / "resumed"), "train.max_steps=4"])
    _dinokit([*base, "--out", str(work / "resumed"), "train.max_steps=8"])
    a, b = _losses(work / "straight"), _losses(work / "resumed")
    launches = (work / "resumed" / "launches.jsonl").read_text().splitlines()
    assert len(a) == len(b) == 8, (len(a), len(b))
    # Bit-exact on CPU; on CUDA kernels may differ in the last bits between processes.
    tol = 1e-4 if CUDA else 0.0
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst <= tol, f"resumed losses differ from the uninterrupted run by {worst:.2e}"
    return {"steps": len(a), "max_loss_difference": worst, "launches": len(launches),
            "device": json.loads(launches[0])["device"]}


def check_torchrun_fsdp(work: Path) -> dict[str, Any]:
    n = min(torch.cuda.device_count(), 2) if CUDA else 2
    data = _image_folder(work)
    extra = ["train.distributed.param_dtype=bfloat16"] if CUDA else []
    args = ["train", str(data), "--preset", "tiny", *SMALL, "train.distributed.strategy=fsdp",
            "train.activation_checkpointing=true", "eval.knn_every=4", "eval.knn_train_size=16",
            "eval.knn_val_size=8", f"eval.knn_train={data}", f"eval.knn_val={data}", *extra]
    run = work / "fsdp"
    _dinokit([*args, "--out", str(run), "train.max_steps=4"], torchrun=n)
    _dinokit([*args, "--out", str(run), "train.max_steps=8"], torchrun=n)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9)), [r["step"] for r in lines]
    assert all(np.isfinite(r["loss"]) for r in lines)
    knn = [r["knn_top1"] for r in lines if "knn_top1" in r]
    assert len(knn) == 2, knn
    return {"processes": n, "steps": len(lines), "knn_top1": knn, "param_dtype": "bfloat16" if CUDA else "float32"}


def check_ddp_compile(work: Path) -> dict[str, Any]:
    if not CUDA:
        raise Skip("CUDA only (compiling on CPU takes minutes and is covered by the test suite)")
    data = _image_folder(work)
    run = work / "ddp_compile"
    env_log = work / "recompiles.log"
    os.environ["TORCH_LOGS"] = "recompiles"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc_per_node={min(torch.cuda.device_count(), 2)}", "-m", "dinokit.cli", "train", str(data),
             "--preset", "tiny", *SMALL, "train.compile=true", "--out", str(run), "train.max_steps=8"],
            capture_output=True, text=True, timeout=600)
    finally:
        os.environ.pop("TORCH_LOGS", None)
    env_log.write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recompiles = sum("Recompiling" in line for line in proc.stderr.splitlines())
    return {"steps": len(_losses(run)), "recompiles_logged": recompiles, "log": str(env_log)}


def check_faiss_gpu(work: Path) -> dict[str, Any]:
    try:
        import faiss
    except ImportError as e:
        raise Skip("faiss is not installed") from e
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        raise Skip("this faiss build sees no GPU (faiss-cpu)")
    from dinokit.curate.index import ArrayEmbeddings, build_index, choose_index, gpu_supports_pq

    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb = ArrayEmbeddings(x)
    out: dict[str, Any] = {}
    for kind in ("flat", "ivf_flat", "ivf_pq"):
        plan = choose_index(emb.n, emb.dim, kind)
        cpu, _ = build_index(emb, plan, gpu=False)
        gpu, _ = build_index(emb, plan, gpu=True)
        _, i_cpu = cpu.search(x[:200], 5)
        _, i_gpu = gpu.search(x[:200], 5)
        agree = float((i_cpu[:, 0] == i_gpu[:, 0]).mean())
        out[f"{kind}_top1_agreement"] = agree
        out[f"{kind}_on_gpu"] = kind != "ivf_pq" or gpu_supports_pq(emb.dim, plan.pq_m)
        assert agree > 0.9, f"{kind}: GPU and CPU nearest neighbours agree on {agree:.0%}"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--only", nargs="*", default=None, help="run only these checks")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dinokit_gpu_smoke_"))
    report: dict[str, Any] = {"machine": {**machine_info(), "cuda": CUDA}, "checks": {}}
    step_rate: list[float] = []

    def train_step_check(w: Path) -> dict[str, Any]:
        result = check_train_step(w)
        step_rate.append(max(r["images_per_s"] for r in result["runs"]))
        return result

    checks: dict[str, Callable[[Path], dict[str, Any]]] = {
        "environment": check_environment,
        "attention": check_attention,
        "train_step": train_step_check,
        "loader": lambda w: check_loader(w, step_rate[0] if step_rate else None),
        "cli_resume": check_cli_resume,
        "torchrun_fsdp": check_torchrun_fsdp,
        "ddp_compile": check_ddp_compile,
        "faiss_gpu": check_faiss_gpu,
    }
    for name, check in checks.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            entry = {"status": "PASS", **check(work)}
        except Skip as e:
            entry = {"status": "SKIP", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - every failure is a FAIL line, and the next check runs
            entry = {"status": "FAIL", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["checks"][name] = entry
        print(f"{entry['status']:4s} {name} ({entry['seconds']} s)"
              + (f": {entry.get('reason') or entry.get('error')}" if entry["status"] != "PASS" else ""),
              file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)  # our own temporary folder
    emit(report, args.out)
    return 1 if any(c["status"] == "FAIL" for c in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
