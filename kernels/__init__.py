"""Fused ops with a plain-torch twin each, importable as ``megatron_lite.kernels``.

``set_backend("auto" | "triton" | "torch")`` picks the implementation; ``auto`` runs Triton on
CUDA tensors and the twins in :mod:`megatron_lite.kernels.reference` everywhere else.
"""

from megatron_lite.kernels import reference
from megatron_lite.kernels.dispatch import get_backend, set_backend, triton_available

rms_norm = reference.rms_norm
layer_norm = reference.layer_norm
swiglu = reference.swiglu
apply_rope = reference.apply_rope
cross_entropy = reference.cross_entropy
flash_attention = reference.flash_attention

__all__ = [
    "apply_rope",
    "cross_entropy",
    "flash_attention",
    "get_backend",
    "layer_norm",
    "reference",
    "rms_norm",
    "set_backend",
    "swiglu",
    "triton_available",
]
