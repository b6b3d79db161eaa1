"""RMSNorm with an optional fused residual add: Triton forward and backward.

Twin: :func:`megatron_lite.kernels.reference.rms_norm`. One program normalises one row in fp32
registers; the backward loops each program over a run of rows and writes one fp32 partial of dW,
summed in torch. The forward saves the (summed) input and one fp32 ``rstd`` per row, so the
backward reads x, dy (and dh) once and writes dx once: 3 to 4 row-sized passes, the minimum.
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
def _rms_norm_fwd_kernel(
    X, R, H, Y, W, RSTD,
    stride_x, stride_r, stride_h, stride_y,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = row_mask(cols, n_cols, BLOCK_N, EVEN)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Round the sum to the activation dtype before normalising, as `x + residual` does in torch:
        # the stored h is what the next block adds to, so the norm must see exactly that value.
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DH, X, W, RSTD, DX, DW_PART,
    stride_dy, stride_dh, stride_x, stride_dx,
    n_rows, n_cols, rows_per_program,
    HAS_DH: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = row_mask(cols, n_cols, BLOCK_N, EVEN)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # Row pointers advance by their strides, in int64 from a first row computed in int64: rows x stride
    # can pass 2^31 (the loop's own row index stays int32, below n_rows).
    first = pid.to(tl.int64) * rows_per_program
    X += first * stride_x
    DY += first * stride_dy
    DX += first * stride_dx
    if HAS_DH:
        DH += first * stride_dh
    for row in tl.range(row_start, row_end, num_stages=STAGES):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        wdy = w * dy
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat)) with g = w * dy.
        dx = rstd * (wdy - xhat * (tl.sum(wdy * xhat, axis=0) / n_cols))
        if HAS_DH:
            # h = x + residual is also an output: its gradient passes straight through to x.
            dx += tl.load(DH + cols, mask=mask, other=0.0).to(tl.float32)
            DH += stride_dh
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        X += stride_x
        DY += stride_dy
        DX += stride_dx
    tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x, residual: (rows, N) with unit column stride -> (y, h or None, rstd (rows,) fp32)."""
    n_rows, n_cols = x.shape
    block, warps = row_block(n_cols, "rms_norm")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    r = residual if residual is not None else x  # never read when HAS_RESIDUAL is off
    hh = h if h is not None else y
    _rms_norm_fwd_kernel[(n_rows,)](
        x, r, hh, y, weight, rstd,
        x.stride(0), r.stride(0), hh.stride(0), y.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block, EVEN=n_cols == block, num_warps=warps,
    )  # fmt: skip
    return y, h, rstd


def rms_norm_bwd(
    dy: torch.Tensor, dh: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx, dweight) from dy (and dh, the gradient of the returned x + residual)."""
    n_rows, n_cols = x.shape
    block, warps = row_block(n_cols, "rms_norm")
    programs = reduction_programs(n_rows, x.device)
    streamed = 3 if dh is not None else 2  # dy, x (and dh) stream through the row loop
    stages = pipeline_stages(block * x.element_size() * streamed, x.device)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dw_part = torch.empty(programs, n_cols, device=x.device, dtype=torch.float32)
    dhh = dh if dh is not None else dy
    _rms_norm_bwd_kernel[(programs,)](
        dy, dhh, x, weight, rstd, dx, dw_part,
        dy.stride(0), dhh.stride(0), x.stride(0), dx.stride(0),
        n_rows, n_cols, triton.cdiv(n_rows, programs),
        HAS_DH=dh is not None, BLOCK_N=block, EVEN=n_cols == block, STAGES=stages, num_warps=backward_warps(warps),
    )  # fmt: skip
    return dx, dw_part.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        shape = x.shape
        x2 = as_rows(x)
        r2 = as_rows(residual) if residual is not None else None
        y, h, rstd = rms_norm_fwd(x2, weight, eps, r2)
        ctx.save_for_backward(h if h is not None else x2, weight, rstd)
        ctx.has_residual = residual is not None
        # dh is None when the caller never uses h: skip reading a tensor of zeros.
        ctx.set_materialize_grads(False)
        if h is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        first_order_only("rms_norm")
        x2, weight, rstd = ctx.saved_tensors
        dy2 = as_rows(dy) if dy is not None else torch.zeros_like(x2)
        dh2 = as_rows(dh) if dh is not None else None
        dx, dw = rms_norm_bwd(dy2, dh2, x2, weight, rstd)
        shape = dy.shape if dy is not None else dh.shape
        dx = dx.view(shape)
        # x and residual receive the same gradient; autograd clones where the two would alias.
        return dx, dw, (dx if ctx.has_residual else None), None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim in fp32, output in ``x.dtype``; x (..., N), weight (N,).

    With ``residual`` (same shape and dtype as x) returns ``(norm(h), h)`` for ``h = x + residual``,
    the fused add-then-norm of a pre-norm block: one read of each input instead of three passes.
    Rows wider than ``MAX_ROW_BLOCK`` (65536) values run the twin, logged once.
    """
    check_norm("rms_norm", x, weight, None, eps, residual)
    if reason := wide_row_reason(x.shape[-1]):
        warn_fallback("rms_norm", reason)
        return reference.rms_norm(x, weight, eps, residual)
    # The kernels read weight at unit stride: a strided or expanded view (w[::2], w.expand(n)) is copied.
    return _RMSNorm.apply(x, weight.contiguous(), residual, eps)
