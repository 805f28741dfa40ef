"""Compute savers: activation checkpointing, batch-subset stochastic depth, the config switches
and torch.compile (the last only with DINOKIT_TEST_COMPILE=1: compiling takes minutes on CPU)."""

from __future__ import annotations

import os
import random

import pytest
import torch
from torch import Tensor
from torch._dynamo.utils import counters

from dinokit.config import ConfigError, load_config, schedule_args
from dinokit.data.collate import collate_data_and_cast
from dinokit.data.masking import MaskingGenerator
from dinokit.models import vit_args
from dinokit.models.layers import Block
from dinokit.models.vision_transformer import VisionTransformer
from dinokit.train.compute import packing_enabled
from dinokit.train.loop import build_model, train_step
from dinokit.train.optim import build_optimizer
from dinokit.train.schedules import build_schedules

SMALL = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4", "model.img_size=16",
    "crops.global_size=16", "crops.local_size=8", "crops.local_number=2", "optim.batch_size=4",
    "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16", "train.device=cpu",
]



def _assert_grad_close(actual: Tensor, expected: Tensor, name: str) -> None:
    # Weight gradients sum over all rows; packing changes the summation order, so compare at
    # float32 rounding relative to the gradient's scale.
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")

def _grads(model: VisionTransformer, packing: bool) -> dict[str, Tensor]:
    model.packing = packing
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 16, 16, generator=g), torch.randn(6, 3, 8, 8, generator=g)]
    torch.manual_seed(123)  # the same stochastic-depth draws in both runs
    outs = model.forward_features_list(xs, [torch.rand(4, 16, generator=g) < 0.3, None])
    sum(o["x_norm_clstoken"].square().sum() + o["x_norm_patchtokens"].mean() for o in outs).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", [False, True], ids=["separate", "packed"])
def test_activation_checkpointing_gives_the_same_gradients_and_recomputes_blocks(packing: bool) -> None:
    torch.manual_seed(0)
    # Batch-subset stochastic depth: the recomputation must drop the same samples.
    model = vit_args("vit_small", embed_dim=32, depth=3, num_heads=2, patch_size=4, img_size=16,
                     init_values=0.5, drop_path_rate=0.3, drop_path_uniform=True).build().train()
    plain = _grads(model, packing)
    calls: list[int] = []
    # A pre-hook: the recomputation stops as soon as it has rebuilt the saved tensors.
    model.blocks[1].register_forward_pre_hook(lambda m, i: calls.append(1))
    model.activation_checkpointing = True
    checkpointed = _grads(model, packing)
    n_batches = 1 if packing else 2
    assert len(calls) == 2 * n_batches  # forward, then again in the backward pass
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        _assert_grad_close(checkpointed[name], grad, name)


def test_checkpointing_is_off_without_gradients() -> None:
    model = vit_args("vit_small", embed_dim=32, depth=1, num_heads=2, patch_size=4, img_size=16).build()
    model.activation_checkpointing = True
    calls: list[int] = []
    model.blocks[0].register_forward_pre_hook(lambda m, i: calls.append(1))
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert calls == [1]


@pytest.mark.parametrize(("rate", "rows"), [(0.5, 4), (0.25, 6), (0.05, 8)])
def test_batch_subset_stochastic_depth_skips_both_branches_for_dropped_samples(rate: float, rows: int) -> None:
    block = Block(32, 4, drop_path=rate).train()
    seen: dict[str, list[int]] = {"attn": [], "mlp": []}
    block.attn.register_forward_hook(lambda m, i, o: seen["attn"].append(i[0].shape[0]))
    block.mlp.register_forward_hook(lambda m, i, o: seen["mlp"].append(i[0].shape[0]))
    block(torch.randn(8, 5, 32))
    # Rates above 0.1 run the branches on int(8 * (1 - rate)) samples; 0.05 is per-sample
    # DropPath, which computes every sample.
    assert seen == {"attn": [rows], "mlp": [rows]}


def test_config_switches_reach_the_model() -> None:
    model = build_model(load_config("tiny", SMALL))
    assert model.student["backbone"].packing is False  # auto on CPU
    assert model.student["backbone"].activation_checkpointing is False
    model = build_model(load_config("tiny", [*SMALL, "train.packing=true", "train.activation_checkpointing=true"]))
    assert model.student["backbone"].packing is True
    assert model.student["backbone"].activation_checkpointing is True
    assert model.teacher["backbone"].activation_checkpointing is False
    model = build_model(load_config("tiny", [*SMALL, "train.compile=true"]))
    # nn.Module.compile is lazy (nothing compiles before the first call) and keeps the keys.
    for net in (model.student, model.teacher):
        assert all(block._compiled_call_impl is not None for block in net["backbone"].blocks)
    assert "backbone.blocks.0.attn.qkv.weight" in model.student.state_dict()


def test_packing_setting_resolution_and_bad_value() -> None:
    cfg = load_config("tiny", SMALL)
    assert not packing_enabled(cfg.train)
    assert packing_enabled(load_config("tiny", [*SMALL, "train.device=cuda", "train.packing=auto"]).train)
    assert not packing_enabled(load_config("tiny", [*SMALL, "train.device=cuda", "train.packing=false"]).train)
    with pytest.raises(ConfigError, match="train.packing"):
        load_config("tiny", [*SMALL, "train.packing=maybe"])


def _batch(cfg, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = cfg.crops
    samples = [({"global_crops": [torch.randn(3, c.global_size, c.global_size, generator=g) for _ in range(2)],
                 "local_crops": [torch.randn(3, c.local_size, c.local_size, generator=g) for _ in range(c.local_number)]}, 0)
               for _ in range(cfg.optim.batch_size)]
    grid = c.global_size // cfg.model.patch_size
    return collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, n_tokens=grid * grid,
                                 mask_generator=MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid),
                                 random_state=random.Random(seed))


def _one_step(overrides: list[str]) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of one train step and the student's (clipped) gradients it left behind."""
    cfg = load_config("tiny", [*SMALL, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(model.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    sched = build_schedules(**schedule_args(cfg)).at(0)
    terms, _ = train_step(model, optimizer, _batch(cfg), sched, cfg, torch.device("cpu"))
    grads = {name.replace("_orig_mod.", ""): p.grad.detach().clone()
             for name, p in model.student.named_parameters() if p.grad is not None}
    return float(terms["total"]), grads


@pytest.mark.skipif(os.environ.get("DINOKIT_TEST_COMPILE") != "1", reason="set DINOKIT_TEST_COMPILE=1 (minutes of compiling)")
@pytest.mark.parametrize("mode", ["blocks", "step"])
def test_compiled_train_step_runs_on_cpu_and_matches_eager(mode: str) -> None:
    """Forward and backward: the loss and every gradient of the compiled step equal eager's
    (blocks compiled one by one, or the whole model call as one graph)."""
    eager_loss, eager_grads = _one_step(["train.packing=true"])
    compiled_loss, compiled_grads = _one_step(["train.packing=true", f"train.compile={mode}"])
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 10
    for name, grad in eager_grads.items():
        scale = float(grad.abs().max()) or 1.0
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


@pytest.mark.skipif(os.environ.get("DINOKIT_TEST_COMPILE") != "1", reason="set DINOKIT_TEST_COMPILE=1 (minutes of compiling)")
def test_whole_step_compilation_follows_eager_over_steps() -> None:
    """`train.compile=step` over 4 steps whose batches mask different numbers of patches and
    whose teacher temperatures differ, compiled once: the loss
    terms of every step and the student and teacher after the optimizer and EMA updates equal
    eager's within float tolerance."""
    runs = []
    torch._dynamo.reset()
    counters.clear()
    for mode in ("false", "step"):
        cfg = load_config("tiny", [*SMALL, f"train.compile={mode}", "teacher.warmup_teacher_temp_epochs=1"])
        torch.manual_seed(0)
        model = build_model(cfg).train()
        optimizer = build_optimizer(model.trainable(), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
        schedules = build_schedules(**schedule_args(cfg))
        losses = []
        for step in range(4):
            batch = _batch(cfg, step)
            terms, _ = train_step(model, optimizer, batch, schedules.at(step), cfg, torch.device("cpu"))
            losses.append({k: float(v) for k, v in terms.items()})
        runs.append((losses, {k.replace("_orig_mod.", ""): v.detach().clone() for k, v in model.state_dict().items()}))
    # One compilation for all four steps: the masked-patch count is marked dynamic up front, and
    # the temperature is a tensor (a recompilation per new value would cost minutes each).
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    (eager, eager_state), (compiled, compiled_state) = runs
    assert len({int(_batch(load_config("tiny", SMALL), s)["n_masked_patches"]) for s in range(4)}) > 1
    for a, b in zip(eager, compiled):
        assert b.keys() == a.keys()
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), name
    assert compiled_state.keys() == eager_state.keys()
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_step_agrees_with_fp32() -> None:
    """bf16 autocast (what `train.autocast=bf16` runs, eager or compiled): the loss within bf16
    rounding of fp32's, every gradient pointing the same way. Sinkhorn-Knopp and KoLeo cast to
    float32 themselves, and autocast runs the log-softmaxes in float32."""
    fp32_loss, fp32_grads = _one_step([])
    bf16_loss, bf16_grads = _one_step(["train.autocast=bf16"])
    assert bf16_loss == pytest.approx(fp32_loss, rel=2e-2)
    assert bf16_grads.keys() == fp32_grads.keys()
    for name, grad in fp32_grads.items():
        if grad.norm() > 1e-6:
            cos = torch.nn.functional.cosine_similarity(bf16_grads[name].flatten(), grad.flatten(), dim=0)
            assert cos > 0.95, (name, float(cos))
