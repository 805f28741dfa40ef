"""Parity runners for the data-side cases: `masking`, `collate` and `schedules`.

Each runner rebuilds its case from the manifest's plain values only (constructor kwargs, seeds,
draw counts, config numbers, tensor shapes), so a reference folder with other grid sizes, seeds or
configs runs without code changes.

Random streams: `random.Random(seed)` yields exactly the stream of the global `random` after
`random.seed(seed)` (same Mersenne-Twister seeding), so the runners regenerate the official draws on
a dedicated stream and leave the global state alone.
"""

from __future__ import annotations

import ast
import math
import operator
import random
import re
from typing import Any, Callable

import numpy as np
import torch

from dinokit.data.collate import collate_data_and_cast
from dinokit.data.masking import MaskingGenerator
from dinokit.reference.core import SCHEDULE_TOL, CaseContext, ReferenceError, Runner
from dinokit.train.schedules import CosineScheduler, DinoSchedules, build_schedules, scaled_lr

__all__ = ["RUNNERS", "run_masking", "run_collate", "run_schedules", "parse_mask_generator"]


# ---------------------------------------------------------------------------------------------
# masking
# ---------------------------------------------------------------------------------------------


def _masking_ctor(ctor: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(ctor)
    if isinstance(kwargs.get("input_size"), list):
        kwargs["input_size"] = tuple(kwargs["input_size"])
    return kwargs


def _draw_masks(gen: MaskingGenerator, target: int, draws: int, seed: int) -> np.ndarray:
    """`draws` masks after seeding, as bool (draws, H, W)."""
    rng = random.Random(seed)
    return np.stack([gen(target, rng=rng) for _ in range(draws)])


def run_masking(ctx: CaseContext) -> None:
    """Masking generator: first draws bit-exact, histogram / mean mask exact or statistical.

    With the same seed and the official random-call order the 2000 regenerated draws are the very
    draws the reference was computed from, so `count_hist`, `position_counts` and `mean_mask`
    match exactly (observed on the shared reference set). If they do not (e.g. a folder whose
    statistics come from a different seed than its first draws) they are compared statistically,
    with ~3x the manifest's seed-to-seed spread as tolerance.
    """
    for cfg in ctx.case["configs"]:
        p = f"cfg{cfg['index']}."
        gen = MaskingGenerator(**_masking_ctor(cfg["ctor"]))
        target = int(cfg["num_masking_patches_in_call"])
        draws = int(cfg["draws"])
        masks = _draw_masks(gen, target, draws, int(cfg["python_random_seed"]))
        flat_counts = masks.reshape(draws, -1).sum(1)

        first = ctx.tensor(p + "exact_first_draws")
        ctx.compare_exact(p + "exact_first_draws", torch.from_numpy(masks[: first.shape[0]]))
        # Invariant of the algorithm, whatever the reference: never more than the target.
        ctx.check(p + "invariant.count_le_target", bool(flat_counts.max() <= target),
                  float(flat_counts.max() - target), f"a mask has {flat_counts.max()} > {target} patches")

        hist = torch.bincount(torch.from_numpy(flat_counts), minlength=ctx.tensor(p + "count_hist").numel())
        positions = torch.from_numpy(masks.sum(0).astype(np.int64))
        mean_mask = torch.from_numpy(masks.sum(0) / draws)
        exact = torch.equal(hist, ctx.tensor(p + "count_hist")) and torch.equal(
            positions, ctx.tensor(p + "position_counts")
        )
        if exact:
            ctx.compare_exact(p + "count_hist", hist)
            ctx.compare_exact(p + "position_counts", positions)
            ctx.compare(p + "mean_mask", mean_mask, atol=1e-15, rtol=0.0)
        else:
            _masking_statistical(ctx, p, cfg, hist, mean_mask, draws)


def _masking_statistical(
    ctx: CaseContext, p: str, cfg: dict[str, Any], hist: torch.Tensor, mean_mask: torch.Tensor, draws: int
) -> None:
    spread = cfg.get("seed_to_seed_variability", {})
    # Floors cover folders without spread numbers: TVD of two 2000-draw histograms over a handful
    # of bins is ~0.02-0.05; a binomial mean-mask entry has std <= 0.5/sqrt(draws).
    tvd_tol = max(3 * float(spread.get("total_variation_distance_count_hist", 0.0)), 0.05)
    mm_tol = max(3 * float(spread.get("max_abs_diff_mean_mask", 0.0)), 5 * 0.5 / math.sqrt(draws))

    ref_hist = ctx.tensor(p + "count_hist").to(torch.float64)
    tvd = 0.5 * float((hist / hist.sum() - ref_hist / ref_hist.sum()).abs().sum())
    ctx.check(p + "count_hist", tvd <= tvd_tol, tvd, f"histogram TVD {tvd:.4f} > {tvd_tol:.4f}")

    ref_mm = ctx.tensor(p + "mean_mask").to(torch.float64)
    d_mm = float((mean_mask - ref_mm).abs().max())
    ctx.check(p + "mean_mask", d_mm <= mm_tol, d_mm, f"mean mask max diff {d_mm:.4f} > {mm_tol:.4f}")

    ref_pos = ctx.tensor(p + "position_counts").to(torch.float64) / float(draws)
    d_pos = float((mean_mask - ref_pos).abs().max())
    ctx.check(p + "position_counts", d_pos <= mm_tol, d_pos, f"position frequency diff {d_pos:.4f} > {mm_tol:.4f}")


# ---------------------------------------------------------------------------------------------
# collate
# ---------------------------------------------------------------------------------------------


def parse_mask_generator(text: str) -> MaskingGenerator:
    """Build a generator from text like "MaskingGenerator(input_size=(8,8), max_num_patches=32.0)".

    Only keyword arguments with literal values are accepted (`ast.literal_eval`, never `eval`).
    """
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ReferenceError(f"cannot parse mask_generator {text!r}: {exc}") from exc
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "MaskingGenerator"):
        raise ReferenceError(f"mask_generator {text!r} is not a MaskingGenerator(...) call")
    if node.args:
        raise ReferenceError(f"mask_generator {text!r}: only keyword arguments are supported")
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
    return MaskingGenerator(**_masking_ctor(kwargs))


def _parse_dtype(text: str) -> torch.dtype:
    dtype = getattr(torch, text.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ReferenceError(f"unknown dtype {text!r}")
    return dtype


_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _fill_rule(expr: str) -> Callable[[int, int], float]:
    """A tiny evaluator for fill formulas like "100+i*10+k" (names i, k; + - * and integers)."""
    tree = ast.parse(expr.strip(), mode="eval").body

    def ev(node: ast.AST, env: dict[str, int]) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name) and node.id in env:
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            return _ARITH[type(node.op)](ev(node.left, env), ev(node.right, env))
        raise ReferenceError(f"unsupported fill formula {expr!r}")

    ev(tree, {"i": 0, "k": 0})  # validate once
    return lambda i, k: float(ev(tree, {"i": i, "k": k}))


def _collate_samples(ctx: CaseContext, prefix: str = "example.") -> list[tuple[dict[str, list[torch.Tensor]], tuple]]:
    """Rebuild the example samples from the manifest's description (or the output shapes)."""
    text = str(ctx.case.get("example_input", {}).get("samples_list", ""))
    g_shape = tuple(ctx.tensor(prefix + "collated_global_crops").shape)
    l_shape = tuple(ctx.tensor(prefix + "collated_local_crops").shape)

    def crops(key: str) -> tuple[int, tuple[int, ...]] | None:
        m = re.search(rf"{key}=\[(\d+) tensors \(([\d,\s]+)\)\]", text)
        return (int(m.group(1)), tuple(int(x) for x in m.group(2).split(","))) if m else None

    m = re.search(r"(\d+) samples", text)
    g, loc = crops("global_crops"), crops("local_crops")
    if m and g and loc:
        n_images, (n_global, g_size), (n_local, l_size) = int(m.group(1)), g, loc
    else:
        # Fallback on shapes: DINOv2 always has 2 global crops, which fixes the number of images.
        n_global = 2
        n_images = g_shape[0] // n_global
        n_local = l_shape[0] // n_images
        g_size, l_size = g_shape[1:], l_shape[1:]

    gm = re.search(r"global crop k of image i is filled with ([-+*\d\sik]+?)\s*(?:,|;|$)", text)
    lm = re.search(r"local crop k with ([-+*\d\sik]+?)\s*(?:,|;|$)", text)
    g_fill = _fill_rule(gm.group(1) if gm else "i*10+k")
    l_fill = _fill_rule(lm.group(1) if lm else "100+i*10+k")
    return [
        (
            {
                "global_crops": [torch.full(g_size, g_fill(i, k)) for k in range(n_global)],
                "local_crops": [torch.full(l_size, l_fill(i, k)) for k in range(n_local)],
            },
            (),
        )
        for i in range(n_images)
    ]


def run_collate(ctx: CaseContext) -> None:
    """collate_data_and_cast: the concrete example bit-exact, then the per-image mask counts.

    `stats.mask_counts_per_image` are `collated_masks.sum(-1)` of consecutive calls on the same
    samples and generator after seeding (seed read from the tensor's semantics). With the official
    random-call order they match exactly (observed on the shared set); otherwise they are compared
    statistically (per-call sorted counts, mean per rank).
    """
    call = ctx.case["call"]
    ratio = tuple(float(x) for x in call["mask_ratio_tuple"])
    kwargs = dict(
        mask_ratio_tuple=ratio,
        mask_probability=float(call["mask_probability"]),
        dtype=_parse_dtype(str(call["dtype"])),
        n_tokens=call.get("n_tokens"),
    )
    gen = parse_mask_generator(str(call["mask_generator"]))
    samples = _collate_samples(ctx)

    rng = random.Random(int(call["python_random_seed_before_call"]))
    out = collate_data_and_cast(samples, mask_generator=gen, random_state=rng, **kwargs)
    for key, value in out.items():
        name = "example." + key
        if name not in ctx.tensors:
            continue  # the reference may not store every output; unchecked_outputs guards the rest
        actual = torch.as_tensor(value, dtype=ctx.tensor(name).dtype) if key == "upperbound" else value
        ctx.compare_exact(name, actual)

    if "stats.mask_counts_per_image" in ctx.tensors:
        _collate_stats(ctx, samples, gen, kwargs)


def _collate_stats(ctx: CaseContext, samples: list, gen: MaskingGenerator, kwargs: dict[str, Any]) -> None:
    name = "stats.mask_counts_per_image"
    ref = ctx.tensor(name)
    sem = str(ctx.case.get("tensors", {}).get(name, {}).get("semantics", ""))
    m = re.search(r"random\.seed\((\d+)\)", sem)
    seed = int(m.group(1)) if m else 0
    rng = random.Random(seed)
    counts = torch.stack(
        [collate_data_and_cast(samples, mask_generator=gen, random_state=rng, **kwargs)["collated_masks"].sum(-1)
         for _ in range(ref.shape[0])]
    )
    if m and torch.equal(counts, ref):
        ctx.compare_exact(name, counts)
        return
    # Statistical: sort each call's counts (the shuffle hides which image got which slot) and
    # compare the mean of every rank; the standard error of a rank mean is std/sqrt(calls).
    a = counts.sort(-1, descending=True).values.to(torch.float64)
    e = ref.sort(-1, descending=True).values.to(torch.float64)
    se = torch.sqrt((a.var(0) + e.var(0)) / ref.shape[0])
    diff = (a.mean(0) - e.mean(0)).abs()
    ok = bool((diff <= 5 * se + 0.25).all())
    ctx.check(name, ok, float(diff.max()), f"sorted per-rank mean counts differ by up to {float(diff.max()):.3f}")


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    """A value by dotted name, stored either flat ("train.X") or nested ({"train": {"X": ...}})."""
    if dotted in cfg:
        return cfg[dotted]
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ReferenceError(f"schedule config lacks {dotted!r}")
        node = node[part]
    return node


def _schedules_from_cfg(ctx: CaseContext, name: str, cfg: dict[str, Any]) -> DinoSchedules:
    optim, teacher = cfg["optim"], cfg["teacher"]
    computed: float | None = None
    if "base_lr" in optim:
        world = int(cfg.get("train.world_size", cfg.get("world_size", 1)))  # the shared set used 1
        batch = int(_get(cfg, "train.batch_size_per_gpu")) * world
        computed = scaled_lr(float(optim["base_lr"]), batch, optim.get("scaling_rule", "sqrt_wrt_1024"))
        if "lr" in optim:
            # The config's own scaled lr came from the same float ops, so they must be equal.
            err = abs(computed - float(optim["lr"]))
            ctx.check(name + "scaled_lr", err <= 1e-15, err, f"scaled lr {computed!r} != {optim['lr']!r}")
    lr = float(optim["lr"]) if "lr" in optim else computed
    if lr is None:
        raise ReferenceError(f"case {ctx.name}: {name} has neither optim.lr nor optim.base_lr")
    return build_schedules(
        epochs=int(optim["epochs"]),
        epoch_length=int(_get(cfg, "train.OFFICIAL_EPOCH_LENGTH")),
        lr=lr,
        min_lr=optim["min_lr"],
        warmup_epochs=int(optim["warmup_epochs"]),
        weight_decay=optim["weight_decay"],
        weight_decay_end=optim["weight_decay_end"],
        momentum_teacher=teacher["momentum_teacher"],
        final_momentum_teacher=teacher["final_momentum_teacher"],
        teacher_temp=teacher["teacher_temp"],
        warmup_teacher_temp=teacher["warmup_teacher_temp"],
        warmup_teacher_temp_epochs=int(teacher["warmup_teacher_temp_epochs"]),
        freeze_last_layer_epochs=int(optim["freeze_last_layer_epochs"]),
    )


def run_schedules(ctx: CaseContext) -> None:
    """Every `<tag>.<run>.<schedule>` tensor, for each `<run>_run_cfg` of each config, to 1e-12.

    Without an `<tag>.<run>.index` input the tensor holds iterations 0..len-1 (past the end of the
    schedule included, where the final value is expected).
    """
    for cfg in ctx.case["configs"]:
        for key, run_cfg in cfg.items():
            if not key.endswith("_run_cfg"):
                continue
            prefix = f"{cfg['tag']}.{key.removesuffix('_run_cfg')}."
            scheds = _schedules_from_cfg(ctx, prefix, run_cfg)
            outputs = {k: v for k, v in ctx.with_prefix(prefix).items() if k != "index"}
            if not outputs:
                continue
            length = next(iter(outputs.values())).shape[0]
            index = ctx.tensor(prefix + "index").tolist() if prefix + "index" in ctx.tensors else range(length)
            for sched_name in outputs:
                sched = getattr(scheds, sched_name, None)
                if not isinstance(sched, CosineScheduler):
                    raise ReferenceError(f"case {ctx.name}: unknown schedule {prefix + sched_name!r}")
                values = torch.tensor([sched[int(it)] for it in index], dtype=torch.float64)
                ctx.compare(prefix + sched_name, values, atol=SCHEDULE_TOL)


RUNNERS: dict[str, Runner] = {"masking": run_masking, "collate": run_collate, "schedules": run_schedules}
