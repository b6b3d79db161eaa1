"""Plain-torch twins of every fused op.

These are the definitions: the Triton kernels must match them (tests/kernels) and the CPU
training path runs them. Autograd supplies every backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron_lite.kernels._checks import (
    check_attention,
    check_cross_entropy,
    check_norm,
    check_rope,
    check_swiglu,
)

_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA gained enable_gqa in 2.5


_WIDE = (torch.float32, torch.float64)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype the twins compute in: fp32 for 16-bit inputs; fp32 and fp64 as they are,
    with no call into torch (a training step runs the twins a few times per layer)."""
    return t if t.dtype in _WIDE else t.float()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, computed in fp32 (fp64 for fp64 inputs) and cast back to ``x.dtype``.

    With ``residual``: ``h = x + residual`` is normalised and ``(norm(h), h)`` is returned, the
    fused add-then-norm of a pre-norm block.
    """
    check_norm("rms_norm", x, weight, None, eps, residual)
    if residual is not None:
        x = x + residual
    xf = _wide(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = (y * _wide(weight)).to(x.dtype)
    return (out, x) if residual is not None else out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim, computed in fp32 (fp64 for fp64 inputs) and cast back to ``x.dtype``."""
    check_norm("layer_norm", x, weight, bias, eps)
    xf = _wide(x)
    w = weight.to(xf.dtype)
    b = bias.to(xf.dtype) if bias is not None else None
    return F.layer_norm(xf, (x.shape[-1],), w, b, eps).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the Llama MLP nonlinearity), computed in fp32 (fp64 for fp64 inputs) and cast
    back to ``gate.dtype`` (one rounding, as the Triton kernel: bf16 silu then product rounds twice)."""
    check_swiglu(gate, up)
    return (F.silu(_wide(gate)) * _wide(up)).to(gate.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split rotation (Llama / Hugging Face convention).

    x: (B, T, H, D); cos, sin: (T, D/2). The first half of each head is rotated against the
    second half: ``[x1, x2] -> [x1*cos - x2*sin, x2*cos + x1*sin]``, computed in fp32 (fp64 for fp64
    inputs; the tables not rounded to x's dtype) and cast back to ``x.dtype``, as the Triton kernel does.
    """
    check_rope(x, cos, sin)
    d2 = x.shape[-1] // 2
    xf = _wide(x)
    x1, x2 = xf[..., :d2], xf[..., d2:]
    c = cos[None, :, None, :].to(xf.dtype)  # (1, T, 1, D/2)
    s = sin[None, :, None, :].to(xf.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token loss over non-ignored targets; logits (N, V) are upcast to fp32; target (N,) of any
    integer dtype (F.cross_entropy itself takes int64 and uint8 only). No target left to average (all
    ignored, or N = 0): the loss is NaN (0 / 0) and the gradient zero."""
    check_cross_entropy("cross_entropy", logits, target, ignore_index)
    return F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index)


def cross_entropy_partials(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy pieces of a vocab shard, to be combined across tensor-parallel ranks.

    logits: (N, V_local), this rank's columns [vocab_start, vocab_start + V_local) of the vocabulary;
    target: (N,) global ids. Returns three (N,) fp32 tensors: ``m`` (local max, detached),
    ``s = sum exp(x - m)`` and ``x_t`` (the target's logit if it lies in this shard, else 0).
    The combination, with ``valid = target != ignore_index``::

        M = all_reduce(m, MAX)                         # constant: the loss does not depend on it
        S = all_reduce(s * exp(m - M), SUM)            # forward all-reduce, backward identity
        X_t = all_reduce(x_t, SUM)                     # forward all-reduce, backward identity
        loss = ((M + log(S) - X_t) * valid).sum() / valid.sum()

    which is the full-vocabulary ``cross_entropy``. Autograd through it gives each shard
    ``(softmax(x) - onehot) * dloss / n_valid`` on valid rows.
    """
    check_cross_entropy("cross_entropy_partials", logits, target, ignore_index, vocab_start)
    x = logits.float()
    m = x.max(dim=-1).values.detach()
    s = torch.exp(x - m[:, None]).sum(dim=-1)
    local = target - vocab_start
    hit = (target != ignore_index) & (local >= 0) & (local < x.shape[-1])
    x_t = x.gather(1, torch.where(hit, local, 0)[:, None]).squeeze(1)
    return m, s, torch.where(hit, x_t, 0.0)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Scaled dot-product attention; q (B, H, T, D), k and v (B, Hkv, T, D) with Hkv dividing H."""
    check_attention(q, k, v, causal)
    return sdpa(q, k, v, causal)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """:func:`flash_attention` without its argument check, for a caller that has made it."""
    h, hkv = q.shape[1], k.shape[1]
    if h != hkv:
        if _SDPA_GQA:  # torch >= 2.5: grouped heads without materialising repeated K/V (exactly equal)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        # Grouped-query attention: each KV head serves h // hkv consecutive query heads.
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
