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

The step reads nothing back to the host: loss terms and health signals stay on the device until
the loop logs them (every `train.log_every` steps and before every checkpoint), where they are
checked for NaN / inf and written to metrics.jsonl, one line per step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from dinokit.checkpoint.training import (
    checkpoint_step,
    export_backbone,
    full_state_dict,
    latest_checkpoint,
    load_training_state,
    save_training_state,
    set_rng_state,
)
from dinokit.config import (
    backbone_from_config,
    Config,
    ConfigError,
    CropsConfig,
    DistillConfig,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    ignored_keys,
    schedule_args,
    student_models,
    validate,
)
from dinokit.data.datasets import FashionMNIST, FileListDataset, ImageFolderDataset
from dinokit.data.batch_augment import BatchMultiCrop, SourceImage
from dinokit.data.loader import (
    batch_to_device,
    check_shared_memory,
    derive_seed,
    device_crops,
    make_train_loader,
    shared_memory_per_worker,
    shared_memory_per_worker_sources,
)
from dinokit.data.masking import MaskingGenerator
from dinokit.data.transforms import MultiCropAugmentation
from dinokit.distributed import DTYPES, DistEnv, distributed_env, parallelize, reduce_sum
from dinokit.distributed.env import resolve_device
from dinokit.machine import machine_info
from dinokit.checkpoint.sources import TrainedWeights, read_weights
from dinokit.models.vision_transformer import resize_pos_embed
from dinokit.train.accumulate import MicroBatch, micro_targets, split_batch
from dinokit.train.accumulate import to_device as micro_to_device
from dinokit.train.compute import apply_compute_options, configure_float32_math, packing_enabled
from dinokit.train.distill import (
    DistillModel,
    build_distill_model,
    teacher_heads_config,
    teacher_heads_run,
)
from dinokit.train.init_weights import backbone_lr_scale, load_initial_weights, set_backbones_frozen
from dinokit.train.metrics import MetricsLog
from dinokit.train.online_knn import OnlineKNN
from dinokit.train.optim import apply_schedule, build_optimizer, clip_grad_norm_
from dinokit.train.schedules import build_schedules
from dinokit.train.ssl_model import HEALTH_SIGNALS, LossArgs, SSLModel, collapse_reasons, health_tensor

__all__ = ["NonFiniteLossError", "TrainResult", "build_model", "phase_config", "resolve_device", "train", "train_step"]

log = logging.getLogger("dinokit.train")

# Settings that may change between a run and its resumption without changing the result
# (the number of processes is not a setting: it may change too, see docs/distributed.md).
RESUMABLE_CHANGES = {
    "train.max_steps", "train.log_every", "train.device", "data.num_workers", "data.path",
    "checkpoint.every", "checkpoint.keep", "eval.knn_every", "eval.knn_train", "eval.knn_val",
    "eval.knn_train_size", "eval.knn_val_size", "eval.knn_k", "train.distributed.strategy",
    # Compute savers change speed and memory, not the numbers.
    "train.compile", "train.activation_checkpointing", "train.tf32", "train.distributed.backend",
    "crops.batched_on",
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
    # Seconds of this process's first step, compilation included (None when no step ran).
    first_step_seconds: float | None = None


def build_dataset(cfg: Config) -> Any:
    data = cfg.data
    if data.dataset == "fashion_mnist":
        return FashionMNIST(data.path or "/usr/share/datasets/fashion-mnist", split=data.split)
    if data.dataset == "filelist":
        return FileListDataset(data.path)
    return ImageFolderDataset(data.path)


def build_model(cfg: Config, run_dir: Path | None = None,
                teacher: TrainedWeights | None = None) -> SSLModel | DistillModel:
    """Student and teacher of `cfg` (or, with `distill.teacher`, the frozen teacher, from
    `teacher` when already read, and the students), with the compute options of `cfg.train`
    applied (packing, activation checkpointing, compile: `dinokit.train.compute`). Weights of
    `init` are not loaded here."""
    if cfg.distill.teacher:
        return apply_compute_options(build_distill_model(cfg, run_dir, teacher), cfg.train)
    v1 = cfg.loss.mode == "dino"
    model = SSLModel(
        backbone_from_config(cfg.model, use_mask_token=not v1),
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
                 dtype: torch.dtype = torch.float32, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """This rank's batches: `optim.batch_size / world_size` images each, from global sample
    `start_index` (the number consumed by all ranks so far) on; crops cast to `dtype`, in pinned
    memory when `pin_memory` (CUDA: the copy to the GPU is then asynchronous)."""
    c = cfg.crops
    transform = multicrop_recipe(c)
    batch_transform = None
    if c.batched:
        batch_transform = BatchMultiCrop.from_multicrop(transform)
        transform = SourceImage(c.source_size or c.global_size)
    on_device = c.batched and c.batched_on == "device"
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
        pin_memory=pin_memory,
        crops_on_device=on_device,
    )
    return iter(loader)


def device_crop_transform(cfg: Config) -> BatchMultiCrop | None:
    """The batched crops the training process makes itself (`crops.batched_on=device`), or None."""
    c = cfg.crops
    if not (c.batched and c.batched_on == "device"):
        return None
    return BatchMultiCrop.from_multicrop(multicrop_recipe(c))


def multicrop_recipe(c: CropsConfig) -> MultiCropAugmentation:
    """The multi-crop augmentation of the `crops` settings (per image, or the recipe of the
    batched path)."""
    return MultiCropAugmentation(
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


def _batch_counts(batch: dict[str, Any], env: DistEnv) -> tuple[int, int]:
    """(images skipped by all ranks, ranks whose whole batch failed to decode). The loader counts
    on the host; several ranks add their counts in one all_reduce of a CPU tensor over the host
    group (gloo), which never waits for the GPU."""
    counts = [int(batch.get("n_skipped", 0)), int(batch.get("n_images", 1) == 0)]
    if env.world_size > 1:
        counts = reduce_sum(torch.tensor(counts), group=env.host_group).tolist()
    return counts[0], counts[1]


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
    model: SSLModel | DistillModel,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    sched: dict[str, float],
    cfg: Config,
    device: torch.device,
    *,
    forward: nn.Module | None = None,
    env: DistEnv | None = None,
    micro_batches: list[MicroBatch] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One optimisation step: schedules -> forward -> backward -> clip -> AdamW -> EMA.

    `forward` is the module to call for the loss (the DDP wrapper; default `model`).
    `micro_batches` (`dinokit.train.accumulate.split_batch` of `batch`, on the device): the
    teacher sees `batch`, the student each micro-batch in turn, gradients accumulated. Returns the
    detached loss terms, averaged over ranks, and the teacher targets of this rank's batch. The
    step reads nothing back to the host (no `.item()`, no finiteness branch), so a GPU never
    waits for the CPU; the loop checks the terms for NaN / inf when it logs them, before any
    checkpoint (`_StepRecords.flush`).
    """
    apply_schedule(optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"], sched.get("backbone_lr_scale", 1.0))
    optimizer.zero_grad(set_to_none=True)
    # A compiled model call would specialise on a Python float and recompile at every new value.
    temp: Any = torch.tensor(sched["teacher_temp"]) if cfg.train.compile == "step" else sched["teacher_temp"]
    if cfg.train.compile == "step":
        for part in [batch, *(m.batch for m in micro_batches or ())]:
            _mark_masked_dynamic(part)
    if micro_batches:
        terms, targets = _accumulate(forward or model, batch, micro_batches, temp, cfg, device)
    else:
        with _autocast(cfg, device):
            terms, targets = (forward or model)(batch, temp)
        terms["total"].backward()
    reported = _mean_over_ranks(terms, env)
    if cfg.optim.clip_grad > 0:
        # Per sub-model, as the official code: a huge head gradient does not shrink the backbone's.
        for module in model.trainable().values():
            clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)  # frozen parameters have no grad
    optimizer.step()
    model.update_teacher(sched["momentum"])
    return reported, targets


def _mark_masked_dynamic(batch: dict[str, Any]) -> None:
    """Tell torch.compile up front that the number of masked patches changes from batch to batch.

    Otherwise it compiles the whole step for the first batch's count, then again, with that
    dimension symbolic, at the second batch: a second compilation as long as the first (minutes
    on a CPU with a cold cache)."""
    import torch._dynamo  # loaded by torch.compile already; explicit for older PyTorch

    for key in ("mask_indices_list", "masks_weight"):
        if key in batch:
            torch._dynamo.maybe_mark_dynamic(batch[key], 0)


def _accumulate(forward: nn.Module, batch: dict[str, Any], micro_batches: list[MicroBatch], teacher_temp: Any,
                cfg: Config, device: torch.device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Teacher targets of the whole batch, then forward + backward of each micro-batch with its
    loss scaled by its share; DDP reduces gradients after the last micro-batch only. Returns the
    share-weighted loss terms (those of the whole batch) and the targets."""
    with torch.no_grad(), _autocast(cfg, device):
        _, targets = forward(batch, teacher_temp, teacher_only=True)
    terms: dict[str, Tensor] = {}
    student_cls = []
    for i, micro in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        no_sync = forward.no_sync() if isinstance(forward, DistributedDataParallel) and not last else nullcontext()
        with no_sync:
            with _autocast(cfg, device):
                part, outputs = forward(micro.batch, teacher_temp, targets=micro_targets(targets, micro))
            (part["total"] * micro.share).backward()
        for name, value in part.items():
            terms[name] = terms.get(name, 0) + value.detach() * micro.share
        student_cls.append(outputs["global_cls"].view(2, -1, outputs["global_cls"].shape[-1]))
    # The student's global [CLS] of the whole batch in crop-major order, for the health signals.
    targets["global_cls"] = torch.cat(student_cls, dim=1).flatten(0, 1)
    return terms, targets


@dataclass
class _StepRecord:
    """What the loop keeps of a step until it is logged: host values, and device tensors (the
    rank-mean loss terms, rank 0's health signals) that are read back at the next flush."""

    step: int
    terms: Tensor  # (n_terms,), names in _StepRecords.names
    health: Tensor | None
    host: dict[str, Any]


class _StepRecords:
    """Steps since the last log: one device-to-host copy per flush instead of several per step.

    Flushed every `train.log_every` steps, before every checkpoint, at online k-NN steps and at
    the end: the loss terms are checked (every rank holds the same rank means, so all ranks stop
    together), the metrics lines written in order, and a NaN / inf raises `NonFiniteLossError`
    naming the first bad step, after the lines of the good steps before it."""

    def __init__(self) -> None:
        self.pending: list[_StepRecord] = []
        self.names: list[str] = []

    def add(self, step: int, terms: dict[str, Tensor], health: Tensor | None, host: dict[str, Any]) -> None:
        self.names = list(terms)
        self.pending.append(_StepRecord(step, torch.stack(list(terms.values())), health, host))

    def flush(self, run_dir: Path) -> tuple[list[dict[str, Any]], NonFiniteLossError | None]:
        """The pending steps as metrics records (oldest first), up to the first step with a
        non-finite term, and the error to raise for that step (None when all are finite)."""
        if not self.pending:
            return [], None
        pending, self.pending = self.pending, []
        values = torch.stack([r.terms for r in pending]).float().cpu().tolist()  # the one sync
        health = [r.health for r in pending if r.health is not None]
        health_values = torch.stack(health).float().cpu().tolist() if health else []
        records: list[dict[str, Any]] = []
        h = iter(health_values)
        for r, row in zip(pending, values):
            bad = [n for n, v in zip(self.names, row) if not math.isfinite(v)]
            if bad:
                last = latest_checkpoint(run_dir)
                return records, NonFiniteLossError(
                    f"loss term '{bad[0]}' is {row[self.names.index(bad[0])]} at step {r.step}; the run stops "
                    f"here. Last good checkpoint: {last or 'none'}. Lower optim.base_lr, raise "
                    f"teacher.warmup_teacher_temp_epochs or use train.autocast=none.")
            terms = dict(zip(self.names, row))
            record: dict[str, Any] = {"step": r.step, "loss": terms.pop("total"), **terms, **r.host}
            if r.health is not None:
                record.update(zip(HEALTH_SIGNALS, next(h)))
            records.append(record)
        return records, None


def train(cfg: Config, run_dir: Path) -> TrainResult:
    """Train (or resume) the run in `run_dir` with `cfg`; returns when `max_steps` or the end of
    the schedule is reached. Raises `NonFiniteLossError` on a NaN / inf loss. Under torchrun (or
    with a process group already started) every rank calls it."""
    with distributed_env(cfg.train.device, cfg.train.distributed.backend) as env:
        return _train(cfg, Path(run_dir), env)


@dataclass
class _Progress:
    """Where a run stands: what a checkpoint stores besides the model and optimizer."""

    step: int = 0
    skipped_images: int = 0
    samples_consumed: int = 0  # global: by all ranks

    def trainer_state(self) -> dict[str, int]:
        return {"step": self.step, "samples_consumed": self.samples_consumed, "skipped_images": self.skipped_images}


def _train(cfg: Config, run_dir: Path, env: DistEnv) -> TrainResult:
    dataset, online_knn = _check_before_work(cfg, run_dir, env)
    teacher = read_weights(cfg.distill.teacher) if cfg.distill.teacher else None  # read once
    if teacher is not None and "dino_head" not in teacher.heads:
        if env.is_main:
            log.info("distill.teacher has no heads: training them first in %s", teacher_heads_run(run_dir))
        _train(teacher_heads_config(cfg), teacher_heads_run(run_dir), env)
    model, config_yaml = _build_and_start(cfg, run_dir, env, teacher)

    dist_cfg = cfg.train.distributed
    # Frozen backbones give no gradients during a head warm-up: DDP must expect unused parameters.
    find_unused = cfg.train.head_warmup_steps > 0
    wrap = (lambda: parallelize(model, dist_cfg, env, find_unused_parameters=find_unused)) if env.distributed else None
    forward = wrap() if wrap is not None else model
    optimizer = build_optimizer(
        model.trainable(), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult,
        betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
    )
    schedules = build_schedules(**schedule_args(cfg))
    stop, phase = cfg.run_steps, cfg.highres.start_step
    progress, resume_rng = _restore(cfg, run_dir, model, optimizer, env)

    # FSDP's root does not cast inputs (see parallelize), so the collate casts the crops.
    fsdp = dist_cfg.strategy == "fsdp" and env.distributed
    crops_dtype = DTYPES[dist_cfg.param_dtype] if fsdp else torch.float32
    in_phase = phase is not None and progress.step > phase  # a checkpoint at the switch step predates it
    run_cfg = phase_config(cfg) if in_phase else cfg
    pin_memory = env.device.type == "cuda"
    crop_on_device = device_crop_transform(run_cfg)
    configure_float32_math(env.device, cfg.train.tf32)
    if env.is_main:
        _record_launch(cfg, run_dir, env, progress.step, crops_dtype, pin_memory)
    c, per_rank = run_cfg.crops, run_cfg.optim.batch_size // env.world_size
    if crop_on_device is not None:
        per_worker = shared_memory_per_worker_sources(per_rank, c.source_size or c.global_size)
    else:
        per_worker = shared_memory_per_worker(per_rank, c.global_size, c.local_size, c.local_number,
                                              torch.finfo(crops_dtype).bits // 8)
    # Every process on a machine shares its /dev/shm: count the workers of all local ranks.
    shm_warning = check_shared_memory(cfg.data.num_workers * int(os.environ.get("LOCAL_WORLD_SIZE", "1")), per_worker)
    if shm_warning and env.local_rank == 0:
        log.warning("%s", shm_warning)
    batches = build_loader(run_cfg, dataset, progress.samples_consumed, env.rank, env.world_size, crops_dtype,
                           pin_memory)
    if online_knn is not None and in_phase:
        online_knn.set_image_size(run_cfg.crops.global_size)
    if resume_rng is not None:
        set_rng_state(resume_rng)  # after the loader started, so nothing draws in between

    metrics = MetricsLog(run_dir, resume_step=progress.step) if env.is_main else None
    bar = _progress(stop, progress.step) if env.is_main else None
    model.train()
    device = env.device
    loss_value = float("nan")
    warmup_steps = cfg.optim.warmup_epochs * cfg.optim.epoch_length
    last_warning = -(10**9)
    frozen: bool | None = None
    records = _StepRecords()
    started = progress.step
    first_step_seconds: float | None = None

    def checkpoint_due(done: int) -> bool:
        return done % cfg.checkpoint.every == 0 or done == stop

    def flush(knn: dict[str, float] | None = None) -> None:
        """Read the pending steps back, check them, write their metrics lines and log."""
        nonlocal loss_value, last_warning
        lines, error = records.flush(run_dir)
        for record in lines:
            if "koleo" in record:
                record["koleo_value"] = record["koleo"] / cfg.loss.koleo_weight  # unweighted
            if knn is not None and record is lines[-1]:
                record.update(knn)
            loss_value = record["loss"]
            if metrics is not None:
                metrics.write(record)  # before any checkpoint: a kill in between loses no line
        if error is not None:
            raise error
        if not lines or not env.is_main:
            return
        last = lines[-1]
        if knn is not None:
            log.info("step %d: online k-NN top-1 %.2f %%", last["step"], last["knn_top1"])
        # Early steps look collapsed by construction (a fresh teacher maps every image to nearly
        # the same output), so warnings start after the lr warmup.
        reasons = collapse_reasons(last) if "teacher_entropy" in last else []
        if reasons and last["step"] > warmup_steps and last["step"] - last_warning >= 100:
            log.warning("step %d: collapse signal: %s", last["step"], "; ".join(reasons))
            last_warning = last["step"]
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{last['lr']:.2e}")
        else:
            log.info("step %d/%d loss %.4f lr %.3g %.1f img/s", last["step"], stop, loss_value, last["lr"],
                     last["images_per_s"])

    try:
        while progress.step < stop:
            step = progress.step
            if phase is not None and step == phase and not in_phase:
                # The switch: positions resized once, the loader restarted at the same sample.
                in_phase, run_cfg = True, phase_config(cfg)
                _resize_positions(model, optimizer, run_cfg.crops.global_size)
                if wrap is not None and dist_cfg.strategy == "ddp":
                    forward = wrap()  # DDP holds the old Parameter and its gradient buckets
                del batches
                batches = build_loader(run_cfg, dataset, progress.samples_consumed, env.rank, env.world_size,
                                       crops_dtype, pin_memory)
                crop_on_device = device_crop_transform(run_cfg)
                if online_knn is not None:
                    online_knn.set_image_size(run_cfg.crops.global_size)
                if env.is_main:
                    log.info("step %d: switching to %d / %d px crops, batch %d", step, run_cfg.crops.global_size,
                             run_cfg.crops.local_size, run_cfg.optim.batch_size)
            if cfg.train.head_warmup_steps and frozen != (step < cfg.train.head_warmup_steps):
                frozen = step < cfg.train.head_warmup_steps
                set_backbones_frozen(model.student_backbones(), frozen)
            t0 = time.perf_counter()
            batch = next(batches)
            skipped, empty_ranks = _batch_counts(batch, env)
            progress.skipped_images += skipped
            progress.samples_consumed += run_cfg.optim.batch_size
            if empty_ranks:  # every rank skips, so the collectives stay matched
                if env.is_main:
                    log.warning("step %d: every image of a batch failed to decode; step skipped", step + 1)
                progress.step += 1
                if checkpoint_due(progress.step):  # the last step's checkpoint too
                    flush()
                    _save(run_dir, model, optimizer, progress.trainer_state(), config_yaml, cfg.checkpoint.keep, env)
                continue
            k = cfg.optim.accumulation_steps
            micro = [micro_to_device(m, device) for m in split_batch(batch, k)] if k > 1 else None
            batch = batch_to_device(batch, device)
            if crop_on_device is not None:
                batch = device_crops(batch, crop_on_device, device, crops_dtype)
            sched = schedules.at(step)
            sched["backbone_lr_scale"] = backbone_lr_scale(step, cfg.train.head_warmup_steps,
                                                           cfg.train.backbone_lr_warmup_steps)
            terms, targets = train_step(model, optimizer, batch, sched, cfg, device, forward=forward, env=env,
                                        micro_batches=micro)
            progress.step = step = step + 1
            images = batch["collated_global_crops"].shape[0] / 2 * env.world_size  # all ranks
            host = {"lr": sched["lr"], "wd": sched["wd"], "momentum": sched["momentum"],
                    "teacher_temp": sched["teacher_temp"], "images_per_s": images / (time.perf_counter() - t0),
                    "skipped_images": progress.skipped_images}
            if cfg.init.backbone:
                host["backbone_lr_scale"] = sched["backbone_lr_scale"]
            records.add(step, terms, health_tensor(targets) if env.is_main else None, host)  # rank 0's batch
            if step == started + 1:
                first_step_seconds = time.perf_counter() - t0
                if cfg.train.compile and env.is_main:
                    log.info("first step of this process: %.1f s, compilation included (train.compile=%s)",
                             first_step_seconds, cfg.train.compile)
            if bar is not None:
                bar.update(1)
            knn_step = cfg.eval.knn_every > 0 and step % cfg.eval.knn_every == 0
            knn = _online_knn(online_knn, model, cfg, env) if knn_step else None  # rank 0's result
            # The same steps on every rank, so that a NaN stops all ranks at the same step.
            if knn_step or step % cfg.train.log_every == 0 or checkpoint_due(step):
                flush(knn)
            if checkpoint_due(step):
                _save(run_dir, model, optimizer, progress.trainer_state(), config_yaml, cfg.checkpoint.keep, env)
    finally:
        if metrics is not None:
            metrics.close()
        if bar is not None:
            bar.close()
    return TrainResult(run_dir, progress.step, loss_value, progress.skipped_images, first_step_seconds)


def _check_before_work(cfg: Config, run_dir: Path, env: DistEnv) -> tuple[Any, OnlineKNN | None]:
    """Everything that can be wrong before any work: the configuration, a run folder holding
    another configuration, the data (missing or empty) and the online k-NN's data sets."""
    validate(cfg, world_size=env.world_size)
    if env.is_main:
        for note in ignored_keys(cfg, env.world_size):
            log.warning("%s", note)
    saved_cfg_path = run_dir / "config.yaml"
    if saved_cfg_path.is_file():
        import yaml

        _check_resume_config(config_from_dict(yaml.safe_load(saved_cfg_path.read_text())), cfg, run_dir)
    dataset = build_dataset(cfg)
    online_knn = OnlineKNN(cfg, dataset) if cfg.eval.knn_every > 0 and env.is_main else None
    return dataset, online_knn


def _build_and_start(cfg: Config, run_dir: Path, env: DistEnv,
                     teacher: TrainedWeights | None) -> tuple[SSLModel | DistillModel, str]:
    """The model on its device, with `init` weights on a fresh run (a misfit fails before
    anything is written), and the run folder's config.yaml written."""
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    model = build_model(cfg, run_dir, teacher)  # the same initial weights on every rank
    if latest_checkpoint(run_dir) is None and cfg.init.backbone:
        load_initial_weights(model.networks(), cfg.init)
    config_yaml = _dump_yaml(cfg)
    env.barrier()  # every rank has read the old config.yaml before rank 0 replaces it
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
        _write_student_configs(cfg, run_dir)
    model = model.to(env.device)
    if env.world_size > 1:  # ranks draw different stochastic-depth samples from here on
        torch.manual_seed(derive_seed(cfg.train.seed, _RANK_RNG_STREAM, env.rank))
    return model, config_yaml


def _restore(cfg: Config, run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             env: DistEnv) -> tuple[_Progress, dict[str, Any] | None]:
    """Load the newest checkpoint, if any: the progress and this rank's random streams (None when
    the world size changed, or on a fresh run)."""
    ckpt_path = latest_checkpoint(run_dir)
    if ckpt_path is None:
        return _Progress(), None
    # The state the checkpoint was written in: resized positions; a backbone that has not
    # stepped yet (every step so far a head warm-up step) has no optimizer state to load.
    written_at = checkpoint_step(ckpt_path)
    if cfg.highres.start_step is not None and written_at > cfg.highres.start_step:
        _resize_positions(model, optimizer, phase_config(cfg).crops.global_size)
    if cfg.train.head_warmup_steps:
        set_backbones_frozen(model.student_backbones(), written_at <= cfg.train.head_warmup_steps)  # type: ignore[operator]
    state = load_training_state(ckpt_path, model, optimizer, env)
    progress = _Progress(state["step"], state["skipped_images"], state["samples_consumed"])
    if state["rng"] is None:  # another world size: fresh per-rank streams, still seeded
        torch.manual_seed(derive_seed(cfg.train.seed, _RANK_RNG_STREAM, env.rank, progress.step))
    if env.is_main:
        log.info("resuming %s from step %d (written by %d process(es), now %d)",
                 run_dir, progress.step, state["world_size"], env.world_size)
    return progress, state["rng"]


def launch_record(cfg: Config, env: DistEnv, step: int, crops_dtype: torch.dtype,
                  pin_memory: bool) -> dict[str, Any]:
    """What runs where in this (re)start of a run: device, world size, backend, precision and
    batch per rank, as logged at start and appended to the run folder's launches.jsonl."""
    device = env.device
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "start_step": step,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine_info()["cpu"],
        "world_size": env.world_size,
        "backend": env.backend if env.distributed else "none",
        "strategy": cfg.train.distributed.strategy if env.distributed else "none",
        "autocast": cfg.train.autocast,
        "param_dtype": cfg.train.distributed.param_dtype if env.distributed else "float32",
        "reduce_dtype": cfg.train.distributed.reduce_dtype if env.distributed else "float32",
        "crops_dtype": str(crops_dtype).removeprefix("torch."),
        "tf32": cfg.train.tf32 and device.type == "cuda",
        "global_batch": cfg.optim.batch_size,
        "batch_per_rank": cfg.optim.batch_size // env.world_size,
        "loader_workers": cfg.data.num_workers,
        "pin_memory": pin_memory,
        "packing": packing_enabled(cfg.train),
        "crops": ("batched on the " + ("device" if cfg.crops.batched_on == "device" else "loader")
                  if cfg.crops.batched else "per image in the loader"),
        "compile": cfg.train.compile,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
    }


def _record_launch(cfg: Config, run_dir: Path, env: DistEnv, step: int, crops_dtype: torch.dtype,
                   pin_memory: bool) -> None:
    record = launch_record(cfg, env, step, crops_dtype, pin_memory)
    log.info("run: %s on %s (%s), %d process(es), backend %s, %s, autocast %s, batch %d per rank (%d in all)",
             run_dir, record["device"], record["device_name"], record["world_size"], record["backend"],
             record["strategy"], record["autocast"], record["batch_per_rank"], record["global_batch"])
    with open(run_dir / "launches.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def phase_config(cfg: Config) -> Config:
    """`cfg` as the high-resolution phase runs it: its crop sizes and batch size (the schedules
    are built from `cfg` itself, so they continue across the switch)."""
    hr, c = cfg.highres, cfg.crops
    crops = dataclasses.replace(c, global_size=hr.global_size or c.global_size, local_size=hr.local_size or c.local_size)
    optim = dataclasses.replace(cfg.optim, batch_size=hr.batch_size or cfg.optim.batch_size)
    return dataclasses.replace(cfg, crops=crops, optim=optim)


def _resize_positions(model: nn.Module, optimizer: torch.optim.Optimizer, image_size: int) -> None:
    """Resize every backbone's positional embedding to `image_size`: a new Parameter takes the
    old one's place in the optimizer, with AdamW's moments resized alike (bicubically; the second
    moment clamped at 0, which bicubic overshoot could cross)."""
    for net in model.networks():  # type: ignore[operator]
        backbone = net["backbone"]
        old = backbone.pos_embed
        new = backbone.resize_pos_embed_(image_size)
        if new is old:
            continue
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = optimizer.state.pop(old, None)
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                moment = resize_pos_embed(state[key], backbone.pos_grid, backbone.interpolate_antialias)
                state[key] = moment.clamp_min(0) if key == "exp_avg_sq" else moment
            optimizer.state[new] = state


def _released_model_config(cfg: Config, name: str) -> ModelConfig:
    return student_models(cfg)[name] if name else cfg.model


def _write_student_configs(cfg: Config, run_dir: Path) -> None:
    """Each distillation student's folder is a run folder of its own for `dinokit eval` & co.:
    the run's config with the student's architecture, beside its exported EMA backbone."""
    if not cfg.distill.teacher:
        return
    for name, model_cfg in student_models(cfg).items():
        folder = run_dir / "students" / name
        folder.mkdir(parents=True, exist_ok=True)
        own = dataclasses.replace(cfg, model=model_cfg, distill=DistillConfig())
        (folder / "config.yaml").write_text(_dump_yaml(own))


def _online_knn(knn: OnlineKNN | None, model: nn.Module, cfg: Config, env: DistEnv) -> dict[str, float] | None:
    """k-NN of the released backbone (the teacher, or the first student's EMA) on rank 0. A
    sharded backbone is gathered (by every rank) into a plain copy first, so that rank 0 can run
    it alone."""
    name, backbone = next(iter(model.released_backbones().items()))  # type: ignore[operator]
    if cfg.train.distributed.strategy == "fsdp" and env.distributed:
        state = full_state_dict(backbone)
        if knn is None:
            return None
        with torch.random.fork_rng(devices=[]):  # building draws init numbers; training must not see it
            backbone = backbone_from_config(_released_model_config(cfg, name), use_mask_token=cfg.loss.mode != "dino")
        if "pos_embed" in state:
            backbone.resize_pos_embed_(math.isqrt(state["pos_embed"].shape[1] - 1) * backbone.patch_size)
        backbone.load_state_dict(state)
        backbone.to(env.device)
    return knn.evaluate(backbone) if knn is not None else None


def _save(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict[str, int],
          config_yaml: str, keep: int, env: DistEnv) -> None:
    model.settle_pending_center_updates()  # type: ignore[operator]
    save_training_state(run_dir, trainer["step"], model, optimizer, trainer, config_yaml, keep, env)
    for name, backbone in model.released_backbones().items():  # type: ignore[operator]
        state = full_state_dict(backbone)  # gathers FSDP shards (every rank calls)
        if env.is_main:
            folder = run_dir / "students" / name if name else run_dir
            export_backbone(folder / "teacher_backbone.safetensors", state)


def _dump_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

