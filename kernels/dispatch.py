"""Backend choice for the fused ops: ``auto`` (Triton on CUDA tensors, torch elsewhere), ``triton``
or ``torch``. One process-wide setting, chosen from ``kernels.backend`` at startup.

NVIDIA apex, when it works here, runs the two norms under ``auto`` on CUDA tensors where Triton
cannot (not importable): one fused CUDA kernel each instead of the twins' several torch ops
(``apex_norms.py``; torch does the residual add, as apex has no residual-fused RMSNorm). Where
Triton runs, its kernels (tested against the twins in ``reference.py``) keep the norms. The
optimizer does not take apex's FusedAdam: on CUDA it runs torch's fused AdamW kernel, the same
one-pass multi-tensor update, whose state keeps the one checkpoint layout on every machine. Transformer
Engine is used for ``train.dtype=fp8`` (its Linear under fp8 autocast). :func:`describe` reports
whether each library works here.
"""

from __future__ import annotations

import functools
import os

import torch
from megatron_lite.kernels.accelerators import apex_problem, transformer_engine_problem

OPS = ("rms_norm", "layer_norm", "swiglu", "apply_rope", "cross_entropy", "flash_attention")

_BACKENDS = ("auto", "triton", "torch")
# Ops that ``auto`` keeps on torch even on CUDA, with the measurement that says why. Our Triton
# attention reaches 0.78x (forward) and 0.67x (forward+backward) of torch's SDPA flash kernel on an
# H100 (B4 H32 T4096 D128 bf16, BENCHMARKS.md); ``set_backend("triton")`` still selects it.
AUTO_PREFERS_TORCH = {"flash_attention": "SDPA measured faster than our Triton attention on H100 (0.67x fwd+bwd)"}
_backend = "auto"

# Limits of the Triton kernels past which an op runs its torch twin: defined here, where no Triton is
# imported, so that describe() states the numbers the op files check.
# One program holds a whole row in registers: 64K fp32 values is already 256 KB per program, past
# which the row kernels would spill; no norm width in a decoder LM comes near (hidden <= 16384), and
# wider rows run the norms' torch twins (_common.wide_row_reason).
MAX_ROW_BLOCK = 65536
# The attention kernels' head dims: tl.dot tiles need a power of two >= 16, and their tiles are tuned
# for D <= 128 (_attention_common.py).
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


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


def triton_problem(device: str | torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` in this process (a phrase starting with
    "needs"), or None when they can: on CUDA, or anywhere under ``TRITON_INTERPRET=1``."""
    if not triton_available():
        return "needs Triton, which is not importable here (pip install triton)"
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels in Triton's interpreter, slowly)"
    return None


def use_triton(x: torch.Tensor, op: str | None = None) -> bool:
    """Whether op ``op`` on tensor ``x`` runs its Triton kernel under the current backend."""
    if _backend == "torch":
        return False
    if _backend == "triton":
        if not x.is_cuda and (problem := triton_problem(x.device)):
            raise RuntimeError(f"kernels backend 'triton' on a {x.device.type} tensor: {problem}")
        return True
    return bool(x.is_cuda) and triton_available() and op not in AUTO_PREFERS_TORCH


def use_apex(x: torch.Tensor) -> bool:
    """Whether a norm on tensor ``x`` runs NVIDIA apex's kernel: under ``auto``, on CUDA, where Triton
    cannot run and apex works (``accelerators.apex_problem``)."""
    return _backend == "auto" and bool(x.is_cuda) and not triton_available() and apex_problem() is None


def _op_choice(device: torch.device) -> str:
    """The implementation every op takes on ``device`` under the current backend, and why."""
    if _backend == "torch":
        return "torch: set_backend('torch')"
    if not triton_available():  # then set_backend('triton') was refused: the backend is auto
        return "torch: Triton is not importable"
    import triton

    if _backend == "triton":
        problem = triton_problem(device)
        where = f"Triton {triton.__version__}, tensors on {device.type}"
        return f"triton: set_backend('triton') ({where}" + (f"; UNUSABLE here: {problem})" if problem else ")")
    if device.type != "cuda":
        return f"torch: auto runs Triton on CUDA tensors only, and the device is {device.type}"
    return f"triton: CUDA device {torch.cuda.get_device_name(device)}, Triton {triton.__version__}"


def describe(device: str | torch.device | None = None) -> dict[str, str]:
    """Per op, ``"<implementation>: <why>"`` on ``device`` (default: cuda if present, else cpu).

    The implementation is one of ``triton``, ``apex`` (the norms only) or ``torch``; the ``apex`` and
    ``transformer_engine`` entries say whether each library works here (``available: ...`` or
    ``unavailable: <why>``). For the ``doctor`` command and the startup log.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"describe({str(device)!r}): no CUDA device is available")
    choice = _op_choice(device)
    out = dict.fromkeys(OPS, choice)
    if choice.startswith("triton"):
        dims = "/".join(map(str, SUPPORTED_HEAD_DIMS))
        out["flash_attention"] = choice + f"; head dims outside {dims} and GPUs before Hopper fall back to torch"
        out["rms_norm"] = out["layer_norm"] = choice + f"; rows wider than {MAX_ROW_BLOCK} values fall back to torch"
        if _backend == "auto":
            out["flash_attention"] = "torch: " + AUTO_PREFERS_TORCH["flash_attention"]
    apex, te = apex_problem(), transformer_engine_problem()
    if apex is None and device.type == "cuda" and _backend == "auto" and not triton_available():
        out["rms_norm"] = out["layer_norm"] = "apex: fused norms (Triton is not importable)"
    used = "available: runs the norms under auto where Triton cannot; AdamW is torch's fused kernel"
    out["apex"] = used if apex is None else f"unavailable: {apex}"
    out["transformer_engine"] = "available: used by train.dtype=fp8" if te is None else f"unavailable: {te}"
    return out
