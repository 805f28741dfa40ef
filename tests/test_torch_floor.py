"""dinokit against the oldest PyTorch it declares (`torch>=` in pyproject.toml), checked by name and
signature rather than by installing old wheels.

`FLOOR_NAMES` lists every `torch.*` name dinokit's sources use; each exists in PyTorch 2.6 (its
documentation). `FLOOR_SIGNATURES` records the parameters, in 2.6, of the calls whose signatures
moved between releases. A new name or keyword in dinokit fails here until someone checks it
against the floor (or raises the floor in pyproject.toml and these tables together).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FLOOR = (2, 6)

FLOOR_NAMES = {
    # modules and classes imported with `from ... import`
    "torch.Tensor", "torch.nn", "torch.distributed.algorithms.ddp_comm_hooks.default_hooks",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.state_dict.StateDictOptions",
    "torch.distributed.checkpoint.state_dict.get_model_state_dict",
    "torch.distributed.checkpoint.state_dict.get_optimizer_state_dict",
    "torch.distributed.checkpoint.state_dict.set_model_state_dict",
    "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict",
    "torch.distributed.device_mesh.init_device_mesh", "torch.distributed.fsdp.MixedPrecisionPolicy",
    "torch.distributed.fsdp.fully_shard", "torch.distributed.tensor.DTensor",
    "torch.nn.parallel.DistributedDataParallel", "torch.utils.checkpoint.checkpoint",
    "torch.utils.data.DataLoader", "torch.utils.data.Dataset", "torch.utils.data.Sampler",
    "torch.utils.data.Subset", "torch.utils.tensorboard.SummaryWriter",
    # attributes used as torch.a.b
    "torch._foreach_lerp_", "torch._shape_as_tensor", "torch._weight_norm", "torch.autocast",
    "torch.autograd.grad", "torch.backends.cpu.get_cpu_capability", "torch.compile",
    "torch.cuda.device_count", "torch.cuda.get_rng_state_all", "torch.cuda.is_available",
    "torch.cuda.set_device", "torch.cuda.set_rng_state_all", "torch.cuda.get_device_name",
    "torch.distributed.checkpoint", "torch.hub.load", "torch.inference_mode", "torch.jit.TracerWarning",
    "torch.linalg.svd", "torch.load", "torch.nn.functional.normalize", "torch.nn.utils.clip_grad_norm_",
    "torch.nn.utils.clip_grads_with_norm_", "torch.nn.utils.get_total_norm",
    "torch.nn.utils.parametrizations.weight_norm", "torch.nn.utils.weight_norm", "torch.onnx.export",
    "torch.optim.AdamW", "torch.optim.Optimizer", "torch.optim.SGD", "torch.random.fork_rng",
    "torch.optim.lr_scheduler.CosineAnnealingLR", "torch.compiler.is_compiling",
    "torch._dynamo", "torch._dynamo.maybe_mark_dynamic",
    "torch.get_num_threads", "torch.set_float32_matmul_precision", "torch.get_float32_matmul_precision",
    "torch.version.cuda", "torch.cuda.get_device_capability", "torch.nn.Linear", "torch.nn.Module",
    "torch.backends.cudnn.allow_tf32",
}

# Parameter names in PyTorch 2.6.
FLOOR_SIGNATURES = {
    "DistributedDataParallel": [
        "module", "device_ids", "output_device", "dim", "broadcast_buffers", "init_sync", "process_group",
        "bucket_cap_mb", "find_unused_parameters", "check_reduction", "gradient_as_bucket_view", "static_graph",
        "delay_all_reduce_named_params", "param_to_hook_all_reduce", "mixed_precision", "device_mesh"],
    "fully_shard": ["module", "mesh", "reshard_after_forward", "shard_placement_fn", "mp_policy", "offload_policy"],
    "MixedPrecisionPolicy": ["param_dtype", "reduce_dtype", "output_dtype", "cast_forward_inputs"],
    "init_device_mesh": ["device_type", "mesh_shape", "mesh_dim_names"],
    "init_process_group": ["backend", "init_method", "timeout", "world_size", "rank", "store", "group_name",
                           "pg_options", "device_id"],
    "get_total_norm": ["tensors", "norm_type", "error_if_nonfinite", "foreach"],
    "clip_grads_with_norm_": ["parameters", "max_norm", "total_norm", "foreach"],
    "StateDictOptions": ["full_state_dict", "cpu_offload", "ignore_frozen_params", "keep_submodule_prefixes",
                         "strict", "broadcast_from_rank0", "flatten_optimizer_state_dict"],
}

SOURCES = sorted((ROOT / "dinokit").rglob("*.py")) + [ROOT / "hubconf.py"]


def _trees() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in SOURCES]


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def test_the_declared_floor_is_the_one_checked_here() -> None:
    declared = re.search(r'"torch>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert declared is not None, "pyproject.toml declares no torch floor"
    assert tuple(int(x) for x in declared.group(1).split(".")[:2]) == FLOOR


def test_every_torch_name_dinokit_uses_exists_at_the_floor() -> None:
    used: set[str] = set()
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
                used.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Attribute):
                name = _dotted(node)
                if name and name.startswith("torch.") and not name.startswith("torch.Tensor."):
                    used.add(name)
    # Checked: the longest chains (torch.cuda.is_available covers torch.cuda) below the top level;
    # public top-level functions and dtypes (torch.cat, torch.float32) date from 1.x.
    basics = {n for n in used if n.count(".") == 1 and not (n.startswith("torch._") and not n.endswith("__"))}
    missing = sorted(n for n in used - basics - FLOOR_NAMES if not _is_module_of(n))
    assert not missing, f"torch names not checked against torch {FLOOR}: {missing}"


def _is_module_of(name: str) -> bool:
    """`name` is a module or class on the way to a listed name (torch.distributed, torch.nn.utils)."""
    return any(known.startswith(name + ".") for known in FLOOR_NAMES)


def test_the_floor_names_exist_in_the_installed_torch() -> None:
    """The table is not stale: every name resolves here (a name removed since would be a bug)."""
    import importlib

    for name in sorted(FLOOR_NAMES):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            break


def test_every_keyword_dinokit_passes_exists_at_the_floor() -> None:
    checked = 0
    for path, tree in _trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            callee = _dotted(node.func)
            short = callee.rsplit(".", 1)[-1] if callee else None
            if short not in FLOOR_SIGNATURES:
                continue
            checked += 1
            for kw in node.keywords:
                if kw.arg is not None:
                    assert kw.arg in FLOOR_SIGNATURES[short], (
                        f"{path.name}:{node.lineno}: {short}({kw.arg}=...) has no such parameter in torch {FLOOR}")
    assert checked >= 8  # the tables above are in use


def test_ddp_buffer_option_binds_to_the_floor_and_to_this_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    parallelize = importlib.import_module("dinokit.distributed.parallelize")

    def floor_ddp(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True,  # noqa: ANN001
                  init_sync=True, process_group=None, bucket_cap_mb=None, find_unused_parameters=False,
                  check_reduction=False, gradient_as_bucket_view=False, static_graph=False,
                  delay_all_reduce_named_params=None, param_to_hook_all_reduce=None, mixed_precision=None,
                  device_mesh=None) -> None:
        pass

    assert list(inspect.signature(floor_ddp).parameters)[1:] == FLOOR_SIGNATURES["DistributedDataParallel"]
    installed = inspect.signature(parallelize.DistributedDataParallel.__init__)
    installed.bind(None, torch.nn.Linear(1, 1), find_unused_parameters=False, **parallelize._no_forward_buffer_sync())
    stand_in = type("DDP26", (), {"__init__": floor_ddp})
    monkeypatch.setattr(parallelize, "DistributedDataParallel", stand_in)
    option = parallelize._no_forward_buffer_sync()
    assert option == {"broadcast_buffers": False}
    inspect.signature(floor_ddp).bind(None, torch.nn.Linear(1, 1), find_unused_parameters=False, **option)
