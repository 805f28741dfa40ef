"""A backbone as an ONNX graph with dynamic batch, height and width.

The graph's outputs (names fixed, shapes for an H x W input with patch p, N = (H/p)(W/p)):
- `cls_token` (B, D): the normalised [CLS] token (`x_norm_clstoken`);
- `patch_tokens` (B, N, D): the normalised patch tokens, row-major (`x_norm_patchtokens`);
- `register_tokens` (B, R, D): only for models with registers (`x_norm_regtokens`).

The positional grid is resized inside the graph for every input size with the model's own rule
(`dinokit.models.pos_resample`: the +offset on the target size, antialiasing where the model
uses it), as two small resampling matrices built from the input's shape. ONNX's `Resize` is not
used: its cubic kernel and coordinate mapping are not PyTorch's, and it has no way to express the
offset, so a graph built on it would drift from the PyTorch model at every size but the stored one.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from dinokit.models.pos_resample import resample_grid
from dinokit.models.vision_transformer import VisionTransformer

__all__ = ["OnnxBackbone", "export_onnx", "output_names"]


def output_names(model: VisionTransformer) -> list[str]:
    return ["cls_token", "patch_tokens"] + (["register_tokens"] if model.num_register_tokens else [])


class OnnxBackbone(nn.Module):
    """`model` with a shape-traced positional resize; `forward(images)` -> the named outputs."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model

    def _pos_embed(self, images: Tensor) -> Tensor:
        model = self.model
        shape = torch._shape_as_tensor(images)  # traced: the graph reads H and W off its input
        height, width = shape[2], shape[3]
        rows, cols = height // model.patch_size, width // model.patch_size
        side = model.pos_grid
        pos = model.pos_embed.float()
        dim = pos.shape[-1]
        grid = pos[0, 1:].reshape(side, side, dim).permute(2, 0, 1)
        # The official rule keeps the stored grid for a square input with as many patches.
        keep = (rows * cols == side * side) & (height == width)
        resized = resample_grid(grid, rows, cols, model.interpolate_offset, model.interpolate_antialias, keep)
        return torch.cat((pos[:, :1], resized.reshape(dim, -1).T[None]), dim=1)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        x = model.patch_embed(images)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self._pos_embed(images).to(x.dtype)
        if model.register_tokens is not None:
            x = torch.cat((x[:, :1], model.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        for block in model.blocks:
            x = block(x)
        x = model.norm(x)
        registers = 1 + model.num_register_tokens
        outputs = (x[:, 0], x[:, registers:])
        return (*outputs, x[:, 1:registers]) if model.num_register_tokens else outputs


def export_onnx(model: VisionTransformer, path: Path, sample_size: int, opset: int = 18) -> Path:
    """Write `model` (eval mode, float32) to `path` with dynamic batch, height and width."""
    wrapper = OnnxBackbone(model.eval().float())
    sample = torch.zeros(1, model.patch_embed.proj.in_channels, sample_size, sample_size)
    names = output_names(model)
    axes = {"images": {0: "batch", 2: "height", 3: "width"}}
    axes.update({name: {0: "batch"} for name in names})
    axes["patch_tokens"][1] = "patches"
    with torch.no_grad(), warnings.catch_warnings():
        # The patch embedding's "multiple of the patch" check reads the sample's shape: traced as
        # a constant, so the graph does not check it (inputs must be multiples of the patch).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(wrapper, (sample,), str(path), input_names=["images"], output_names=names,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return path
