"""Detection of the optional NVIDIA accelerator libraries: apex and Transformer Engine.

Neither is imported when this package is: each probe runs on first call (cached), imports the
library and makes one tiny CUDA call, because both are often installed yet broken (an extension
built for another torch or CUDA; Transformer Engine 2.20's fails to build on CPU machines).
A library counts as available only when that call works.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


def _find(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def apex_problem() -> str | None:
    """None when NVIDIA apex works here (FusedLayerNorm, FusedRMSNorm, FusedAdam); else why not."""
    if not _find("apex"):
        return "not installed"
    if not _find("apex.normalization"):
        # PyPI's `apex` is an unrelated web toolkit; NVIDIA apex is built from github.com/NVIDIA/apex.
        return "the installed 'apex' is not NVIDIA apex (no apex.normalization)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from apex.normalization import FusedLayerNorm, FusedRMSNorm
        from apex.optimizers import FusedAdam

        x = torch.randn(2, 8, device="cuda")
        FusedLayerNorm(8).cuda()(x)
        FusedRMSNorm(8).cuda()(x)
        p = torch.nn.Parameter(torch.ones(8, device="cuda"))
        p.grad = torch.ones_like(p)
        FusedAdam([p]).step()
        torch.cuda.synchronize()
    except Exception as e:  # any failure of an optional extension means "do not use it"
        return f"installed but not working: {type(e).__name__}: {e}"
    return None


@functools.cache
def transformer_engine_problem() -> str | None:
    """None when Transformer Engine's torch extension works here (a te.Linear forward); else why not."""
    if not _find("transformer_engine"):
        return "not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import transformer_engine.pytorch as te

        te.Linear(16, 16).cuda()(torch.randn(16, 16, device="cuda"))
        torch.cuda.synchronize()
    except Exception as e:  # any failure of an optional extension means "do not use it"
        return f"installed but not working: {type(e).__name__}: {e}"
    return None


def apex_available() -> bool:
    """True when NVIDIA apex is importable and its fused norms and FusedAdam run on this GPU."""
    return apex_problem() is None


def transformer_engine_available() -> bool:
    """True when Transformer Engine is importable and a te.Linear runs on this GPU."""
    return transformer_engine_problem() is None
