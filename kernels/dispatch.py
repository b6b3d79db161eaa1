"""Backend choice for the fused ops: ``auto`` (Triton on CUDA tensors, torch elsewhere), ``triton``
or ``torch``. One process-wide setting, chosen from ``kernels.backend`` at startup."""

from __future__ import annotations

import functools

_BACKENDS = ("auto", "triton", "torch")
_backend = "auto"


def set_backend(name: str) -> None:
    """Select the kernel backend for every op: ``auto`` | ``triton`` | ``torch``."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(_BACKENDS)}")
    if name == "triton" and not triton_available():
        raise RuntimeError("kernels.backend=triton but Triton is not importable; install triton or use 'auto'")
    _backend = name


def get_backend() -> str:
    """The configured backend name (``auto`` until :func:`set_backend` changes it)."""
    return _backend


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works (a launch may still need a GPU or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(x) -> bool:
    """Whether an op on tensor ``x`` runs its Triton kernel under the current backend."""
    if _backend == "torch":
        return False
    if _backend == "triton":
        return True
    return bool(x.is_cuda) and triton_available()
