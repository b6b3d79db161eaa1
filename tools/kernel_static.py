"""Compile every Triton kernel for a GPU target on any machine (no GPU needed) and report what ptxas says.

    python tools/kernel_static.py                  # sm_90, the first tile of each attention tile list
    python tools/kernel_static.py --arch 80 --all-tiles
    python tools/kernel_static.py --only attn --json

Each launcher of ``kernels/fused_*.py`` is called on meta tensors of a Llama-3-8B-like step (``SHAPES``;
no memory, no device) with its kernels swapped for recorders, so arguments, constexprs and warps are the
launcher's own; autotuned kernels get their autotune configs. Triton's own binder specializes the
arguments as a launch would, and ``triton.compile`` builds for ``GPUTarget("cuda", arch, 32)`` with the
ptxas bundled in the Triton wheel. Its ``-v`` log gives registers, spills and advisories (such as C7515,
serialized wgmma); ``nvdisasm`` the SASS, whose innermost loops are counted by instruction class; the
TTIR, pointer offsets multiplied in 32 bits, which wrap past 2**31 elements (``ttir_offsets``). Run
it without ``TRITON_INTERPRET=1`` (the kernels would be interpreter functions). Triton 3.6 and 3.9 tested.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from types import ModuleType
from unittest import mock

import torch
from ttir_offsets import narrow_products

SHAPES = dict(batch=2, seq=4096, hidden=4096, ffn=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)
SM_COUNT = {80: 108, 90: 132}  # A100, H100 SXM: reduction_programs sizes the norms' backward grid by it
# Shared memory per program (opt-in maximum): pipeline_stages fits the norms' backward into it; a
# kernel asking for more compiles but fails at launch with OutOfResources.
MAX_SHARED = {80: 166912, 90: 232448}
WIDE = 8192  # fp32 rows this wide (or 16-bit rows twice as wide) fill shared memory at 3 rows a stage
# Text of ptxas's advisories C7510-C7515: wgmma.mma_async serialized (for register pressure, foreign
# writes to accumulators, ...): the wgmma pipeline the kernel meant to have is gone.
WGMMA_SERIALIZED = "wgmma.mma_async instructions are serialized"


@dataclass
class Launch:
    """One kernel launch as a launcher makes it: ``kernel[grid](*args, **kwargs)``."""

    name: str  # e.g. rms_norm_fwd+residual, attn_fwd
    kernel: object  # JITFunction or Autotuner
    args: tuple
    kwargs: dict


def toolchain(arch: int) -> dict[str, str]:
    """Paths of the ptxas Triton itself uses for ``arch`` and of nvdisasm; a clear error when missing."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return {"ptxas": get_ptxas(arch).path, "nvdisasm": knobs.nvidia.nvdisasm.path}
    except RuntimeError as e:  # knobs raise "Cannot find ptxas" when neither the wheel nor TRITON_*_PATH has it
        raise RuntimeError(
            f"{e}: this Triton wheel lacks its NVIDIA binaries (backends/nvidia/bin); point "
            "the matching TRITON_<TOOL>_PATH (e.g. TRITON_PTXAS_PATH) at a CUDA toolkit's"
        ) from None


def _modules() -> dict[str, ModuleType]:
    """The op files ``kernels/fused_*.py``, imported (compiled mode: the test suite may have set the interpreter)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: the kernels would be interpreter functions; unset it")
    import importlib

    import megatron_lite.kernels as package

    names = sorted(os.path.basename(p)[:-3] for d in package.__path__ for p in glob.glob(os.path.join(d, "fused_*.py")))
    return {name: importlib.import_module(f"{package.__name__}.{name}") for name in names}


def _kernels(module: ModuleType) -> dict[str, object]:
    return {k: v for k, v in vars(module).items() if k.startswith("_") and k.endswith("_kernel")}


def _record(modules: list[ModuleType], call: Callable[[], object], suffix: str) -> list[Launch]:
    """The kernel launches ``call`` makes, every kernel of ``modules`` replaced by a recorder."""
    launches: list[Launch] = []

    class Recorder:
        def __init__(self, name: str, kernel: object):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            label = self.name.strip("_").removesuffix("_kernel")
            return lambda *args, **kwargs: launches.append(Launch(label + suffix, self.kernel, args, kwargs))

    with ExitStack() as stack:
        for module in modules:
            for name, kernel in _kernels(module).items():
                stack.enter_context(mock.patch.object(module, name, Recorder(name, kernel)))
        call()
    return launches


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def launches(arch: int) -> list[Launch]:
    """Every launch the launchers make for one training step of ``SHAPES`` (bf16, causal attention)."""
    m, s = _modules(), SHAPES
    rows, n, hd = s["batch"] * s["seq"], s["hidden"], s["head_dim"]
    B, T, H, HKV = s["batch"], s["seq"], s["heads"], s["kv_heads"]
    x, w, stat = _meta(rows, n), _meta(n), _meta(rows, dtype=torch.float32)
    g, u = _meta(rows, 2 * s["ffn"]).chunk(2, dim=-1)  # halves of the fused gate/up projection, as in the model
    qkv = _meta(B, T, (H + 2 * HKV) * hd)  # rope rotates q as a view of it (B, T, H, D)
    q_view, cos = qkv[..., : H * hd].view(B, T, H, hd), _meta(T, hd // 2, dtype=torch.float32)
    q, k = _meta(B, T, H, hd).transpose(1, 2), _meta(B, T, HKV, hd).transpose(1, 2)  # as the model passes them
    o, lse = _meta(B, H, T, hd), _meta(B, H, T, dtype=torch.float32)
    logits, target = _meta(rows, s["vocab"]), _meta(rows, dtype=torch.int64)
    xw, ww = _meta(64, WIDE, dtype=torch.float32), _meta(WIDE, dtype=torch.float32)
    rms, ln, sw = m["fused_rms_norm"], m["fused_layer_norm"], m["fused_swiglu"]
    rope, ce, fa = m["fused_rope"], m["fused_cross_entropy"], m["fused_attention"]
    calls: list[tuple[str, Callable[[], object]]] = [
        ("", lambda: rms.rms_norm_fwd(x, w, 1e-6, None)),
        ("+residual", lambda: rms.rms_norm_fwd(x, w, 1e-6, x)),
        ("", lambda: rms.rms_norm_bwd(x, None, x, w, stat)),
        ("+residual", lambda: rms.rms_norm_bwd(x, x, x, w, stat)),
        ("+bias", lambda: ln.layer_norm_fwd(x, w, w, 1e-5)),
        ("+bias", lambda: ln.layer_norm_bwd(x, x, w, True, stat, stat)),
        ("+residual_fp32_wide", lambda: rms.rms_norm_bwd(xw, xw, xw, ww, stat[:64])),
        ("+bias_fp32_wide", lambda: ln.layer_norm_bwd(xw, xw, ww, True, stat[:64], stat[:64])),
        ("", lambda: sw.swiglu_fwd(g, u)),
        ("", lambda: sw.swiglu_bwd(x.new_empty(g.shape), g, u)),
        ("_fwd", lambda: rope.rope_rotate(q_view, cos, cos, inverse=False)),
        ("_bwd", lambda: rope.rope_rotate(o.transpose(1, 2), cos, cos, inverse=True)),
        ("", lambda: ce.ce_partials_fwd(logits, target, 0, -100)),
        ("", lambda: ce.ce_bwd(logits, target, 0, -100, stat, stat, stat)),
        ("", lambda: fa.attention_fwd(q, k, k, causal=True)),
        ("", lambda: fa.attention_bwd(o, q, k, k, o, lse, causal=True)),
    ]
    with ExitStack() as stack:
        # reduction_programs and pipeline_stages ask the device for its SMs and shared memory: answer for the target.
        common = "megatron_lite.kernels._common"
        stack.enter_context(mock.patch(f"{common}._sm_count", lambda i: SM_COUNT.get(arch, 132)))
        stack.enter_context(mock.patch(f"{common}._max_shared_memory", lambda i: MAX_SHARED.get(arch, 232448)))
        cuda = torch.device("cuda", 0)
        for mod in m.values():  # the launchers ask these of their (meta) tensors' device: ask for a GPU's
            if real := getattr(mod, "reduction_programs", None):
                stack.enter_context(mock.patch.object(mod, "reduction_programs", lambda r, d, f=real: f(r, cuda)))
            if real := getattr(mod, "pipeline_stages", None):
                stack.enter_context(mock.patch.object(mod, "pipeline_stages", lambda b, d, f=real: f(b, cuda)))
        return [launch for suffix, call in calls for launch in _record(list(m.values()), call, suffix)]


def uncovered() -> list[str]:
    """``*_kernel`` functions of the op files that no launch above reaches (this tool needs a case for them)."""
    seen = {id(launch.kernel) for launch in launches(90)}
    found = {id(v): f"{op}.{k}" for op, mod in _modules().items() for k, v in _kernels(mod).items()}
    return sorted(name for key, name in found.items() if key not in seen)


def variants(launch: Launch, all_tiles: bool) -> list[tuple[str, object, dict, Callable[[], None]]]:
    """(tile, JITFunction, launch kwargs, prepare) per config: an autotuned kernel's first, or every, config.

    ``prepare`` runs the config's pre-hook (e.g. sizing tensor descriptors' blocks) right before compiling."""
    kernel = launch.kernel
    if not hasattr(kernel, "configs"):
        return [("", kernel, launch.kwargs, lambda: None)]
    out = []
    for cfg in kernel.configs if all_tiles else kernel.configs[:1]:
        kwargs = {**launch.kwargs, **cfg.all_kwargs()}
        nargs = {**dict(zip(kernel.arg_names, launch.args)), **kwargs}
        prepare = (lambda c=cfg, a=nargs: c.pre_hook(a)) if cfg.pre_hook else (lambda: None)
        out.append(("x".join(str(v) for v in cfg.kwargs.values()) + " ", kernel.fn, kwargs, prepare))
    return out


def compile_one(fn, args: tuple, kwargs: dict, arch: int) -> tuple[object, str]:
    """(compiled kernel, ptxas -v log): specialized by Triton's own binder, as a real launch would be.

    The binder and ``_pack_args`` are what ``JITFunction.run`` calls (private, the same in 3.6 and 3.9):
    pointer alignment, ints divisible by 16 or equal to 1 become the same attributes and constants."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    log = io.StringIO()
    # Compile afresh (ptxas prints its log only when it runs) into a throw-away cache.
    with tempfile.TemporaryDirectory() as cache, ExitStack() as stack:
        for scope in (knobs.cache, knobs.compilation, knobs.nvidia):
            stack.enter_context(scope.scope())
        knobs.cache.dir, knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = cache, True, True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)  # fmt: skip
    return compiled, log.getvalue()


def parse_ptxas(log: str) -> dict:
    """Registers, spill bytes and advisories (lines with a ptxas message code, or warnings) of a -v log."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    advisories = [re.sub(r"^ptxas\S*\s+(info|warning)\s*:\s*", "", line).strip() for line in log.splitlines()
                  if re.search(r"\(C\d{4}\)|warning", line)]  # fmt: skip
    stores, loads = (int(spill.group(1)), int(spill.group(2))) if spill else (None, None)
    return {"registers": int(regs.group(1)) if regs else None, "spill_stores": stores, "spill_loads": loads,
            "advisories": advisories}  # fmt: skip


_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(?:.*`\((\.L_x_\d+)\))?")
_LABEL = re.compile(r"^(\.L_x_\d+):")
# Spin-waits (on an mbarrier for TMA or wgmma, on setmaxnreg) are not hot loops.
_WAIT = {"SYNCS", "BRA", "NANOSLEEP", "YIELD", "NOP", "USETMAXREG", "PLOP3"}


def _blocks(sass: str) -> tuple[list[list[str]], list[set[int]]]:
    """Basic blocks of nvdisasm output (opcode classes) and their successors."""
    code, labels = [], {}
    for line in sass.splitlines():
        if label := _LABEL.match(line):
            labels[label.group(1)] = len(code)
        elif m := _INSTR.search(line):
            code.append((m.group(2), bool(m.group(1)), m.group(3)))
    starts = sorted({0, *labels.values(), *(i + 1 for i, (op, _, t) in enumerate(code) if t or op == "EXIT")})
    starts = [i for i in starts if i < len(code)]
    block_of = {start: n for n, start in enumerate(starts)}
    blocks, succs = [], []
    for n, (a, b) in enumerate(zip(starts, [*starts[1:], len(code)])):
        op, predicated, target = code[b - 1]
        blocks.append([c[0] for c in code[a:b]])
        ends = target is not None and op == "BRA" and not predicated or op == "EXIT" and not predicated
        succs.append({block_of[labels[target]]} if target in labels else set())
        if not ends and n + 1 < len(starts):
            succs[-1].add(n + 1)
    return blocks, succs


def sass_loops(sass: str) -> list[dict]:
    """Innermost natural loops of nvdisasm output, largest first: instructions and count per class.

    A back edge jumps to a block that dominates its source: an out-of-line retry path that jumps back
    into the code is not a loop. Spin-waits (only SYNCS / BRA) are skipped, inside a loop too.
    """
    blocks, succs = _blocks(sass)
    reach, work = {0}, [0]
    while work:
        new = succs[work.pop()] - reach
        reach |= new
        work += new
    preds = {n: {p for p in reach if n in succs[p]} for n in reach}
    dom = {n: ({0} if n == 0 else set(reach)) for n in reach}
    changed = True
    while changed:  # iterative dominators
        changed = False
        for n in sorted(reach - {0}):
            new = {n} | set.intersection(*(dom[p] for p in preds[n]))
            changed, dom[n] = changed or new != dom[n], new
    loops: dict[int, set[int]] = {}
    for tail, head in ((n, h) for n in reach for h in succs[n] if h in dom[n]):
        body, work = loops.setdefault(head, {head}), [tail]
        while work:
            if (n := work.pop()) not in body:
                body.add(n)
                work += preds[n]
    hot = {h: b for h, b in loops.items() if any(set(blocks[n]) - _WAIT for n in b)}
    inner = [b for h, b in hot.items() if not any(o != h and o in b for o in hot)]
    counts = sorted((collections.Counter(op for n in b for op in blocks[n]) for b in inner), key=lambda c: -c.total())
    return [{"instructions": c.total(), "classes": dict(c.most_common())} for c in counts]


def analyse(arch: int, all_tiles: bool = False, only: str | None = None) -> list[dict]:
    """One report row per kernel config: registers, spills, shared memory, advisories, hot loops, int32 offset
    products (or error)."""
    nvdisasm = toolchain(arch)["nvdisasm"]
    rows = []
    for launch in launches(arch):
        if only and only not in launch.name:
            continue
        for tile, fn, kwargs, prepare in variants(launch, all_tiles):
            start, row = time.perf_counter(), {"kernel": launch.name, "config": tile.strip() or "-", "arch": arch}
            try:
                prepare()
                compiled, log = compile_one(fn, launch.args, kwargs, arch)
            except Exception as e:  # a kernel that fails to compile is reported, and the others still run
                rows.append({**row, "error": f"{type(e).__name__}: {e}"[:2000]})
                continue
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
            row["config"] = f"{tile}w{compiled.metadata.num_warps} s{compiled.metadata.num_stages}"
            rows.append({**row, **parse_ptxas(log), "shared": compiled.metadata.shared, "loops": sass_loops(sass),
                         "warps": compiled.metadata.num_warps, "i32_offsets": narrow_products(compiled.asm["ttir"]),
                         "compile_s": round(time.perf_counter() - start, 2)})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    """Human-readable report: a line per config and per further innermost loop, advisories beneath."""
    head = f"{'kernel':<36}{'config':<16}{'regs':>5}{'spill st/ld':>12}{'smem KB':>8}  innermost loops: instrs, classes"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernel']:<36}{r['config']:<16}FAILED: {r['error'].splitlines()[0]}")
            continue
        loops = [
            f"{lp['instructions']:>4}: " + " ".join(f"{op} {n}" for op, n in list(lp["classes"].items())[:6])
            for lp in r["loops"]
        ]
        spills = f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(f"{r['kernel']:<36}{r['config']:<16}{r['registers']:>5}{spills:>12}"
                     f"{r['shared'] / 1024:>8.1f}  {loops[0] if loops else '-'}")  # fmt: skip
        lines += [" " * 79 + loop for loop in loops[1:]]
        lines += [f"{'':<4}! {adv}" for adv in r["advisories"]]
        lines += [
            f"{'':<4}! pointer offset multiplied in int32 (wraps past 2**31 elements) at {at}"
            for at in r["i32_offsets"]
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 (H100), 80 (A100)")
    parser.add_argument("--all-tiles", action="store_true", help="every autotune config, not only the first")
    parser.add_argument("--only", help="kernels whose name contains this string")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args(argv)
    import triton

    rows = analyse(args.arch, args.all_tiles, args.only)
    missing = uncovered()
    if args.json:
        print(json.dumps({"arch": args.arch, "triton": triton.__version__, "uncovered": missing, "kernels": rows}))
    else:
        print(f"sm_{args.arch}, Triton {triton.__version__}, ptxas {toolchain(args.arch)['ptxas']}\n{table(rows)}")
        if missing:
            print(f"not covered by this tool: {', '.join(missing)}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
