"""The attention backward: dQ, dK and dV from the forward's output and base-2 logsumexp.

Part of :mod:`megatron_lite.kernels.fused_attention` (twin: ``reference.flash_attention``). Three
kernels: a row pass for ``delta = rowsum(o * do)``, one program per K/V tile that streams the tile's
query group past it (dK and dV summed inside the program: no atomics, so the result is
deterministic), and one program per query tile for dQ.
"""

# Triton's convention, kept for readability next to its docs: pointers and constexprs in capitals.
# ruff: noqa: N803

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from megatron_lite.kernels._attention_common import (
    AUTOTUNE_KEY,
    DKDV_TILES,
    DQ_TILES,
    LOG2E,
    configs,
    descriptor,
    dot,
    key_ranges,
    launch_args,
    load_tile,
    prune,
    query_program,
    schedule,
    section_heads,
    set_blocks,
    store_tile,
)

_DELTA_ROWS = 64


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d o_id * do_id, the softmax backward's row term, once per query instead of per block.
    n_tiles = tl.cdiv(T, BLOCK_M)
    start_m = tl.program_id(0) % n_tiles * BLOCK_M
    bh = tl.program_id(0) // n_tiles
    o = load_tile(O, bh // H, bh % H, start_m, BLOCK_M, HEAD_DIM).to(tl.float32)
    do = load_tile(DO, bh // H, bh % H, start_m, BLOCK_M, HEAD_DIM).to(tl.float32)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, axis=1), mask=offs_m < T)


def _dkdv_blocks(nargs: dict) -> None:
    rows = {"Q": "BLOCK_M", "DO": "BLOCK_M", "K": "BLOCK_N", "V": "BLOCK_N", "DK": "BLOCK_N", "DV": "BLOCK_N"}
    set_blocks(nargs, rows)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, Q, DO, LSE, DELTA, b, h, rows, offs_n, lo, hi, T, qk_scale,
    MASKED: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Accumulates dK and dV of one key tile over query tiles [lo, hi), with the causal mask when
    MASKED. Queries past T need no mask: their q and dO tiles read as zeros and their lse and
    delta as 0, so they add exactly 0 to both sums. The tile's own keys past T (zero rows of k) may
    sum to inf or NaN where every score is very negative (exp2(0 - lse) overflows); each row of dK and
    dV depends only on its own key, and those rows are never stored."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(Q, b, h, start_m, BLOCK_M, HEAD_DIM)
        do = load_tile(DO, b, h, start_m, BLOCK_M, HEAD_DIM)
        lse = tl.load(LSE + rows + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(DELTA + rows + offs_m, mask=offs_m < T, other=0.0)
        # Transposed scores (keys x queries) so dK and dV accumulate without a transpose.
        s_t = dot(k, tl.trans(q), None, INTERPRET, PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = dot(p_t.to(do.dtype), do, dv, INTERPRET, PRECISION)
        dp_t = dot(v, tl.trans(do), None, INTERPRET, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dot(ds_t.to(q.dtype), q, dk, INTERPRET, PRECISION)
    return dk, dv


@triton.autotune(configs=configs(DKDV_TILES, _dkdv_blocks), key=AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": prune})  # fmt: skip
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, H, HKV, T, GROUP, qk_scale, sm_scale, SECTION: tl.constexpr,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Causal: the first key tiles are seen by the most queries, so key tile = rank.
    rank, bhk = schedule(tl.cdiv(T, BLOCK_N), SECTION)
    start_n = rank * BLOCK_N
    b = bhk // HKV
    hkv = bhk % HKV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(K, b, hkv, start_n, BLOCK_N, HEAD_DIM)
    v = load_tile(V, b, hkv, start_n, BLOCK_N, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        # Queries before this key tile never see it: start at the query tile holding start_n.
        lo = (start_n // BLOCK_M) * BLOCK_M
    for h in range(hkv * GROUP, hkv * GROUP + GROUP):  # the K/V head's query heads
        rows = (b.to(tl.int64) * H + h) * T
        # One loop, masked throughout when causal: a second, unmasked copy for the tiles past the
        # diagonal (as dQ has) cost the 32x64 tile ~40 registers and the others spills on sm_90.
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, b, h, rows, offs_n, lo, T, T, qk_scale,
                             CAUSAL, INTERPRET, PRECISION, HEAD_DIM, BLOCK_M)  # fmt: skip
    store_tile(DK, b, hkv, start_n, dk * sm_scale, BLOCK_N, HEAD_DIM)
    store_tile(DV, b, hkv, start_n, dv, BLOCK_N, HEAD_DIM)


def _dq_blocks(nargs: dict) -> None:
    set_blocks(nargs, {"Q": "BLOCK_M", "DO": "BLOCK_M", "DQ": "BLOCK_M", "K": "BLOCK_N", "V": "BLOCK_N"})


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, K, V, b, hk, offs_m, lo, hi, T, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Accumulates dQ of one query tile over key tiles [lo, hi); MASKED tiles straddle the causal
    diagonal or hold keys past T. Those keys must be masked although their K tiles read as zeros:
    their score is 0, and exp2(0 - lse) overflows where every real score is very negative, making
    ds * 0 a NaN."""
    for start_n in range(lo, hi, BLOCK_N):
        k = load_tile(K, b, hk, start_n, BLOCK_N, HEAD_DIM)
        v = load_tile(V, b, hk, start_n, BLOCK_N, HEAD_DIM)
        s = dot(q, tl.trans(k), None, INTERPRET, PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if CAUSAL:  # keys past T are past every real query's diagonal too
                p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
            else:
                p = tl.where(offs_n[None, :] < T, p, 0.0)
        dp = dot(do, tl.trans(v), None, INTERPRET, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(k.dtype), k, dq, INTERPRET, PRECISION)
    return dq


@triton.autotune(configs=configs(DQ_TILES, _dq_blocks), key=AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": prune})  # fmt: skip
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, H, T, GROUP, qk_scale, sm_scale, SECTION: tl.constexpr,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    start_m, bh, b, h, offs_m = query_program(H, T, SECTION, CAUSAL, BLOCK_M)
    q = load_tile(Q, b, h, start_m, BLOCK_M, HEAD_DIM)
    do = load_tile(DO, b, h, start_m, BLOCK_M, HEAD_DIM)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    split, hi = key_ranges(start_m, T, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, b, h // GROUP, offs_m, 0, split, T, qk_scale,
                   False, CAUSAL, INTERPRET, PRECISION, HEAD_DIM, BLOCK_N)  # fmt: skip
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, b, h // GROUP, offs_m, split, hi, T, qk_scale,
                   True, CAUSAL, INTERPRET, PRECISION, HEAD_DIM, BLOCK_N)  # fmt: skip
    store_tile(DQ, b, h, start_m, dq * sm_scale, BLOCK_M, HEAD_DIM)


def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients (dq, dk, dv), contiguous, shaped like q, k and v; every input descriptor-ready."""
    B, H, T, D = q.shape
    hkv = k.shape[1]
    delta = torch.empty_like(lse)
    o_desc, do_desc = descriptor(o), descriptor(do)
    o_desc.block_shape[2] = do_desc.block_shape[2] = _DELTA_ROWS
    _attn_bwd_delta_kernel[(triton.cdiv(T, _DELTA_ROWS) * B * H,)](
        o_desc, do_desc, delta, H, T, HEAD_DIM=D, BLOCK_M=_DELTA_ROWS
    )
    dq = torch.empty((B, H, T, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, hkv, T, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, hkv, T, D), device=q.device, dtype=v.dtype)
    q_desc, k_desc, v_desc = descriptor(q), descriptor(k), descriptor(v)
    qk_scale, sm_scale = LOG2E / math.sqrt(D), 1.0 / math.sqrt(D)
    args = launch_args(q)
    group, head_bytes = H // hkv, 2 * k[0, 0].nbytes  # K and V of a head, or Q and dO
    # Causal: sections of heads, longest tiles first (``schedule``); equal work otherwise: head-major.
    dkdv_section = section_heads(B * hkv, group * head_bytes) if causal else 1
    dq_section = section_heads(B * H, head_bytes, group) if causal else 1
    grid_kv = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]) * B * hkv,)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](
        q_desc, k_desc, v_desc, descriptor(do), lse, delta, descriptor(dk), descriptor(dv),
        H, hkv, T, group, qk_scale, sm_scale, SECTION=dkdv_section, CAUSAL=causal, **args,
    )  # fmt: skip
    grid_q = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](
        q_desc, k_desc, v_desc, descriptor(do), lse, delta, descriptor(dq),
        H, T, group, qk_scale, sm_scale, SECTION=dq_section, CAUSAL=causal, **args,
    )  # fmt: skip
    return dq, dk, dv
