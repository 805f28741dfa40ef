"""Vision Transformer backbone of DINO / DINOv2 (Dosovitskiy et al. 2021; Oquab et al. 2023).

Parameter names and shapes equal the official hub checkpoints (`cls_token`, `pos_embed`,
`register_tokens`, `mask_token`, `patch_embed.proj.*`, `blocks.{i}.*`, `norm.*`), so official
weights load with a plain `load_state_dict`; chunked training checkpoints are handled by key
mapping in `dinokit.checkpoint`, not by nesting modules. The model knows nothing of parallelism:
`blocks` is a flat `ModuleList` that FSDP or activation checkpointing can wrap block by block.

Two execution switches are plain attributes, not constructor arguments, because they change how
the same weights compute, not what they compute: `packing` (crops of several sizes through the
blocks as one packed token matrix in `forward_features_list`) and `activation_checkpointing`
(recompute each block's activations in the backward pass instead of storing them).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinokit.models.layers import Block, PackedLayout, PatchEmbed
from dinokit.models.layers.block import FfnLayer


class VisionTransformer(nn.Module):
    """DINOv2 ViT: patch embedding, [CLS] + registers + patch tokens, pre-norm blocks, final norm.

    Args:
        img_size: side of the image the positional embedding is made for (518 for released
            DINOv2 models: a 37 x 37 patch grid); other sizes are interpolated at run time.
        patch_size: patch side p (14 for DINOv2, 16 or 8 for DINO).
        in_chans: image channels.
        embed_dim, depth, num_heads, mlp_ratio: width D, blocks, heads, FFN ratio.
        qkv_bias, proj_bias, ffn_bias: biases of the attention and FFN Linear layers.
        drop_path_rate: stochastic-depth rate, linear over depth from 0 (or uniform).
        drop_path_uniform: same rate for every block.
        init_values: LayerScale init (1e-5 in training, 1.0 in hub builders); None = no LayerScale.
        ffn_layer: "mlp", "swiglu" or "swiglufused".
        num_register_tokens: R extra learnable tokens after [CLS] (Darcet et al. 2024).
        interpolate_antialias: antialiased bicubic when resizing the positional embedding
            (DINOv2 models with registers).
        interpolate_offset: the official +0.1 "kludge" on the target grid size (0 for register
            models); see `interpolate_pos_encoding`.
        use_mask_token: have a `mask_token` (DINO v1 checkpoints have none).

    Shapes: images (B, in_chans, H, W) with H, W multiples of p; N = (H/p) * (W/p) patches.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        ffn_layer: FfnLayer = "mlp",
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        use_mask_token: bool = True,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.embed_dim = embed_dim
        self.num_features = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.n_blocks = depth

        # Order of construction follows the official model so that a seeded initialisation draws
        # the same random numbers (patch embedding, then blocks); zero-filled tokens draw none.
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = [float(r) for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=rates[i],
                init_values=init_values,
                ffn_layer=ffn_layer,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if use_mask_token else None
        # Off by default: on CPU packing measured slower than separate forwards (bench/results/
        # packing_cpu_tiny.json, packing_cpu_vits14.json); training turns it on for CUDA (`train.packing`).
        self.packing = False
        self.activation_checkpointing = False
        self.init_weights()

    # ------------------------------------------------------------------ initialisation

    def init_weights(self) -> None:
        """Official initialisation: truncated-normal (std 0.02) positions and Linear weights,
        tiny normal [CLS] / registers, zero biases; convolution and norms keep PyTorch defaults."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ optimiser information

    def no_weight_decay(self) -> set[str]:
        """Names of the learned tokens and embeddings, which training excludes from weight decay."""
        names = {"cls_token", "pos_embed", "register_tokens", "mask_token"}
        return {n for n, _ in self.named_parameters() if n in names}

    def layer_id(self, param_name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 for the embeddings and tokens, i + 1 for
        `blocks.{i}`, depth + 1 for the final norm (and anything after the blocks)."""
        first = param_name.split(".", 1)[0]
        if first in ("cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed"):
            return 0
        if first == "blocks":
            return int(param_name.split(".")[1]) + 1
        return self.n_blocks + 1

    # ------------------------------------------------------------------ tokens

    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """Positional embedding (1, 1 + n, D) for an image of h x w pixels.

        Official semantics, which matter for exact outputs: the embedding is returned unchanged
        only when the patch count matches and the image is square; otherwise the M x M grid is
        resized bicubically (align_corners False) in float32. With a non-zero offset the resize
        is asked for by `scale_factor = (h/p + offset) / M`, which maps source coordinates
        slightly differently from an output size; antialiasing also changes the cubic kernel.

        Args:
            x: tokens (B, 1 + n, D) including [CLS] (used for n and the dtype).
            h, w: image height and width in pixels.
        """
        n_patches = x.shape[1] - 1
        n_stored = self.pos_embed.shape[1] - 1
        if n_patches == n_stored and h == w:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        dim = x.shape[-1]
        gh, gw = h // self.patch_size, w // self.patch_size
        m = int(math.sqrt(n_stored))
        if m * m != n_stored:
            raise ValueError(f"pos_embed holds {n_stored} patch positions, not a square grid")
        grid = patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((gh + self.interpolate_offset) / m, (gw + self.interpolate_offset) / m)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=self.interpolate_antialias)
        if grid.shape[-2:] != (gh, gw):
            raise RuntimeError(f"interpolated grid {tuple(grid.shape[-2:])} != {(gh, gw)}")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)
        return torch.cat((cls_pos, patch_pos), dim=1).to(x.dtype)

    @property
    def pos_grid(self) -> int:
        """Side M of the stored M x M positional-embedding grid."""
        return math.isqrt(self.pos_embed.shape[1] - 1)

    @torch.no_grad()
    def resize_pos_embed_(self, img_size: int) -> nn.Parameter:
        """Store the positional embedding for an `img_size` x `img_size` input from now on, once
        (high-resolution phase, or weights made at another size). The embedding becomes a new
        Parameter (autograd caches a leaf's shape), which is returned: an optimizer holding the
        old one must be told (see `dinokit.train.loop`)."""
        if img_size % self.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {self.patch_size}")
        grid = img_size // self.patch_size
        if grid != self.pos_grid:
            old = self.pos_embed
            self.pos_embed = nn.Parameter(resize_pos_embed(old.data, grid, self.interpolate_antialias),
                                          requires_grad=old.requires_grad)
        return self.pos_embed

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + R + N, D): [CLS + pos, registers, patches + pos].

        `masks` (B, N) bool replaces the chosen patch embeddings by `mask_token` before the
        positional embedding is added (iBOT's masked image modelling). Registers carry no
        positional embedding.
        """
        B, _, H, W = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask_token (DINO v1 architecture); masks are not supported")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, H, W)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        return x

    # ------------------------------------------------------------------ forward

    def _run_blocks(self, x: Tensor, layout: PackedLayout | None = None) -> Tensor:
        checkpointed = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointed:
                # Non-reentrant checkpointing restores the RNG state for the recomputation, so
                # stochastic depth drops the same samples twice.
                x = checkpoint(block, x, layout=layout, use_reentrant=False)
            else:
                x = block(x, layout=layout)
        return x

    def _output_dict(self, x: Tensor, masks: Tensor | None, x_norm: Tensor | None = None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x) if x_norm is None else x_norm
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        """Run the backbone.

        Returns the official dict: `x_norm_clstoken` (B, D), `x_norm_regtokens` (B, R, D),
        `x_norm_patchtokens` (B, N, D), `x_prenorm` (B, 1 + R + N, D), `masks`.
        """
        tokens = self.prepare_tokens_with_masks(x, masks)
        return self._output_dict(self._run_blocks(tokens), masks)

    def forward_features_list(
        self, xs: Sequence[Tensor], masks_list: Sequence[Tensor | None]
    ) -> list[dict[str, Tensor | None]]:
        """`forward_features` for several crop sizes at once (e.g. global and local crops).

        With `self.packing` the tokens of all batches are packed into one (rows, D) matrix
        that goes through each block once, with block-diagonal attention (see
        `dinokit.models.layers.packing`); otherwise each batch runs separately. Both give the
        same results up to float rounding. Returns one `forward_features` dict per batch.
        """
        if len(xs) != len(masks_list):
            raise ValueError(f"{len(xs)} image batches but {len(masks_list)} mask entries")
        if not self.packing or len(xs) < 2:
            return [self.forward_features(x, m) for x, m in zip(xs, masks_list)]
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(xs, masks_list)]
        layout = PackedLayout.of(tokens)
        packed = self._run_blocks(layout.pack(tokens), layout)
        outs, normed = layout.unpack(packed), layout.unpack(self.norm(packed))
        return [self._output_dict(x, m, x_norm) for x, m, x_norm in zip(outs, masks_list, normed)]

    def forward(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Normalised [CLS] token (B, D), the image embedding of the hub models."""
        out = self.forward_features(x, masks)["x_norm_clstoken"]
        assert out is not None
        return out

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[Tensor, ...] | tuple[tuple[Tensor, Tensor], ...]:
        """Outputs of the last `n` blocks (or of the blocks listed in `n`), official semantics.

        Args:
            x: images (B, C, H, W).
            n: how many final blocks, or a list of block indices.
            reshape: return patch tokens as (B, D, H/p, W/p) instead of (B, N, D).
            return_class_token: pair each output with its [CLS] token (B, D).
            norm: apply the final LayerNorm to each output.

        Registers are dropped from the patch outputs.
        """
        depth = len(self.blocks)
        wanted = set(range(depth - n, depth)) if isinstance(n, int) else set(n)
        if not wanted or min(wanted) < 0 or max(wanted) >= depth:
            raise ValueError(f"blocks {sorted(wanted)} out of range for a model with {depth} blocks")
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in wanted:
                outputs.append(tokens)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            B, _, H, W = x.shape
            p = self.patch_size
            patches = [o.reshape(B, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous() for o in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        return tuple(patches)

    def last_block_attention(self, x: Tensor) -> Tensor:
        """Attention probabilities of the last block (B, heads, T, T), T = 1 + R + N, for pictures.

        Runs the other blocks through the fast path and only the last attention explicitly.
        """
        tokens = self.prepare_tokens_with_masks(x)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        last = self.blocks[-1]
        assert isinstance(last, Block)
        return last.attn.attention_probs(last.norm1(tokens))


def resize_pos_embed(pos_embed: Tensor, grid: int, antialias: bool = False) -> Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + grid*grid, D): the patch part resized bicubically to the
    output size (align_corners False, float32, as the run-time interpolation), [CLS] kept.
    Also used for Adam moments of the embedding, so any (1, 1 + M*M, D) tensor goes."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:].float()
    m = math.isqrt(patch_pos.shape[1])
    if m * m != patch_pos.shape[1]:
        raise ValueError(f"pos_embed holds {patch_pos.shape[1]} patch positions, not a square grid")
    if m == grid:
        return pos_embed.clone()
    dim = patch_pos.shape[-1]
    img = patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)
    patch_pos = img.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat((cls_pos, patch_pos), dim=1)
