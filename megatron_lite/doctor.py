"""``megatron-lite doctor``: what this machine offers the framework, and what is missing.

Each optional package is reported as usable only when it imports (and, for GPU libraries, works),
never from its mere presence on disk; Triton counts as usable only where its kernels can run (a
CUDA device, or ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import platform
import sys

import torch

from megatron_lite import __version__, kernels
from megatron_lite.amounts import counted
from megatron_lite.kernels.accelerators import apex_problem, transformer_engine_problem


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _importable(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken optional package must not break the report
        return False, f"{type(e).__name__}: {e}"[:200]
    return True, "ok"


def _devices() -> list[str]:
    if not torch.cuda.is_available():
        return [f"cpu ({counted(torch.get_num_threads(), 'thread')})"]
    return [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]


def collect() -> dict:
    """Everything the report shows, as a dict."""
    optional = {}
    for name, module in [
        ("triton", "triton"),
        ("wandb", "wandb"),
        ("tensorboard", "torch.utils.tensorboard"),
        ("transformers", "transformers"),
        ("sentencepiece", "sentencepiece"),
    ]:
        ok, why = _importable(module)
        optional[name] = {"usable": ok, "version": _version(name), "detail": why}
    # importable is not enough for Triton: its kernels run on CUDA, or in its interpreter
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if optional["triton"]["usable"] and (problem := kernels.triton_problem(device)):
        optional["triton"].update(usable=False, detail=f"imports, but kernels.backend=triton {problem}")
    # every package has the same three keys (doctor --json's documented form), and its reason when unusable
    apex, te = apex_problem(), transformer_engine_problem()
    optional["apex"] = {"usable": apex is None, "version": _version("apex"), "detail": apex or "ok"}
    optional["transformer_engine"] = {
        "usable": te is None,
        "version": _version("transformer_engine") or _version("transformer-engine"),
        "detail": te or "ok",
    }
    return {
        "megatron_lite": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "devices": _devices(),
        "distributed_backends": {
            "gloo": torch.distributed.is_gloo_available(),
            "nccl": torch.distributed.is_nccl_available(),
        },
        "kernel_backend": kernels.get_backend(),
        "kernels": kernels.describe(),
        "optional": optional,
    }


def report(as_json: bool = False) -> str:
    """A human-readable (or one-line JSON) report."""
    info = collect()
    if as_json:
        return json.dumps(info)
    lines = [
        f"megatron-lite {info['megatron_lite']}  python {info['python']}  torch {info['torch']} (cuda {info['cuda']})",
        f"platform: {info['platform']}",
        f"devices: {', '.join(info['devices'])}",
        f"distributed: {', '.join(k for k, v in info['distributed_backends'].items() if v)}",
        f"kernels (backend={info['kernel_backend']}):",
    ]
    width = max(map(len, info["kernels"]))  # transformer_engine, the longest name, is 18 characters
    lines += [f"  {op:<{width}} {how}" for op, how in info["kernels"].items()]
    lines.append("optional packages:")
    for name, o in info["optional"].items():
        state = "usable" if o["usable"] else "not usable"
        detail = "" if o["usable"] or not o.get("detail") else f"  ({o['detail']})"
        lines.append(f"  {name:<18} {state:<11} {o['version'] or '-'}{detail}")
    return "\n".join(lines)
