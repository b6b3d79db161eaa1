"""The training path on a CUDA device: the CPU suite's checks, repeated where only a GPU can run them.

Skipped (with the reason) on machines without CUDA; `tools/gpu_check.sh` runs them on a GPU machine.
Tolerances: fp32 on the GPU against fp32 on the CPU differ only in GEMM and reduction order (and
CUDA's atomic embedding-gradient adds): rel 1e-4 over a few steps, ~100x the usual differences.
bf16 runs compare the Triton kernels with the torch twins at rel 2e-2: both round activations to
bf16 (8 bits of mantissa, ~4e-3 relative per rounding) at different points of the fused ops.
"""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (tools/gpu_check.sh runs these on a GPU machine)", allow_module_level=True)

from megatron_lite.config import load_config  # noqa: E402
from megatron_lite.data.corpus import prepare_default_corpus  # noqa: E402
from megatron_lite.training.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.gpu
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> list[str]:
    files = [STDLIB / n for n in ("textwrap.py", "shlex.py", "fractions.py", "heapq.py")]
    prefix, tok = prepare_default_corpus(tmp_path_factory.mktemp("corpus"), 512, progress=False, files=files)
    return [
        f"data.path={prefix}",
        f"data.tokenizer={tok}",
        "model.layers=2",
        "model.hidden=128",
        "model.heads=4",
        "model.kv_heads=2",
        "model.ffn_hidden=256",
        "model.seq_len=64",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "train.steps=6",
        "optim.warmup=1",
        "optim.lr=3e-3",
        "log.every=1",
        "log.progress=false",
        "data.valid_fraction=0",
        "checkpoint.resume=none",
    ]


def losses(base: list[str], run_dir: Path, *extra: str) -> list[float]:
    cfg = load_config(None, [*base, f"log.dir={run_dir}", *extra])
    return [r["loss"] for r in Trainer(cfg).fit()]


def test_fp32_on_cuda_matches_cpu(base, tmp_path):
    cpu = losses(base, tmp_path / "cpu", "train.device=cpu", "train.dtype=fp32")
    for backend in ("torch", "triton"):
        gpu = losses(base, tmp_path / backend, "train.device=cuda", "train.dtype=fp32", f"kernels.backend={backend}")
        assert gpu == pytest.approx(cpu, rel=1e-4), (backend, gpu, cpu)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_triton_matches_torch_kernels(base, tmp_path, dtype):
    ref = losses(base, tmp_path / "torch", "train.device=cuda", f"train.dtype={dtype}", "kernels.backend=torch")
    fused = losses(base, tmp_path / "triton", "train.device=cuda", f"train.dtype={dtype}", "kernels.backend=triton")
    assert fused == pytest.approx(ref, rel=2e-2), (fused, ref)
    assert fused[-1] < fused[0] - 0.5, fused  # it trains: six steps at lr 3e-3 drop the loss by > 1


def test_resume_on_cuda_continues_the_run(base, tmp_path):
    ckpt = [f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every=3", "train.device=cuda", "train.dtype=fp32"]
    straight = losses(base, tmp_path / "straight", "train.device=cuda", "train.dtype=fp32")
    first = losses(base, tmp_path / "a", *ckpt, "train.exit_after=3")
    rest = losses(base, tmp_path / "b", *ckpt, "checkpoint.resume=auto")
    assert len(first) == 3 and len(rest) == 3
    assert first + rest == pytest.approx(straight, rel=1e-4)


def test_torchrun_on_one_gpu(base, tmp_path):
    # under torchrun the trainer joins a process group: NCCL, on the GPU picked from LOCAL_RANK
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "megatron_lite.train", *base, f"log.dir={tmp_path}", "train.steps=3"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "metrics.jsonl").read_text().count('"step"') == 3


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_on_cuda_matches_no_recompute(base, tmp_path, mode):
    # the Triton kernels' autograd Functions re-run inside the checkpointed blocks; re-running
    # deterministic kernels reproduces the forward, so the losses agree to rounding
    common = ["train.device=cuda", "train.dtype=bf16", "kernels.backend=triton"]
    ref = losses(base, tmp_path / "none", *common)
    got = losses(base, tmp_path / mode, *common, f"train.recompute={mode}")
    assert got == pytest.approx(ref, rel=1e-6), (mode, got, ref)
