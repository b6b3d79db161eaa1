"""The trainer warns before starting when plan's peak estimate exceeds what a rank has."""

import re
from pathlib import Path

import torch

from megatron_lite.config import load_config
from megatron_lite.plan import make_plan
from megatron_lite.training import preflight
from megatron_lite.training.preflight import memory_warning

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def test_a_run_that_fits_gets_no_warning():
    cfg = load_config(QUICKSTART, ["train.steps=1"])
    assert memory_warning(cfg, 1, torch.device("cpu")) is None


def test_a_run_far_past_the_machines_memory_is_named_with_the_fix():
    """micro batch 512 x 4096 tokens: unwarned, the kernel's OOM killer would end such a run, silently."""
    cfg = load_config(QUICKSTART, ["train.micro_batch_size=512", "train.global_batch_size=512", "model.seq_len=4096"])
    why = memory_warning(cfg, 1, torch.device("cpu"), local_world_size=2)
    assert why is not None and "GiB per rank at peak" in why and "per local rank (2)" in why
    assert "train.micro_batch_size" in why


def test_the_machines_ram_is_shared_by_its_local_ranks(monkeypatch):
    cfg = load_config(QUICKSTART, ["train.steps=1"])
    need = make_plan(load_config(QUICKSTART, ["train.steps=1", "train.dtype=fp32"]), 1).memory_bytes_per_rank
    ram = {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": 3 * need // 2}  # 1.5x one rank's peak
    monkeypatch.setattr(preflight.os, "sysconf", ram.__getitem__)
    assert memory_warning(cfg, 1, torch.device("cpu"), local_world_size=1) is None
    why = memory_warning(cfg, 1, torch.device("cpu"), local_world_size=2)  # 0.75x each
    assert why is not None and "per local rank (2)" in why, why
    # a model of hundreds of MiB in MiB, not 0.4 GiB
    assert re.search(r"estimates \d+\.\d MiB per rank at peak, and .* per local rank \(2\), \d+\.\d MiB: ", why), why
    ram["SC_PHYS_PAGES"] = need  # exactly the estimate: it fits
    assert memory_warning(cfg, 1, torch.device("cpu"), local_world_size=1) is None


def test_auto_dtype_is_planned_as_the_device_runs_it(monkeypatch):
    """train.dtype=auto is fp32 on CPU: the warning planned it as a GPU's bf16, 2 bytes a parameter
    and an activation element, and let a run past the machine's RAM start unwarned."""
    bf16, fp32 = (
        make_plan(load_config(QUICKSTART, ["train.steps=1", f"train.dtype={d}"]), 1).memory_bytes_per_rank
        for d in ("bf16", "fp32")
    )
    assert bf16 < fp32
    monkeypatch.setattr(preflight.os, "sysconf", {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": (bf16 + fp32) // 2}.__getitem__)
    why = memory_warning(load_config(QUICKSTART, ["train.steps=1"]), 1, torch.device("cpu"))
    assert why is not None and why == memory_warning(
        load_config(QUICKSTART, ["train.steps=1", "train.dtype=fp32"]), 1, torch.device("cpu")
    )
