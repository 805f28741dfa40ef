"""`dinokit check-reference`: the whole shared folder passes, and the checker is generic and strict."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dinokit.cli import main
from dinokit.models import vit_args
from dinokit.reference.checker import check_reference


def test_cli_passes_every_case_of_the_reference_folder(reference_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dinokit.cli", "check-reference", str(reference_dir)],
        capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    n_cases = len(json.loads((reference_dir / "manifest.json").read_text())["cases"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(lines) == n_cases and all(line.startswith("PASS ") for line in lines)


IL_SEMANTICS = "get_intermediate_layers(x, n=2, reshape=True, return_class_token=True, norm=True)"
LIST_SEMANTICS = "get_intermediate_layers(x, n=[0, 2], reshape=False, return_class_token=False, norm=False)"


def _write_generated_case(folder: Path) -> None:
    """A backbone case in the manifest format, with sizes the shared folder never uses: patch 16,
    2 registers, 3 chunks, non-square inputs, antialiased offset-free interpolation."""
    kwargs = dict(
        img_size=32, patch_size=16, embed_dim=48, depth=3, num_heads=3, mlp_ratio=3.0, init_values=0.5,
        ffn_layer="swiglufused", num_register_tokens=2, interpolate_antialias=True, interpolate_offset=0.0,
        qkv_bias=True, ffn_bias=False, proj_bias=True, drop_path_rate=0.0, drop_path_uniform=False,
    )
    torch.manual_seed(3)
    model = vit_args("vit_small", **kwargs).build().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for k, v in model.state_dict().items():  # chunked keys, as in a training checkpoint
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i}.{k[len('blocks.'):]}"
        tensors[f"model.{k}"] = v.clone()
    x = torch.randn(2, 3, 32, 32)
    x_wide = torch.randn(2, 3, 48, 80)
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, 1:3] = True
    tensors.update({"input.x": x, "input.masks": masks, "input.x_48x80": x_wide})
    with torch.no_grad():
        for group, inp, m in (("ff", x, None), ("ff_masked", x, masks), ("ff_48x80", x_wide, None)):
            out = model.forward_features(inp, m)
            for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
                tensors[f"out.{group}.{key}"] = out[key].contiguous()
        tensors["out.forward_48x80"] = model(x_wide)
        for i, (patch, cls) in enumerate(model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)):
            tensors[f"out.il_n2.{i}.patch"], tensors[f"out.il_n2.{i}.cls"] = patch, cls
            meta[f"out.il_n2.{i}.patch"] = {"role": "output", "semantics": IL_SEMANTICS + f"[{i}][0]"}
            meta[f"out.il_n2.{i}.cls"] = {"role": "output", "semantics": "same call"}
        for k, out in zip((0, 2), model.get_intermediate_layers(x, n=[0, 2], norm=False)):
            tensors[f"out.il_list.block{k}"] = out
            meta[f"out.il_list.block{k}"] = {"role": "output", "semantics": LIST_SEMANTICS}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "gen.safetensors"))
    for name in tensors:
        meta.setdefault(name, {"role": "input" if name.startswith("input.") else "output", "semantics": ""})
    case = {
        "name": "generated_p16_reg2_chunked",
        "kind": "backbone_chunking",
        "file": "gen.safetensors",
        "constructor": {"kwargs": {**kwargs, "block_chunks": 3, "norm_layer": "nn.LayerNorm(eps=1e-6)"}},
        "tensors": {k: v for k, v in meta.items() if not k.startswith("model.")},
    }
    (folder / "manifest.json").write_text(json.dumps({"cases": [case]}))


def test_checker_is_generic_over_sizes_and_catches_a_wrong_value(tmp_path: Path) -> None:
    _write_generated_case(tmp_path)
    results = list(check_reference(tmp_path))
    assert [r.ok for r in results] == [True], results[0].line()
    assert results[0].n_checks == 19  # 3 x 4 forward_features keys, forward, 4 + 2 intermediate outputs

    tensors = load_file(str(tmp_path / "gen.safetensors"))
    tensors["out.ff_48x80.x_prenorm"][0, 0, 0] += 1e-3
    save_file(tensors, str(tmp_path / "gen.safetensors"))
    (result,) = check_reference(tmp_path)
    assert not result.ok and "out.ff_48x80.x_prenorm" in result.detail


def test_unknown_kind_and_unchecked_outputs_fail(tmp_path: Path, reference_dir: Path, capsys) -> None:
    shutil.copy(reference_dir / "loss_koleo.safetensors", tmp_path)
    manifest = json.loads((reference_dir / "manifest.json").read_text())
    koleo = next(c for c in manifest["cases"] if c["kind"] == "koleo_loss")
    mystery = dict(koleo, name="mystery", kind="sparse_attention")
    # The same file with one extra output that no runner knows about.
    tensors = load_file(str(tmp_path / "loss_koleo.safetensors"))
    tensors["out.something_new"] = torch.zeros(3)
    save_file(tensors, str(tmp_path / "koleo_plus.safetensors"))
    extra = dict(koleo, name="koleo_plus", file="koleo_plus.safetensors")
    (tmp_path / "manifest.json").write_text(json.dumps({"cases": [koleo, mystery, extra]}))

    assert main(["check-reference", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PASS loss_koleo")
    assert out[1] == "FAIL mystery unknown case kind 'sparse_attention'"
    assert out[2].startswith("FAIL koleo_plus") and "out.something_new" in out[2]


def test_missing_manifest_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["check-reference", str(tmp_path)]) == 2
    assert "manifest.json does not exist" in capsys.readouterr().err
