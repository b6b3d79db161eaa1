"""Benchmark the fused Triton kernels against torch eager, torch.compile and Liger-Kernel on one GPU.

    python tools/bench/kernels.py                        # every op, every implementation
    python tools/bench/kernels.py --ops swiglu,flash_attention --impls triton,eager

Memory-bound ops (norms, SwiGLU, RoPE, cross-entropy) report achieved bandwidth, counting the
bytes each op must read and write at least (inputs, outputs, gradients; no intermediates), against
the card's peak; attention reports TFLOP/s against the dense bf16 peak. ``eager`` is the plain-torch
twin in ``reference.py``, ``compile`` that twin under ``torch.compile``, ``liger`` Liger-Kernel's op
when it is installed and has one. A failing case is reported and the run goes on. The table is
followed by one JSON line holding every figure. Without a CUDA device it exits with a message.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from bench_common import randint, time_call
from bench_common import randn as _randn
from megatron_lite.kernels import reference

BF16 = 2  # bytes per element: every case runs in bf16, as in training

# name -> (matches device name, peak HBM TB/s, dense bf16 TFLOP/s), vendor datasheets. Order
# matters: "H100 NVL" and the PCIe card must not match the SXM entry.
CARDS: list[tuple[str, Callable[[str, int], bool], float | None, float | None]] = [
    ("H200", lambda n, gb: "H200" in n, 4.8, 989.0),
    ("H100 NVL", lambda n, gb: "H100 NVL" in n, None, None),
    ("H100 PCIe", lambda n, gb: "H100" in n and "PCIE" in n.upper(), 2.0, 756.0),
    ("H100 SXM", lambda n, gb: "H100" in n, 3.35, 989.0),
    ("A100 80GB", lambda n, gb: "A100" in n and gb > 50, 2.0, 312.0),
    ("A100 40GB", lambda n, gb: "A100" in n, 1.55, 312.0),
]


@dataclass
class Case:
    """One op at one shape: how to build inputs, the implementations, and the work per call."""

    op: str
    shape: str
    make: Callable[[], tuple[list[torch.Tensor], list[int]]]  # (inputs, indices that need grads)
    impls: dict[str, Callable | str]  # name -> function, or why there is none
    bytes_fwd: float = 0.0
    bytes_bwd: float = 0.0
    flops_fwd: float = 0.0  # attention only: backward counts 2.5x the forward


def _card() -> tuple[str, float | None, float | None]:
    name = torch.cuda.get_device_name()
    gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    for label, match, bw, flops in CARDS:
        if match(name, gb):
            return label, bw, flops
    return name, None, None


def _liger(name: str) -> Callable | str:
    try:
        import liger_kernel.transformers.functional as lf
    except Exception as e:  # an optional peer: absent or broken is reported, not fatal
        return f"Liger-Kernel not importable ({type(e).__name__})"
    return getattr(lf, name)


def _with_eps(fn: Callable | str, eps: float) -> Callable | str:
    """Liger's norms take eps last, with no default: give them the reference's (1e-6 RMS, 1e-5 layer)."""
    return fn if isinstance(fn, str) else (lambda *tensors: fn(*tensors, eps))


def _norm_cases(k) -> list[Case]:
    M, N = 16384, 4096  # 16K tokens (e.g. 4 x 4096) of a Llama-3-8B-wide hidden state
    act = M * N * BF16  # one activation-sized tensor; weights (N values) are negligible
    x_w = lambda: ([_randn(M, N), _randn(N)], [0, 1])  # noqa: E731
    x_w_r = lambda: ([_randn(M, N), _randn(N), _randn(M, N)], [0, 1, 2])  # noqa: E731
    x_w_b = lambda: ([_randn(M, N), _randn(N), _randn(N)], [0, 1, 2])  # noqa: E731
    plain = {"triton": k.rms_norm, "eager": reference.rms_norm, "liger": _with_eps(_liger("liger_rms_norm"), 1e-6)}
    fused = {
        "triton": lambda x, w, r: k.rms_norm(x, w, 1e-6, r),
        "eager": lambda x, w, r: reference.rms_norm(x, w, 1e-6, r),
        "liger": "Liger has no residual-fused RMSNorm",
    }
    ln = {"triton": k.layer_norm, "eager": reference.layer_norm, "liger": _with_eps(_liger("liger_layer_norm"), 1e-5)}
    return [
        # fwd: x -> y; bwd: x, dy -> dx
        Case("rms_norm", f"{M}x{N}", x_w, plain, bytes_fwd=2 * act, bytes_bwd=3 * act),
        # fwd: x, r -> y, h; bwd: h, dy, dh -> dx (the same tensor is the residual's gradient)
        Case("rms_norm+residual", f"{M}x{N}", x_w_r, fused, bytes_fwd=4 * act, bytes_bwd=4 * act),
        Case("layer_norm", f"{M}x{N}", x_w_b, ln, bytes_fwd=2 * act, bytes_bwd=3 * act),
    ]


def _elementwise_cases(k) -> list[Case]:
    M, F = 16384, 14336  # 16K tokens through Llama-3-8B's FFN width
    B, T, H, D = 4, 4096, 32, 128  # Llama-3-8B queries for 4 sequences of 4K
    inv_freq = 10000.0 ** (-torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D)
    theta = torch.outer(torch.arange(T, device="cuda", dtype=torch.float32), inv_freq)
    cos, sin = theta.cos(), theta.sin()
    swiglu = {"triton": k.swiglu, "eager": reference.swiglu, "liger": _liger("liger_swiglu")}
    rope = {
        "triton": lambda x: k.apply_rope(x, cos, sin),
        "eager": lambda x: reference.apply_rope(x, cos, sin),
        "liger": "Liger rotates q and k together in (B, H, T, D) layout: not comparable",
    }
    gate_up = lambda: ([_randn(M, F), _randn(M, F)], [0, 1])  # noqa: E731
    q = lambda: ([_randn(B, T, H, D)], [0])  # noqa: E731
    ffn, qkv = M * F * BF16, B * T * H * D * BF16
    return [
        # fwd: gate, up -> y; bwd: dy, gate, up -> dgate, dup
        Case("swiglu", f"{M}x{F}", gate_up, swiglu, bytes_fwd=3 * ffn, bytes_bwd=5 * ffn),
        # x -> y and dy -> dx; the (T, D/2) fp32 tables are 2 MB against 128 MB of activations
        Case("apply_rope", f"{B}x{T}x{H}x{D}", q, rope, bytes_fwd=2 * qkv, bytes_bwd=2 * qkv),
    ]


def _loss_and_attention_cases(k) -> list[Case]:
    N, V = 8192, 128256  # Llama-3 vocabulary; 8K tokens keep eager's fp32 copies (~15 GB) in memory
    B, H, T, D = 4, 32, 4096, 128
    liger_ce = _liger("liger_cross_entropy")
    ce = {"triton": k.cross_entropy, "eager": reference.cross_entropy, "liger": liger_ce}
    logits = lambda: ([_randn(N, V, scale=4.0), randint(V, N)], [0])  # noqa: E731
    attn = {"triton": k.flash_attention, "eager": reference.flash_attention, "liger": "Liger has no attention"}
    mha = lambda: ([_randn(B, H, T, D), _randn(B, H, T, D), _randn(B, H, T, D)], [0, 1, 2])  # noqa: E731
    gqa = lambda: ([_randn(B, H, T, D), _randn(B, 8, T, D), _randn(B, 8, T, D)], [0, 1, 2])  # noqa: E731
    full = {  # no mask: every tile is a full one and every program as long as the others
        name: (lambda q, k, v, f=f: f(q, k, v, causal=False)) if callable(f) else f for name, f in attn.items()
    }
    flops = 4 * B * H * T * T * D / 2  # QK^T and PV, 2*T*T*D flops each per head, half masked
    return [
        # fwd: logits -> loss; bwd: logits -> dlogits
        Case("cross_entropy", f"{N}x{V}", logits, ce, bytes_fwd=N * V * BF16, bytes_bwd=2 * N * V * BF16),
        Case("flash_attention", f"B{B} H{H} T{T} D{D} causal", mha, attn, flops_fwd=flops),
        Case("flash_attention_gqa", f"B{B} H{H} Hkv8 T{T} D{D} causal", gqa, attn, flops_fwd=flops),
        Case("flash_attention_full", f"B{B} H{H} T{T} D{D} not causal", mha, full, flops_fwd=2 * flops),
    ]


def _triton_ops():
    """The Triton implementations, imported only once a GPU is known to be there."""
    from types import SimpleNamespace

    from megatron_lite.kernels import (
        fused_attention,
        fused_cross_entropy,
        fused_layer_norm,
        fused_rms_norm,
        fused_rope,
        fused_swiglu,
    )  # fmt: skip

    return SimpleNamespace(
        rms_norm=fused_rms_norm.rms_norm, layer_norm=fused_layer_norm.layer_norm, swiglu=fused_swiglu.swiglu,
        apply_rope=fused_rope.apply_rope, cross_entropy=fused_cross_entropy.cross_entropy,
        flash_attention=fused_attention.flash_attention,
    )  # fmt: skip


def _measure(case: Case, impl: str, fn: Callable, backward: bool, peaks: tuple) -> dict:
    inputs, grad_idx = case.make()
    ms, timer = time_call(fn, inputs, grad_idx, backward)
    mode = "fwd+bwd" if backward else "fwd"
    row = {"op": case.op, "shape": case.shape, "mode": mode, "impl": impl, "ms": ms, "timer": timer}
    if case.flops_fwd:
        flops = case.flops_fwd * (3.5 if backward else 1.0)  # backward = 2.5x forward
        row["TFLOPs"] = flops / ms / 1e9
        row["frac_peak"] = row["TFLOPs"] / peaks[1] if peaks[1] else None
    else:
        nbytes = case.bytes_fwd + (case.bytes_bwd if backward else 0.0)
        row["GBps"] = nbytes / ms / 1e6
        row["frac_peak"] = row["GBps"] / (peaks[0] * 1000) if peaks[0] else None
    return row


def _run_case(case: Case, impls: list[str], peaks: tuple) -> tuple[list[dict], list[dict]]:
    rows, errors = [], []
    fns = dict(case.impls)
    if "compile" in impls and callable(fns.get("eager")):
        fns["compile"] = torch.compile(fns["eager"])
    for backward in (False, True):
        for impl in impls:
            fn = fns.get(impl, "not available")
            where = {"op": case.op, "mode": "fwd+bwd" if backward else "fwd", "impl": impl}
            if isinstance(fn, str):
                errors.append({**where, "error": fn})
                continue
            try:
                rows.append(_measure(case, impl, fn, backward, peaks))
                print(f"  {where['mode']:<8} {impl:<8} {rows[-1]['ms']:9.3f} ms ({rows[-1]['timer']})", flush=True)
            except Exception as e:  # one broken case must not end a run the lead does once
                errors.append({**where, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            torch.cuda.empty_cache()
    torch._dynamo.reset()
    return rows, errors


def _print_table(rows: list[dict], card: str, peaks: tuple) -> None:
    base = {(r["op"], r["mode"]): r["ms"] for r in rows if r["impl"] == "eager"}
    print(f"\n{card}: peak {peaks[0] or 'unknown'} TB/s, dense bf16 {peaks[1] or 'unknown'} TFLOP/s")
    print(f"{'op':<22}{'shape':<32}{'mode':<9}{'impl':<9}{'ms':>9}{'rate':>16}{'% peak':>8}{'vs eager':>9}  timer")
    for r in rows:
        rate = f"{r['TFLOPs']:.0f} TFLOP/s" if "TFLOPs" in r else f"{r['GBps']:.0f} GB/s"
        frac = f"{100 * r['frac_peak']:.0f}%" if r["frac_peak"] is not None else "n/a"
        eager = base.get((r["op"], r["mode"]))
        speed = f"{eager / r['ms']:.2f}x" if eager else "n/a"
        cells = f"{r['op']:<22}{r['shape']:<32}{r['mode']:<9}{r['impl']:<9}{r['ms']:>9.3f}{rate:>16}{frac:>8}"
        print(f"{cells}{speed:>9}  {r['timer']}")
    if peaks[0] is None:
        print(f"peak figures of '{card}' are unknown: fractions of peak are left out, not guessed")


def main(argv: list[str] | None = None) -> int:
    """Run the selected cases; print the table, then one JSON line with every figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    parser.add_argument("--impls", default="triton,eager,compile,liger", help="comma-separated implementations")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tools/bench/kernels.py: no CUDA device here; this benchmark needs an NVIDIA GPU.", file=sys.stderr)
        return 1
    import triton

    card, bw, flops = _card()
    k = _triton_ops()
    cases = _norm_cases(k) + _elementwise_cases(k) + _loss_and_attention_cases(k)
    wanted = {o for o in args.ops.split(",") if o}
    impls = [i for i in args.impls.split(",") if i]
    rows, errors = [], []
    for case in cases:
        if wanted and case.op not in wanted:
            continue
        print(f"benchmarking {case.op} {case.shape} ...", flush=True)
        r, e = _run_case(case, impls, (bw, flops))
        rows += r
        errors += e
    _print_table(rows, card, (bw, flops))
    for e in errors:
        print(f"not measured: {e['op']} {e['mode']} {e['impl']}: {e['error']}")
    versions = {"torch": torch.__version__, "triton": triton.__version__}
    summary = {"device": torch.cuda.get_device_name(), "card": card, "peak_TBps": bw, "peak_bf16_TFLOPs": flops}
    print(json.dumps({**summary, **versions, "results": rows, "errors": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
