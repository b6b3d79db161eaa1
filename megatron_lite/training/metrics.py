"""Model FLOPs, the device's peak, MFU, the run log's line for a logged step and its closing lines.

FLOPs are counted from the architecture, per token, as matmul multiply-adds x 2:
QKV (with grouped-query K/V), attention scores and values (causal: half of the T x T products,
the work a causal kernel actually does), output projection, MLP (3 matmuls for SwiGLU, 2 for GELU)
and the LM head. Training is 3x forward (backward = 2x). Recomputation is not counted: MFU is
model FLOPs utilisation, as in the PaLM paper.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import time
from collections import Counter
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_lite import jsontext
from megatron_lite.amounts import duration
from megatron_lite.config import ModelConfig, TrainConfig
from megatron_lite.data.preprocess_pool import allowed_cpus, usable_cpus

log = logging.getLogger(__name__)

# Dense (no sparsity) peak TFLOP/s by GPU name fragment: (bf16/fp16 tensor core, tf32, fp32).
# From NVIDIA's data sheets; matched against torch.cuda.get_device_name() in this order.
GPU_PEAK_TFLOPS = {
    "H200": (989.0, 494.0, 67.0),
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H100": (989.0, 494.0, 67.0),
    "GH200": (989.0, 494.0, 67.0),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.0, 183.0, 91.6),
    "A10G": (70.0, 35.0, 31.2),
    "RTX 4090": (165.0, 82.6, 82.6),
    "RTX 3090": (71.0, 35.6, 35.6),
    "V100": (125.0, 15.7, 15.7),
}


def flops_per_token(m: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward) of the model described by ``m``."""
    T = seq_len or m.seq_len
    hd = m.hidden // m.heads
    qkv = 2 * m.hidden * (m.heads + 2 * m.kv_heads) * hd
    attn = 2 * 2 * T * m.heads * hd * 0.5  # QK^T and AV, causal half
    proj = 2 * m.heads * hd * m.hidden
    mlp = (3 if m.activation == "swiglu" else 2) * 2 * m.hidden * m.ffn_hidden
    head = 2 * m.hidden * m.vocab_size
    return 3.0 * (m.layers * (qkv + attn + proj + mlp) + head)


def _cpu_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "megatron-lite" / "cpu_peak_v2.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_peak(seconds: float = 1.0, n: int = 1024, trials: int = 5) -> float:
    """Achievable fp32 matmul FLOP/s of this CPU at the current thread count: the best of
    ``trials`` timings, since anything else running can only make a trial slower."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up the BLAS thread pool
    best = 0.0
    for _ in range(trials):
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / trials:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def cpu_peak_flops() -> float:
    """The fp32 GEMM peak of every CPU this process may run on (a container's or taskset's share, not
    the host's: best of several trials), measured once per CPU model, CPU count and torch version, and
    cached on disk."""
    cores = usable_cpus()
    key = f"{_cpu_model()}|{cores} cores|torch {torch.__version__}"
    path = _cpu_cache_path()
    try:
        cached = jsontext.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return float(cached[key])
    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        peak = measure_cpu_peak()
    finally:
        torch.set_num_threads(threads)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**cached, key: peak}))
    except OSError as e:
        log.warning("could not cache the measured CPU peak at %s: %s", path, e)
    return peak


def cpu_share(mine: Collection[int], machine: Iterable[Collection[int]]) -> float:
    """The part of the CPUs ``mine`` that one rank has to itself, where the ranks of its machine (it
    among them) may run on the CPU sets ``machine``: each CPU split evenly among the ranks allowed on
    it. 1/n for n ranks that all see every CPU (torchrun, srun without CPU binding); 1 for ranks bound
    to CPUs of their own (srun's per-task cpusets, numactl per rank)."""
    ranks_on = Counter(cpu for cpus in machine for cpu in cpus)
    return sum(1 / ranks_on[cpu] for cpu in mine) / len(mine)


def local_cpu_share() -> float:
    """This rank's :func:`cpu_share` of the CPUs it may run on, among the ranks on its machine (those
    of its host name): one all-gather over the world, so every rank calls it. 1 in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 1.0
    mine, here = allowed_cpus(), socket.gethostname()
    everyone: list[tuple[str, list[int]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (here, sorted(mine)))
    return cpu_share(mine, [set(cpus) for host, cpus in everyone if host == here])


def peak_flops(device: torch.device, dtype: torch.dtype, share: float = 1.0) -> float | None:
    """Peak FLOP/s of one rank for MFU, or None (with a warning) for an unknown GPU: never a made-up
    number. On CPU: the peak of the CPUs this process may use, times ``share``, the part of them that
    is this rank's (:func:`local_cpu_share`), so ranks that share CPUs split their peak once."""
    if device.type == "cpu":
        return cpu_peak_flops() * share
    if device.type != "cuda":
        log.warning("no peak FLOP/s known for device type %s; MFU will not be reported", device.type)
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32, fp32) in GPU_PEAK_TFLOPS.items():
        if key in name:
            if dtype in (torch.bfloat16, torch.float16):
                return half * 1e12
            return (tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32) * 1e12
    log.warning("unknown GPU %r: no peak FLOP/s on record, MFU will not be reported", name)
    return None


class Throughput:
    """Tokens/s and MFU over the steps since the last report, and tokens/s over every step added
    (:meth:`mean_tokens_per_s`)."""

    def __init__(self, flops_per_tok: float, peak: float | None, world_size: int = 1) -> None:
        self.flops_per_tok, self.peak, self.world = flops_per_tok, peak, world_size
        self.tokens, self.seconds = 0, 0.0
        self.total_tokens, self.total_seconds = 0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.total_tokens += tokens
        self.total_seconds += seconds

    def mean_tokens_per_s(self) -> float:
        """Global tokens/s over every step added, whatever the reports since."""
        return self.total_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    def report(self) -> dict[str, float | None]:
        """``tokens_per_s`` (global) and ``mfu`` (per device), then reset."""
        tps = self.tokens / self.seconds if self.seconds > 0 else 0.0
        mfu = tps * self.flops_per_tok / (self.peak * self.world) if self.peak else None
        self.tokens, self.seconds = 0, 0.0
        return {"tokens_per_s": tps, "mfu": mfu}


def step_lines(record: dict[str, Any], steps: int, tokens_per_step: int) -> list[str]:
    """The run log's lines for one metrics row of a run of ``steps`` steps, one line each whether the
    log is a terminal or a job's file (``metrics.jsonl`` keeps every value in full), as Megatron's::

        step 10/300 | loss 7.8300 | lr 3.333e-04 | grad norm 2.497 | 1,429 tokens/s | MFU 27.1% | 1,433.3 ms/step
        step 10/300 | eval loss 7.5968

    MFU where the device's peak is known, the peak memory on CUDA and the skipped steps once there are
    any; ms/step is the train steps' own time since the last row, evaluations and saves aside."""
    head = f"step {record['step']}/{steps}"
    tps, mfu = record["tokens_per_s"], record["mfu"]
    parts = [head, f"loss {record['loss']:.4f}", f"lr {record['lr']:.3e}", f"grad norm {record['grad_norm']:.3f}"]
    parts.append(f"{tps:,.0f} tokens/s")
    if mfu is not None:
        parts.append(f"MFU {100 * mfu:.1f}%")
    if tps > 0:
        parts.append(f"{1000 * tokens_per_step / tps:,.1f} ms/step")
    if "max_memory_gb" in record:
        parts.append(f"max memory {record['max_memory_gb']:.2f} GiB")
    if record.get("skipped_steps"):
        parts.append(f"skipped steps {record['skipped_steps']}")
    lines = [" | ".join(parts)]
    if "eval_loss" in record:
        lines.append(f"{head} | eval loss {record['eval_loss']:.4f}")
    return lines


def nothing_to_train(step: int, steps: int) -> str:
    """The line of a launch whose checkpoint already reached ``train.steps``, with the ways on."""
    return (
        f"checkpoint step {step} >= train.steps {steps}: nothing to train; to train on, raise train.steps above "
        f"{step}; for a new run, give another log.dir"
    )


def closing_lines(
    t: TrainConfig,
    first_step: int,
    history: list[dict[str, Any]],
    preempted: bool,
    seconds: float,
    throughput: Throughput,
    checkpoint: str,
) -> list[str]:
    """Rank 0's last lines of a launch whose loop ran from step ``first_step`` to the step of its last
    row (``history``, which has the row of the step it stopped at): why it stopped before
    ``train.steps``, if it did, then one summary of the launch: ``seconds``, its wall time (setup
    included); tokens/s over its steps' own time (``throughput``), as each step line's; the last
    step's loss, the last evaluation's where it evaluated; the checkpoint it saved last::

        run summary: steps 1-300 of 300 (300 this launch) in 1h02m | 1,429 tokens/s | final loss 3.2100 | eval loss
        3.3012 (step 300) | checkpoint runs/x/checkpoints/step_00000300     (one line, cut here)
    """
    step, lines = history[-1]["step"], []
    if preempted:
        lines.append(f"stopped at step {step} on a preemption signal; the checkpoint is saved")
    elif step < t.steps:
        what = f"train.exit_after={t.exit_after} steps at step {step} of {t.steps}"
        lines.append(f"stopped after {what}; rerun with checkpoint.resume=auto to continue")
    parts = [
        f"steps {first_step + 1}-{step} of {t.steps} ({step - first_step} this launch) in {duration(seconds)}",
        f"{throughput.mean_tokens_per_s():,.0f} tokens/s",
        f"final loss {history[-1]['loss']:.4f}",
    ]
    if evaluated := [r for r in history if r.get("eval_loss") is not None]:
        parts.append(f"eval loss {evaluated[-1]['eval_loss']:.4f} (step {evaluated[-1]['step']})")
    lines.append("run summary: " + " | ".join([*parts, f"checkpoint {checkpoint}"]))
    return lines
