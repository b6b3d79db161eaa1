"""Cross-entropy over a large vocabulary, whole or vocab-parallel: Triton forward and backward.

Twins: :func:`megatron_lite.kernels.reference.cross_entropy` and
:func:`megatron_lite.kernels.reference.cross_entropy_partials`.

One program owns one row and walks its vocabulary in chunks of ``_BLOCK_V`` with an online
logsumexp in fp32, so neither the softmax nor an fp32 copy of the logits is ever materialised
(8192 x 128256 fp32 would be 4.2 GB). Both public functions share the two kernels:

- forward, per row: ``m = max_j x_j``, ``s = sum_j exp(x_j - m)`` and ``x_t``, the target's logit
  when the target lies in this shard (else 0);
- backward, per row: ``dx_j = a * exp(x_j - c) + b * [j == t]``. The full loss uses
  ``a = g / n_valid`` (0 on ignored rows), ``c = logsumexp``, ``b = -a``; the partials use
  ``a = ds``, ``c = m``, ``b = dx_t``, the gradients of ``s`` and ``x_t``.
"""

# Triton's convention, kept for readability next to its docs: pointers and constexprs in capitals.
# ruff: noqa: N803

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megatron_lite.kernels._checks import check_cross_entropy
from megatron_lite.kernels._common import INTERPRET, first_order_only

# 4K logits per chunk (16 per thread at 8 warps): few loop trips over a 128K vocabulary while the
# chunk stays in registers. The interpreter runs each chunk as one numpy call: a small chunk keeps
# several trips (and the masked tail) in the tests' 1001-word vocabulary.
_BLOCK_V = 256 if INTERPRET else 4096
_WARPS = 8


@triton.jit
def _ce_fwd_kernel(
    X, TARGET, MAX, SUMEXP, XT,
    stride_x, n_cols, vocab_start, ignore_index,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    target = tl.load(TARGET + row)
    local = target - vocab_start
    hit = (target != ignore_index) & (local >= 0) & (local < n_cols)
    x_t = tl.load(x_row + tl.where(hit, local, 0)).to(tl.float32)
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Rescale the running sum to the new maximum: every exp argument stays <= 0, no overflow.
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    tl.store(MAX + row, m)
    tl.store(SUMEXP + row, s)
    tl.store(XT + row, tl.where(hit, x_t, 0.0))


@triton.jit
def _ce_bwd_kernel(
    X, TARGET, DX, SCALE, SHIFT, TARGET_GRAD,
    stride_x, stride_dx, n_cols, vocab_start, ignore_index,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGET + row)
    local = tl.where(target != ignore_index, target - vocab_start, -1)
    a = tl.load(SCALE + row)
    c = tl.load(SHIFT + row)
    b = tl.load(TARGET_GRAD + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dx = a * tl.exp(x - c) + tl.where(cols == local, b, 0.0)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _rows(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (logits if logits.stride(-1) == 1 else logits.contiguous()), target.contiguous()


def ce_partials_fwd(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row (max, sum of exp(x - max), target logit or 0), each (N,) fp32."""
    n_rows, n_cols = logits.shape
    m, s, x_t = (torch.empty(n_rows, device=logits.device, dtype=torch.float32) for _ in range(3))
    _ce_fwd_kernel[(n_rows,)](
        logits, target, m, s, x_t, logits.stride(0), n_cols, vocab_start, ignore_index,
        BLOCK_V=_BLOCK_V, num_warps=_WARPS,
    )  # fmt: skip
    return m, s, x_t


def ce_bwd(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int, ignore_index: int,
    scale: torch.Tensor, shift: torch.Tensor, target_grad: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """dlogits (N, V) = scale * exp(logits - shift) + target_grad * onehot(target - vocab_start)."""
    n_rows, n_cols = logits.shape
    dx = torch.empty((n_rows, n_cols), device=logits.device, dtype=logits.dtype)
    _ce_bwd_kernel[(n_rows,)](
        logits, target, dx, scale.contiguous(), shift, target_grad.contiguous(),
        logits.stride(0), dx.stride(0), n_cols, vocab_start, ignore_index,
        BLOCK_V=_BLOCK_V, num_warps=_WARPS,
    )  # fmt: skip
    return dx


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index):
        m, s, x_t = ce_partials_fwd(logits, target, 0, ignore_index)
        lse = m + torch.log(s)
        valid = target != ignore_index
        n_valid = valid.sum()
        # 0 / 0 = nan when every target is ignored, as torch's mean reduction gives.
        loss = torch.where(valid, lse - x_t, 0.0).sum() / n_valid
        ctx.save_for_backward(logits, target, lse, valid, n_valid)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, g):
        first_order_only("cross_entropy")
        logits, target, lse, valid, n_valid = ctx.saved_tensors
        scale = torch.where(valid, g / n_valid, 0.0)
        dx = ce_bwd(logits, target, 0, ctx.ignore_index, scale, lse, -scale)
        return dx, None, None


class _CrossEntropyPartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, ignore_index):
        m, s, x_t = ce_partials_fwd(logits, target, vocab_start, ignore_index)
        ctx.save_for_backward(logits, target, m)
        ctx.vocab_start, ctx.ignore_index = vocab_start, ignore_index
        ctx.mark_non_differentiable(m)
        return m, s, x_t

    @staticmethod
    def backward(ctx, _dm, ds, dx_t):
        first_order_only("cross_entropy_partials")
        logits, target, m = ctx.saved_tensors
        dx = ce_bwd(logits, target, ctx.vocab_start, ctx.ignore_index, ds, m, dx_t)
        return dx, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over rows whose target is not ``ignore_index``; logits (N, V), target (N,).

    Accumulates in fp32 whatever the logits dtype; the gradient comes back in the logits dtype.
    With every target ignored (or N = 0) the loss is NaN (0 / 0) and the gradient zero, as in torch.
    A target outside [0, V) that is not ignore_index counts as a zero logit (no device sync to check).
    """
    check_cross_entropy("cross_entropy", logits, target, ignore_index)
    logits, target = _rows(logits, target)
    return _CrossEntropy.apply(logits, target, ignore_index)


def cross_entropy_partials(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (m, s, x_t) of a vocab shard (N, V_local) whose columns start at global id ``vocab_start``.

    Same outputs and combination recipe as :func:`megatron_lite.kernels.reference.cross_entropy_partials`;
    the backward turns (ds, dx_t) into ``ds * exp(x - m) + dx_t * onehot`` in one pass over the shard.
    """
    check_cross_entropy("cross_entropy_partials", logits, target, ignore_index, vocab_start)
    logits, target = _rows(logits, target)
    return _CrossEntropyPartials.apply(logits, target, vocab_start, ignore_index)
