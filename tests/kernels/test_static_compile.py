"""Every Triton kernel compiles for sm_90 and sm_80 on this machine, without spills, serialized wgmma or
pointer offsets multiplied in int32.

``tools/kernel_static.py`` compiles each kernel as its launcher would launch it (default config: the
first tile of each attention autotune list) with the ptxas bundled in the Triton wheel; no GPU is
needed. Register spills cost local-memory traffic in the hot loop, and ptxas's advisories C7510-C7515 mean
the wgmma pipeline of an attention kernel was serialized: both are silent slowdowns that the
numerical tests in this directory cannot see. An int32 ``row * stride`` wraps past 2**31 elements (a
bf16 logits tensor of 32768 x 128256 holds 4.2e9), which no tensor these tests can allocate reaches:
the compiled TTIR shows it at any size (``tools/ttir_offsets.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import megatron_lite

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import kernel_static  # noqa: E402

ARCHS = (90, 80)
KERNELS = {
    "rms_norm_fwd", "rms_norm_fwd+residual", "rms_norm_bwd", "rms_norm_bwd+residual",
    "layer_norm_fwd+bias", "layer_norm_bwd+bias", "swiglu_fwd", "swiglu_bwd", "rope_fwd", "rope_bwd",
    "ce_fwd", "ce_bwd", "attn_fwd", "attn_bwd_delta", "attn_bwd_dkdv", "attn_bwd_dq",
    "rms_norm_bwd+residual_fp32_wide", "layer_norm_bwd+bias_fp32_wide",
}  # fmt: skip
# Default configs that spill today, by arch: before Hopper the attention kernels' tensor descriptors
# lower to per-element masked loads (no cp.async) and spill (Triton 3.6, bytes stored/loaded: attn_fwd
# 64x64 w4 14904/16016). flash_attention never launches them there:
# it runs SDPA before compute capability 9.0 (unsupported_reason). Kept exact, so that a fix (or a new
# spill) shows here.
KNOWN_SPILLS = {80: {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"}}


@pytest.fixture(scope="module")
def reports() -> dict[int, dict]:
    """The tool's JSON report per arch, both arches compiled at once in fresh interpreters.

    Not in this process: conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA before any op
    file is imported, and the whole suite shares one process, so here the kernels (and Triton's own
    jit helpers) are interpreter functions, which cannot be compiled (and the launchers' constants,
    such as cross-entropy's block, are the interpreter's). A subprocess without the variable imports
    them compiled, from the same megatron_lite as this process.
    """
    for arch in ARCHS:
        kernel_static.toolchain(arch)  # a Triton wheel without its bundled ptxas fails here, saying so
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(megatron_lite.__file__).parents[1]), env.get("PYTHONPATH", "")])
    tool = str(ROOT / "tools" / "kernel_static.py")
    procs = {
        arch: subprocess.Popen([sys.executable, tool, "--arch", str(arch), "--json"], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for arch in ARCHS
    }  # fmt: skip
    out = {}
    try:
        for arch, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            assert stdout, f"kernel_static.py --arch {arch} printed nothing (exit {proc.returncode}):\n{stderr[-4000:]}"
            out[arch] = json.loads(stdout)
    finally:
        for proc in procs.values():
            proc.kill()  # only a hung one is still running
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(reports: dict[int, dict], arch: int) -> None:
    report = reports[arch]
    assert report["uncovered"] == [], "kernels the tool never launches: add a case to kernel_static.launches"
    assert {r["kernel"] for r in report["kernels"]} == KERNELS
    failed = {f"{r['kernel']} {r['config']}": r["error"] for r in report["kernels"] if "error" in r}
    assert not failed, f"sm_{arch}: kernels that do not compile: {failed}"
    unread = [r["kernel"] for r in report["kernels"] if "error" not in r and r["spill_stores"] is None]
    assert not unread, f"sm_{arch}: no ptxas -v figures for {unread}"


@pytest.mark.parametrize("arch", ARCHS)
def test_default_configs_do_not_spill(reports: dict[int, dict], arch: int) -> None:
    rows = [r for r in reports[arch]["kernels"] if "error" not in r]
    spilling = {r["kernel"]: (r["config"], r["spill_stores"], r["spill_loads"]) for r in rows
                if r["spill_stores"] or r["spill_loads"]}  # fmt: skip
    expected = KNOWN_SPILLS.get(arch, set())
    assert set(spilling) == expected, f"sm_{arch} spills (config, store/load bytes): {spilling}; known: {expected}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_fits_shared_memory(reports: dict[int, dict], arch: int) -> None:
    """A kernel that asks for more shared memory than a program may have compiles, then fails at launch
    (OutOfResources). The fp32 *_wide cases are where the norms' pipelined backward would overflow."""
    limit = kernel_static.MAX_SHARED[arch]
    over = {f"{r['kernel']} {r['config']}": r["shared"] for r in reports[arch]["kernels"]
            if "error" not in r and r["shared"] > limit}  # fmt: skip
    assert not over, f"sm_{arch}: shared memory (bytes) over the {limit} a program may use: {over}"


@pytest.mark.parametrize("arch", ARCHS)
def test_pointer_offsets_are_not_int32_products(reports: dict[int, dict], arch: int) -> None:
    rows = [r for r in reports[arch]["kernels"] if "error" not in r]
    narrow = {r["kernel"]: r["i32_offsets"] for r in rows if r["i32_offsets"]}
    assert not narrow, f"sm_{arch}: int32 products in pointer offsets (cast a factor .to(tl.int64)): {narrow}"


# A row kernel as Triton 3.6/3.7 lowers it: the row offset is pid x stride, in int32 at line 7 and in int64
# at line 9 (its factors widened first); the column block's pid x 1024 is a multiple of a constant.
_TTIR = """
module {
  tt.func public @k(%X: !tt.ptr<bf16> loc("X"(#loc)), %stride: i32 loc("stride"(#loc))) {
    %c1024_i32 = arith.constant 1024 : i32 loc(#loc1)
    %pid = tt.get_program_id x : i32 loc(#loc2)
    %cols = tt.make_range {end = 1024 : i32, start = 0 : i32} : tensor<1024xi32> loc(#loc3)
    %off = arith.muli %pid, %stride : i32 loc(#loc4)
    %row = tt.addptr %X, %off : !tt.ptr<bf16>, i32 loc(#loc4)
    %pid64 = arith.extsi %pid : i32 to i64 loc(#loc5)
    %stride64 = arith.extsi %stride : i32 to i64 loc(#loc5)
    %off64 = arith.muli %pid64, %stride64 : i64 loc(#loc5)
    %row64 = tt.addptr %X, %off64 : !tt.ptr<bf16>, i64 loc(#loc6)
    %blk = arith.muli %pid, %c1024_i32 : i32 loc(#loc7)
    %blks = tt.splat %blk : i32 -> tensor<1024xi32> loc(#loc7)
    %c = arith.addi %blks, %cols : tensor<1024xi32> loc(#loc7)
    %ptrs = tt.splat %row64 : !tt.ptr<bf16> -> tensor<1024x!tt.ptr<bf16>> loc(#loc7)
    %p = tt.addptr %ptrs, %c : tensor<1024x!tt.ptr<bf16>>, tensor<1024xi32> loc(#loc7)
    %wide = arith.muli %pid, %stride : i32 loc(#loc8)
    %wide64 = arith.extsi %wide : i32 to i64 loc(#loc8)
    %q = tt.addptr %X, %wide64 : !tt.ptr<bf16>, i64 loc(#loc9)
    tt.return loc(#loc)
  } loc(#loc)
} loc(#loc)
#loc = loc("k.py":1:0)
#loc1 = loc("k.py":3:0)
#loc2 = loc("k.py":4:0)
#loc3 = loc("k.py":5:0)
#loc4 = loc("k.py":7:0)
#loc5 = loc("k.py":9:0)
#loc6 = loc("row"(#loc5))
#loc7 = loc("k.py":11:0)
#loc10 = loc("k.py":13:0)
#loc8 = loc(callsite(#loc10 at #loc7))
#loc9 = loc("k.py":14:0)
"""


def test_ttir_offsets_finds_int32_products_of_runtime_values() -> None:
    """Reported: pid x stride in int32, whether used as is (line 7) or widened after the multiply (line 13,
    inside an inlined helper); not: the product of widened factors (9) or a multiple of a constant (11)."""
    from ttir_offsets import narrow_products

    assert narrow_products(_TTIR) == ["k.py:13", "k.py:7"]


def test_attention_wgmma_not_serialized(reports: dict[int, dict]) -> None:
    rows = [r for r in reports[90]["kernels"] if r["kernel"].startswith("attn") and "error" not in r]
    assert rows
    text = kernel_static.WGMMA_SERIALIZED
    serialized = {r["kernel"]: r["advisories"] for r in rows if any(text in a for a in r["advisories"])}
    assert not serialized, f"ptxas serialized wgmma (sm_90): {serialized}"


def test_ptxas_log_parsing_catches_serialized_wgmma_and_spills() -> None:
    """The checks above read these fields: a log that reports a problem must show it (ptxas 12.8 wording)."""
    log = (
        "ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
        "insufficient register resources for the function '_attn_fwd_kernel'\n"
        "ptxas info    : Function properties for _attn_fwd_kernel\n"
        "    1000 bytes stack frame, 4720 bytes spill stores, 4464 bytes spill loads\n"
        "ptxas info    : Used 128 registers, used 1 barriers, 1000 bytes cumulative stack size\n"
    )
    parsed = kernel_static.parse_ptxas(log)
    assert (parsed["registers"], parsed["spill_stores"], parsed["spill_loads"]) == (128, 4720, 4464)
    assert len(parsed["advisories"]) == 1 and kernel_static.WGMMA_SERIALIZED in parsed["advisories"][0]
