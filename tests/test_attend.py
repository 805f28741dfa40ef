"""`attend` (the attention kernel choice) and the matmul patch embedding equal their references."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dinokit.models.layers import attend as attend_module
from dinokit.models.layers.attend import attend
from dinokit.models.layers.patch_embed import PatchEmbed


def _qkv(b: int, h: int, n: int, d: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def _forward_backward(fn, q, k, v) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = fn(q, k, v)
    out.float().square().sum().backward()
    grads = [t.grad.float().clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.float().detach(), grads


def _reference(q, k, v):
    """Attention in float64, written out."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    weights = (q64 @ k64.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
    return (weights @ v64).to(q.dtype)


@pytest.mark.parametrize("n", [2, 5, 50, 257])
def test_bfloat16_cpu_path_matches_float64_attention_and_gradients(n: int) -> None:
    q, k, v = _qkv(4, 3, n, 32, torch.bfloat16)
    out, grads = _forward_backward(attend, q, k, v)
    ref_out, ref_grads = _forward_backward(_reference, *(t.detach().double().requires_grad_() for t in (q, k, v)))
    # bfloat16 keeps 8 bits of mantissa: errors of a few 1e-3 relative to the values' scale.
    assert (out - ref_out).abs().max() <= 2e-2 * ref_out.abs().max()
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 3e-2 * r.abs().max()
    # and it is the explicit path, not the fused kernel (which agrees only to bf16 precision)
    explicit = ((q * 32 ** -0.5) @ k.transpose(-2, -1)).softmax(-1, dtype=torch.float32).to(v.dtype) @ v
    assert torch.equal(attend(q, k, v), explicit)


def test_float32_and_masked_and_long_sequences_use_the_fused_kernel() -> None:
    q, k, v = _qkv(2, 2, 5, 16, torch.float32)
    assert torch.equal(attend(q, k, v), F.scaled_dot_product_attention(q, k, v))
    mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    mask.fill_diagonal_(True)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    assert torch.equal(attend(qb, kb, vb, mask), F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask))
    n = attend_module.EXPLICIT_MAX_TOKENS + 1
    q, k, v = (t.detach() for t in _qkv(1, 1, n, 8, torch.bfloat16))
    assert torch.equal(attend(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.skipif(os.environ.get("DINOKIT_TEST_COMPILE") != "1", reason="set DINOKIT_TEST_COMPILE=1 (minutes of compiling)")
def test_compiled_broadcast_path_matches_eager_with_gradients() -> None:
    calls = []

    def traced(q, k, v):
        calls.append(torch.compiler.is_compiling())
        return attend(q, k, v)

    q, k, v = _qkv(8, 4, 5, 32, torch.float32)
    eager_out, eager_grads = _forward_backward(F.scaled_dot_product_attention, q, k, v)
    compiled_out, compiled_grads = _forward_backward(torch.compile(traced, fullgraph=True), q, k, v)
    assert calls and all(calls)  # traced under compilation: the broadcast form was taken
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("size", "patch"), [(28, 14), (32, 16), (42, 14)])
def test_patch_embedding_equals_the_strided_convolution(size: int, patch: int) -> None:
    torch.manual_seed(0)
    embed = PatchEmbed(patch, 3, 24)
    x = torch.randn(2, 3, size, size, requires_grad=True)
    out = embed(x)
    expected = embed.proj(x).flatten(2).transpose(1, 2)  # the official conv formulation
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x)
    (grad_x_conv,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad_x, grad_x_conv, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        embed(torch.randn(1, 3, size + 1, size))
