"""Launch helpers shared by the op files: interpreter switch, row blocks, warps, program counts.

Imported only by the Triton op files, which :mod:`megatron_lite.kernels` loads lazily, so that
``TRITON_INTERPRET`` can still be set (tests/kernels/conftest.py) before any ``@triton.jit`` runs.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Read once at import, like the @triton.jit decorators of the op files, so kernels and launchers agree.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# One program holds a whole row in registers: 64K fp32 values is already 256 KB per program, past
# which the row kernels would spill; no norm width in a decoder LM comes near (hidden <= 16384).
MAX_ROW_BLOCK = 65536

# Programs per SM of the norms' backward (see reduction_programs), and its warps per program (None:
# row_block's choice for the row); tools/bench/kernel_sweep.py varies both.
PROGRAMS_PER_SM = 2
BWD_WARPS: int | None = None


@triton.jit
def row_mask(cols, n_cols, BLOCK_N: tl.constexpr, EVEN: tl.constexpr):  # noqa: N803 (Triton's constexpr style)
    """``cols < n_cols``. When EVEN (the launcher's ``n_cols == BLOCK_N``) the mask is true at compile
    time and the compiler drops every predicate and select it guards: layer_norm's backward loop goes
    from 374 to 350 instructions per row, 119 to 113 registers (tools/kernel_static.py, sm_90)."""
    return cols < BLOCK_N if EVEN else cols < n_cols


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as (rows, last dim) with a unit stride along the last dim (copying only if needed)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def row_block(n_cols: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a kernel that keeps one row of ``n_cols`` values in registers.

    Warps grow with the row so that each thread holds 8 to 16 values: 4 warps up to 2K columns,
    8 up to 8K, 16 beyond (the hidden sizes 4096 and 8192 land on 8 and 16).
    """
    block = triton.next_power_of_2(n_cols)
    if block > MAX_ROW_BLOCK:
        raise ValueError(f"row of {n_cols} values exceeds the {MAX_ROW_BLOCK}-value row kernels")
    warps = 4 if block < 2048 else 8 if block < 8192 else 16
    return block, warps


def backward_warps(row_warps: int) -> int:
    """Warps per program of the norms' backward: ``BWD_WARPS`` when set, else ``row_warps``."""
    return BWD_WARPS or row_warps


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def reduction_programs(n_rows: int, device: torch.device) -> int:
    """Programs for a backward that also sums a per-column gradient (dW) over rows.

    Each program loops over a contiguous run of rows and writes one fp32 partial row; torch sums the
    partials. Two programs per SM, each pipelining its row loop three rows deep (``BWD_STAGES``), is
    the fastest pairing measured (tools/bench/kernel_sweep.py, H100 SXM, bf16 16384 x 4096 fwd+bwd):
    RMSNorm 0.244 ms at 2 per SM against 0.250 / 0.253 / 0.251 ms at 1 / 4 / 8, LayerNorm 0.258 ms
    against 0.264 / 0.276 / 0.274; without pipelining 8 per SM was best (0.258 ms). More programs
    only queue once the registers of the resident ones are used up. Under the interpreter programs
    run one after another, so few.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return max(1, min(n_rows, PROGRAMS_PER_SM * _sm_count(index)))
    return max(1, min(n_rows, 4))
