"""Fused ops with a plain-torch twin each, importable as ``megatron_lite.kernels``.

``set_backend("auto" | "triton" | "torch")`` picks the implementation; ``auto`` runs the Triton
kernels (``fused_*.py``, one file per op) on CUDA tensors and the twins in
:mod:`megatron_lite.kernels.reference` everywhere else. The Triton files are imported on first
use only, so importing this package needs neither Triton nor a GPU, and a test can still switch
on ``TRITON_INTERPRET`` before any ``@triton.jit`` runs. ``describe()`` says what runs here and why.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch
from megatron_lite.kernels import reference
from megatron_lite.kernels.accelerators import apex_available, transformer_engine_available
from megatron_lite.kernels.dispatch import (
    describe,
    get_backend,
    set_backend,
    triton_available,
    triton_problem,
    use_apex,
    use_triton,
)


@functools.cache
def _triton_op(module: str, name: str) -> Callable:
    return getattr(importlib.import_module(f"megatron_lite.kernels.{module}"), name)


def _norm(x: torch.Tensor, module: str, name: str) -> Callable:
    """The norm ``name``: Triton's; else apex's under ``auto`` on CUDA when apex works; else the twin."""
    if use_triton(x):
        return _triton_op(module, name)
    if use_apex(x):
        from megatron_lite.kernels import apex_norms  # imports apex only when a norm runs

        return getattr(apex_norms, name)
    return getattr(reference, name)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim (x (..., N), weight (N,)); with ``residual`` returns ``(norm(x + r), x + r)``."""
    return _norm(x, "fused_rms_norm", "rms_norm")(x, weight, eps, residual)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim; x (..., N), weight and bias (N,), bias may be None."""
    return _norm(x, "fused_layer_norm", "layer_norm")(x, weight, bias, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; gate and up (..., N) of the same shape."""
    impl = _triton_op("fused_swiglu", "swiglu") if use_triton(gate) else reference.swiglu
    return impl(gate, up)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding; x (B, T, H, D), cos and sin (T, D/2)."""
    impl = _triton_op("fused_rope", "apply_rope") if use_triton(x) else reference.apply_rope
    return impl(x, cos, sin)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over non-ignored targets; logits (N, V), target (N,) integer ids; fp32 accumulation.

    With no target left to average (every one is ``ignore_index``, or N = 0) the loss is NaN (0 / 0, as
    ``F.cross_entropy`` gives) and the gradient is zero, in both backends.

    Target values are not checked (that needs a device sync): one outside [0, V) other than
    ``ignore_index`` raises in torch but counts as a zero logit in the Triton kernel. The trainer
    checks the data's token ids against ``model.vocab_size``.
    """
    impl = _triton_op("fused_cross_entropy", "cross_entropy") if use_triton(logits) else reference.cross_entropy
    return impl(logits, target, ignore_index)


def cross_entropy_partials(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (local max, sum-exp, target logit) of a vocab shard (N, V_local), for a vocab-parallel loss.

    How to combine them across ranks: :func:`megatron_lite.kernels.reference.cross_entropy_partials`.
    """
    if use_triton(logits):
        impl = _triton_op("fused_cross_entropy", "cross_entropy_partials")
    else:
        impl = reference.cross_entropy_partials
    return impl(logits, target, vocab_start, ignore_index)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Scaled dot-product attention; q (B, H, T, D), k and v (B, Hkv, T, D) with Hkv dividing H."""
    if use_triton(q, "flash_attention"):
        return _triton_op("fused_attention", "flash_attention")(q, k, v, causal)
    return reference.flash_attention(q, k, v, causal)


__all__ = [
    "apex_available",
    "apply_rope",
    "cross_entropy",
    "cross_entropy_partials",
    "describe",
    "flash_attention",
    "get_backend",
    "layer_norm",
    "reference",
    "rms_norm",
    "set_backend",
    "swiglu",
    "transformer_engine_available",
    "triton_available",
    "triton_problem",
    "use_apex",
    "use_triton",
]
