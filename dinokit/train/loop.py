"""`dinokit train`: the DINO / DINOv2 pretraining loop on one process, exactly resumable.

    dinokit train DATA --preset tiny --out runs/tiny          # start, or resume if runs/tiny exists
    dinokit train DATA --preset tiny --out runs/tiny train.max_steps=300

Each step: schedules -> teacher targets -> student outputs -> losses -> backward -> clip ->
AdamW -> EMA. Every `checkpoint.every` steps (and at the last step) the full state is written
atomically and the teacher backbone is exported as `teacher_backbone.safetensors`. Resuming
restores model, optimiser, loss centers, RNG states and the data position, so a run stopped and
resumed reproduces the uninterrupted run bit for bit on CPU.
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
from torch import Tensor

from dinokit.checkpoint.training import (
    export_backbone,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dinokit.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    schedule_args,
    vit_args_from_config,
)
from dinokit.data.datasets import FashionMNIST, FileListDataset, ImageFolderDataset
from dinokit.data.loader import make_train_loader
from dinokit.data.masking import MaskingGenerator
from dinokit.data.transforms import MultiCropAugmentation
from dinokit.train.metrics import MetricsLog
from dinokit.train.online_knn import OnlineKNN
from dinokit.train.optim import apply_schedule, build_optimizer
from dinokit.train.schedules import build_schedules
from dinokit.train.ssl_model import LossArgs, SSLModel, collapse_reasons, health_signals

log = logging.getLogger("dinokit.train")

# Settings that may change between a run and its resumption without changing the result.
RESUMABLE_CHANGES = {
    "train.max_steps", "train.log_every", "train.device", "data.num_workers", "data.path",
    "checkpoint.every", "checkpoint.keep", "eval.knn_every", "eval.knn_train", "eval.knn_val",
    "eval.knn_train_size", "eval.knn_val_size", "eval.knn_k",
}


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the run stops and the last good checkpoint stays."""


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    final_loss: float
    skipped_images: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_dataset(cfg: Config) -> Any:
    data = cfg.data
    if data.dataset == "fashion_mnist":
        return FashionMNIST(data.path or "/usr/share/datasets/fashion-mnist", split=data.split)
    if data.dataset == "filelist":
        return FileListDataset(data.path)
    return ImageFolderDataset(data.path)


def build_model(cfg: Config) -> SSLModel:
    v1 = cfg.loss.mode == "dino"
    return SSLModel(
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


def build_loader(cfg: Config, dataset: Any, start_index: int) -> Iterator[dict[str, Any]]:
    c = cfg.crops
    transform = MultiCropAugmentation(
        global_crops_size=c.global_size,
        local_crops_size=c.local_size,
        global_crops_scale=tuple(c.global_scale),
        local_crops_scale=tuple(c.local_scale),
        local_crops_number=c.local_number,
        flip_p=c.flip_p,
        color_jitter_p=c.color_jitter_p,
        grayscale_p=c.grayscale_p,
        blur_p=tuple(c.blur_p),
        solarize_p=c.solarize_p,
    )
    grid = c.global_size // cfg.model.patch_size
    # Rectangles up to half the grid; the official value has an operator-precedence quirk
    # (see dinokit.data.masking.official_max_num_patches) that is not worth reproducing here.
    mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    loader = make_train_loader(
        dataset,
        transform,
        batch_size=cfg.optim.batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.train.seed,
        start_index=start_index,
        mask_generator=mask_generator,
        mask_ratio_tuple=tuple(cfg.loss.mask_ratio),
        mask_probability=cfg.loss.mask_probability,
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


def train_step(
    model: SSLModel,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    sched: dict[str, float],
    cfg: Config,
    device: torch.device,
    step_number: int = 0,
    run_dir: Path | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One optimisation step: schedules -> forward -> finite check -> backward -> clip -> AdamW -> EMA."""
    apply_schedule(optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])
    with _autocast(cfg, device):
        terms, targets = model(batch, sched["teacher_temp"])
    for name, value in terms.items():
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
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
    optimizer.step()
    model.update_teacher(sched["momentum"])
    return terms, targets


def train(cfg: Config, run_dir: Path) -> TrainResult:
    """Train (or resume) the run in `run_dir` with `cfg`; returns when `max_steps` or the end of
    the schedule is reached. Raises `NonFiniteLossError` on a NaN / inf loss."""
    run_dir = Path(run_dir)
    saved_cfg_path = run_dir / "config.yaml"
    ckpt_path = latest_checkpoint(run_dir)
    if saved_cfg_path.is_file():
        import yaml

        _check_resume_config(config_from_dict(yaml.safe_load(saved_cfg_path.read_text())), cfg, run_dir)
    dataset = build_dataset(cfg)  # fails on a missing / empty folder before any work
    online_knn = OnlineKNN(cfg, dataset) if cfg.eval.knn_every > 0 else None
    run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = _dump_yaml(cfg)
    saved_cfg_path.write_text(config_yaml)

    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(
        model.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult,
        betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
    )
    schedules = build_schedules(**schedule_args(cfg))
    stop = cfg.run_steps

    step, skipped_total, samples_consumed = 0, 0, 0
    resume_rng = None
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        model.student.load_state_dict(state["student"])
        model.teacher.load_state_dict(state["teacher"])
        model.dino_loss.load_state_dict(state["dino_loss"])
        model.ibot_loss.load_state_dict(state["ibot_loss"])
        optimizer.load_state_dict(state["optimizer"])
        step, skipped_total = int(state["step"]), int(state["skipped_images"])
        samples_consumed = int(state["samples_consumed"])
        resume_rng = state["rng"]
        log.info("resuming %s from step %d", run_dir, step)
    batches = build_loader(cfg, dataset, start_index=samples_consumed)
    if resume_rng is not None:
        set_rng_state(resume_rng)  # after the loader started, so nothing draws in between

    metrics = MetricsLog(run_dir, resume_step=step)
    bar = _progress(stop, step)
    model.train()
    loss_value = float("nan")
    warmup_steps = cfg.optim.warmup_epochs * cfg.optim.epoch_length
    last_warning = -(10**9)
    try:
        while step < stop:
            t0 = time.perf_counter()
            batch = next(batches)
            skipped_total += int(batch.get("n_skipped", 0))
            samples_consumed += cfg.optim.batch_size
            if batch.get("n_images", 1) == 0:
                log.warning("step %d: every image of the batch failed to decode; batch skipped", step + 1)
                step += 1
                continue
            batch = _to_device(batch, device)
            sched = schedules.at(step)
            terms, targets = train_step(model, optimizer, batch, sched, cfg, device, step + 1, run_dir)
            step += 1
            loss_value = terms["total"].item()

            health = health_signals(targets)
            if "koleo" in terms:
                health["koleo_value"] = terms["koleo"].item() / cfg.loss.koleo_weight  # unweighted
            seconds = time.perf_counter() - t0
            record = {
                "step": step,
                "loss": loss_value,
                **{k: v.item() for k, v in terms.items() if k != "total"},
                "lr": sched["lr"],
                "wd": sched["wd"],
                "momentum": sched["momentum"],
                "teacher_temp": sched["teacher_temp"],
                "images_per_s": batch["collated_global_crops"].shape[0] / 2 / seconds,
                "skipped_images": skipped_total,
                **health,
            }
            if online_knn is not None and online_knn.due(step):
                record.update(online_knn.evaluate(model.teacher["backbone"]))
                log.info("step %d: online k-NN top-1 %.2f %%", step, record["knn_top1"])
            metrics.write(record)
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
                log.info("step %d/%d loss %.4f lr %.3g %.1f img/s", step, stop, loss_value, sched["lr"], record["images_per_s"])

            if step % cfg.checkpoint.every == 0 or step == stop:
                _save(run_dir, step, model, optimizer, skipped_total, samples_consumed, config_yaml, cfg.checkpoint.keep)
    finally:
        metrics.close()
        if bar is not None:
            bar.close()
    return TrainResult(run_dir, step, loss_value, skipped_total)


def _save(run_dir: Path, step: int, model: SSLModel, optimizer: torch.optim.Optimizer,
          skipped: int, samples_consumed: int, config_yaml: str, keep: int) -> None:
    model.settle_pending_center_updates()
    state = {
        "step": step,
        "student": model.student.state_dict(),
        "teacher": model.teacher.state_dict(),
        "dino_loss": model.dino_loss.state_dict(),
        "ibot_loss": model.ibot_loss.state_dict(),
        "optimizer": optimizer.state_dict(),
        "skipped_images": skipped,
        "samples_consumed": samples_consumed,  # the data sampler's position
        "rng": rng_state(),
    }
    save_checkpoint(run_dir, step, state, config_yaml, keep)
    export_backbone(run_dir / "teacher_backbone.safetensors", model.teacher["backbone"].state_dict())


def _dump_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

