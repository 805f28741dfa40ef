"""Typed configuration of `dinokit train`: dataclasses, YAML presets, dotted overrides.

The dataclasses below are the one source of truth: their annotations drive the type checks and
their defaults are the official DINOv2 values (`ssl_default_config.yaml`) for a ViT-S/14. YAML
presets (`dinokit/presets/*.yaml`) only set values; command-line overrides are `key=value` items
with dotted keys. Unknown keys and wrong types fail at once, naming the key.

Example:
    >>> cfg = load_config("tiny", ["optim.base_lr=0.001", "train.max_steps=6"])
    >>> cfg.optim.base_lr, cfg.train.max_steps, cfg.total_steps
    (0.001, 6, 1000)

Sections map onto the code (each module gets its own section or plain arguments):
`data` -> datasets, `crops` -> multi-crop transform, `model` -> `ViTArgs` (see
`vit_args_from_config`), `head` / `loss.ibot_head` -> `DINOHead`, `loss` -> losses and masking,
`optim` + `teacher` -> `build_schedules` (see `schedule_args`), `train` / `checkpoint` -> the loop.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from torch import nn

from dinokit.models.builders import CONV_ARCHS, VIT_SIZES, ViTArgs, vit_args
from dinokit.train.schedules import scaled_lr

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "CropsConfig",
    "DataConfig",
    "DistillConfig",
    "DistributedConfig",
    "HeadConfig",
    "HighResConfig",
    "InitConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "available_presets",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "load_config_file",
    "load_preset",
    "save_config",
    "schedule_args",
    "ignored_keys",
    "student_models",
    "validate",
    "vit_args_from_config",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key (e.g. `optim.base_lr`)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the images come from. `path` is a folder (folder), a text file of image paths
    (filelist) or the IDX folder (fashion_mnist; empty = the Debian package's location)."""

    path: str = ""
    dataset: Literal["folder", "filelist", "fashion_mnist"] = "folder"
    split: str = "train"
    num_workers: int = 2


@dataclass
class CropsConfig:
    """Multi-crop: 2 global crops and `local_number` local crops (sizes in pixels), and the
    probabilities of the photometric augmentations (DINOv2's values). `blur_p` is (global crop 1,
    global crop 2, local crops); solarisation applies to global crop 2 only."""

    global_size: int = 224
    local_size: int = 98
    local_number: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    flip_p: float = 0.5
    # ColorJitter strengths (brightness, contrast, saturation, hue), torchvision's meaning.
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    solarize_p: float = 0.2
    # Crop whole batches with tensor operations (dinokit.data.batch_augment) instead of one PIL
    # image at a time: several times less CPU for small images. Each image is first resized and
    # centre-cropped to source_size x source_size (None: global_size); downsampling crops are not
    # antialiased, so keep source_size near global_size.
    batched: bool = False
    source_size: int | None = None
    # Where batched crops are made: `loader` (in the loader workers, float crops cross the shared
    # memory) or `device` (uint8 sources cross it and the crops are made on the model's device,
    # the GPU when training on one: the loader then only decodes and resizes).
    batched_on: Literal["loader", "device"] = "loader"


@dataclass
class ModelConfig:
    """The ViT backbone: a named size (`VIT_SIZES`) with optional overrides of its dimensions.

    `img_size` sets the positional-embedding grid (img_size / patch_size per side); other input
    sizes are interpolated. `layerscale` is the LayerScale init (None: no LayerScale).
    """

    arch: str = "vit_small"
    patch_size: int = 14
    img_size: int = 224
    in_chans: int = 3
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    ffn_layer: Literal["mlp", "swiglu", "swiglufused"] = "mlp"
    num_register_tokens: int = 0
    layerscale: float | None = 1e-5
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1


@dataclass
class HeadConfig:
    """A DINOHead. `norm_last_layer` freezes weight_g at 1 (DINO v1); DINOv2 trains it."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    norm_last_layer: bool = False


@dataclass
class LossConfig:
    """Objective. `dinov2`: DINO + iBOT + KoLeo; `dino` (v1): the DINO loss only, so
    `ibot_weight` and `koleo_weight` must be 0. `ibot_head` is used only when
    `separate_ibot_head` (the "untied" heads of the DINOv2 L/g configs); otherwise iBOT shares
    the DINO head."""

    mode: Literal["dinov2", "dino"] = "dinov2"
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    centering: Literal["sinkhorn_knopp", "centering"] = "sinkhorn_knopp"
    separate_ibot_head: bool = False
    ibot_head: HeadConfig = field(default_factory=HeadConfig)
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    student_temp: float = 0.1
    center_momentum: float = 0.9


@dataclass
class OptimConfig:
    """AdamW and its schedules. `batch_size` is global (all ranks); an "epoch" is `epoch_length`
    iterations (official OFFICIAL_EPOCH_LENGTH), not a pass over the data."""

    batch_size: int = 64
    epochs: int = 100
    epoch_length: int = 1250
    base_lr: float = 0.004
    scaling_rule: Literal["sqrt_wrt_1024", "linear_wrt_256"] = "sqrt_wrt_1024"
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: int = 1
    clip_grad: float = 3.0  # 0 disables clipping
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    # Micro-batches per step on each rank: the teacher sees the rank's whole batch (targets,
    # Sinkhorn-Knopp and centering as without accumulation), the student runs and back-propagates
    # one micro-batch at a time, so a global batch fits on fewer GPUs. Equal to the unsplit step
    # up to float rounding, except KoLeo, whose neighbours are sought within each micro-batch.
    accumulation_steps: int = 1

    @property
    def lr(self) -> float:
        """Peak learning rate: `base_lr` scaled with the global batch size by `scaling_rule`."""
        return scaled_lr(self.base_lr, self.batch_size, self.scaling_rule)


@dataclass
class TeacherConfig:
    """EMA momentum (cosine to the final value) and teacher temperature (linear warmup)."""

    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30


@dataclass
class DistributedConfig:
    """Multi-process training (launched by `torchrun`; see docs/distributed.md). Used only when a
    process group exists: a plain `dinokit train` is one process whatever these say.

    `strategy`: `ddp` replicates the student and all-reduces its gradients; `fsdp` shards student
    and teacher with FSDP2 (`fully_shard` per block, per head, then the root); `none` is only
    valid on one rank. `param_dtype`: the dtype FSDP gathers parameters in for compute (the
    optimizer keeps float32 master weights); DDP needs float32 (use `train.autocast` there).
    `reduce_dtype`: the dtype gradients are reduced in (FSDP reduce-scatter; DDP via a
    compression hook). `backend`: the process group's; `auto` is nccl on CUDA, gloo on CPU, and
    `nccl` on a machine without usable CUDA is an error instead of a CPU run."""

    strategy: Literal["none", "ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    reduce_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class TrainConfig:
    """The loop. `max_steps` stops early without changing any schedule (None: run them all)."""

    seed: int = 0
    max_steps: int | None = None
    autocast: Literal["none", "bf16", "fp16"] = "none"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    log_every: int = 1
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # Efficiency options (docs/training.md, "Efficiency options"). packing: the student's global
    # and local crops through the blocks as one packed sequence; auto = on for CUDA, off on CPU,
    # where bench/packing.py measured it slower. (A bool, so YAML's on / off / true / false work.)
    packing: Literal["auto"] | bool = "auto"
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, more time
    # torch.compile (slow first step): `true` / `blocks` each block of student and teacher;
    # `step` the whole model call (teacher, student, heads, losses with Sinkhorn-Knopp) as one
    # graph, whose backward AOTAutograd compiles as one graph too.
    compile: Literal["blocks", "step"] | bool = False
    # CUDA only: float32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa inputs,
    # float32 accumulation), PyTorch's "high" matmul precision. No effect on CPU.
    tf32: bool = True
    # Continued pretraining (docs/finetuning.md): the first `head_warmup_steps` train only the
    # heads (student backbone frozen, so the teacher backbone stays equal to it); then the
    # backbone's lr ramps linearly from 0 over `backbone_lr_warmup_steps`.
    head_warmup_steps: int = 0
    backbone_lr_warmup_steps: int = 0


@dataclass
class CheckpointConfig:
    """Save every `every` iterations, keeping the `keep` newest."""

    every: int = 100
    keep: int = 3


@dataclass
class EvalConfig:
    """Online k-NN during training: every `knn_every` steps (0 = off) the teacher backbone's
    [CLS] features of `knn_val_size` images of `knn_val` are classified by weighted k-NN
    (k = `knn_k`) against `knn_train_size` images of `knn_train`. Dataset specs as in
    `dinokit eval`: an image folder with class sub-folders, a `.txt` list, or
    `fashion_mnist[:root]` (the test split is used for `knn_val`). An empty `knn_train` uses the
    training data, which then needs labels."""

    knn_every: int = 0
    knn_train: str = ""
    knn_val: str = ""
    knn_train_size: int = 10000
    knn_val_size: int = 2000
    knn_k: int = 20


@dataclass
class InitConfig:
    """Start from trained weights instead of random initialisation (`dinokit train --init`).

    `backbone`: a run folder, an official hub or training checkpoint, or a safetensors file (what
    `dinokit.checkpoint.load_backbone` reads), loaded into student and teacher. Its positional
    embedding is resized to `model.img_size` when the grids differ. `heads`: also load the DINO /
    iBOT heads when the source has them (a run folder, an official training checkpoint); false
    starts fresh heads whatever the source holds."""

    backbone: str = ""
    heads: bool = True


@dataclass
class HighResConfig:
    """A last phase at other crop sizes (DINOv2's high-resolution adaptation): from step
    `start_step` on, global / local crops of `global_size` / `local_size` pixels and batches of
    `batch_size` images (None: unchanged). The positional embeddings of every network are resized
    to the new global grid once, at the switch; schedules continue. `start_step: null` = no phase."""

    start_step: int | None = None
    global_size: int | None = None
    local_size: int | None = None
    batch_size: int | None = None


@dataclass
class DistillConfig:
    """Distillation from a frozen teacher (`dinokit distill`); `teacher: ""` = ordinary
    self-distillation from the EMA teacher.

    `teacher`: a run folder or a checkpoint file; `teacher_arch` names the official architecture
    of a file (`dinov2_vitg14`; inferred from a file name that starts with one). `students`: one
    item per student, `[SIZE][,key=value...]` over the `model` section (`vit_small`,
    `depth=4`, `vit_tiny,embed_dim=128,num_heads=4`); empty = one student of the `model` section.
    `teacher_dtype`: bfloat16 runs the frozen teacher in bf16 (its targets in float32).
    `teacher_head_warmup_steps`: a teacher without heads first gets heads trained on its frozen
    backbone for this many steps (a `dinokit train --init` run inside the run folder)."""

    teacher: str = ""
    teacher_arch: str = ""
    students: tuple[str, ...] = ()
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    teacher_head_warmup_steps: int = 1000


@dataclass
class Config:
    """The whole configuration of a `dinokit train` run."""

    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)
    highres: HighResConfig = field(default_factory=HighResConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    @property
    def total_steps(self) -> int:
        """Length of the schedules: epochs * epoch_length."""
        return self.optim.epochs * self.optim.epoch_length

    @property
    def run_steps(self) -> int:
        """Steps this run will make: total_steps, or fewer with `train.max_steps`."""
        if self.train.max_steps is None:
            return self.total_steps
        return min(self.train.max_steps, self.total_steps)


# --------------------------------------------------------------------------------------------
# Typed construction from plain data
# --------------------------------------------------------------------------------------------

# YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string; such strings are accepted for floats.
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_type_name(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} {_type_name(args[0])}" if len(set(args)) == 1 else str(tp)
    if _is_section(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the annotation `tp` (and normalised: int -> float, list -> tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(key, tp, value)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise _type_error(key, tp, value)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _type_error(key, tp, value)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        return tuple(_coerce(v, args[0], key) for v in value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _type_error(key, tp, value)
        try:
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        except ConfigError:
            raise _type_error(key, tp, value) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema annotation this module does not know
        raise TypeError(f"{key}: unsupported annotation {tp!r}")
    raise _type_error(key, tp, value)


def _build(cls: type, data: Any, base: Any, prefix: str) -> Any:
    where = prefix or "top-level"
    if data is None:  # an empty YAML section
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r} ({type(data).__name__})")
    hints = _hints(cls)
    updates: dict[str, Any] = {}
    for raw_key, value in data.items():
        name = str(raw_key)
        key = f"{prefix}.{name}" if prefix else name
        if name not in hints:
            section = f"of {prefix}" if prefix else "(top level)"
            raise ConfigError(f"unknown key {key!r}; valid keys {section}: {', '.join(hints)}")
        tp = hints[name]
        if _is_section(tp):
            updates[name] = _build(tp, value, getattr(base, name), key)
        else:
            updates[name] = _coerce(value, tp, key)
    return dataclasses.replace(base, **updates)


def config_from_dict(d: Mapping[str, Any] | None, base: Config | None = None) -> Config:
    """A `Config` from nested plain data (e.g. parsed YAML), on top of `base` (default: defaults).

    Missing keys keep the value of `base`. Unknown keys raise `ConfigError` naming the dotted key
    and the valid keys of its section; values of the wrong type raise naming the key, the
    expected type and the value (bool is not int, int is accepted for float, a list of 2 numbers
    for a pair, None only where the annotation allows it).
    """
    return _build(Config, d, base if base is not None else Config(), "")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain data (tuples as lists); `config_from_dict(config_to_dict(cfg)) == cfg`."""
    return _plain(dataclasses.asdict(cfg))


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, pairs on one line (`global_scale: [0.32, 1.0]`)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved configuration as YAML (in schema order); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # never a half-written file
    return path


def _load_yaml_text(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {exc}") from None


def load_config_file(path: str | Path, base: Config | None = None) -> Config:
    """A `Config` from a YAML file (a saved run config or a custom preset); not validated."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        return config_from_dict(_load_yaml_text(text, str(path)), base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Presets and command-line overrides
# --------------------------------------------------------------------------------------------


def available_presets() -> list[str]:
    """Names of the bundled presets (`dinokit/presets/NAME.yaml`)."""
    folder = resources.files("dinokit.presets")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> Config:
    """The bundled preset `name` on top of the defaults (not validated)."""
    names = available_presets()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(names)}")
    text = (resources.files("dinokit.presets") / f"{name}.yaml").read_text()
    try:
        return config_from_dict(_load_yaml_text(text, f"preset {name}"))
    except ConfigError as exc:
        raise ConfigError(f"preset {name}: {exc}") from None


def _field_type(key: str) -> Any:
    """The annotation of a dotted leaf key, or ConfigError naming it."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = _hints(cls) if _is_section(cls) else {}
        prefix = ".".join(parts[:i])
        if part not in hints:
            if not _is_section(cls):
                raise ConfigError(f"unknown key {key!r}: {prefix!r} is a value, not a section")
            section = f"of {prefix}" if prefix else "(top level)"
            raise ConfigError(f"unknown key {key!r}; valid keys {section}: {', '.join(hints)}")
        cls = hints[part]
    return cls


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """`cfg` with dotted `key=value` items applied in order (a new Config; `cfg` is unchanged).

    Values are parsed as YAML (`0.001`, `true`, `null`, `[0.4, 1.0]`, `{out_dim: 4096}`); for
    string fields the text is taken verbatim when YAML would read something else (`data.path=2024`).
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"malformed override {item!r}: expected key=value, e.g. optim.base_lr=0.001")
        tp = _field_type(key)
        value = _load_yaml_text(text, f"override {item!r}")
        if tp is str and not isinstance(value, (str, list, dict)):
            value = text.strip()
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        cfg = config_from_dict(nested, base=cfg)
    return cfg


def load_config(preset: str | Path, overrides: Sequence[str] = (), world_size: int = 1) -> Config:
    """Preset (a bundled name or a YAML file path) + overrides, validated."""
    text = str(preset)
    if isinstance(preset, Path) or text.endswith((".yaml", ".yml")) or "/" in text:
        cfg = load_config_file(preset)
    else:
        cfg = load_preset(str(preset))
    cfg = apply_overrides(cfg, overrides)
    validate(cfg, world_size=world_size)
    return cfg


# --------------------------------------------------------------------------------------------
# Semantic checks
# --------------------------------------------------------------------------------------------


def _check_types(obj: Any, prefix: str, problems: list[str]) -> None:
    # Catches bad values in a Config built or mutated in code rather than parsed.
    for name, tp in _hints(type(obj)).items():
        key = f"{prefix}.{name}" if prefix else name
        value = getattr(obj, name)
        if _is_section(tp):
            if isinstance(value, tp):
                _check_types(value, key, problems)
            else:
                problems.append(f"{key}: expected a {tp.__name__}, got {value!r}")
            continue
        try:
            _coerce(value, tp, key)
        except ConfigError as exc:
            problems.append(str(exc))


def _head_problems(h: HeadConfig, prefix: str) -> list[str]:
    return [
        f"{prefix}.{name} must be >= 1, got {getattr(h, name)}"
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "nlayers")
        if getattr(h, name) < 1
    ]


def _pair_problems(key: str, pair: tuple[float, float], low_open: bool) -> list[str]:
    lo, hi = pair
    ok_lo = (lo > 0) if low_open else (lo >= 0)
    if not (ok_lo and lo <= hi <= 1):
        bound = "0 < low" if low_open else "0 <= low"
        return [f"{key} must satisfy {bound} <= high <= 1, got {list(pair)}"]
    return []


def validate(cfg: Config, world_size: int = 1) -> None:
    """Semantic checks before any work starts; raises one ConfigError listing every problem.

    `world_size` (the number of ranks) is checked against the global batch size: KoLeo needs a
    neighbour in each rank's batch.
    """
    problems: list[str] = []
    _check_types(cfg, "", problems)
    if problems:  # the checks below assume well-typed values
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems), problems)

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    d, c, m, lo, o, t, tr, ck = (
        cfg.data, cfg.crops, cfg.model, cfg.loss, cfg.optim, cfg.teacher, cfg.train, cfg.checkpoint
    )
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(bool(d.split), "data.split must not be empty")

    resnet = m.arch in CONV_ARCHS
    need(m.arch in VIT_SIZES or resnet,
         f"model.arch: unknown architecture {m.arch!r}; known: {', '.join([*VIT_SIZES, *CONV_ARCHS])}")
    if resnet:
        need(lo.mode == "dino", f"model.arch={m.arch} trains with loss.mode=dino (DINO v1): iBOT and KoLeo need "
                                f"ViT tokens, got loss.mode={lo.mode}")
        need(tr.compile not in (True, "blocks"), f"model.arch={m.arch}: train.compile=blocks compiles ViT blocks; "
                                                 "use step or false")
        need(not cfg.distill.teacher, f"model.arch={m.arch}: distillation students are ViTs")
    need(m.patch_size >= 1, f"model.patch_size must be >= 1, got {m.patch_size}")
    p = 1 if resnet else max(m.patch_size, 1)
    for name in ("img_size", "in_chans", "embed_dim", "depth", "num_heads"):
        value = getattr(m, name)
        need(value is None or value >= 1, f"model.{name} must be >= 1, got {value}")
    need(resnet or m.img_size % p == 0, f"model.img_size ({m.img_size}) must be a multiple of model.patch_size ({p})")
    dim, _, heads = VIT_SIZES.get(m.arch, (m.embed_dim or 1, 0, m.num_heads or 1))
    dim, heads = m.embed_dim or dim, m.num_heads or heads
    need(heads < 1 or dim % heads == 0, f"model.embed_dim ({dim}) must be divisible by model.num_heads ({heads})")
    need(m.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {m.mlp_ratio}")
    need(m.num_register_tokens >= 0, f"model.num_register_tokens must be >= 0, got {m.num_register_tokens}")
    need(m.layerscale is None or m.layerscale >= 0, f"model.layerscale must be >= 0 or null, got {m.layerscale}")
    need(0 <= m.drop_path_rate < 1, f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    need(m.interpolate_offset >= 0, f"model.interpolate_offset must be >= 0, got {m.interpolate_offset}")

    for name in ("global_size", "local_size"):
        size = getattr(c, name)
        need(size >= 1, f"crops.{name} must be >= 1, got {size}")
        need(size % p == 0, f"crops.{name} ({size}) must be a multiple of model.patch_size ({p})")
    need(c.local_number >= 0, f"crops.local_number must be >= 0, got {c.local_number}")
    need(c.source_size is None or c.source_size >= 1, f"crops.source_size must be >= 1 or null, got {c.source_size}")
    problems += _pair_problems("crops.global_scale", c.global_scale, low_open=True)
    problems += _pair_problems("crops.local_scale", c.local_scale, low_open=True)

    problems += _head_problems(cfg.head, "head")
    problems += _head_problems(lo.ibot_head, "loss.ibot_head")
    for name in ("dino_weight", "ibot_weight", "koleo_weight"):
        need(getattr(lo, name) >= 0, f"loss.{name} must be >= 0, got {getattr(lo, name)}")
    if lo.mode == "dino":
        for name in ("ibot_weight", "koleo_weight"):
            need(getattr(lo, name) == 0, f"loss.{name} must be 0 with loss.mode 'dino' (DINO v1 has no iBOT / KoLeo)")
    problems += _pair_problems("loss.mask_ratio", lo.mask_ratio, low_open=False)
    need(0 <= lo.mask_probability <= 1, f"loss.mask_probability must be in [0, 1], got {lo.mask_probability}")
    need(lo.student_temp > 0, f"loss.student_temp must be > 0, got {lo.student_temp}")
    need(0 <= lo.center_momentum <= 1, f"loss.center_momentum must be in [0, 1], got {lo.center_momentum}")

    need(o.batch_size >= 1, f"optim.batch_size must be >= 1, got {o.batch_size}")
    need(world_size >= 1 and o.batch_size % max(world_size, 1) == 0,
         f"optim.batch_size ({o.batch_size}) must be divisible by the number of ranks ({world_size})")
    need(o.accumulation_steps >= 1, f"optim.accumulation_steps must be >= 1, got {o.accumulation_steps}")
    k = max(o.accumulation_steps, 1)
    for key, batch in (("optim.batch_size", o.batch_size), ("highres.batch_size", cfg.highres.batch_size)):
        if batch and k > 1:
            need(batch % (max(world_size, 1) * k) == 0,
                 f"{key} ({batch}) must be divisible by the number of ranks ({world_size}) times "
                 f"optim.accumulation_steps ({k})")
    need(k == 1 or not cfg.distill.teacher, "optim.accumulation_steps > 1 is not supported with distill.teacher")
    need(k == 1 or not (c.batched and c.batched_on == "device"),
         "optim.accumulation_steps > 1 is not supported with crops.batched_on=device (use loader)")
    if lo.koleo_weight > 0:
        per_rank = o.batch_size // max(world_size, 1) // k
        need(per_rank >= 2, f"optim.batch_size: KoLeo (loss.koleo_weight > 0) needs >= 2 images per rank and "
             f"micro-batch, got {per_rank} (global batch {o.batch_size}, {world_size} rank(s), "
             f"{k} micro-batch(es))")
    need(o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}")
    need(o.epoch_length >= 1, f"optim.epoch_length must be >= 1, got {o.epoch_length}")
    need(o.base_lr > 0, f"optim.base_lr must be > 0, got {o.base_lr}")
    if o.base_lr > 0 and o.batch_size >= 1:
        need(0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, peak lr {o.lr:.3g}], got {o.min_lr}")
    need(0 <= o.warmup_epochs <= o.epochs, f"optim.warmup_epochs must be in [0, optim.epochs], got {o.warmup_epochs}")
    need(0 <= o.freeze_last_layer_epochs <= o.epochs,
         f"optim.freeze_last_layer_epochs must be in [0, optim.epochs], got {o.freeze_last_layer_epochs}")
    for name in ("weight_decay", "weight_decay_end", "patch_embed_lr_mult", "clip_grad"):
        need(getattr(o, name) >= 0, f"optim.{name} must be >= 0, got {getattr(o, name)}")
    need(0 < o.layerwise_decay <= 1, f"optim.layerwise_decay must be in (0, 1], got {o.layerwise_decay}")
    for name in ("adamw_beta1", "adamw_beta2"):
        need(0 <= getattr(o, name) < 1, f"optim.{name} must be in [0, 1), got {getattr(o, name)}")

    for name in ("momentum_teacher", "final_momentum_teacher"):
        need(0 <= getattr(t, name) <= 1, f"teacher.{name} must be in [0, 1], got {getattr(t, name)}")
    for name in ("warmup_teacher_temp", "teacher_temp"):
        need(getattr(t, name) > 0, f"teacher.{name} must be > 0, got {getattr(t, name)}")
    need(t.warmup_teacher_temp_epochs >= 0,
         f"teacher.warmup_teacher_temp_epochs must be >= 0, got {t.warmup_teacher_temp_epochs}")

    need(tr.max_steps is None or tr.max_steps >= 1, f"train.max_steps must be >= 1 or null, got {tr.max_steps}")
    need(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", tr.device) is not None,
         f"train.device must be auto, cpu, mps, cuda or cuda:N, got {tr.device!r}")
    need(tr.log_every >= 1, f"train.log_every must be >= 1, got {tr.log_every}")
    # fp16 gradients need loss scaling (a gradient scaler), which the loop does not have: small
    # gradients would underflow to zero and training would silently stall. bf16 has fp32's range.
    need(tr.autocast != "fp16", "train.autocast=fp16 is refused: it needs a gradient scaler, which dinokit does "
         "not have (small gradients underflow to zero); use train.autocast=bf16")
    dd = tr.distributed
    need(dd.param_dtype != "float16", "train.distributed.param_dtype=float16 is refused: it needs a gradient "
         "scaler, which dinokit does not have; use bfloat16")
    need(world_size == 1 or dd.strategy != "none",
         f"train.distributed.strategy 'none' cannot run on {world_size} ranks; use ddp or fsdp")
    need(dd.strategy != "ddp" or dd.param_dtype == "float32",
         f"train.distributed.param_dtype {dd.param_dtype!r} needs strategy fsdp; DDP keeps float32 "
         "parameters (use train.autocast=bf16 for reduced-precision compute)")
    need(ck.every >= 1, f"checkpoint.every must be >= 1, got {ck.every}")
    need(ck.keep >= 1, f"checkpoint.keep must be >= 1, got {ck.keep}")
    for name in ("flip_p", "color_jitter_p", "grayscale_p", "solarize_p"):
        need(0.0 <= getattr(c, name) <= 1.0, f"crops.{name} must be in [0, 1], got {getattr(c, name)}")
    need(all(0.0 <= p <= 1.0 for p in c.blur_p), f"crops.blur_p values must be in [0, 1], got {c.blur_p}")
    need(len(c.color_jitter) == 4 and all(v >= 0 for v in c.color_jitter) and c.color_jitter[3] <= 0.5,
         f"crops.color_jitter must be 4 values (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, "
         f"got {c.color_jitter}")
    ev = cfg.eval
    need(ev.knn_every >= 0, f"eval.knn_every must be >= 0 (0 = off), got {ev.knn_every}")
    need(ev.knn_every == 0 or bool(ev.knn_val), "eval.knn_val must name a labeled validation set when eval.knn_every > 0")
    for name in ("knn_train_size", "knn_val_size", "knn_k"):
        need(getattr(ev, name) >= 1, f"eval.{name} must be >= 1, got {getattr(ev, name)}")

    problems += _start_problems(cfg, world_size)

    bad = [key for key, v in _walk_floats(cfg, "") if not math.isfinite(v)]
    need(not bad, f"{', '.join(bad)}: NaN or infinite values are not allowed")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems), problems)


def _start_problems(cfg: Config, world_size: int) -> list[str]:
    """Checks of the init / head warm-up / high-resolution phase / distillation settings."""
    problems: list[str] = []
    tr, hr, dist, p = cfg.train, cfg.highres, cfg.distill, max(cfg.model.patch_size, 1)
    for name in ("head_warmup_steps", "backbone_lr_warmup_steps"):
        if getattr(tr, name) < 0:
            problems.append(f"train.{name} must be >= 0, got {getattr(tr, name)}")
    for key, source in (("init.backbone", cfg.init.backbone), ("distill.teacher", dist.teacher)):
        if source and not Path(source).exists():
            problems.append(f"{key}: {source} is neither a run folder nor a checkpoint file")
    if tr.head_warmup_steps > 0 and not cfg.init.backbone:
        problems.append("train.head_warmup_steps needs init.backbone (--init): warming heads up on a "
                        "random backbone teaches them nothing")
    if hr.start_step is not None:
        if not 0 <= hr.start_step < cfg.total_steps:
            problems.append(f"highres.start_step ({hr.start_step}) must be in [0, {cfg.total_steps}), the "
                            f"schedule's length (optim.epochs x optim.epoch_length): the phase would never start")
        for name in ("global_size", "local_size"):
            size = getattr(hr, name)
            if size is not None and (size < 1 or size % p):
                problems.append(f"highres.{name} ({size}) must be a positive multiple of model.patch_size ({p})")
        if hr.batch_size is not None and (hr.batch_size < 1 or hr.batch_size % max(world_size, 1)):
            problems.append(f"highres.batch_size ({hr.batch_size}) must be >= 1 and divisible by the number "
                            f"of ranks ({world_size})")
        if (hr.global_size, hr.local_size, hr.batch_size) == (None, None, None):
            problems.append("highres.start_step is set but highres.global_size, local_size and batch_size are "
                            "all null: the phase would change nothing")
        if world_size > 1 and tr.distributed.strategy == "fsdp":
            problems.append("highres: resizing the sharded positional embedding under "
                            "train.distributed.strategy=fsdp is not supported; use ddp")
    if dist.teacher:
        if cfg.init.backbone:
            problems.append("init.backbone and distill.teacher are both set: distillation students start "
                            "from random initialisation")
        if cfg.loss.mode != "dinov2":
            problems.append("distill.teacher needs loss.mode 'dinov2' (the DINOv2 distillation recipe)")
        if dist.teacher_head_warmup_steps < 1:
            problems.append(f"distill.teacher_head_warmup_steps must be >= 1, got {dist.teacher_head_warmup_steps}")
        try:
            student_models(cfg)
        except ConfigError as exc:
            problems.append(str(exc))
    elif dist.students:
        problems.append("distill.students needs distill.teacher (--teacher)")
    return problems


def ignored_keys(cfg: Config, world_size: int = 1) -> list[str]:
    """Settings the run will not use as they stand, each with why (warned about at start)."""
    notes: list[str] = []
    if cfg.data.dataset != "fashion_mnist" and cfg.data.split != DataConfig().split:
        notes.append(f"data.split={cfg.data.split!r} is ignored: only data.dataset=fashion_mnist has splits")
    lo = cfg.loss
    sizes = ("out_dim", "hidden_dim", "bottleneck_dim", "nlayers")
    if lo.mode == "dinov2" and not lo.separate_ibot_head and any(
            getattr(lo.ibot_head, k) != getattr(cfg.head, k) for k in sizes):
        notes.append("loss.ibot_head is ignored: iBOT shares the DINO head (`head`) unless "
                     "loss.separate_ibot_head=true")
    if world_size == 1 and cfg.train.distributed != DistributedConfig():
        notes.append("train.distributed.* is ignored: it applies to runs under torchrun with more than one process")
    return notes


def student_models(cfg: Config) -> dict[str, ModelConfig]:
    """The distillation students: `student{i}` -> the `model` section with the i-th item of
    `distill.students` applied, and stochastic depth off (the DINOv2 distillation recipe) unless
    the item sets it. Raises ConfigError naming the item and key."""
    specs = cfg.distill.students or ("",)
    out: dict[str, ModelConfig] = {}
    for i, spec in enumerate(specs):
        items = [part.strip() for part in spec.split(",") if part.strip()]
        overrides = ["model.drop_path_rate=0.0"]
        for item in items:
            if "=" not in item:
                if item not in VIT_SIZES:
                    raise ConfigError(f"distill.students[{i}] {spec!r}: {item!r} is not a ViT size "
                                      f"({', '.join(VIT_SIZES)}) nor a key=value item")
                # A named size brings its own width, depth and heads (later items may change them).
                overrides += [f"model.arch={item}", "model.embed_dim=null", "model.depth=null", "model.num_heads=null"]
            else:
                overrides.append(f"model.{item}")
        try:
            model = apply_overrides(dataclasses.replace(cfg, model=cfg.model), overrides).model
        except ConfigError as exc:
            raise ConfigError(f"distill.students[{i}] {spec!r}: {exc}") from None
        out[f"student{i}"] = model
    return out


def _walk_floats(obj: Any, prefix: str) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _walk_floats(value, key)
        elif isinstance(value, (tuple, list)):
            out += [(key, v) for v in value if isinstance(v, float)]
        elif isinstance(value, float):
            out.append((key, value))
    return out


# --------------------------------------------------------------------------------------------
# Mapping onto the code
# --------------------------------------------------------------------------------------------


def backbone_from_config(model: ModelConfig, **overrides: Any) -> nn.Module:
    """The backbone of `model`: a `ResNetBackbone` for `resnet50` (DINO v1's ResNet-50), else the
    ViT of `vit_args_from_config(model, **overrides)`."""
    if model.arch in CONV_ARCHS:
        from dinokit.models.resnet import ResNetBackbone

        return ResNetBackbone()
    return vit_args_from_config(model, **overrides).build()


def vit_args_from_config(model: ModelConfig, **overrides: Any) -> ViTArgs:
    """`ViTArgs` of the backbone: the named size, its dimension overrides and the other fields
    (`layerscale` -> `init_values`). `overrides` go straight to ViTArgs, e.g.
    `use_mask_token=False` for a DINO v1 backbone (no iBOT, so an unused mask token)."""
    sizes = {k: getattr(model, k) for k in ("embed_dim", "depth", "num_heads") if getattr(model, k) is not None}
    kwargs: dict[str, Any] = dict(
        img_size=model.img_size,
        patch_size=model.patch_size,
        in_chans=model.in_chans,
        mlp_ratio=model.mlp_ratio,
        qkv_bias=model.qkv_bias,
        proj_bias=model.proj_bias,
        ffn_bias=model.ffn_bias,
        drop_path_rate=model.drop_path_rate,
        drop_path_uniform=model.drop_path_uniform,
        init_values=model.layerscale,
        ffn_layer=model.ffn_layer,
        num_register_tokens=model.num_register_tokens,
        interpolate_antialias=model.interpolate_antialias,
        interpolate_offset=model.interpolate_offset,
    )
    kwargs.update(sizes)
    kwargs.update(overrides)
    return vit_args(model.arch, **kwargs)


def schedule_args(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of `dinokit.train.schedules.build_schedules` (lr already scaled)."""
    o, t = cfg.optim, cfg.teacher
    return dict(
        epochs=o.epochs,
        epoch_length=o.epoch_length,
        lr=o.lr,
        min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=t.momentum_teacher,
        final_momentum_teacher=t.final_momentum_teacher,
        teacher_temp=t.teacher_temp,
        warmup_teacher_temp=t.warmup_teacher_temp,
        warmup_teacher_temp_epochs=t.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs,
    )
