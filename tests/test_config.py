"""Typed configuration: presets, strict parsing, overrides, semantic checks, YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinokit.config import (
    Config,
    ConfigError,
    apply_overrides,
    available_presets,
    config_from_dict,
    config_to_dict,
    load_config,
    load_config_file,
    load_preset,
    save_config,
    schedule_args,
    validate,
    vit_args_from_config,
)
from dinokit.train.schedules import build_schedules

PRESETS = ["tiny", "vits14", "vitb14", "vitl14", "vitg14", "vitl16_short", "dino_vits16"]


def test_presets_are_bundled() -> None:
    assert set(PRESETS) <= set(available_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name: str) -> None:
    cfg = load_config(name)
    validate(cfg)
    assert cfg.total_steps == cfg.optim.epochs * cfg.optim.epoch_length
    assert cfg.crops.global_size % cfg.model.patch_size == 0
    # The schedules build from the preset (warmup and freeze fit in the run).
    build_schedules(**schedule_args(cfg))


def test_official_values() -> None:
    l14, g14, short, v1 = (load_preset(n) for n in ("vitl14", "vitg14", "vitl16_short", "dino_vits16"))
    for cfg in (l14, g14):
        assert (cfg.optim.epochs, cfg.model.ffn_layer, cfg.loss.centering) == (500, "swiglufused", "sinkhorn_knopp")
        assert cfg.loss.separate_ibot_head and cfg.head.out_dim == cfg.loss.ibot_head.out_dim == 131072
        assert (cfg.head.bottleneck_dim, cfg.model.drop_path_rate) == (384, 0.4)
        assert (cfg.optim.layerwise_decay, cfg.optim.weight_decay_end) == (1.0, 0.2)
    assert (g14.model.arch, l14.model.arch) == ("vit_giant2", "vit_large")
    assert (short.optim.epochs, short.optim.batch_size, short.optim.base_lr) == (100, 2048, 0.004)
    assert (short.model.patch_size, short.model.ffn_layer, short.loss.centering) == (16, "mlp", "centering")
    assert not short.loss.separate_ibot_head and short.head.out_dim == 65536
    assert (v1.loss.mode, v1.loss.centering, v1.optim.scaling_rule) == ("dino", "centering", "linear_wrt_256")
    assert v1.crops.global_scale == (0.4, 1.0) and v1.crops.local_scale == (0.05, 0.4)
    assert v1.model.layerscale is None and v1.teacher.momentum_teacher == 0.996


def test_unknown_preset_lists_available() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*tiny"):
        load_preset("nope")


def test_unknown_key_names_dotted_key_and_valid_keys() -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"optim": {"lr_typo": 1.0}})
    assert "optim.lr_typo" in str(exc.value) and "base_lr" in str(exc.value)
    with pytest.raises(ConfigError, match="loss.ibot_head.outdim"):
        config_from_dict({"loss": {"ibot_head": {"outdim": 3}}})
    with pytest.raises(ConfigError, match="'optimizer'.*optim"):
        config_from_dict({"optimizer": {}})


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"optim": {"batch_size": "64"}}, "optim.batch_size", "int"),
        ({"optim": {"batch_size": True}}, "optim.batch_size", "int"),  # bool is not int
        ({"optim": {"batch_size": 64.0}}, "optim.batch_size", "int"),
        ({"optim": {"base_lr": None}}, "optim.base_lr", "float"),  # None only where Optional
        ({"model": {"qkv_bias": 1}}, "model.qkv_bias", "bool"),
        ({"crops": {"global_scale": [0.4]}}, "crops.global_scale", "list of 2 float"),
        ({"crops": {"global_scale": [0.4, "x"]}}, "crops.global_scale", "list of 2 float"),
        ({"loss": {"mode": "ibot"}}, "loss.mode", "one of 'dinov2', 'dino'"),
        ({"train": {"max_steps": 2.5}}, "train.max_steps", "int | null"),
        ({"loss": {"ibot_head": 5}}, "loss.ibot_head", "mapping"),
    ],
)
def test_wrong_type_names_key_type_and_value(data: dict, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    message = str(exc.value)
    assert key in message and expected in message
    leaf = next(iter(next(iter(data.values())).values()))
    assert repr(leaf) in message


def test_coercions() -> None:
    cfg = config_from_dict(
        {"optim": {"base_lr": 1, "min_lr": "1e-7"}, "crops": {"local_scale": [0, 1]}, "model": {"layerscale": None}}
    )
    assert isinstance(cfg.optim.base_lr, float) and cfg.optim.base_lr == 1.0
    assert cfg.optim.min_lr == 1e-7  # PyYAML reads `1e-7` (no dot) as a string
    assert cfg.crops.local_scale == (0.0, 1.0) and isinstance(cfg.crops.local_scale, tuple)
    assert cfg.model.layerscale is None
    assert config_from_dict({"optim": None}) == Config()  # an empty YAML section


def test_base_is_kept_and_not_mutated() -> None:
    base = load_preset("tiny")
    epochs = base.optim.epochs
    cfg = config_from_dict({"optim": {"epochs": epochs + 3}}, base=base)
    assert cfg.optim.epochs == epochs + 3 and cfg.model.embed_dim == base.model.embed_dim
    assert base.optim.epochs == epochs


def test_overrides_parse_yaml_values() -> None:
    base = load_preset("tiny")
    cfg = apply_overrides(
        base,
        [
            "optim.base_lr=0.001",
            "train.max_steps=6",
            "crops.global_scale=[0.4,1.0]",
            "model.layerscale=null",
            "model.qkv_bias=false",
            "loss.ibot_head={out_dim: 512}",
            "train.device=cuda:0",
            "data.path=2024",  # a string field keeps the text
            "optim.min_lr=1e-7",
        ],
    )
    assert cfg.optim.base_lr == 0.001 and cfg.train.max_steps == 6
    assert cfg.crops.global_scale == (0.4, 1.0) and cfg.model.layerscale is None
    assert cfg.model.qkv_bias is False and cfg.loss.ibot_head.out_dim == 512
    assert cfg.loss.ibot_head.hidden_dim == base.loss.ibot_head.hidden_dim
    assert (cfg.train.device, cfg.data.path, cfg.optim.min_lr) == ("cuda:0", "2024", 1e-7)
    assert cfg.run_steps == 6 and cfg.total_steps == base.total_steps  # max_steps leaves schedules alone
    assert base.train.max_steps is None


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("optim.base_lr", "malformed override 'optim.base_lr'"),
        ("=3", "malformed override"),
        ("optim.lr_typo=1", "optim.lr_typo"),
        ("nosection.x=1", "nosection"),
        ("optim.base_lr.x=1", "optim.base_lr.x"),
        ("train.max_steps=six", "train.max_steps"),
        ("crops.global_scale=[0.4,", "crops.global_scale"),
    ],
)
def test_bad_overrides_name_the_item(item: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Config(), [item])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["crops.global_size=30"], "crops.global_size"),
        (["crops.local_size=13"], "crops.local_size"),
        (["model.img_size=30"], "model.img_size"),
        (["crops.global_scale=[0.5,0.4]"], "crops.global_scale"),
        (["crops.local_scale=[0.0,0.3]"], "crops.local_scale"),
        (["loss.mask_ratio=[0.6,0.5]"], "loss.mask_ratio"),
        (["loss.mask_probability=1.5"], "loss.mask_probability"),
        (["optim.batch_size=1"], "optim.batch_size"),  # KoLeo needs a neighbour
        (["optim.epoch_length=0"], "optim.epoch_length"),
        (["optim.warmup_epochs=30"], "optim.warmup_epochs"),
        (["model.arch=vit_huge"], "model.arch"),
        (["model.num_heads=5"], "model.embed_dim"),
        (["head.out_dim=0"], "head.out_dim"),
        (["train.device=gpu"], "train.device"),
        (["train.max_steps=0"], "train.max_steps"),
        (["loss.mode=dino"], "loss.ibot_weight"),
        (["teacher.teacher_temp=.nan"], "teacher.teacher_temp"),
    ],
)
def test_validate_names_the_key(overrides: list[str], key: str) -> None:
    cfg = apply_overrides(load_preset("tiny"), overrides)
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert key in str(exc.value)


def test_validate_checks_world_size_and_types_set_in_code() -> None:
    cfg = load_preset("tiny")
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="divisible"):
        validate(cfg, world_size=3)
    with pytest.raises(ConfigError, match="needs >= 2 images per rank"):
        validate(cfg, world_size=64)
    validate(apply_overrides(cfg, ["loss.koleo_weight=0", "optim.batch_size=1"]))
    cfg.optim.epochs = "ten"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="optim.epochs"):
        validate(cfg)


def test_validate_reports_every_problem() -> None:
    cfg = apply_overrides(load_preset("tiny"), ["crops.global_size=30", "optim.epoch_length=0"])
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert len(exc.value.problems) == 2


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip_through_yaml(name: str, tmp_path: Path) -> None:
    cfg = apply_overrides(load_preset(name), ["train.max_steps=6", "model.layerscale=null"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert "global_scale:" in path.read_text() and "!!python" not in path.read_text()
    assert load_config_file(path) == cfg
    assert load_config(path) == cfg  # a saved run config works where a preset name does


def test_vit_args_from_config_builds_the_tiny_model() -> None:
    cfg = load_config("tiny")
    args = vit_args_from_config(cfg.model)
    assert (args.embed_dim, args.depth, args.num_heads, args.patch_size) == (128, 6, 4, 14)
    assert args.init_values == cfg.model.layerscale and args.img_size == 28
    model = args.build()
    out = model.forward_features(torch.randn(2, 3, 28, 28))
    assert out["x_norm_clstoken"].shape == (2, 128)
    assert out["x_norm_patchtokens"].shape == (2, 4, 128)  # a 2 x 2 grid of 14 px patches
    local = model.forward_features(torch.randn(2, 3, cfg.crops.local_size, cfg.crops.local_size))
    assert local["x_norm_patchtokens"].shape == (2, 1, 128)  # a local crop is one patch


def test_vit_args_from_config_named_sizes_and_overrides() -> None:
    args = vit_args_from_config(load_preset("vitg14").model)
    assert (args.embed_dim, args.depth, args.num_heads, args.ffn_layer) == (1536, 40, 24, "swiglufused")
    v1 = vit_args_from_config(load_preset("dino_vits16").model, use_mask_token=False)
    assert v1.init_values is None and not v1.use_mask_token and v1.patch_size == 16


def test_schedule_args_scale_the_lr() -> None:
    cfg = load_preset("tiny")
    assert schedule_args(cfg)["lr"] == pytest.approx(0.004 * (64 / 1024) ** 0.5)
    v1 = load_preset("dino_vits16")
    assert schedule_args(v1)["lr"] == pytest.approx(0.0005 * 512 / 256)


def test_augmentation_probabilities_are_validated() -> None:
    cfg = load_config("tiny", ["crops.blur_p=[0.5, 0.1, 0.2]", "crops.solarize_p=0"])
    assert cfg.crops.blur_p == (0.5, 0.1, 0.2) and cfg.crops.solarize_p == 0.0
    with pytest.raises(ConfigError, match="crops.blur_p"):
        load_config("tiny", ["crops.blur_p=[0.5, 2, 0.2]"])
    with pytest.raises(ConfigError, match="crops.blur_p"):
        load_config("tiny", ["crops.blur_p=[0.5, 0.2]"])


def test_colour_jitter_strengths_are_validated() -> None:
    assert load_config("tiny", ["crops.color_jitter=[0.8, 0.8, 0, 0]"]).crops.color_jitter == (0.8, 0.8, 0.0, 0.0)
    with pytest.raises(ConfigError, match="crops.color_jitter"):
        load_config("tiny", ["crops.color_jitter=[0.4, -0.1, 0.2, 0.1]"])
    with pytest.raises(ConfigError, match="crops.color_jitter"):
        load_config("tiny", ["crops.color_jitter=[0.4, 0.4, 0.2, 0.7]"])
    with pytest.raises(ConfigError, match="crops.color_jitter"):
        load_config("tiny", ["crops.color_jitter=[0.4, 0.4]"])


@pytest.mark.parametrize("override", ["train.autocast=fp16", "train.distributed.param_dtype=float16"])
def test_fp16_without_a_gradient_scaler_is_refused(override: str) -> None:
    """fp16 trained without loss scaling lets small gradients underflow; it must not start."""
    with pytest.raises(ConfigError, match="gradient scaler"):
        load_config("tiny", [override, "train.distributed.strategy=fsdp"])


def test_settings_the_run_ignores_are_named() -> None:
    from dinokit.config import ignored_keys

    assert ignored_keys(load_config("tiny")) == []
    assert ignored_keys(load_config("vits14")) == [] and ignored_keys(load_config("dino_vits16")) == []
    notes = ignored_keys(load_config("tiny", ["data.split=test", "loss.ibot_head.out_dim=512",
                                              "train.distributed.strategy=fsdp"]))
    assert [n.split(" ")[0] for n in notes] == ["data.split='test'", "loss.ibot_head", "train.distributed.*"]
    used = load_config("tiny", ["data.dataset=fashion_mnist", "data.split=test", "loss.separate_ibot_head=true",
                                "loss.ibot_head.out_dim=512", "train.distributed.strategy=fsdp"])
    assert [n.split(" ")[0] for n in ignored_keys(used, world_size=2)] == []
