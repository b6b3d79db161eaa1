"""Causal / full attention with grouped-query heads, FlashAttention-2 style: Triton forward and backward.

Twin: :func:`megatron_lite.kernels.reference.flash_attention`. The (T, T) score matrix never
exists: the forward streams K/V blocks past a block of queries with an online softmax and saves
one logsumexp per query; the backward recomputes probabilities from it in two kernels, one per
K/V block (dK, dV, summed over the K/V head's query group inside the program: no atomics, so the
result is deterministic) and one per query block (dQ).

Scores live in base 2: ``qk_scale = log2(e) / sqrt(D)`` folds the softmax scale into one multiply
and ``exp2`` is the hardware's native exponential; the saved logsumexp is in the same base. Tiles
move through tensor descriptors (TMA on Hopper; see ``_attention_common``); the backward kernels live
in ``fused_attention_bwd``.
"""

# Triton's convention, kept for readability next to its docs: pointers and constexprs in capitals.
# ruff: noqa: N803

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from megatron_lite.kernels import reference
from megatron_lite.kernels._attention_common import (
    AUTOTUNE_KEY,
    FWD_TILES,
    LOG2E,
    configs,
    describable,
    descriptor,
    dot,
    key_ranges,
    launch_args,
    load_tile,
    prune,
    query_program,
    section_heads,
    set_blocks,
    store_tile,
)
from megatron_lite.kernels._checks import check_attention
from megatron_lite.kernels._common import first_order_only, warn_fallback
from megatron_lite.kernels.dispatch import SUPPORTED_HEAD_DIMS
from megatron_lite.kernels.fused_attention_bwd import attention_bwd

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, K, V, b, hk, offs_m, lo, hi, T, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Online softmax over key tiles [lo, hi); MASKED tiles may hold keys past T or past the diagonal."""
    for start_n in range(lo, hi, BLOCK_N):
        k = load_tile(K, b, hk, start_n, BLOCK_N, HEAD_DIM)
        s = dot(q, tl.trans(k), None, INTERPRET, PRECISION)
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            # Causal: a query inside T sees only keys inside T, and rows past T are never stored.
            valid = offs_n[None, :] <= offs_m[:, None] if CAUSAL else offs_n[None, :] < T
            s = tl.where(valid, s, float("-inf"))
        # Key 0 sits in the first tile and is valid for every query, so m_i is finite from then on.
        # The scale is applied to the row maximum, then in one multiply-add per score (qk_scale > 0).
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        v = load_tile(V, b, hk, start_n, BLOCK_N, HEAD_DIM)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], INTERPRET, PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_finish(O, LSE, acc, l_i, m_i, b, h, bh, start_m, offs_m, T,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """Stores the query tile's logsumexp (base 2) and its normalized output."""
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)
    store_tile(O, b, h, start_m, acc / l_i[:, None], BLOCK_M, HEAD_DIM)


def _fwd_blocks(nargs: dict) -> None:
    set_blocks(nargs, {"Q": "BLOCK_M", "O": "BLOCK_M", "K": "BLOCK_N", "V": "BLOCK_N"})


@triton.autotune(configs=configs(FWD_TILES, _fwd_blocks), key=AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": prune})  # fmt: skip
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, H, T, GROUP, qk_scale, SECTION: tl.constexpr,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    start_m, bh, b, h, offs_m = query_program(H, T, SECTION, CAUSAL, BLOCK_M)
    q = load_tile(Q, b, h, start_m, BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    split, hi = key_ranges(start_m, T, CAUSAL, BLOCK_M, BLOCK_N)  # unmasked tiles save a compare and a select
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, b, h // GROUP, offs_m, 0, split, T, qk_scale,
                               False, CAUSAL, INTERPRET, PRECISION, HEAD_DIM, BLOCK_N)  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, b, h // GROUP, offs_m, split, hi, T, qk_scale,
                               True, CAUSAL, INTERPRET, PRECISION, HEAD_DIM, BLOCK_N)  # fmt: skip
    _fwd_finish(O, LSE, acc, l_i, m_i, b, h, bh, start_m, offs_m, T, BLOCK_M, HEAD_DIM)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T, D), k and v (B, Hkv, T, D), descriptor-ready (see ``describable``) -> (o (B, H, T, D)
    contiguous, lse (B, H, T) fp32 in base 2)."""
    B, H, T, D = q.shape
    o = torch.empty((B, H, T, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    group = H // k.shape[1]
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    scalars = (H, T, group, LOG2E / math.sqrt(D))
    section = section_heads(B * H, 2 * k[0, 0].nbytes, group) if causal else 1  # equal work: head-major
    _attn_fwd_kernel[grid](descriptor(q), descriptor(k), descriptor(v), descriptor(o), lse, *scalars,
                           SECTION=section, CAUSAL=causal, **launch_args(q))  # fmt: skip
    return o, lse


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal):
        q, k, v = describable(q), describable(k), describable(v)
        o, lse = attention_fwd(q, k, v, causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        first_order_only("flash_attention")
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(describable(do), q, k, v, o, lse, ctx.causal)
        return dq, dk, dv, None


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs (they then run the reference), or None."""
    D = q.shape[-1]
    if q.dtype not in KERNEL_DTYPES:
        # fp64 would lose its precision to the fp32 softmax statistics and accumulator (3e-7 off the twin).
        return f"dtype {q.dtype} is not one of fp16/bf16/fp32 (the kernels accumulate in fp32)"
    if D not in SUPPORTED_HEAD_DIMS:
        return f"head dim {D} is not one of {SUPPORTED_HEAD_DIMS} (tl.dot tiles need a power of two >= 16)"
    if q.numel() == 0 or k.numel() == 0:
        return "empty input (a tensor descriptor needs every dimension >= 1)"
    if k.shape[2] != q.shape[2]:
        return f"query length {q.shape[2]} != key length {k.shape[2]} (the kernels are for self-attention)"
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (9, 0):
        # Before Hopper, Triton lowers the tiles' descriptors to plain loads without cp.async
        # pipelining, and most tiles spill (tools/kernel_static.py --arch 80): SDPA is the faster choice.
        return "GPU before Hopper (compute capability < 9.0): the kernels load tiles with TMA"
    return None


# torch.compile (train.compile) cannot trace the autotune configs' pre-hooks that size the tensor
# descriptors (torch raises "pre_hook ... not supported"), so compiled blocks call this one eagerly.
@torch.compiler.disable
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Softmax(q k^T / sqrt(D)) v with an optional causal mask; q (B, H, T, D), k and v (B, Hkv, T, D).

    Grouped-query attention when Hkv divides H: query head h reads K/V head h // (H // Hkv), as in
    the reference's repeat_interleave. Dtypes other than fp16/bf16/fp32, head dims outside 16/32/64/128,
    unequal query/key lengths and GPUs before Hopper run the reference (logged once per reason).
    Softmax statistics are fp32 whatever the dtype.
    """
    check_attention(q, k, v, causal)
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        warn_fallback("flash_attention", reason)
        return reference.sdpa(q, k, v, causal)
    return _FlashAttention.apply(q, k, v, causal)
