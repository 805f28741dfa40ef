"""Parity runners for backbone cases: `backbone`, `backbone_chunking`, `backbone_init`.

The calls to make are read from the reference tensor names, so other sizes, resolutions, register
counts and chunkings need no code change:

- `out.ff[_S].<key>`      forward_features(...)[key]
- `out.forward[_S]`       model(x)
- `out.il_n<n>[_S].<i>.patch|cls`  get_intermediate_layers(x, n=<n>, ...)[i][0|1]
- `out.il_list[_S].block<k>`       get_intermediate_layers(x, n=[all listed k], ...)[position of k]
- `out.train_dp<rate>.<key>`       forward_features in train mode after torch.manual_seed(seed)
- `out.debug.tokens | block<i> | pos_embed_<H>x<W>`  intermediates (optional, compared too)

where the suffix `_S` selects the input: none -> `input.x`; `_masked` -> `input.x` with
`input.masks`; `_<H>x<W>` -> `input.x_<H>x<W>`. Keyword arguments of get_intermediate_layers are
parsed from the tensor's semantics text (`reshape=True, ...`).
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from dinokit.checkpoint.loading import load_into, unchunk_blocks
from dinokit.models.builders import ViTArgs
from dinokit.models.vision_transformer import VisionTransformer
from dinokit.reference.core import BACKBONE_TOL, SCHEDULE_TOL, CaseContext, ReferenceError, Runner
from dinokit.train.param_groups import param_infos

# Constructor arguments that only describe the official code's classes (always what dinokit
# implements: LayerNorm eps 1e-6, exact GELU, convolutional patch embedding) or its module
# nesting (block_chunks: handled by key mapping when loading).
_DESCRIPTIVE = {"block_fn", "norm_layer", "act_layer", "embed_layer", "block_chunks"}
_CALL = re.compile(r"^(?P<op>ff|forward|il_n(?P<n>\d+)|il_list|train_dp(?P<rate>[0-9p]+))(?:_(?P<suffix>masked|\d+x\d+))?$")
_BOOL_KW = re.compile(r"\b(reshape|return_class_token|norm)\s*=\s*(True|False)")
_FLOAT_KW = re.compile(r"\b(lr_decay_rate|patch_embed_lr_mult)\s*=\s*([0-9.eE+-]+)")


def vit_args_from_manifest(kwargs: dict[str, Any], **overrides: Any) -> ViTArgs:
    """ViTArgs from the official constructor's plain kwargs; unknown arguments are an error."""
    known = {f.name for f in fields(ViTArgs)}
    values: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in _DESCRIPTIVE:
            continue
        if key not in known:
            raise ReferenceError(f"unknown backbone constructor argument {key}={value!r}")
        values[key] = value
    values.update(overrides)
    return ViTArgs(**values)


def _build(ctx: CaseContext, **overrides: Any) -> VisionTransformer:
    model = vit_args_from_manifest(ctx.case["constructor"]["kwargs"], **overrides).build()
    load_into(model, unchunk_blocks(ctx.with_prefix("model.")), source=f"case {ctx.name}")
    return model.eval()


def _input_for(ctx: CaseContext, op: str, suffix: str | None) -> tuple[Tensor, Tensor | None]:
    if op.startswith("train_dp"):
        return ctx.tensor(f"input.x_{op}"), None
    if suffix == "masked":
        return ctx.tensor("input.x"), ctx.tensor("input.masks")
    if suffix:
        return ctx.tensor(f"input.x_{suffix}"), None
    return ctx.tensor("input.x"), None


def _call_kwargs(ctx: CaseContext, names: list[str]) -> dict[str, bool]:
    """get_intermediate_layers flags from the semantics text of any tensor of the group."""
    semantics = ctx.case.get("tensors", {})
    for name in names:
        found = dict(_BOOL_KW.findall(semantics.get(name, {}).get("semantics", "")))
        if found:
            return {k: v == "True" for k, v in found.items()}
    raise ReferenceError(f"case {ctx.name}: no get_intermediate_layers arguments in the semantics of {names[0]}")


def _train_settings(ctx: CaseContext, rate_text: str) -> dict[str, Any]:
    rate = float(rate_text.replace("p", "."))
    for entry in ctx.case.get("train_mode_optional", []):
        if abs(float(entry["drop_path_rate"]) - rate) < 1e-12:
            return entry
    raise ReferenceError(f"case {ctx.name}: no train_mode_optional entry for drop_path_rate {rate}")


def _shape(entry: list[Any]) -> list[int]:
    # Float tensors are listed as a shape, others as [shape, dtype].
    return list(entry[0]) if entry and isinstance(entry[-1], str) else list(entry)


def _check_state_dict_keys(ctx: CaseContext, model: VisionTransformer) -> None:
    listed = ctx.case.get("weights", {}).get("state_dict_keys_in_order")
    if not listed:
        return
    renamed = unchunk_blocks({k: torch.empty(0) for k in listed})  # keeps insertion order
    expected = [(k, _shape(v)) for k, v in zip(renamed, listed.values())]
    ours = [(k, list(t.shape)) for k, t in model.state_dict().items()]
    ok = expected == ours
    ctx.check("state_dict_keys_in_order", ok, 0.0 if ok else 1.0, "key names, order or shapes differ from the official list")


def _check_param_groups(ctx: CaseContext, model: VisionTransformer) -> None:
    spec = ctx.case.get("param_groups")
    if not spec:
        return
    args = {k: float(v) for k, v in _FLOAT_KW.findall(spec.get("call", ""))}
    infos = {
        i.name: i
        for i in param_infos(
            model,
            lr_decay_rate=args.get("lr_decay_rate", 1.0),
            patch_embed_lr_mult=args.get("patch_embed_lr_mult", 1.0),
            decay_tokens=True,  # the official groups decay the learned tokens
        )
    }
    expected = unchunk_blocks({k: v for k, v in spec["groups"].items()})  # type: ignore[arg-type]
    worst, bad = 0.0, []
    for name, (lr_mult, wd_mult, last) in expected.items():  # type: ignore[misc]
        info = infos.get(name)
        if info is None:
            bad.append(f"{name} missing")
            continue
        err = max(abs(info.lr_multiplier - lr_mult), abs(info.wd_multiplier - wd_mult))
        worst = max(worst, err)
        if err > SCHEDULE_TOL or info.is_last_layer != last:
            bad.append(f"{name}: ({info.lr_multiplier}, {info.wd_multiplier}, {info.is_last_layer}) != {(lr_mult, wd_mult, last)}")
    if set(infos) - set(expected):
        bad.append(f"extra parameters {sorted(set(infos) - set(expected))}")
    ctx.check("param_groups", not bad, worst, "; ".join(bad[:5]))


def run_backbone(ctx: CaseContext) -> None:
    """Forward passes of a backbone case (also used for the chunking cases)."""
    model = _build(ctx)
    _check_state_dict_keys(ctx, model)
    _check_param_groups(ctx, model)
    tol = BACKBONE_TOL

    groups: dict[str, list[str]] = {}
    for name in ctx.tensors:
        if name.startswith("out.") and not name.startswith("out.debug."):
            groups.setdefault(name.split(".")[1], []).append(name)

    with torch.no_grad():
        for key, names in groups.items():
            match = _CALL.match(key)
            if match is None:
                raise ReferenceError(f"case {ctx.name}: unknown output group 'out.{key}'")
            op, suffix = match["op"], match["suffix"]
            x, masks = _input_for(ctx, op, suffix)
            if op == "ff":
                out = model.forward_features(x, masks)
                for name in names:
                    ctx.compare(name, out[name.split(".", 2)[2]], tol)
            elif op == "forward":
                ctx.compare(names[0], model(x, masks), tol)
            elif op.startswith("il_n"):
                kw = _call_kwargs(ctx, names)
                res = model.get_intermediate_layers(x, n=int(match["n"]), **kw)
                for name in names:
                    parts = name.split(".")
                    item: Any = res[int(parts[2])]
                    if len(parts) > 3:
                        item = item[0 if parts[3] == "patch" else 1]
                    ctx.compare(name, item, tol)
            elif op == "il_list":
                blocks = sorted(int(n.rsplit("block", 1)[1]) for n in names)
                res = model.get_intermediate_layers(x, n=blocks, **_call_kwargs(ctx, names))
                for name in names:
                    ctx.compare(name, res[blocks.index(int(name.rsplit("block", 1)[1]))], tol)
            else:  # train_dp<rate>: strict-RNG check of both stochastic-depth paths
                settings = _train_settings(ctx, match["rate"])
                train_model = _build(
                    ctx,
                    drop_path_rate=float(settings["drop_path_rate"]),
                    drop_path_uniform=bool(settings.get("drop_path_uniform", False)),
                ).train()
                torch.manual_seed(int(settings["seed_before_forward"]))
                out = train_model.forward_features(x)
                for name in names:
                    ctx.compare(name, out[name.split(".", 2)[2]], tol)
        _run_debug(ctx, model, tol)


def _run_debug(ctx: CaseContext, model: VisionTransformer, tol: float) -> None:
    debug = [n for n in ctx.tensors if n.startswith("out.debug.")]
    if not debug:
        return
    x = ctx.tensor("input.x")
    tokens = model.prepare_tokens_with_masks(x)
    block_outputs = []
    for block in model.blocks:
        tokens = block(tokens)
        block_outputs.append(tokens)
    for name in debug:
        what = name[len("out.debug."):]
        if what == "tokens":
            ctx.compare(name, model.prepare_tokens_with_masks(x), tol)
        elif re.fullmatch(r"block\d+", what):
            ctx.compare(name, block_outputs[int(what[5:])], tol)
        elif m := re.fullmatch(r"pos_embed_(\d+)x(\d+)", what):
            h, w = int(m[1]), int(m[2])
            n = (h // model.patch_size) * (w // model.patch_size)
            dummy = torch.zeros(1, 1 + n, model.embed_dim)
            ctx.compare(name, model.interpolate_pos_encoding(dummy, h, w), tol)


def run_backbone_init(ctx: CaseContext) -> None:
    """Seeded initialisation: the official init rules, drawn in the official order, bit for bit."""
    torch.manual_seed(int(ctx.case["seed"]))
    model = vit_args_from_manifest(ctx.case["constructor"]["kwargs"]).build()
    _check_state_dict_keys(ctx, model)
    expected = unchunk_blocks(ctx.with_prefix("model."))
    ours = model.state_dict()
    worst, bad = 0.0, []
    for key, value in expected.items():
        if key not in ours or ours[key].shape != value.shape:
            bad.append(f"{key} missing or misshapen")
            continue
        err = float((ours[key].double() - value.double()).abs().max()) if value.numel() else 0.0
        worst = max(worst, err)
        if not torch.equal(ours[key], value):
            bad.append(f"{key} differs by {err:.3g}")
    ctx.check("init_weights", not bad, worst, "; ".join(bad[:5]))


RUNNERS: dict[str, Runner] = {
    "backbone": run_backbone,
    "backbone_chunking": run_backbone,
    "backbone_init": run_backbone_init,
}
