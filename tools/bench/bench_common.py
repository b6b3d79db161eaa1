"""Shared by the benchmark scripts (run as ``python tools/bench/NAME.py``, so this imports by name)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from megatron_lite.config import ModelConfig


def llama_config(args: argparse.Namespace) -> ModelConfig:
    """A resolved llama ModelConfig from ``--layers --hidden --ffn --vocab --seq`` (head dim 64, MHA, untied)."""
    return ModelConfig(
        arch="llama",
        layers=args.layers,
        hidden=args.hidden,
        heads=args.hidden // 64,
        kv_heads=args.hidden // 64,
        ffn_hidden=args.ffn,
        vocab_size=args.vocab,
        seq_len=args.seq,
        norm="rmsnorm",
        activation="swiglu",
        tie_embeddings=False,
        norm_eps=1e-5,
    )


def gpu_ms(step: Callable) -> tuple[float, str]:
    """Median GPU time of ``step`` and how it was timed.

    Replayed from a CUDA graph, so Python and launch overhead do not count: in a training step the
    CPU enqueues ahead and hides it, but here it would dominate the 0.1 ms ops, and inductor's idle
    compile workers made such timings swing 2x between runs on the same H200. A step that cannot be
    captured is timed with plain CUDA events instead (``events`` in the table).
    """
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        return do_bench_cudagraph(step, return_mode="median"), "cudagraph"
    except Exception:  # capture refused (a sync or allocation pattern): fall back, never abort
        torch.cuda.synchronize()
        return do_bench(step, return_mode="median"), "events"


_GENERATOR: dict[str, torch.Generator] = {}


def _generator() -> torch.Generator:
    if "cuda" not in _GENERATOR:
        _GENERATOR["cuda"] = torch.Generator(device="cuda").manual_seed(0)
    return _GENERATOR["cuda"]


def randint(high: int, n: int) -> torch.Tensor:
    """``n`` random CUDA int64 values in [0, high), from the benchmarks' own generator (see randn)."""
    return torch.randint(0, high, (n,), device="cuda", generator=_generator())


def randn(*shape: int, scale: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Random CUDA inputs from the benchmarks' own generator.

    A CUDA-graph capture that fails midway can leave the default CUDA generator believing a capture
    is still open ("Offset increment outside graph capture"); a separate generator is unaffected.
    """
    return torch.randn(shape, device="cuda", dtype=dtype, generator=_generator()) * scale


def time_call(fn: Callable, inputs: list[torch.Tensor], grad_idx: list[int], backward: bool) -> tuple[float, str]:
    """Time one call: forward, or forward + backward via autograd.grad (no .grad accumulation).

    The output shapes are found without autograd, so no graph (and no AccumulateGrad node) exists
    on the default stream when ``gpu_ms`` captures the step on its own stream.
    """
    with torch.no_grad():
        if not backward:
            return gpu_ms(lambda: fn(*inputs))
        out = fn(*inputs)
    grads = [randn(*o.shape, dtype=o.dtype) for o in (out if isinstance(out, tuple) else (out,))]
    del out
    leaves = [t.detach().requires_grad_() if i in grad_idx else t for i, t in enumerate(inputs)]
    wrt = [leaves[i] for i in grad_idx]

    def step():
        o = fn(*leaves)
        torch.autograd.grad(o if isinstance(o, tuple) else (o,), wrt, grads)

    return gpu_ms(step)
