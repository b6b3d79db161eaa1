"""metrics.jsonl's figures computed again by hand: the step's loss and gradient norm from the model
rebuilt in this process, the learning rate from the schedule (warmup-stable-decay: each phase logged),
samples from the batch arithmetic, tokens/s from a stand-in clock, MFU from the FLOPs per token and a
stand-in peak; and the rows of a run logged every 3 steps, stopped and resumed, equal to those of a
straight run logged every step."""

import json
import math
import types

import pytest
import torch

from megatron_lite.cli import main
from megatron_lite.config import load_config
from megatron_lite.data.gpt_dataset import PretrainingLoader
from megatron_lite.models.transformer import build_model
from megatron_lite.training import metrics, trainer
from megatron_lite.training.lr import lr_at
from megatron_lite.training.trainer import Trainer

PEAK, TICK = 1e12, 0.25  # the stand-in CPU peak (FLOP/s) and the stand-in clock's step (s)
MICRO, GLOBAL, STEPS = 2, 8, 7  # 4 microbatches a step: gradients accumulated over them
# warmup 2 (tiny_args), then 5 decay steps: steps 3-4 stable at lr, 5-7 decay along 1 - sqrt(p)
WSD = ["optim.decay_style=wsd", "optim.wsd_decay_steps=3", "optim.wsd_decay_shape=1-sqrt"]


def rows(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def hand_step_one(cfg, dataset) -> tuple[float, float]:
    """Step 1's loss (the mean over its microbatches) and the norm of the whole model's gradient."""
    model = build_model(cfg.model, cfg.train.seed, torch.device("cpu"))
    micro = PretrainingLoader(dataset, MICRO, GLOBAL, 0, 1).next_step()
    loss = sum(model(b[:, :-1], b[:, 1:]) for b in micro) / len(micro)
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    return loss.item(), norm.item()


def test_each_row_holds_its_steps_own_figures(tiny_args, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "cpu_peak_flops", lambda: PEAK)
    clock = iter(range(10**6))  # the trainer's clock: TICK seconds from each reading to the next
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=lambda: TICK * next(clock)))
    keep = ("log.every=", "log.dir=", "train.micro_batch_size=", "train.global_batch_size=", "train.steps=")
    args = [a for a in tiny_args if not a.startswith(keep)]
    args += [f"train.micro_batch_size={MICRO}", f"train.global_batch_size={GLOBAL}", f"train.steps={STEPS}", *WSD]
    straight = Trainer(load_config(None, [*args, "log.every=1", f"log.dir={tmp_path / 's'}"]))
    straight.fit()
    cfg, every = straight.cfg, rows(tmp_path / "s")
    assert sorted(every) == list(range(1, STEPS + 1))
    # rtol 1e-6: the engine sums the microbatches' losses (each divided by 4) and their gradients in
    # its own order; the norm is of fp32 buffers
    loss, norm = hand_step_one(cfg, straight.data.train)
    assert every[1]["loss"] == pytest.approx(loss, rel=1e-6) and every[1]["grad_norm"] == pytest.approx(norm, rel=1e-6)
    tokens, fpt = GLOBAL * cfg.model.seq_len, metrics.flops_per_token(cfg.model)
    for step, r in every.items():
        assert r["lr"] == lr_at(step - 1, cfg.optim) and r["consumed_samples"] == GLOBAL * step
        assert r["tokens_per_s"] == tokens / TICK  # one step: the clock's two readings around it
        assert r["mfu"] == r["tokens_per_s"] * fpt / PEAK  # world 1: one rank, the whole peak
    # by hand: lr 3e-3 (tiny_args) at the stable steps; the last, p = 2/3 of the way to min_lr 3e-5
    assert every[3]["lr"] == every[4]["lr"] == 3e-3
    assert every[7]["lr"] == pytest.approx(3e-5 + (3e-3 - 3e-5) * (1 - math.sqrt(2 / 3)), rel=1e-12)
    # logged every 3 steps, stopped after step 4, resumed: each row is the straight run's of its step
    parts = [*args, "log.every=3", f"log.dir={tmp_path / 'p'}"]
    assert main(["train", *parts, "train.exit_after=4"]) == 0 and main(["train", *parts]) == 0
    sparse = rows(tmp_path / "p")
    assert sorted(sparse) == [3, 4, 6, 7]
    figures = ("loss", "grad_norm", "lr", "consumed_samples", "tokens_per_s", "mfu")
    assert {s: [r[k] for k in figures] for s, r in sparse.items()} == {
        s: [every[s][k] for k in figures] for s in sparse
    }
