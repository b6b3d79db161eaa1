"""LayerNorm (bias optional): Triton forward and backward.

Twin: :func:`megatron_lite.kernels.reference.layer_norm`. Same structure as the RMSNorm file: one
program per row in the forward (saving fp32 mean and rstd per row), and a backward whose programs
loop over runs of rows and write fp32 partials of dW and dB, summed in torch (one sum for both).
"""

# Triton's convention, kept for readability next to its docs: pointers and constexprs in capitals.
# ruff: noqa: N803

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megatron_lite.kernels import reference
from megatron_lite.kernels._checks import check_norm
from megatron_lite.kernels._common import (
    as_rows,
    backward_warps,
    first_order_only,
    pipeline_stages,
    reduction_programs,
    row_block,
    row_mask,
    warn_fallback,
    wide_row_reason,
)


@triton.jit
def _layer_norm_fwd_kernel(
    X, Y, W, B, MEAN, RSTD,
    stride_x, stride_y, n_cols, eps,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = row_mask(cols, n_cols, BLOCK_N, EVEN)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    # Two-pass variance (centre first): E[x^2] - mean^2 loses all digits when |mean| >> std.
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART,
    stride_dy, stride_x, stride_dx, stride_part,
    n_rows, n_cols, rows_per_program,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = row_mask(cols, n_cols, BLOCK_N, EVEN)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # Row pointers advance by their strides, in int64 from a first row computed in int64: rows x stride
    # can pass 2^31 (the loop's own row index stays int32, below n_rows).
    first = pid.to(tl.int64) * rows_per_program
    X += first * stride_x
    DY += first * stride_dy
    DX += first * stride_dx
    for row in tl.range(row_start, row_end, num_stages=STAGES):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
        g = w * dy
        # rstd * (g - mean(g) - xhat * mean(g * xhat)): the mean and the variance both depend on x.
        # One two-operand reduction: its partial sums cross the warps together, with half the
        # barriers of two tl.sum (3 per row instead of 6 in the sm_90 SASS, tools/kernel_static.py).
        sum_g, sum_gx = tl.reduce((g, g * xhat), 0, _add_pair)
        dx = rstd * (g - sum_g / n_cols - xhat * (sum_gx / n_cols))
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
        X += stride_x
        DY += stride_dy
        DX += stride_dx
    part = pid.to(tl.int64) * stride_part
    tl.store(DW_PART + part + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PART + part + cols, db, mask=mask)


def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (rows, N) with unit column stride -> (y, mean (rows,) fp32, rstd (rows,) fp32)."""
    n_rows, n_cols = x.shape
    block, warps = row_block(n_cols, "layer_norm")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    mean = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _layer_norm_fwd_kernel[(n_rows,)](
        x, y, weight, bias if bias is not None else weight, mean, rstd,
        x.stride(0), y.stride(0), n_cols, eps,
        HAS_BIAS=bias is not None, BLOCK_N=block, EVEN=n_cols == block, num_warps=warps,
    )  # fmt: skip
    return y, mean, rstd


def layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dx, dweight, dbias or None) from dy (rows, N)."""
    n_rows, n_cols = x.shape
    block, warps = row_block(n_cols, "layer_norm")
    programs = reduction_programs(n_rows, x.device)
    stages = pipeline_stages(block * x.element_size() * 2, x.device)  # streamed: dy, x
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    # dW's and dB's partials side by side, so one sum and one cast finish both.
    parts = torch.empty(programs, 1 + has_bias, n_cols, device=x.device, dtype=torch.float32)
    _layer_norm_bwd_kernel[(programs,)](
        dy, x, weight, mean, rstd, dx, parts[:, 0], parts[:, -1],
        dy.stride(0), x.stride(0), dx.stride(0), parts.stride(0),
        n_rows, n_cols, triton.cdiv(n_rows, programs),
        HAS_BIAS=has_bias, BLOCK_N=block, EVEN=n_cols == block, STAGES=stages, num_warps=backward_warps(warps),
    )  # fmt: skip
    sums = parts.sum(0).to(weight.dtype)
    return dx, sums[0], sums[1] if has_bias else None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2 = as_rows(x)
        y, mean, rstd = layer_norm_fwd(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        first_order_only("layer_norm")
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_bwd(as_rows(dy), x2, weight, ctx.has_bias, mean, rstd)
        return dx.view(dy.shape), dw, db, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim in fp32, output in ``x.dtype``; x (..., N), weight and bias (N,).

    Rows wider than ``MAX_ROW_BLOCK`` (65536) values run the twin, logged once."""
    check_norm("layer_norm", x, weight, bias, eps)
    if reason := wide_row_reason(x.shape[-1]):
        warn_fallback("layer_norm", reason)
        return reference.layer_norm(x, weight, bias, eps)
    # The kernels read weight and bias at unit stride: strided or expanded views are copied.
    bias = bias.contiguous() if bias is not None else None
    return _LayerNorm.apply(x, weight.contiguous(), bias, eps)
