"""A few training steps with ``kernels.backend=triton`` against the same run with ``kernels.backend=torch``.

On a CPU the Triton kernels run in the interpreter (this folder's conftest sets TRITON_INTERPRET=1);
``tests/gpu/test_cuda_training.py`` makes the same comparison with the compiled kernels on CUDA.
"""

import sysconfig
from pathlib import Path

import megatron_lite.kernels as kernels
import pytest
import torch
from megatron_lite.kernels import dispatch

from megatron_lite.config import load_config
from megatron_lite.data.corpus import prepare_default_corpus
from megatron_lite.training.trainer import Trainer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# fp32: every fused op matches its twin to a few ulps (conftest.TOL); three AdamW steps carry that into
# the loss as 1 to 2 ulps of a loss near 6.25 (measured: 1.5e-7 relative, step 2). 1e-6 is ~13 ulps.
LOSS_RTOL = 1e-6


# llama: rms_norm, apply_rope, swiglu, grouped-query attention (2 heads over 1), cross_entropy;
# gpt2: layer_norm, multi-head attention, cross_entropy
ARCHS = {"llama": ["model.kv_heads=1"], "gpt2": ["model.arch=gpt2"]}
OPS_USED = {"llama": set(dispatch.OPS) - {"layer_norm"}, "gpt2": {"layer_norm", "flash_attention", "cross_entropy"}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests/gpu/test_cuda_training.py runs it on CUDA")
@pytest.mark.parametrize("arch", ARCHS)
def test_triton_backend_trains_like_torch_backend(tmp_path, monkeypatch, arch):
    files = [STDLIB / "textwrap.py", STDLIB / "heapq.py"]
    prefix, tok = prepare_default_corpus(tmp_path / "corpus", 512, progress=False, files=files)
    # head dim 16 (the smallest the attention kernel takes), 2 microbatches a step
    base = [f"data.path={prefix}", f"data.tokenizer={tok}", "model.layers=2", "model.hidden=32",
            "model.heads=2", *ARCHS[arch], "model.seq_len=16", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.steps=3", "optim.warmup=1", "optim.lr=3e-3",
            "log.every=1", "log.progress=false", "data.valid_fraction=0", "checkpoint.resume=none",
            "train.device=cpu", "train.dtype=fp32"]  # fmt: skip
    used, real = set(), kernels._triton_op
    monkeypatch.setattr(kernels, "_triton_op", lambda module, name: used.add(name) or real(module, name))
    losses = {}
    try:
        for backend in ("torch", "triton"):
            cfg = load_config(None, [*base, f"log.dir={tmp_path / backend}", f"kernels.backend={backend}"])
            losses[backend] = [r["loss"] for r in Trainer(cfg).fit()]
            if backend == "torch":
                assert not used, used
    finally:
        kernels.set_backend("auto")
    assert used == OPS_USED[arch], used  # each through the dispatcher
    assert len(losses["triton"]) == 3
    assert losses["triton"] == pytest.approx(losses["torch"], rel=LOSS_RTOL), losses
