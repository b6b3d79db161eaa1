"""Rotary position embedding, half-split convention: Triton forward and backward.

Twin: :func:`megatron_lite.kernels.reference.apply_rope`. One program rotates every head of one
(batch, position) pair, so cos/sin for that position are loaded once and reused across the heads.
A rotation by theta is orthogonal, so its backward is the same kernel rotating by -theta (sin
negated): nothing but x's shape is saved for backward.
"""

# Triton's convention, kept for readability next to its docs: pointers and constexprs in capitals.
# ruff: noqa: N803

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megatron_lite.kernels._checks import check_rope
from megatron_lite.kernels._common import first_order_only


@triton.jit
def _rope_kernel(
    X, COS, SIN, Y,
    stride_xb, stride_xt, stride_xh,
    stride_yb, stride_yt, stride_yh,
    stride_ct, stride_st,
    T, H, HALF,
    INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    # int64: a (B, H, T, D) gradient comes in as a (B, T, H, D) view whose head stride is T x D, and
    # h x T x D passes 2^31 at 128 heads of T = 256K, D = 128.
    h = tl.arange(0, BLOCK_H)[:, None].to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = d < HALF
    mask = (h < H) & dmask
    cos = tl.load(COS + t * stride_ct + d, mask=dmask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + t * stride_st + d, mask=dmask, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    x_row = X + b * stride_xb + t * stride_xt + h * stride_xh
    x1 = tl.load(x_row + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + d + HALF, mask=mask, other=0.0).to(tl.float32)
    y_row = Y + b * stride_yb + t * stride_yt + h * stride_yh
    tl.store(y_row + d, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_row + d + HALF, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotate x (B, T, H, D), any strides, by theta (or -theta when ``inverse``); returns contiguous."""
    if x.stride(-1) != 1:  # the kernel reads a head's D values at unit stride
        x = x.contiguous()
    B, T, H, D = x.shape
    y = torch.empty((B, T, H, D), device=x.device, dtype=x.dtype)
    if y.numel() == 0:  # no heads or D = 0: nothing to rotate (and no block of 0 lanes to launch)
        return y
    block_h = triton.next_power_of_2(H)
    block_d = triton.next_power_of_2(D // 2)
    # 4 warps hold up to 4K values (32 per thread) of one position's heads; 8 beyond that.
    warps = 4 if block_h * block_d <= 4096 else 8
    _rope_kernel[(B * T,)](
        x, cos, sin, y,
        *x.stride()[:3], *y.stride()[:3], cos.stride(0), sin.stride(0),
        T, H, D // 2,
        INVERSE=inverse, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return y


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dy):
        first_order_only("apply_rope")
        cos, sin = ctx.saved_tensors
        return rope_rotate(dy, cos, sin, inverse=True), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x (B, T, H, D) with D even, cos and sin (T, D/2) with unit column stride.

    The first half of each head is rotated against the second: ``[x1, x2] -> [x1*cos - x2*sin,
    x2*cos + x1*sin]``, computed in fp32. cos and sin are constants (position tables): they get
    no gradient.
    """
    check_rope(x, cos, sin)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return _RoPE.apply(x, cos, sin)
