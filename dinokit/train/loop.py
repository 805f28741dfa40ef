"""`dinokit train`: the DINO / DINOv2 pretraining loop, on one process or many, exactly resumable.

    dinokit train DATA --preset tiny --out runs/tiny          # start, or resume if runs/tiny exists
    dinokit train DATA --preset tiny --out runs/tiny train.max_steps=300
    torchrun --nproc_per_node=2 -m dinokit.cli train DATA --out runs/ddp train.distributed.strategy=ddp
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 -m dinokit.cli train DATA --out /shared/run train.distributed.strategy=fsdp

Each step: schedules -> teacher targets -> student outputs -> losses -> backward -> clip ->
AdamW -> EMA. Every `checkpoint.every` steps (and at the last step) the full state is written
atomically and the teacher backbone is exported as `teacher_backbone.safetensors`. Resuming
restores model, optimiser, loss centers, RNG states and the data position, so a run stopped and
resumed on the same number of processes reproduces the uninterrupted run bit for bit on CPU.

Under torchrun (see docs/distributed.md) every rank runs this same loop: `optim.batch_size` is the
GLOBAL batch, each rank loads `batch_size / world_size` images of the world-size-independent global
sample stream, the model is wrapped by `dinokit.distributed.parallelize` (DDP or FSDP2), the
logged losses are means over ranks, and only rank 0 logs, writes metrics and exports.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from dinokit.checkpoint.training import (
    export_backbone,
    full_state_dict,
    latest_checkpoint,
    load_training_state,
    save_training_state,
    set_rng_state,
)
from dinokit.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    schedule_args,
    validate,
    vit_args_from_config,
)
from dinokit.data.datasets import FashionMNIST, FileListDataset, ImageFolderDataset
from dinokit.data.batch_augment import BatchMultiCrop, SourceImage
from dinokit.data.loader import derive_seed, make_train_loader
from dinokit.data.masking import MaskingGenerator
from dinokit.data.transforms import MultiCropAugmentation
from dinokit.distributed import DTYPES, DistEnv, distributed_env, parallelize, reduce_sum
from dinokit.distributed.env import resolve_device
from dinokit.train.compute import apply_compute_options
from dinokit.train.metrics import MetricsLog
from dinokit.train.online_knn import OnlineKNN
from dinokit.train.optim import apply_schedule, build_optimizer, clip_grad_norm_
from dinokit.train.schedules import build_schedules
from dinokit.train.ssl_model import LossArgs, SSLModel, collapse_reasons, health_signals

__all__ = ["NonFiniteLossError", "TrainResult", "build_model", "resolve_device", "train", "train_step"]

log = logging.getLogger("dinokit.train")

# Settings that may change between a run and its resumption without changing the result
# (the number of processes is not a setting: it may change too, see docs/distributed.md).
RESUMABLE_CHANGES = {
    "train.max_steps", "train.log_every", "train.device", "data.num_workers", "data.path",
    "checkpoint.every", "checkpoint.keep", "eval.knn_every", "eval.knn_train", "eval.knn_val",
    "eval.knn_train_size", "eval.knn_val_size", "eval.knn_k", "train.distributed.strategy",
    # Compute savers change speed and memory, not the numbers.
    "train.compile", "train.activation_checkpointing",
}
# Stream tag of the per-rank training RNG seed (the loader uses 1 and 2).
_RANK_RNG_STREAM = 3


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the run stops and the last good checkpoint stays."""


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    final_loss: float
    skipped_images: int


def build_dataset(cfg: Config) -> Any:
    data = cfg.data
    if data.dataset == "fashion_mnist":
        return FashionMNIST(data.path or "/usr/share/datasets/fashion-mnist", split=data.split)
    if data.dataset == "filelist":
        return FileListDataset(data.path)
    return ImageFolderDataset(data.path)


def build_model(cfg: Config) -> SSLModel:
    """Student and teacher of `cfg`, with the compute options of `cfg.train` applied
    (packing, activation checkpointing, compile: `dinokit.train.compute`)."""
    v1 = cfg.loss.mode == "dino"
    model = SSLModel(
        vit_args_from_config(cfg.model, use_mask_token=not v1).build(),
        cfg.head,
        cfg.loss.ibot_head if cfg.loss.separate_ibot_head else None,
        LossArgs(
            dino_weight=cfg.loss.dino_weight,
            ibot_weight=cfg.loss.ibot_weight,
            koleo_weight=cfg.loss.koleo_weight,
            use_ibot=not v1 and cfg.loss.ibot_weight > 0,
            use_koleo=not v1 and cfg.loss.koleo_weight > 0,
            centering=cfg.loss.centering,
            student_temp=cfg.loss.student_temp,
            center_momentum=cfg.loss.center_momentum,
        ),
    )
    return apply_compute_options(model, cfg.train)


def build_loader(cfg: Config, dataset: Any, start_index: int, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32) -> Iterator[dict[str, Any]]:
    """This rank's batches: `optim.batch_size / world_size` images each, from global sample
    `start_index` (the number consumed by all ranks so far) on; crops cast to `dtype`."""
    c = cfg.crops
    transform = MultiCropAugmentation(
        global_crops_size=c.global_size,
        local_crops_size=c.local_size,
        global_crops_scale=tuple(c.global_scale),
        local_crops_scale=tuple(c.local_scale),
        local_crops_number=c.local_number,
        flip_p=c.flip_p,
        color_jitter=tuple(c.color_jitter),
        color_jitter_p=c.color_jitter_p,
        grayscale_p=c.grayscale_p,
        blur_p=tuple(c.blur_p),
        solarize_p=c.solarize_p,
    )
    batch_transform = None
    if c.batched:
        batch_transform = BatchMultiCrop.from_multicrop(transform)
        transform = SourceImage(c.source_size or c.global_size)
    grid = c.global_size // cfg.model.patch_size
    # Rectangles up to half the grid; the official value has an operator-precedence quirk
    # (see dinokit.data.masking.official_max_num_patches) that is not worth reproducing here.
    mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    loader = make_train_loader(
        dataset,
        transform,
        batch_size=cfg.optim.batch_size // world_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.train.seed,
        start_index=start_index // world_size,  # global batches are multiples of world_size
        mask_generator=mask_generator,
        mask_ratio_tuple=tuple(cfg.loss.mask_ratio),
        mask_probability=cfg.loss.mask_probability,
        dtype=dtype,
        rank=rank,
        world_size=world_size,
        batch_transform=batch_transform,
    )
    return iter(loader)


def _check_resume_config(saved: Config, requested: Config, run_dir: Path) -> None:
    a, b = _flatten(config_to_dict(saved)), _flatten(config_to_dict(requested))
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
    if differ:
        details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differ[:8])
        raise ConfigError(
            f"{run_dir} holds a run with another configuration ({details}); "
            f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume. Use a new --out."
        )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _autocast(cfg: Config, device: torch.device) -> Any:
    if cfg.train.autocast == "none":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.train.autocast == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _progress(total: int, initial: int) -> Any:
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    return None


def _mean_over_ranks(terms: dict[str, Tensor], env: DistEnv | None) -> dict[str, Tensor]:
    """Detached loss terms averaged over ranks (one all_reduce): what one process with the global
    batch would report, since every term is a mean over equally sized per-rank batches."""
    names = list(terms)
    values = torch.stack([terms[n].detach().float() for n in names])
    if env is not None and env.distributed:
        values = reduce_sum(values) / env.world_size
    return dict(zip(names, values.unbind()))


def train_step(
    model: SSLModel,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    sched: dict[str, float],
    cfg: Config,
    device: torch.device,
    step_number: int = 0,
    run_dir: Path | None = None,
    *,
    forward: nn.Module | None = None,
    env: DistEnv | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One optimisation step: schedules -> forward -> finite check -> backward -> clip -> AdamW -> EMA.

    `forward` is the module to call for the loss (the DDP wrapper; default `model`). Returns the
    detached loss terms, averaged over ranks, and the teacher targets of this rank's batch.
    """
    apply_schedule(optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])
    with _autocast(cfg, device):
        terms, targets = (forward or model)(batch, sched["teacher_temp"])
    # Checked on the rank mean, so that every rank sees a NaN of any rank and all stop together.
    reported = _mean_over_ranks(terms, env)
    for name, value in reported.items():
        if not torch.isfinite(value):
            last = latest_checkpoint(run_dir) if run_dir is not None else None
            raise NonFiniteLossError(
                f"loss term '{name}' is {value.item()} at step {step_number}; the run stops here. "
                f"Last good checkpoint: {last or 'none'}. Lower optim.base_lr, "
                f"raise teacher.warmup_teacher_temp_epochs or use train.autocast=none."
            )
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    if cfg.optim.clip_grad > 0:
        # Per sub-model, as the official code: a huge head gradient does not shrink the backbone's.
        for module in model.student.values():
            clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
    optimizer.step()
    model.update_teacher(sched["momentum"])
    return reported, targets


def train(cfg: Config, run_dir: Path) -> TrainResult:
    """Train (or resume) the run in `run_dir` with `cfg`; returns when `max_steps` or the end of
    the schedule is reached. Raises `NonFiniteLossError` on a NaN / inf loss. Under torchrun (or
    with a process group already started) every rank calls it."""
    with distributed_env(cfg.train.device) as env:
        return _train(cfg, Path(run_dir), env)


def _train(cfg: Config, run_dir: Path, env: DistEnv) -> TrainResult:
    validate(cfg, world_size=env.world_size)
    saved_cfg_path = run_dir / "config.yaml"
    ckpt_path = latest_checkpoint(run_dir)
    if saved_cfg_path.is_file():
        import yaml

        _check_resume_config(config_from_dict(yaml.safe_load(saved_cfg_path.read_text())), cfg, run_dir)
    dataset = build_dataset(cfg)  # fails on a missing / empty folder before any work
    online_knn = OnlineKNN(cfg, dataset) if cfg.eval.knn_every > 0 and env.is_main else None
    config_yaml = _dump_yaml(cfg)
    env.barrier()  # every rank has read the old config.yaml before rank 0 replaces it
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved_cfg_path.write_text(config_yaml)

    device = env.device
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    model = build_model(cfg).to(device)  # the same initial weights on every rank
    if env.world_size > 1:  # ranks draw different stochastic-depth samples from here on
        torch.manual_seed(derive_seed(cfg.train.seed, _RANK_RNG_STREAM, env.rank))
    dist_cfg = cfg.train.distributed
    forward = parallelize(model, dist_cfg, env) if env.distributed else model
    optimizer = build_optimizer(
        model.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult,
        betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
    )
    schedules = build_schedules(**schedule_args(cfg))
    stop = cfg.run_steps

    step, skipped_total, samples_consumed = 0, 0, 0
    resume_rng = None
    if ckpt_path is not None:
        state = load_training_state(ckpt_path, model, optimizer, env)
        step, skipped_total = state["step"], state["skipped_images"]
        samples_consumed = state["samples_consumed"]
        resume_rng = state["rng"]
        if resume_rng is None:  # another world size: fresh per-rank streams, still seeded
            torch.manual_seed(derive_seed(cfg.train.seed, _RANK_RNG_STREAM, env.rank, step))
        if env.is_main:
            log.info("resuming %s from step %d (written by %d process(es), now %d)",
                     run_dir, step, state["world_size"], env.world_size)
    # FSDP's root does not cast inputs (see parallelize), so the collate casts the crops.
    fsdp = dist_cfg.strategy == "fsdp" and env.distributed
    crops_dtype = DTYPES[dist_cfg.param_dtype] if fsdp else torch.float32
    batches = build_loader(cfg, dataset, samples_consumed, env.rank, env.world_size, crops_dtype)
    if resume_rng is not None:
        set_rng_state(resume_rng)  # after the loader started, so nothing draws in between

    metrics = MetricsLog(run_dir, resume_step=step) if env.is_main else None
    bar = _progress(stop, step) if env.is_main else None
    model.train()
    loss_value = float("nan")
    warmup_steps = cfg.optim.warmup_epochs * cfg.optim.epoch_length
    last_warning = -(10**9)
    try:
        while step < stop:
            t0 = time.perf_counter()
            batch = next(batches)
            # [skipped images, ranks whose whole batch failed], summed over ranks.
            counts = reduce_sum(torch.tensor([int(batch.get("n_skipped", 0)), int(batch.get("n_images", 1) == 0)],
                                             device=device))  # on the GPU for nccl
            skipped_total += int(counts[0])
            samples_consumed += cfg.optim.batch_size
            if int(counts[1]) > 0:  # every rank skips, so the collectives stay matched
                if env.is_main:
                    log.warning("step %d: every image of a batch failed to decode; step skipped", step + 1)
                step += 1
                continue
            batch = _to_device(batch, device)
            sched = schedules.at(step)
            terms, targets = train_step(model, optimizer, batch, sched, cfg, device, step + 1, run_dir,
                                        forward=forward, env=env)
            step += 1
            knn = None
            if cfg.eval.knn_every and step % cfg.eval.knn_every == 0:
                knn = _online_knn(online_knn, model, cfg, env)
            loss_value = terms["total"].item()
            if env.is_main:
                assert metrics is not None
                record = {
                    "step": step,
                    "loss": loss_value,
                    **{k: v.item() for k, v in terms.items() if k != "total"},
                    "lr": sched["lr"],
                    "wd": sched["wd"],
                    "momentum": sched["momentum"],
                    "teacher_temp": sched["teacher_temp"],
                    "images_per_s": batch["collated_global_crops"].shape[0] / 2 * env.world_size
                    / (time.perf_counter() - t0),  # all ranks
                    "skipped_images": skipped_total,
                }
                health = health_signals(targets)  # of rank 0's batch
                if "koleo" in terms:
                    health["koleo_value"] = terms["koleo"].item() / cfg.loss.koleo_weight  # unweighted
                record.update(health)
                if knn is not None:
                    record.update(knn)
                    log.info("step %d: online k-NN top-1 %.2f %%", step, record["knn_top1"])
                metrics.write(record)  # before the checkpoint: a kill in between loses no line
                # Early steps look collapsed by construction (a fresh teacher maps every image to
                # nearly the same output), so warnings start after the lr warmup.
                reasons = collapse_reasons(health)
                if reasons and step > warmup_steps and step - last_warning >= 100:
                    log.warning("step %d: collapse signal: %s", step, "; ".join(reasons))
                    last_warning = step
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{sched['lr']:.2e}")
                elif step % cfg.train.log_every == 0 or step == stop:
                    log.info("step %d/%d loss %.4f lr %.3g %.1f img/s", step, stop, loss_value, sched["lr"],
                             record["images_per_s"])
            if step % cfg.checkpoint.every == 0 or step == stop:
                trainer = {"step": step, "samples_consumed": samples_consumed, "skipped_images": skipped_total}
                _save(run_dir, model, optimizer, trainer, config_yaml, cfg.checkpoint.keep, env)
    finally:
        if metrics is not None:
            metrics.close()
        if bar is not None:
            bar.close()
    return TrainResult(run_dir, step, loss_value, skipped_total)


def _online_knn(knn: OnlineKNN | None, model: SSLModel, cfg: Config, env: DistEnv) -> dict[str, float] | None:
    """k-NN of the teacher backbone on rank 0. A sharded teacher is gathered (by every rank) into
    a plain copy first, so that rank 0 can run it alone."""
    backbone: nn.Module = model.teacher["backbone"]
    if cfg.train.distributed.strategy == "fsdp" and env.distributed:
        state = full_state_dict(backbone)
        if knn is None:
            return None
        with torch.random.fork_rng(devices=[]):  # building draws init numbers; training must not see it
            backbone = vit_args_from_config(cfg.model, use_mask_token=cfg.loss.mode != "dino").build()
        backbone.load_state_dict(state)
        backbone.to(env.device)
    return knn.evaluate(backbone) if knn is not None else None


def _save(run_dir: Path, model: SSLModel, optimizer: torch.optim.Optimizer, trainer: dict[str, int],
          config_yaml: str, keep: int, env: DistEnv) -> None:
    model.settle_pending_center_updates()
    save_training_state(run_dir, trainer["step"], model, optimizer, trainer, config_yaml, keep, env)
    teacher = full_state_dict(model.teacher["backbone"])  # gathers FSDP shards (every rank calls)
    if env.is_main:
        export_backbone(run_dir / "teacher_backbone.safetensors", teacher)


def _dump_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

