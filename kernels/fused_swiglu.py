"""SwiGLU ``silu(gate) * up``: Triton forward and backward.

Twin: :func:`megatron_lite.kernels.reference.swiglu`. Element-wise, so the only thing to win is
memory traffic: the forward reads gate and up once and writes the product (eager torch also writes
and re-reads silu(gate)); the backward recomputes the sigmoid instead of saving it. Rows may be
strided, so the two halves of one fused gate/up projection (``proj(x).chunk(2, -1)``) go in as views.
"""

# Triton's convention, kept for readability next to its docs: pointers and constexprs in capitals.
# ruff: noqa: N803

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megatron_lite.kernels._checks import check_swiglu
from megatron_lite.kernels._common import as_rows, first_order_only

# 1024 values per program: 8 per thread at 4 warps, enough loads in flight to saturate HBM.
_BLOCK_N = 1024
_WARPS = 4


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, stride_y, n_cols, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU,
    stride_dy, stride_g, stride_u, stride_dg, stride_du,
    n_cols, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # silu'(g) = sig * (1 + g * (1 - sig))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, (dy * silu).to(DU.dtype.element_ty), mask=mask)


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    # Rows on axis 0 (up to 2^31 - 1 programs); column blocks on axis 1 (limit 65535).
    return (n_rows, triton.cdiv(n_cols, _BLOCK_N))


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: (rows, N) with unit column stride -> silu(gate) * up, contiguous."""
    n_rows, n_cols = gate.shape
    y = torch.empty((n_rows, n_cols), device=gate.device, dtype=gate.dtype)
    _swiglu_fwd_kernel[_grid(n_rows, n_cols)](
        gate, up, y, gate.stride(0), up.stride(0), y.stride(0), n_cols, BLOCK_N=_BLOCK_N, num_warps=_WARPS
    )
    return y


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dgate, dup), each (rows, N) contiguous."""
    n_rows, n_cols = gate.shape
    dg = torch.empty((n_rows, n_cols), device=gate.device, dtype=gate.dtype)
    du = torch.empty_like(dg)
    _swiglu_bwd_kernel[_grid(n_rows, n_cols)](
        dy, gate, up, dg, du,
        dy.stride(0), gate.stride(0), up.stride(0), dg.stride(0), du.stride(0),
        n_cols, BLOCK_N=_BLOCK_N, num_warps=_WARPS,
    )  # fmt: skip
    return dg, du


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g2, u2 = as_rows(gate), as_rows(up)
        ctx.save_for_backward(g2, u2)
        return swiglu_fwd(g2, u2).view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        first_order_only("swiglu")
        g2, u2 = ctx.saved_tensors
        dg, du = swiglu_bwd(as_rows(dy), g2, u2)
        return dg.view(dy.shape), du.view(dy.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in fp32, output in ``gate.dtype``; gate and up (..., N), same shape."""
    check_swiglu(gate, up)
    return _SwiGLU.apply(gate, up)
