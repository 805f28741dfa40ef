"""`dinokit quickstart`: pretrain with the tiny preset, evaluate, draw, and write `report.md`.

The default data is Fashion-MNIST (Debian package `dataset-fashion-mnist`): pretraining on the
60k training images without labels, then k-NN and linear probes on the 10k test images for
three feature extractors: the pretrained teacher, the same architecture at random
initialisation, and raw pixels. `--data FOLDER` takes any image folder instead; with class
sub-folders a seeded 80 / 20 split gives the evaluation sets, without them the report has the
training curves and pictures only. Images larger than about 48 px are worked on at 56 px, decoded
once into OUT/cache (`dinokit.folder_fit`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from dinokit.config import Config, load_config
from dinokit.data.datasets import FASHION_MNIST_DIR, DatasetError, FashionMNIST, ImageFolderDataset
from dinokit.eval.commands import split_features
from dinokit.eval.embed import PreprocessedImages, eval_transform_for, linear_feature_kinds
from dinokit.eval.knn import knn_classify
from dinokit.eval.linear import linear_probe
from dinokit.folder_fit import cache_folder, fit_folder
from dinokit.machine import machine_info
from dinokit.train.loop import train

log = logging.getLogger("dinokit.quickstart")

FASHION_MNIST_HELP = (
    "Fashion-MNIST was not found in {root}. Install it with `apt-get install dataset-fashion-mnist` "
    "(Debian / Ubuntu), or put the four IDX files (train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a folder and "
    "pass --fashion-mnist-root FOLDER, or run on your own images with --data FOLDER."
)
KNN_KS = (10, 20, 100, 200)


def _datasets(data: Path | None, fmnist_root: Path) -> tuple[str, Dataset | None, Dataset | None, str]:
    """(training data spec for `dinokit train`, eval train set, eval test set, description)."""
    if data is None:
        if not (fmnist_root / "train-images-idx3-ubyte.gz").is_file():
            raise DatasetError(FASHION_MNIST_HELP.format(root=fmnist_root))
        return (str(fmnist_root), FashionMNIST(fmnist_root, "train"), FashionMNIST(fmnist_root, "test"),
                "Fashion-MNIST (60,000 training images without labels; evaluation on the 10,000 test images)")
    folder = ImageFolderDataset(data)
    if not folder.classes:
        return str(data), None, None, f"{data} ({len(folder)} images, no class sub-folders: no evaluation)"
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(0)).tolist()
    cut = int(0.8 * len(order))
    return (str(data), Subset(folder, sorted(order[:cut])), Subset(folder, sorted(order[cut:])),
            f"{data} ({len(folder)} images, {len(folder.classes)} classes; evaluation: seeded 80/20 split)")


def cpu_speed_options(machine: dict[str, Any] | None = None, compiler: str | None = None) -> tuple[list[str], str]:
    """Overrides that make the tiny preset's step faster on this CPU, and why (for the report).

    bf16 autocast where the CPU has AMX (bf16 matrix tiles: oneDNN's bf16 GEMMs outrun fp32 there;
    without AMX it was measured slower), and the whole step compiled (`train.compile=step`) where
    a C++ compiler is found for inductor; with them the crops are made in the training process,
    as a loader worker competes with the compiled step for the same cores. Nothing is chosen on a
    GPU machine (the preset's defaults stand) or without a compiler; `--no-speedups` turns it off
    and the user's overrides still win. docs/benchmarks.md has the measurements.
    """
    if torch.cuda.is_available():
        return [], "none (a GPU is present: the preset's defaults)"
    machine = machine or machine_info()
    if compiler is None:
        compiler = next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), "")
    if not compiler:
        return [], "none (no C++ compiler for torch.compile: eager float32)"
    options = ["train.compile=step", "crops.batched_on=device", "data.num_workers=0"]
    why = f"whole step compiled ({compiler}), crops made in the training process"
    if "amx_bf16" in machine["isa"]:
        options.append("train.autocast=bf16")
        why += ", bf16 autocast (AMX)"
    return options, why


# The compiled step's images per second grow with the batch (64 -> 256: 1.47x on 2 CPU cores),
# and the tiny preset's images in batches of 256 (1,500 steps instead of 6,000) land within seed
# noise of its k-NN accuracy, about 0.2 points lower (docs/benchmarks.md, docs/recipe-study.md).
COMPILED_BATCH = 256


def compiled_batch_options(cfg: Config, overrides: list[str]) -> tuple[list[str], str]:
    """Overrides that pretrain the preset's images in batches of `COMPILED_BATCH` (same number of
    images, fewer steps), and why; none where the preset's batch is already as large, where its
    images do not divide into such batches, or where the user sets the batch, the epoch length or
    the teacher momentum. The teacher's starting momentum m becomes m ** (new batch / old batch):
    one step then moves the teacher as far as the old steps over the same images did."""
    optim = cfg.optim
    images_per_epoch = optim.batch_size * optim.epoch_length
    if (optim.batch_size >= COMPILED_BATCH or images_per_epoch % COMPILED_BATCH
            or _override_keys(overrides) & {"optim.batch_size", "optim.epoch_length", "teacher.momentum_teacher"}):
        return [], ""
    length = images_per_epoch // COMPILED_BATCH
    momentum = round(cfg.teacher.momentum_teacher ** (COMPILED_BATCH / optim.batch_size), 4)
    return ([f"optim.batch_size={COMPILED_BATCH}", f"optim.epoch_length={length}",
             f"teacher.momentum_teacher={momentum}"],
            f"batches of {COMPILED_BATCH} ({optim.epochs * length} steps for the preset's "
            f"{optim.epochs * optim.epoch_length} steps of {optim.batch_size} images, teacher momentum "
            f"{cfg.teacher.momentum_teacher:g} -> {momentum:g})")


def quickstart_speed_options(preset: Config, overrides: list[str], machine: dict[str, Any] | None = None,
                             compiler: str | None = None) -> tuple[list[str], str]:
    """The machine's speed options (`cpu_speed_options`) and, where the step is compiled and the
    user has not turned that off, the batches of `compiled_batch_options`; and why."""
    options, why = cpu_speed_options(machine, compiler)
    if "train.compile=step" in _in_effect(options, overrides):
        batch, batch_why = compiled_batch_options(preset, overrides)
        options, why = options + batch, why + (f", {batch_why}" if batch else "")
    return options, why


def quickstart_config(train_spec: str, fashion_mnist: bool, steps: int | None, preset: str,
                      overrides: list[str], fit: tuple[str, ...] = (), speed: tuple[str, ...] = ()) -> Config:
    """The run's configuration: the preset, then the machine's speed options, then the folder fit,
    then `--steps`, then the user's overrides (each later one wins)."""
    items = [f"data.path={train_spec}", *speed, *fit]
    if fashion_mnist:
        items += ["data.dataset=fashion_mnist",
                  # Online k-NN on a small subsample every 500 steps, for the curves.
                  "eval.knn_every=500", f"eval.knn_train=fashion_mnist:{train_spec}",
                  f"eval.knn_val=fashion_mnist:{train_spec}", "eval.knn_train_size=5000", "eval.knn_val_size=1000"]
    if steps is not None:
        items.append(f"train.max_steps={steps}")
    return load_config(preset, items + overrides)


def _evaluate(name: str, backbone: Any, train_set: Dataset, test_set: Dataset, depth: int, **kw: Any) -> dict:
    t0 = time.time()
    kinds = ["cls"] if name == "raw pixels" else ["cls", *linear_feature_kinds(depth)]
    tr, te, info = split_features(backbone, train_set, test_set, kinds, progress=False, **kw)
    knn = knn_classify(tr.features["cls"], tr.labels, te.features["cls"], te.labels, ks=KNN_KS)
    linear_kinds = [k for k in tr.features if k != "cls"] or ["cls"]
    lin = linear_probe({k: tr.features[k] for k in linear_kinds}, tr.labels,
                       {k: te.features[k] for k in linear_kinds}, te.labels, epochs=10)
    return {"name": name, "backbone": info["backbone"], "knn": {str(k): v for k, v in knn.items()},
            "linear": lin["best"], "n_train": len(tr.labels), "n_test": len(te.labels),
            "seconds": round(time.time() - t0, 1)}


def _pictures(run_dir: Path, out: Path, test_set: Dataset | None, train_spec: str) -> list[str]:
    from dinokit.checkpoint.resolve import resolve_backbone
    from dinokit.viz.attention import attention_maps, attention_picture, prepare_image
    from dinokit.viz.curves import plot_curves
    from dinokit.viz.pca import pca_picture

    made = [plot_curves(run_dir, out / "curves.png").name]
    resolved = resolve_backbone(run_dir)
    source = test_set if test_set is not None else ImageFolderDataset(train_spec)
    images = []
    for i in range(len(source)):  # type: ignore[arg-type]
        item = source[i]
        if item is not None:
            images.append(item[0])
        if len(images) == 6:
            break
    # Small images are drawn larger, at least 8 x 8 tokens (28 px with 14 px patches -> 112 px):
    # positional embeddings are interpolated, so this shows the model off its training size.
    size = max(resolved.image_size, 8 * resolved.model.patch_size)
    for k, image in enumerate(images[:3]):
        shown, x = prepare_image(image.resize((size, size)), resolved.model.patch_size, size)
        attention_picture(shown, attention_maps(resolved.model, x), out / f"attention_{k}.png")
        made.append(f"attention_{k}.png")
    pca_picture(resolved.model, [im.resize((size, size)) for im in images], out / "pca.png", size=size)
    made.append("pca.png")
    return made


def run_quickstart(out: Path, data: Path | None = None, fmnist_root: Path = Path(FASHION_MNIST_DIR),
                   steps: int | None = None, preset: str = "tiny", overrides: list[str] | None = None,
                   speedups: bool = True) -> Path:
    """Run everything and return the path of `report.md`."""
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    speed, speed_reason = (quickstart_speed_options(load_config(preset, []), list(overrides or []))
                           if speedups else ([], "none (--no-speedups)"))
    log.info("speed options: %s", speed_reason)
    fit = None
    if data is not None and preset == "tiny":
        folder = ImageFolderDataset(data)
        preset_optim = load_config(preset, speed).optim
        fit = fit_folder(folder, preset_optim.epochs, preset_optim.epoch_length)
        log.info("%s: %s", data, fit.reason)
        if fit.overrides:
            data, cache_skipped = cache_folder(folder, out / "cache", fit.working_size)
            log.info("images decoded once at %d px into %s (%d undecodable, skipped)", fit.working_size, data,
                     cache_skipped)
    train_spec, eval_train, eval_test, description = _datasets(data, fmnist_root)
    if fit is not None and fit.overrides:
        description = description.replace(str(data), f"{folder.root} (decoded once at {fit.working_size} px into {data})")
    cfg = quickstart_config(train_spec, data is None, steps, preset, list(overrides or []),
                            fit.overrides if fit else (), tuple(speed))
    speed_in_effect = _in_effect(speed, [*(fit.overrides if fit else ()), *(overrides or [])])
    if speed_in_effect != speed:
        speed_reason += "; replaced by the overrides: " + ", ".join(o for o in speed if o not in speed_in_effect)
    run_dir = out / "run"
    log.info("pretraining %s steps on %s", cfg.run_steps, description)
    t0 = time.time()
    result = train(cfg, run_dir)
    train_seconds = time.time() - t0

    evaluations = []
    t_eval = time.time()
    if eval_train is not None and eval_test is not None:
        depth = cfg.model.depth or 12
        # Whole images at the training crop size (no 256/224 centre crop: small images fill their
        # frame), decoded and preprocessed once for the three feature sets below.
        size = cfg.crops.global_size
        transform = eval_transform_for(size, resize=size, crop=size)
        train_images, test_images = PreprocessedImages(eval_train, transform), PreprocessedImages(eval_test, transform)
        for name, backbone, kw in (
            ("dinokit pretrained (teacher)", str(run_dir), {}),
            ("same architecture, random init", str(run_dir), {"random_init": True}),
            ("raw pixels", "pixels", {}),
        ):
            log.info("evaluating %s", name)
            evaluations.append(_evaluate(name, backbone, train_images, test_images, depth, resize=size, crop=size,
                                         **kw))
    eval_seconds = time.time() - t_eval
    pictures = _pictures(run_dir, out, eval_test, train_spec)
    (out / "results.json").write_text(json.dumps({
        "machine": machine_info(), "data": description, "preset": preset, "overrides": list(overrides or []),
        "speed_options": speed_in_effect,
        "fit": asdict(fit) if fit else None,
        "evaluations": evaluations, "steps": result.steps_done, "skipped_images": result.skipped_images,
        "train_seconds": round(train_seconds, 1), "first_step_seconds": _rounded(result.first_step_seconds),
        "eval_seconds": round(eval_seconds, 1),
        "wall_seconds": round(time.time() - t_start, 1)}, indent=2))
    report = out / "report.md"
    report.write_text(_report(cfg, description, result.steps_done, train_seconds, result.skipped_images,
                              evaluations, pictures, time.time() - t_start, fit.reason if fit else None,
                              speed_reason, result.first_step_seconds))
    return report


def _in_effect(options: list[str], later: list[str]) -> list[str]:
    """The `key=value` options that no later override replaced (a user's `train.autocast=none`
    removes the chosen `train.autocast=bf16` from what results.json reports)."""
    replaced = _override_keys(later)
    return [o for o in options if o.partition("=")[0].strip() not in replaced]


def _override_keys(overrides: list[str]) -> set[str]:
    """The dotted keys that `key=value` overrides set."""
    return {item.partition("=")[0].strip() for item in overrides}


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _pct(x: float) -> str:
    return f"{x:.2f}"


def _report(cfg: Config, description: str, steps: int, train_seconds: float, skipped: int,
            evaluations: list[dict], pictures: list[str], total_seconds: float, fit: str | None = None,
            speed: str | None = None, first_step: float | None = None) -> str:
    m = cfg.model
    machine = machine_info()
    lines = [
        "# dinokit quickstart report",
        "",
        f"- data: {description}",
        *([f"- fitted to the images: {fit}"] if fit else []),
        f"- model: ViT {m.embed_dim or ''}-wide, {m.depth} blocks, {m.num_heads} heads, patch {m.patch_size}; "
        f"{cfg.crops.global_size} px global crops, {cfg.crops.local_number} x {cfg.crops.local_size} px local crops; "
        f"{cfg.head.out_dim} prototypes; loss mode {cfg.loss.mode} ({cfg.loss.centering})",
        f"- pretraining: {steps} steps of batch {cfg.optim.batch_size} in {train_seconds / 60:.1f} min "
        f"({steps * cfg.optim.batch_size / max(train_seconds, 1e-9):.0f} images/s); {skipped} images skipped",
        *([f"- speed options for this machine: {speed}"] if speed else []),
        *([f"- first step: {first_step:.1f} s (compilation included, part of the pretraining time)"]
          if first_step is not None and cfg.train.compile else []),
        f"- total time: {total_seconds / 60:.1f} min on {torch.get_num_threads()} threads of "
        f"{machine['cpu']} ({machine['cores']} cores)",
        "",
    ]
    if evaluations:
        lines += [
            "## Evaluation",
            "",
            "k-NN: cosine similarity of the [CLS] token, votes weighted by exp(sim / 0.07). Linear: frozen features, "
            "the official feature sets x a learning-rate grid, chosen on 10 % of the training set, reported on test.",
            "",
            "| features | k-NN top-1 (k=10) | k-NN top-1 (k=20) | k-NN top-1 (k=200) | linear top-1 | linear feature |",
            "|---|---|---|---|---|---|",
        ]
        for e in evaluations:
            knn = e["knn"]
            lines.append(
                f"| {e['name']} | {_pct(knn['10']['top1'])} | {_pct(knn['20']['top1'])} | {_pct(knn['200']['top1'])} "
                f"| {_pct(e['linear']['test_top1'])} | {e['linear']['feature']} (lr {e['linear']['lr']:.3g}) |"
            )
        lines += ["", f"Training set {evaluations[0]['n_train']} images, test set {evaluations[0]['n_test']} images.", ""]
    lines += ["## Pictures", ""]
    for name in pictures:
        lines += [f"![{name}]({name})", ""]
    lines += ["Reproduce: `dinokit quickstart` (see README). Raw numbers: `results.json`; run folder: `run/`.", ""]
    return "\n".join(lines)
