"""Measure the Triton kernels' tuning knobs on one GPU, so each default is a measured choice.

    python tools/bench/kernel_sweep.py [--parts norms,attention]

- norms: the backward's programs per SM (``_common.PROGRAMS_PER_SM``) x its row loop's pipelining
  depth (``_common.BWD_STAGES``) x its warps (``_common.BWD_WARPS``, None: the row's default), for
  rms_norm, rms_norm + residual and layer_norm, fwd+bwd;
- streaming: the block and warps of the one-pass kernels, fwd and fwd+bwd: SwiGLU's values per program
  (``fused_swiglu._BLOCK_N``) x ``_WARPS``, cross-entropy's vocabulary chunk (``fused_cross_entropy._BLOCK_V``)
  x ``_WARPS``;
- attention: every candidate tile (BLOCK_M, BLOCK_N, warps, stages) of the three autotuned kernels,
  timed by Triton's autotuner itself (causal), then the forward's tiles without the causal mask; each
  kernel's timings are printed fastest first, each causal forward tile with its largest difference from
  SDPA (``max_err``).

Shapes and byte counts are the kernels benchmark's (``tools/bench/kernels.py``), bf16. Each row gives
the median time (CUDA-graph replay) and the achieved bandwidth; the last line is JSON with every row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
from bench_common import randn as _randn
from bench_common import time_call

BF16 = 2
NORM_ROWS, NORM_COLS = 16384, 4096
SWIGLU_ROWS, SWIGLU_COLS = 16384, 14336
CE_ROWS, CE_VOCAB = 8192, 128256
ATTN = (4, 32, 4096, 128)  # B, H, T, D

FWD_TILES = [(64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
             (128, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 1), (64, 32, 4, 2), (64, 128, 4, 2), (64, 128, 4, 1),
             (64, 32, 4, 1)]  # fmt: skip
BWD_TILES = [(32, 128, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3),
             (64, 64, 8, 2), (32, 64, 4, 3), (32, 32, 4, 2)]  # fmt: skip


def _row(part: str, setting: dict, mode: str, ms: float, nbytes: float) -> dict:
    row = {"part": part, **setting, "mode": mode, "ms": round(ms, 4), "GBps": round(nbytes / ms / 1e6)}
    print(json.dumps(row), flush=True)
    return row


def sweep_norms() -> list[dict]:
    from megatron_lite.kernels import _common, fused_layer_norm, fused_rms_norm

    m, n = NORM_ROWS, NORM_COLS
    act = m * n * BF16
    ops = {  # name -> (function, inputs, indices needing grads, fwd+bwd bytes as in kernels.py)
        "rms_norm": (fused_rms_norm.rms_norm, lambda: [_randn(m, n), _randn(n)], [0, 1], 5 * act),
        "rms_norm+residual": (lambda x, w, r: fused_rms_norm.rms_norm(x, w, 1e-6, r),
                              lambda: [_randn(m, n), _randn(n), _randn(m, n)], [0, 1, 2], 8 * act),
        "layer_norm": (fused_layer_norm.layer_norm, lambda: [_randn(m, n), _randn(n), _randn(n)], [0, 1, 2], 5 * act),
    }  # fmt: skip
    rows = []
    knobs = itertools.product((1, 2, 4), (3, 4), (None, 8, 16))  # programs per SM, stages, warps
    for (name, (fn, make, grad_idx, nbytes)), (per_sm, stages, warps) in itertools.product(ops.items(), list(knobs)):
        _common.PROGRAMS_PER_SM, _common.BWD_WARPS, _common.BWD_STAGES = per_sm, warps, stages
        ms, _ = time_call(fn, make(), grad_idx, backward=True)
        setting = {"programs_per_sm": per_sm, "stages": stages, "warps": warps}
        rows.append(_row(name, setting, "fwd+bwd", ms, nbytes))
        torch.cuda.empty_cache()
    return rows


def sweep_streaming() -> list[dict]:
    from bench_common import randint
    from megatron_lite.kernels import fused_cross_entropy, fused_swiglu

    ffn, logits = SWIGLU_ROWS * SWIGLU_COLS * BF16, CE_ROWS * CE_VOCAB * BF16
    swiglu_in = lambda: [_randn(SWIGLU_ROWS, SWIGLU_COLS), _randn(SWIGLU_ROWS, SWIGLU_COLS)]  # noqa: E731
    ce_in = lambda: [_randn(CE_ROWS, CE_VOCAB, scale=4.0), randint(CE_VOCAB, CE_ROWS)]  # noqa: E731
    # name -> (module, its block constant, blocks, inputs, grad indices, fwd and fwd+bwd bytes as in kernels.py)
    ops = {
        "swiglu": (fused_swiglu, "_BLOCK_N", (1024, 2048, 4096, 8192), swiglu_in, [0, 1], 3 * ffn, 8 * ffn),
        "cross_entropy": (fused_cross_entropy, "_BLOCK_V", (2048, 4096, 8192), ce_in, [0], logits, 3 * logits),
    }
    rows = []
    for name, (module, constant, blocks, make, grad_idx, fwd_bytes, both_bytes) in ops.items():
        fn = getattr(module, name)  # fused_swiglu.swiglu, fused_cross_entropy.cross_entropy
        default = getattr(module, constant), module._WARPS
        try:
            for block, warps in itertools.product(blocks, (4, 8, 16)):
                setattr(module, constant, block)
                module._WARPS = warps
                for backward, mode, nbytes in ((False, "fwd", fwd_bytes), (True, "fwd+bwd", both_bytes)):
                    setting = {"block": block, "warps": warps}
                    try:
                        ms, _ = time_call(fn, make(), grad_idx, backward=backward)
                    except Exception as e:  # a setting the compiler or the GPU refuses: reported, the sweep goes on
                        rows.append({"part": name, **setting, "mode": mode, "error": f"{type(e).__name__}: {e}"[:200]})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    rows.append(_row(name, setting, mode, ms, nbytes))
                torch.cuda.empty_cache()
        finally:
            setattr(module, constant, default[0])
            module._WARPS = default[1]
    return rows


def _use_tiles(kernel, tiles: list[tuple[int, int, int, int]]) -> None:
    """Make ``tiles`` the autotuned ``kernel``'s candidates (its pre-hook sizes the descriptors' blocks)."""
    from megatron_lite.kernels._attention_common import configs

    kernel.configs, kernel.cache = configs(tiles, kernel.configs[0].pre_hook), {}


def _autotune_rows(part: str, kernel, errors: dict[str, float] | None = None) -> list[dict]:
    """One row per candidate the autotuner timed, fastest first (with its max_err when ``errors``)."""
    rows = []
    timings = getattr(kernel, "configs_timings", None) or {}
    for config, ms in sorted(timings.items(), key=lambda kv: kv[1]):
        ms = ms[0] if isinstance(ms, list | tuple) else ms
        tile = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
        rows.append({"part": part, **tile, "ms": round(float(ms), 4)})
        if errors is not None:
            rows[-1]["max_err"] = errors.get(str(config))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def sweep_attention() -> list[dict]:
    from megatron_lite.kernels import fused_attention as fa
    from megatron_lite.kernels import fused_attention_bwd as fb

    kernels = {"fwd": (fa._attn_fwd_kernel, FWD_TILES), "dkdv": (fb._attn_bwd_dkdv_kernel, BWD_TILES),
               "dq": (fb._attn_bwd_dq_kernel, BWD_TILES)}  # fmt: skip
    for kernel, tiles in kernels.values():
        _use_tiles(kernel, tiles)
    b, h, t, d = ATTN
    q, k, v = (_randn(b, h, t, d).requires_grad_() for _ in range(3))
    fa.flash_attention(q, k, v, causal=True).backward(_randn(b, h, t, d))
    torch.cuda.synchronize()
    errors = _forward_errors(fa, fa._attn_fwd_kernel, q.detach(), k.detach(), v.detach())
    rows = [row for name, (kernel, _) in kernels.items()
            for row in _autotune_rows(f"attention_{name}", kernel, errors if name == "fwd" else None)]  # fmt: skip
    # The unmasked forward (kernels.py's flash_attention_full): the same tiles, autotuned afresh.
    _use_tiles(fa._attn_fwd_kernel, FWD_TILES)
    with torch.no_grad():
        fa.flash_attention(q, k, v, causal=False)
    torch.cuda.synchronize()
    return rows + _autotune_rows("attention_fwd_not_causal", fa._attn_fwd_kernel)


def _forward_errors(fa, kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """Max |output - SDPA| of the forward with each of ``kernel``'s configs forced: the timings say
    which tile is fastest, this that each computes attention."""
    from megatron_lite.kernels import reference

    every = kernel.configs
    expected = reference.flash_attention(q, k, v, True).float()
    errors = {}
    try:
        for config in every:
            kernel.configs, kernel.cache = [config], {}
            errors[str(config)] = (fa.flash_attention(q, k, v, causal=True).float() - expected).abs().max().item()
    finally:
        kernel.configs, kernel.cache = every, {}
    return errors


PARTS = {"norms": sweep_norms, "streaming": sweep_streaming, "attention": sweep_attention}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts; a part that fails is reported and the others still run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tools/bench/kernel_sweep.py: no CUDA device here; this sweep needs an NVIDIA GPU.", file=sys.stderr)
        return 1
    rows, errors = [], []
    for part in args.parts.split(","):
        print(f"sweeping {part} ...", flush=True)
        try:
            rows += PARTS[part]()
        except Exception as e:  # report and go on: the run is one short lease of a GPU
            errors.append({"part": part, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"{part} failed: {errors[-1]['error']}", flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                      "errors": errors}))  # fmt: skip
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
