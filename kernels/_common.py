"""Launch helpers shared by the op files: interpreter switch, row blocks, warps, program counts.

Imported only by the Triton op files, which :mod:`megatron_lite.kernels` loads lazily, so that
``TRITON_INTERPRET`` can still be set (tests/kernels/conftest.py) before any ``@triton.jit`` runs.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import triton
import triton.language as tl
from megatron_lite.kernels.dispatch import MAX_ROW_BLOCK

# Read once at import, like the @triton.jit decorators of the op files, so kernels and launchers agree.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Programs per SM of the norms' backward (see reduction_programs), and its warps per program (None:
# row_block's choice for the row); tools/bench/kernel_sweep.py varies both.
PROGRAMS_PER_SM = 1
BWD_WARPS: int | None = None
# Software-pipelining depth of the norms' backward row loop: rows whose loads are in flight at once
# (None leaves it to Triton), lowered where the rows would not fit shared memory (pipeline_stages).
BWD_STAGES: int | None = 4


@triton.jit
def row_mask(cols, n_cols, BLOCK_N: tl.constexpr, EVEN: tl.constexpr):  # noqa: N803 (Triton's constexpr style)
    """``cols < n_cols``. When EVEN (the launcher's ``n_cols == BLOCK_N``) the mask is true at compile
    time and the compiler drops every predicate and select it guards: layer_norm's backward loop goes
    from 374 to 350 instructions per row, 119 to 113 registers (tools/kernel_static.py, sm_90)."""
    return cols < BLOCK_N if EVEN else cols < n_cols


def first_order_only(op: str) -> None:
    """Called first in every Triton backward. Autograd runs a backward with grad mode on only to record
    it for a higher-order gradient (``create_graph=True``); the kernels' backwards are not differentiable,
    so that gradient would silently lack this op's terms, or fail later with "does not require grad"."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: the Triton kernel's backward is first-order only, and this backward runs with "
                           "create_graph=True (a double backward, e.g. a gradient penalty); use "
                           "kernels.set_backend('torch') for higher-order gradients")  # fmt: skip


@functools.cache
def warn_fallback(op: str, reason: str) -> None:
    """Logs, once per op and reason, that ``op`` runs its torch twin because its kernel cannot take the input."""
    logging.getLogger(__name__).warning("%s runs the torch reference: %s", op, reason)


def wide_row_reason(n_cols: int) -> str | None:
    """Why a norm's kernels cannot take rows of ``n_cols`` values (the op then runs its twin), or None."""
    if triton.next_power_of_2(max(n_cols, 1)) > MAX_ROW_BLOCK:
        return f"rows wider than {MAX_ROW_BLOCK} values (a program holds one row in registers)"
    return None


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as (rows, last dim) with a unit stride along the last dim (copying only if needed)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not (-1, N): ambiguous when N = 0


def row_block(n_cols: int, op: str) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for op ``op``'s kernel that keeps one row of ``n_cols`` values in registers.

    Warps grow with the row so that each thread holds 8 to 16 values: 4 warps up to 2K columns,
    8 up to 8K, 16 beyond (the hidden sizes 4096 and 8192 land on 8 and 16).
    """
    block = triton.next_power_of_2(max(n_cols, 1))  # rows of 0 values: one masked-off lane
    if reason := wide_row_reason(n_cols):  # the public rms_norm and layer_norm run their twins before this
        raise ValueError(f"{op}: {reason}, got {n_cols}; run reference.{op} on them")
    warps = 4 if block < 2048 else 8 if block < 8192 else 16
    return block, warps


# Shared memory the norms' backward uses beside its pipelined rows (its reductions' scratch: 8 KB for
# fp32 rows of 8192 at 16 warps on sm_90); pipeline_stages leaves this much free.
REDUCTION_SCRATCH = 16 * 1024


@functools.cache
def _max_shared_memory(index: int) -> int:
    """Bytes of shared memory one program may use on CUDA device ``index`` (Triton's own launch limit)."""
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def pipeline_stages(row_bytes: int, device: torch.device) -> int | None:
    """The norms' backward row-loop depth: ``BWD_STAGES``, lowered until its buffers fit shared memory.

    Triton keeps ``stages - 1`` rows of every streamed input in flight there; ``row_bytes`` is one row
    of all of them. fp32 rows of 8192 with a residual gradient (3 inputs, 96 KiB a row) at 4 stages
    would ask an H100 for 303 KB of its 227 KB; 3 stages fit. None (Triton's choice) is kept as is.
    """
    stages = BWD_STAGES
    if stages is None or device.type != "cuda":
        return stages
    index = device.index if device.index is not None else torch.cuda.current_device()
    fit = 1 + (_max_shared_memory(index) - REDUCTION_SCRATCH) // row_bytes
    return max(1, min(stages, fit))


def backward_warps(row_warps: int) -> int:
    """Warps per program of the norms' backward: ``BWD_WARPS`` when set, else ``row_warps``."""
    return BWD_WARPS or row_warps


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def reduction_programs(n_rows: int, device: torch.device) -> int:
    """Programs for a backward that also sums a per-column gradient (dW) over rows.

    Each program loops over a contiguous run of rows and writes one fp32 partial row; torch sums the
    partials. One program per SM, pipelining its row loop four rows deep (``BWD_STAGES``), is the
    fastest pairing measured (tools/bench/kernel_sweep.py, H100 SXM, bf16 16384 x 4096 fwd+bwd):
    RMSNorm 0.240 ms against 0.245 at 2 per SM and 3 stages, 0.254 at 4 per SM; LayerNorm 0.241
    against 0.249 and 0.258; with the residual 0.374 against 0.379 and 0.387. Warps (8 or 16) change
    nothing measurable. Under the interpreter programs run one after another, so few.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return max(1, min(n_rows, PROGRAMS_PER_SM * _sm_count(index)))
    return max(1, min(n_rows, 4))
