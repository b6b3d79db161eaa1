"""What the attention forward and backward kernels share: tile lists, autotune pruning, tensor
descriptors, and the ``@triton.jit`` helpers that multiply, load and store tiles.

Every (B, H, T, D) tile moves through a 4-D tensor descriptor (``triton.tools.tensor_descriptor``):
on Hopper and later a TMA copy engine fetches it straight into shared memory, so the kernels spend
no registers or instructions on addresses and bounds (rows past T read as zeros, stores past T are
dropped); before Hopper Triton lowers the same descriptors to ordinary masked loads and stores, and
its interpreter runs them on CPU tensors.
"""

# Triton's convention, kept for readability next to its docs: pointers and constexprs in capitals.
# ruff: noqa: N803

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megatron_lite.kernels._common import INTERPRET
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634
# Sequences up to this many tokens run one tile without autotuning (see prune).
SHORT = 256

# Autotune candidates (BLOCK_M, BLOCK_N, warps, stages) for D <= 128, measured at B4 H32 T4096 D128
# causal bf16 on an H100 SXM (tools/bench/kernel_sweep.py, ms; BENCHMARKS.md). Forward: 64x64 w4 s3
# 1.20-1.21, 128x128 w8 s3 1.22-1.23, 64x64 w4 s1 1.25-1.31; every other tile swept was 5% or more
# slower in every sweep (128x64 w8 s3 or s4 1.26-1.32, 128x128 w8 s2 1.38, 64x128 w4 1.39-1.76) and is
# not a candidate, so that the autotuner's single timing of each tile cannot pick one of them.
# Descriptor loads free registers (tools/kernel_static.py, sm_90): 64x64 w4 needs 138 and 113 KB of
# shared memory, so two 4-warp programs share an SM and one's softmax can overlap the other's
# matmuls (an 8-warp program's two warpgroups meet at 3 barriers per key tile and run in lockstep);
# 128x128 w8 needs 187 (no spill) and issues 7.8 instructions per score against 10.8 for 64-key
# tiles. Tiles that exceed shared memory are skipped by autotune. The last, smallest tile of each
# list is fp32's (prune).
FWD_TILES = [(64, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 1), (64, 32, 4, 2)]
# dK/dV holds a key tile and streams queries past it; dQ the opposite. Measured (ms, same shape):
# dK/dV 64x128 w8 s3 2.12-2.17 (it spills 8 bytes on sm_90, so it is not the first tile, which
# tests/kernels/test_static_compile.py holds to no spills), 32x64 w4 s3 2.17-2.24, 64x64 w4 s3
# 2.35-2.37; dQ 128x64 w8 s3 1.44-1.45, 128x32 w4 s3 1.54-1.59, 64x64 w4 s3 1.64.
DKDV_TILES = [(32, 64, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2)]
DQ_TILES = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (32, 32, 4, 2)]


# Triton's autotuner adds the dtype of each tensor argument to its cache key, but a tensor descriptor
# has no dtype: PRECISION ("ieee" for fp32, else "tf32") keeps fp32 from reusing a 16-bit tile.
AUTOTUNE_KEY = ["T", "HEAD_DIM", "CAUSAL", "PRECISION"]


def configs(tiles: list[tuple[int, int, int, int]], pre_hook) -> list[triton.Config]:
    """Autotune candidates on a GPU; one fixed small tile when interpreting, where autotuning fails
    ("0 active drivers") and each block is a numpy call. ``pre_hook`` sizes the descriptors' blocks."""
    if INTERPRET:
        # BLOCK_M != BLOCK_N on purpose: the tests then cover the causal bounds of unequal tiles.
        tiles = [(32, 16, 4, 1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=pre_hook)
        for m, n, w, s in tiles
    ]


def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The smallest tile (last in each list) alone for fp32, where "ieee" dots run on CUDA cores from
    4-byte tiles and ptxas spends minutes on the big tiles' register spills (D = 128, H200), and for
    sequences up to ``SHORT`` tokens, where a few tiles per head leave nothing for autotuning to
    win back its compile time (one compile per tile, per kernel, per sequence length)."""
    q = named_args["Q"]
    if (q.base if isinstance(q, TensorDescriptor) else q).dtype == torch.float32 or named_args["T"] <= SHORT:
        return configs[-1:]
    return configs


def _tma_compatible(x: torch.Tensor) -> bool:
    """A TMA descriptor needs a 16-byte aligned base, positive 16-byte multiples for every stride but
    the last (an expanded gradient, such as that of ``out.sum()``, has stride 0), and a unit last stride."""
    size = x.element_size()
    return (
        x.stride(-1) == 1
        and x.data_ptr() % 16 == 0
        and all(n == 1 or (s > 0 and s * size % 16 == 0) for s, n in zip(x.stride()[:-1], x.shape[:-1]))
    )


def describable(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when a descriptor can cover it (any layout of (B, H, T, D) views qualifies for
    D >= 16, e.g. (B, T, H, D).transpose(1, 2)), else a contiguous copy in a new allocation, which
    always can (``contiguous()`` would return an already contiguous but misaligned view as it is)."""
    return x if _tma_compatible(x) else x.clone(memory_format=torch.contiguous_format)


def descriptor(x: torch.Tensor) -> TensorDescriptor:
    """A 4-D descriptor over ``x`` (B, H, T, D); its block shape is set per config by a pre-hook.

    A dimension of size 1 is only ever indexed at 0, so its stride (which torch leaves arbitrary) is
    replaced by D, a valid TMA stride for every supported head dim."""
    strides = [s if n > 1 else x.shape[-1] for s, n in zip(x.stride()[:-1], x.shape[:-1])] + [1]
    return TensorDescriptor(x, list(x.shape), strides, [1, 1, 16, x.shape[-1]])


def set_blocks(nargs: dict, rows: dict[str, str]) -> None:
    """Pre-hook body: each descriptor argument's block is (1, 1, nargs[rows[name]], D)."""
    for name, block in rows.items():
        desc = nargs[name]
        desc.block_shape = [1, 1, nargs[block], desc.block_shape[-1]]


@triton.jit
def dot(a, b, acc, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    if INTERPRET:
        # The interpreter's tl.dot returns garbage for bf16 operands (errors ~1e11, measured with
        # Triton 3.9); fp32 operands are exact there. Compiled kernels keep the bf16 tensor cores.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def load_tile(DESC, b, h, start, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows [start, start + ROWS) of head h of batch b as a (ROWS, HEAD_DIM) tile; rows past T are 0."""
    return DESC.load([b, h, start, 0]).reshape(ROWS, HEAD_DIM)


@triton.jit
def store_tile(DESC, b, h, start, tile, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Stores a (ROWS, HEAD_DIM) tile at rows [start, start + ROWS) of head h; rows past T are dropped."""
    DESC.store([b, h, start, 0], tile.to(DESC.dtype).reshape(1, 1, ROWS, HEAD_DIM))


# The L2 cache of an H100 or H200. Programs are launched in sections of heads whose streamed tiles
# (K and V for the forward and dQ, Q and dO for dK/dV) fit in it together (``section_heads``).
L2_BYTES = 50 * 2**20


def section_heads(heads: int, streamed_bytes: int, share: int = 1) -> int:
    """Program heads per section of the launch order (of ``heads`` in all): the largest power of two
    of heads whose ``streamed_bytes`` each fit in ``L2_BYTES`` together (at least one), times
    ``share``, the program heads that read the same streamed tiles (a K/V head's query heads in
    grouped-query attention)."""
    fit = max(1, L2_BYTES // max(1, streamed_bytes))
    return min(heads, (1 << (fit.bit_length() - 1)) * share)


@triton.jit
def schedule(n_tiles, SECTION: tl.constexpr):
    """(rank, bh) of this program in a 1-D grid of n_tiles x (B x heads) programs (query heads, or K/V
    heads for dK/dV), the order of FlashAttention-3's longest-processing-time scheduler: the grid runs
    SECTION heads at a time (the last section may hold fewer), and within a section the rank-0 tile of
    every head, then rank 1, and so on. Ranks are dealt most work first, so the longest programs start
    early and the shortest fill the tail (a head-major order leaves some SMs idle on long tiles at the
    end, ~3% of a causal forward), while the heads in flight at once share their K and V (or Q and dO) in L2."""
    pid = tl.program_id(0)
    first = pid // (SECTION * n_tiles) * SECTION
    heads = tl.minimum(SECTION, tl.num_programs(0) // n_tiles - first)
    r = pid % (SECTION * n_tiles)
    return r // heads, first + r % heads


@triton.jit
def query_program(H, T, SECTION: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """(start_m, bh, b, h, offs_m) of a program that owns one query tile of head h of batch b, in
    ``schedule`` order. Causal: the last tiles (the most keys) have rank 0."""
    n_tiles = tl.cdiv(T, BLOCK_M)
    rank, bh = schedule(n_tiles, SECTION)
    tile = n_tiles - 1 - rank if CAUSAL else rank
    start_m = tile * BLOCK_M
    return start_m, bh, bh // H, bh % H, start_m + tl.arange(0, BLOCK_M)


@triton.jit
def key_ranges(start_m, T, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(split, hi) for a query tile at start_m: key tiles in [0, split) need no mask (keys below every
    query of the tile, all inside T); [split, hi) do. Causal: keys past the tile's last query are
    skipped, about half the work."""
    if CAUSAL:
        split = (start_m // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M, T)
    else:
        split = (T // BLOCK_N) * BLOCK_N
        hi = T
    return split, hi


def launch_args(q: torch.Tensor) -> dict:
    """Constexpr switches shared by every attention kernel launch."""
    # fp32 inputs get true fp32 products ("ieee"): tf32 keeps a 10-bit mantissa, ~1e-3 relative error
    # where fp32 callers expect ~1e-6. bf16/fp16 operands ignore the setting and use tensor cores.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return dict(HEAD_DIM=q.shape[-1], INTERPRET=INTERPRET, PRECISION=precision)
