"""Causal / full attention with grouped-query heads, FlashAttention-2 style: Triton forward and backward.

Twin: :func:`megatron_lite.kernels.reference.flash_attention`. The (T, T) score matrix never
exists: the forward streams K/V blocks past a block of queries with an online softmax and saves
one logsumexp per query; the backward recomputes probabilities from it in two kernels, one per
K/V block (dK, dV, summed over the K/V head's query group inside the program: no atomics, so the
result is deterministic) and one per query block (dQ).

Scores live in base 2: ``qk_scale = log2(e) / sqrt(D)`` folds the softmax scale into one multiply
and ``exp2`` is the hardware's native exponential; the saved logsumexp is in the same base.
"""

# Triton's convention, kept for readability next to its docs: pointers and constexprs in capitals.
# ruff: noqa: N803

from __future__ import annotations

import functools
import logging
import math

import torch
import triton
import triton.language as tl
from megatron_lite.kernels import reference
from megatron_lite.kernels._common import INTERPRET

_LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def _configs(tiles: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune candidates (BLOCK_M, BLOCK_N, warps, stages) on a GPU; one fixed small tile when
    interpreting, where autotuning fails ("0 active drivers") and each block is a numpy call."""
    if INTERPRET:
        # BLOCK_M != BLOCK_N on purpose: the tests then cover the causal bounds of unequal tiles.
        tiles = [(32, 16, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


# Autotune candidates for D <= 128, measured at B4 H32 T4096 D128 causal bf16 on an H100 SXM
# (tools/bench/kernel_sweep.py; forward ms): 128x64 w8 s4 1.29, 128x64 w8 s3 1.31, 128x128 w8 s3
# 1.31, 64x64 w4 s3 1.35; tiles that exceed shared memory are skipped by autotune. The last,
# smallest tile of each list is fp32's (_prune).
_FWD_TILES = [(128, 64, 8, 4), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
# dK/dV holds a key tile and streams queries past it; dQ the opposite. Measured (ms, same shape):
# dK/dV 32x64 w4 s3 2.36, 64x128 w8 s3 2.37, 64x64 w4 s3 2.63 (32x128 w4 s3: 7.16); dQ 128x64 w8 s3
# 1.70, 128x32 w4 s3 1.87, 64x64 w4 s3 1.98.
_DKDV_TILES = [(32, 64, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2)]
_DQ_TILES = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (32, 32, 4, 2)]
_SHORT = 256


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The smallest tile (last in each list) alone for fp32, where "ieee" dots run on CUDA cores from
    4-byte tiles and ptxas spends minutes on the big tiles' register spills (D = 128, H200), and for
    sequences up to ``_SHORT`` tokens, where a few tiles per head leave nothing for autotuning to
    win back its compile time (one compile per tile, per kernel, per sequence length)."""
    if named_args["Q"].dtype == torch.float32 or named_args["T"] <= _SHORT:
        return configs[-1:]
    return configs


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    if INTERPRET:
        # The interpreter's tl.dot returns garbage for bf16 operands (errors ~1e11, measured with
        # Triton 3.9); fp32 operands are exact there. Compiled kernels keep the bf16 tensor cores.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _query_tile(CAUSAL: tl.constexpr):
    """This program's query tile. Causal: the last tiles (the most keys) first, so that the longest
    programs start in the first wave and the short ones fill the tail, not the other way round."""
    if CAUSAL:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    return tl.program_id(0)


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, K, V, skt, svt, offs_m, offs_d, lo, hi, T, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Online softmax over key tiles [lo, hi); MASKED tiles may hold keys past T or past the diagonal."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = offs_n[:, None] < T
        k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), None, INTERPRET, PRECISION)
        if MASKED:
            valid = offs_n[None, :] < T
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
        # Key 0 sits in the first tile and is valid for every query, so m_i is finite from then on.
        # The scale is applied to the row maximum, then in one multiply-add per score (qk_scale > 0).
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], INTERPRET, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_configs(_FWD_TILES), key=["T", "HEAD_DIM", "CAUSAL"], prune_configs_by={"early_config_prune": _prune}
)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    H, T, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    start_m = _query_tile(CAUSAL) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    K += b * skb + (h // GROUP) * skh
    V += b * svb + (h // GROUP) * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Tiles before `split` need no mask (a compare and a select per score saved); the rest do.
    if CAUSAL:
        split = (start_m // BLOCK_N) * BLOCK_N  # keys below every query of this tile
        hi = tl.minimum(start_m + BLOCK_M, T)  # keys past the tile's last query: skipped, ~half the work
    else:
        split = (T // BLOCK_N) * BLOCK_N
        hi = T
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, skt, svt, offs_m, offs_d, 0, split, T, qk_scale,
                               False, CAUSAL, INTERPRET, PRECISION, BLOCK_N)  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, skt, svt, offs_m, offs_d, split, hi, T, qk_scale,
                               True, CAUSAL, INTERPRET, PRECISION, BLOCK_N)  # fmt: skip
    row_mask = offs_m < T
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=row_mask)
    o = (acc / l_i[:, None]).to(O.dtype.element_ty)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], o, mask=row_mask[:, None])


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, sob, soh, sot, sdob, sdoh, sdot, H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr
):
    # delta_i = sum_d o_id * do_id, the softmax backward's row term, once per query instead of per block.
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < T
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=offs_m < T)


@triton.autotune(
    configs=_configs(_DKDV_TILES), key=["T", "HEAD_DIM", "CAUSAL"], prune_configs_by={"early_config_prune": _prune}
)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
    H, HKV, T, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hkv = (bhk % HKV).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = offs_n[:, None] < T
    k = tl.load(K + b * skb + hkv * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hkv * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        # Queries before this key tile never see it: start at the query tile holding start_n.
        lo = (start_n // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        h = hkv * GROUP + g
        q_ptr = Q + b * sqb + h * sqh
        do_ptr = DO + b * sdob + h * sdoh
        row_ptr = (b * H + h) * T
        for start_m in range(lo, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_mask = offs_m[:, None] < T
            q = tl.load(q_ptr + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_ptr + offs_m[:, None] * sdot + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(LSE + row_ptr + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + row_ptr + offs_m, mask=offs_m < T, other=0.0)
            # Transposed scores (keys x queries) so dK and dV accumulate without a transpose.
            s_t = _dot(k, tl.trans(q), None, INTERPRET, PRECISION) * qk_scale
            valid = offs_m[None, :] < T
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(valid, tl.math.exp2(s_t - lse[None, :]), 0.0)
            dv = _dot(p_t.to(do.dtype), do, dv, INTERPRET, PRECISION)
            dp_t = _dot(v, tl.trans(do), None, INTERPRET, PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = _dot(ds_t.to(q.dtype), q, dk, INTERPRET, PRECISION)
    tl.store(DK + bhk.to(tl.int64) * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)  # fmt: skip
    tl.store(DV + bhk.to(tl.int64) * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)  # fmt: skip


@triton.autotune(
    configs=_configs(_DQ_TILES), key=["T", "HEAD_DIM", "CAUSAL"], prune_configs_by={"early_config_prune": _prune}
)
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
    H, T, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    start_m = _query_tile(CAUSAL) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_mask = offs_m[:, None] < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    K += b * skb + (h // GROUP) * skh
    V += b * svb + (h // GROUP) * svh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = T
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, T)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
        v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
        s = _dot(q, tl.trans(k), None, INTERPRET, PRECISION) * qk_scale
        valid = offs_n[None, :] < T
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), None, INTERPRET, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, INTERPRET, PRECISION)
    tl.store(DQ + bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)  # fmt: skip


def _launch_args(q: torch.Tensor) -> dict:
    """Constexpr switches shared by every attention kernel launch."""
    # fp32 inputs get true fp32 products ("ieee"): tf32 keeps a 10-bit mantissa, ~1e-3 relative error
    # where fp32 callers expect ~1e-6. bf16/fp16 operands ignore the setting and use tensor cores.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return dict(HEAD_DIM=q.shape[-1], INTERPRET=INTERPRET, PRECISION=precision)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T, D), k and v (B, Hkv, T, D), unit stride on D -> (o (B, H, T, D), lse (B, H, T) fp32, base 2)."""
    B, H, T, D = q.shape
    o = torch.empty((B, H, T, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, o, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, T, H // k.shape[1], _LOG2E / math.sqrt(D),
        CAUSAL=causal, **_launch_args(q),
    )  # fmt: skip
    return o, lse


def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients (dq, dk, dv), contiguous, shaped like q, k and v."""
    B, H, T, D = q.shape
    hkv = k.shape[1]
    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(triton.cdiv(T, 64), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T, HEAD_DIM=D, BLOCK_M=64
    )
    dq = torch.empty((B, H, T, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, hkv, T, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, hkv, T, D), device=q.device, dtype=v.dtype)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    qk_scale, sm_scale = _LOG2E / math.sqrt(D), 1.0 / math.sqrt(D)
    args = _launch_args(q)
    grid_kv = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * hkv)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv, *strides, H, hkv, T, H // hkv, qk_scale, sm_scale, CAUSAL=causal, **args
    )
    grid_q = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](
        q, k, v, do, lse, delta, dq, *strides, H, T, H // hkv, qk_scale, sm_scale, CAUSAL=causal, **args
    )
    return dq, dk, dv


def _unit_d(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal):
        q, k, v = _unit_d(q), _unit_d(k), _unit_d(v)
        o, lse = attention_fwd(q, k, v, causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(_unit_d(do), q, k, v, o, lse, ctx.causal)
        return dq, dk, dv, None


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs (they then run the reference), or None."""
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        return f"head dim {D} is not one of {SUPPORTED_HEAD_DIMS} (tl.dot tiles need a power of two >= 16)"
    if k.shape[2] != q.shape[2]:
        return f"query length {q.shape[2]} != key length {k.shape[2]} (the kernels are for self-attention)"
    return None


@functools.cache
def _warn_fallback(reason: str) -> None:
    logging.getLogger(__name__).warning("flash_attention runs the torch reference: %s", reason)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Softmax(q k^T / sqrt(D)) v with an optional causal mask; q (B, H, T, D), k and v (B, Hkv, T, D).

    Grouped-query attention when Hkv divides H: query head h reads K/V head h // (H // Hkv), as in
    the reference's repeat_interleave. Head dims outside 16/32/64/128 and unequal query/key lengths
    run the reference (logged once per reason). Softmax statistics are fp32 whatever the dtype.
    """
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[-1] != D or H % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need k == v shapes, "
                         "the same batch and head dim, and Hkv dividing H")  # fmt: skip
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        _warn_fallback(reason)
        return reference.flash_attention(q, k, v, causal)
    return _FlashAttention.apply(q, k, v, causal)
