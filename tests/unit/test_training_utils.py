"""LR schedule, FLOPs/MFU accounting, CPU peak cache, the run log's step lines, and the metric trackers."""

import json
import logging
import math
import types

import pytest
import torch
from wandb_records import history

from megatron_lite.config import OptimConfig, fill_defaults, load_config
from megatron_lite.errors import UserError
from megatron_lite.training import metrics
from megatron_lite.training.fault import SkippedSteps
from megatron_lite.training.lr import lr_at
from megatron_lite.training.trackers import Trackers


def test_lr_warmup_then_cosine_to_min():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup=4, decay_steps=10)
    assert [lr_at(s, o) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, o) == 1.0  # cos(0) = 1 and cos(pi) = -1 are exact: the ends of the decay are exact
    # approx (rel 1e-6): mid-decay, lr_at associates 0.5 * (lr - min_lr) * (1 + cos) in its own order
    assert lr_at(9, o) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, o) == 0.1 and lr_at(100, o) == 0.1
    # optim.decay_steps' docstring: decay step i uses 0.1 + 0.9 * (1 + cos(pi * i / 10)) / 2; the last one
    # (i = 9, the run's 14th step) is one short of min_lr
    assert lr_at(13, o) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.9))) and lr_at(13, o) > 0.1


def test_flops_per_token_counts_every_matmul():
    cfg = fill_defaults(
        load_config(
            None,
            [
                "model.layers=2",
                "model.hidden=64",
                "model.heads=4",
                "model.kv_heads=2",
                "model.ffn_hidden=128",
                "model.seq_len=16",
            ],
        ),
        vocab_size=100,
    ).model
    hd = 16
    per_layer = 2 * 64 * (4 + 2 * 2) * hd + 2 * 2 * 16 * 4 * hd * 0.5 + 2 * 64 * 64 + 3 * 2 * 64 * 128
    assert metrics.flops_per_token(cfg) == 3 * (2 * per_layer + 2 * 64 * 100)
    gelu = fill_defaults(load_config(None, ["model.arch=gpt2", "model.hidden=64", "model.heads=4"]), 100).model
    assert metrics.flops_per_token(gelu) < metrics.flops_per_token(
        fill_defaults(load_config(None, ["model.hidden=64", "model.heads=4", f"model.ffn_hidden={4 * 64}"]), 100).model
    )


def test_throughput_and_mfu():
    t = metrics.Throughput(flops_per_tok=10.0, peak=1000.0, world_size=2)
    t.add(tokens=300, seconds=1.0)
    t.add(tokens=100, seconds=1.0)
    assert t.report() == {"tokens_per_s": 200.0, "mfu": 200.0 * 10.0 / 2000.0}
    assert t.report() == {"tokens_per_s": 0.0, "mfu": 0.0}  # reset after a report
    assert metrics.Throughput(10.0, None).report()["mfu"] is None


def test_cpu_peak_is_measured_once_per_machine_and_shared_by_local_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(metrics, "measure_cpu_peak", lambda: calls.append(torch.get_num_threads()) or 8e10)
    assert metrics.peak_flops(torch.device("cpu"), torch.float32) == 8e10
    assert metrics.peak_flops(torch.device("cpu"), torch.float32, share=0.25) == 2e10
    assert len(calls) == 1  # cached on disk after the first measurement
    assert calls[0] == metrics.usable_cpus()  # measured with every CPU this process may use
    assert list(json.loads((tmp_path / "megatron-lite" / "cpu_peak_v2.json").read_text()).values()) == [8e10]


def test_each_rank_counts_its_own_share_of_the_cpus_once():
    """4 ranks on 8 CPUs: under torchrun each sees all 8, so each has a quarter of their peak; under
    srun with per-task cpusets each sees its own 2, whose whole peak is its own (it was halved again
    by the ranks on the machine, as if they shared them)."""
    everything = [set(range(8))] * 4
    assert metrics.cpu_share(set(range(8)), everything) == 0.25
    own = [{0, 1}, {2, 3}, {4, 5}, {6, 7}]
    assert all(metrics.cpu_share(cpus, own) == 1.0 for cpus in own)
    # overlapping sets: CPU 1 shared by two ranks, CPU 0 this rank's alone
    assert metrics.cpu_share({0, 1}, [{0, 1}, {1, 2}]) == (1 + 0.5) / 2
    assert metrics.local_cpu_share() == 1.0  # one process, no process group: all its CPUs are its own


def test_a_share_of_the_cpus_has_a_cached_peak_of_its_own(tmp_path, monkeypatch):
    """A container or taskset allowed 2 of the host's CPUs measures their peak; one allowed 4 on the same
    host measures again, with 4 threads, instead of taking the 2 CPUs' peak for its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(metrics.os, "cpu_count", lambda: 64)
    measured = []
    monkeypatch.setattr(
        metrics, "measure_cpu_peak", lambda: measured.append(torch.get_num_threads()) or 1e10 * measured[-1]
    )
    for cpus in (2, 4, 2):
        monkeypatch.setattr(metrics.os, "sched_getaffinity", lambda pid, cpus=cpus: set(range(cpus)), raising=False)
        assert metrics.cpu_peak_flops() == 1e10 * cpus
    assert measured == [2, 4]


def test_unknown_device_gets_no_made_up_peak(caplog):
    with caplog.at_level(logging.WARNING):
        assert metrics.peak_flops(torch.device("meta"), torch.float32) is None
    assert "MFU will not be reported" in caplog.text


def test_measured_cpu_peak_is_matmul_flops_over_time(monkeypatch):
    """On a stand-in machine whose clock advances 1/1024 s per n x n matmul (and never otherwise),
    the peak is one matmul's 2 n^3 FLOPs per 1/1024 s, however the trials split the time."""
    clock = [0.0]

    class Matrix:
        def __matmul__(self, other):
            clock[0] += 1 / 1024
            return self

    monkeypatch.setattr(metrics, "torch", types.SimpleNamespace(randn=lambda *shape: Matrix()))
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert metrics.measure_cpu_peak(seconds=0.2, n=256, trials=2) == 2 * 256**3 * 1024  # binary fractions: exact
    monkeypatch.undo()
    peak = metrics.measure_cpu_peak(seconds=0.02, n=64, trials=1)  # the real one runs: no bound on its speed
    assert math.isfinite(peak) and peak > 0


def test_trackers_write_jsonl_and_never_crash_on_optional_ones(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    with caplog.at_level(logging.WARNING):
        tr = Trackers(tmp_path, {"a": 1}, active=True, tensorboard=True, wandb=True, wandb_project="t")
        tr.log({"step": 1, "loss": 2.5, "mfu": None, "eval_loss": float("nan")}, 1)
        tr.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line == {"step": 1, "loss": 2.5, "mfu": None, "eval_loss": None}  # NaN is not JSON
    assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())


def test_every_launch_of_a_run_logs_to_one_wandb_run_the_values_of_metrics_jsonl(tmp_path, monkeypatch):
    """A launch that resumes (starts past step 0) logs to the W&B run of the launches before it; a fresh
    start gets a run of its own. Each W&B row is metrics.jsonl's row of its step, step and nulls aside."""
    for name, value in [("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_SILENT", "true")]:
        monkeypatch.setenv(name, value)
    import wandb.sdk.wandb_init

    # an offline run's directory is named by its start second and id: one launch a minute keeps them apart
    starts = iter(range(0, 3600, 60))
    monkeypatch.setattr(wandb.sdk.wandb_init, "time", types.SimpleNamespace(time=lambda: 1.8e9 + next(starts)))
    rows = [
        {"step": s, "loss": 9.0 - s, "lr": s / 1e3, "grad_norm": 0.5, "tokens_per_s": 100.0 + s, "mfu": None}
        | {"consumed_samples": 8 * s, "skipped_steps": 0}
        for s in range(1, 6)
    ]

    def launch(start: int, stop: int) -> None:
        tr = Trackers(tmp_path, {"a": 1}, active=True, tensorboard=False, wandb=True, wandb_project="t", step=start)
        for row in rows[start:stop]:
            tr.log(row, row["step"])
        tr.close()

    def run_ids() -> list[str]:
        return [run.name.rsplit("-", 1)[1] for run in sorted((tmp_path / "wandb").glob("offline-run-*"))]

    launch(0, 3)
    launch(3, 5)  # resumed from step 3
    # W&B's service may still be writing an offline run's file as finish() returns; the process's exit
    # waits for it (wandb.teardown, at exit), so the rows are read from what a finished process leaves
    wandb.teardown()
    assert len(run_ids()) == 2 and len(set(run_ids())) == 1
    logged = [
        row
        for run in sorted((tmp_path / "wandb").glob("offline-run-*"))
        for row in history(run / f"run-{run_ids()[0]}.wandb")
    ]
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows
    assert logged == [
        {"_step": r["step"], **{k: v for k, v in r.items() if k != "step" and v is not None}} for r in rows
    ]
    launch(0, 1)  # a fresh start in the same log.dir
    assert len(set(run_ids())) == 2


def test_wandb_with_a_key_but_no_server_logs_offline(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # a key, so online is tried
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    with caplog.at_level(logging.INFO):
        tr = Trackers(tmp_path, {"a": 1}, active=True, tensorboard=False, wandb=True, wandb_project="t")
        tr.log({"step": 1, "loss": 2.5}, 1)
        tr.close()
    assert "logging offline instead" in caplog.text and "W&B tracker started (offline mode, run id " in caplog.text
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert "k" * 40 not in (tmp_path / "metrics.jsonl").read_text() and "k" * 40 not in caplog.text


def test_a_broken_optional_tracker_is_dropped_with_a_warning(tmp_path, monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with caplog.at_level(logging.WARNING):
        tr = Trackers(tmp_path, {}, active=True, tensorboard=False, wandb=True, wandb_project="t")
        tr.log({"step": 1, "loss": 1.0}, 1)
        tr.close()
    assert "log.wandb=true but the tracker could not start" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    inactive = Trackers(tmp_path / "other", {}, active=False, tensorboard=True, wandb=True, wandb_project="t")
    inactive.log({"step": 1}, 1)
    assert not (tmp_path / "other").exists()  # ranks other than 0 write nothing


def test_a_full_disk_under_log_dir_drops_metrics_jsonl_naming_the_file_and_step(tmp_path, caplog):
    """It said only "tracker JsonlTracker failed ([Errno 28] No space left on device); disabling it":
    neither which file stops where, nor that the run goes on."""

    class FullDisk:
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    tr = Trackers(tmp_path, {}, active=True, tensorboard=False, wandb=False, wandb_project="t")
    tr.log({"step": 1, "loss": 1.0}, 1)
    tr._all[0]._f = FullDisk()
    with caplog.at_level(logging.WARNING):
        tr.log({"step": 2, "loss": 1.0}, 2)
        tr.log({"step": 3, "loss": 1.0}, 3)  # disabled: no second warning, no error
    tr.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"tracker JsonlTracker failed at step 2 writing {tmp_path / 'metrics.jsonl'} (OSError: [Errno 28] No space "
        "left on device); disabling it: later steps' metrics are in this log's step lines only"
    ], warnings


def test_rows_dropped_for_a_rerun_are_kept_aside_not_erased(tmp_path, caplog):
    """A fresh run (step 0) in an old run's log.dir, e.g. with another checkpoint.dir, erased the old
    run's whole metrics.jsonl; the rows it drops now go to metrics.dropped.jsonl."""
    old = [{"step": s, "loss": 9.0 - s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old) + '{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        tr = Trackers(tmp_path, {}, active=True, tensorboard=False, wandb=False, wandb_project="t", step=1)
        tr.log({"step": 2, "loss": 0.5}, 2)
        tr.close()
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        old[0],
        {"step": 2, "loss": 0.5},
    ]
    aside = (tmp_path / "metrics.dropped.jsonl").read_text()
    assert aside.splitlines() == [json.dumps(old[1]), json.dumps(old[2]), '{"step": 4, "lo'] and aside.endswith("\n")
    assert "moved 3 rows past step 1" in caplog.text and "metrics.dropped.jsonl" in caplog.text
    tr = Trackers(tmp_path, {}, active=True, tensorboard=False, wandb=False, wandb_project="t", step=0)
    tr.close()  # a second drop appends: the first one's rows stay
    assert len((tmp_path / "metrics.dropped.jsonl").read_text().splitlines()) == 5


def test_a_last_row_cut_before_its_line_break_leaves_the_next_row_a_line_of_its_own(tmp_path):
    """A write cut just before a row's line break leaves that row whole: the run resumed at its step
    keeps it, and appends its own rows on lines of their own (each row parses; none is set aside)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}')
    tr = Trackers(tmp_path, {}, active=True, tensorboard=False, wandb=False, wandb_project="t", step=2)
    tr.log({"step": 3, "loss": 1.0}, 3)
    tr.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and not (tmp_path / "metrics.dropped.jsonl").exists()


def test_tensorboard_after_a_rerun_shows_each_step_once(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

    def attempt(start, stop, offset):
        tr = Trackers(tmp_path, {}, active=True, tensorboard=True, wandb=False, wandb_project="t", step=start)
        for s in range(start + 1, stop + 1):
            tr.log({"step": s, "loss": offset + s}, s)
        tr.close()

    attempt(0, 6, 0.0)  # crashed after step 6, its last checkpoint at step 4
    attempt(4, 8, 100.0)
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(s, s + (100.0 if s > 4 else 0.0)) for s in range(1, 9)]


def test_skipped_steps_stop_a_run_once_they_are_hopeless(caplog):
    skip = {"skipped": True, "loss": 9.0, "grad_norm": float("inf")}
    scaler = types.SimpleNamespace(scale=2.0**16, min_scale=1.0)
    scaled = SkippedSteps(scaler, active=True, limit=2)
    with caplog.at_level(logging.INFO, logger="megatron_lite.training.fault"):
        for step in range(1, 6):
            scaled.update(step, skip)  # fp16: the scaler backs off, a routine skip
    assert len(caplog.records) == 5 and all(r.levelno == logging.INFO for r in caplog.records)
    scaled.update(6, {**skip, "loss": float("nan")})  # no scale fixes a non-finite loss
    scaler.scale = 1.0
    with pytest.raises(UserError, match=r"2 steps in a row were skipped.*\(steps 6-7"):
        scaled.update(7, skip)  # nor an overflow at the floor scale
    plain = SkippedSteps(None, active=False, limit=2)
    plain.update(1, skip)
    plain.update(2, {**skip, "skipped": False, "grad_norm": 1.0})  # a finite step resets the count
    plain.update(3, skip)
    with pytest.raises(UserError, match=r"2 steps in a row were skipped.*\(steps 3-4"):
        plain.update(4, skip)


def test_a_streak_of_skipped_steps_carries_over_a_checkpoint():
    """A preemption (or train.exit_after) inside a streak saves its checkpoint with the streak: the
    relaunch stops after the streak's ``limit``-th skip, naming the step it began at."""
    skip = {"skipped": True, "loss": 9.0, "grad_norm": float("inf")}
    first = SkippedSteps(None, active=False, limit=3)
    first.update(5, skip)
    first.update(6, skip)
    saved = json.loads(json.dumps(first.state_dict()))  # as metadata.json holds it
    assert saved == {"in_a_row": 2, "since": 5}
    relaunched = SkippedSteps(None, active=False, limit=3)
    relaunched.load_state_dict(saved)
    with pytest.raises(UserError, match=r"3 steps in a row were skipped.*\(steps 5-7"):
        relaunched.update(7, skip)
    fresh = SkippedSteps(None, active=False, limit=3)
    fresh.load_state_dict(None)  # a checkpoint that records no streak: none
    assert fresh.state_dict() == {"in_a_row": 0, "since": 0}


def test_each_logged_step_is_one_readable_line_with_the_megatron_fields():
    row = {"step": 10, "loss": 7.82996, "lr": 3.3333e-4, "grad_norm": 2.4972, "tokens_per_s": 1428.79, "mfu": 0.2711}
    row |= {"consumed_samples": 80, "skipped_steps": 0}
    # 2,048 tokens a step at 1,428.79 tokens/s: 1,433.4 ms a step
    expected = (
        "step 10/300 | loss 7.8300 | lr 3.333e-04 | grad norm 2.497 | 1,429 tokens/s | MFU 27.1% | 1,433.4 ms/step"
    )
    assert metrics.step_lines(row, 300, 2048) == [expected]
    # an evaluation step gets a second line; an unknown peak leaves MFU out; CUDA adds the memory peak;
    # a skipped step's norm is not finite, and the count shows once there is one
    row |= {"eval_loss": 7.59677, "mfu": None, "max_memory_gb": 1.234, "grad_norm": math.inf, "skipped_steps": 2}
    assert metrics.step_lines(row, 300, 2048) == [
        "step 10/300 | loss 7.8300 | lr 3.333e-04 | grad norm inf | 1,429 tokens/s | 1,433.4 ms/step"
        " | max memory 1.23 GiB | skipped steps 2",
        "step 10/300 | eval loss 7.5968",
    ]
