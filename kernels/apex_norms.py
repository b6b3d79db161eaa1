"""NVIDIA apex's fused norms behind the signatures of :func:`megatron_lite.kernels.rms_norm` and
:func:`megatron_lite.kernels.layer_norm`.

Used by ``auto`` on CUDA tensors where Triton cannot run and apex works
(:func:`megatron_lite.kernels.accelerators.apex_problem`): apex's CUDA kernels are then the fused
option left, ahead of the plain-torch twins. apex is imported only when one of these runs.
"""

from __future__ import annotations

import torch
from megatron_lite.kernels._checks import check_norm


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """apex ``fused_rms_norm_affine``; with ``residual``, ``(norm(h), h)`` for ``h = x + residual``
    (the sum rounded to x's dtype, as the Triton kernel and the twin do)."""
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine

    check_norm("rms_norm", x, weight, None, eps, residual)
    h = x if residual is None else x + residual
    # apex's non-mixed kernels take a weight of the input's dtype; the cast is a no-op in training
    y = fused_rms_norm_affine(h, weight.to(h.dtype), weight.shape, eps)
    return y if residual is None else (y, h)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """apex ``fused_layer_norm_affine``; a missing bias is a zero bias (apex's affine kernel takes both)."""
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine

    check_norm("layer_norm", x, weight, bias, eps)
    b = torch.zeros_like(weight) if bias is None else bias
    return fused_layer_norm_affine(x, weight.to(x.dtype), b.to(x.dtype), weight.shape, eps)
