"""The trainer warns before starting when plan's peak estimate exceeds what a rank has."""

from pathlib import Path

import torch

from megatron_lite.config import load_config
from megatron_lite.training.preflight import memory_warning

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def test_a_run_that_fits_gets_no_warning():
    cfg = load_config(QUICKSTART, ["train.steps=1"])
    assert memory_warning(cfg, 1, torch.device("cpu")) is None


def test_a_run_far_past_the_machines_memory_is_named_with_the_fix():
    """micro batch 512 x 4096 tokens: the kernel's OOM killer ended such a run after 80 s, silently."""
    cfg = load_config(QUICKSTART, ["train.micro_batch_size=512", "train.global_batch_size=512", "model.seq_len=4096"])
    why = memory_warning(cfg, 1, torch.device("cpu"), local_world_size=2)
    assert why is not None and "GiB per rank at peak" in why and "per local rank (2)" in why
    assert "train.micro_batch_size" in why
