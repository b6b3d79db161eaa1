"""`megatron-lite train` end to end: metrics, checkpoints, resume, determinism, divergence, entry points."""

import json
import logging
import re
import subprocess
import sys

import pytest
from train_checks import job_log_error, on_a_terminal, one_error_line

from megatron_lite.cli import main, parse_args
from megatron_lite.config import load_config
from megatron_lite.errors import UserError
from megatron_lite.training.lr import lr_at
from megatron_lite.training.metrics import step_lines
from megatron_lite.training.trackers import Trackers

OTHER_RUN = "holds the checkpoints of another run"  # resume.other_run_note
WALL = r"(?:\d+\.\d s|\d+m\d\ds|\d+h\d\dm)"  # progress.duration


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_metrics_config_and_checkpoint(tiny_args, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="megatron_lite.training.trainer")
    # a tracker's closing words (W&B prints a summary of its own as it finishes) come before ours
    trainer_log, close = logging.getLogger("megatron_lite.training.trainer"), Trackers.close
    monkeypatch.setattr(
        Trackers, "close", lambda self, failed=False: (trainer_log.info("trackers closed"), close(self, failed))
    )
    assert main(["train", *tiny_args, "train.eval_every=4", "checkpoint.every=4"]) == 0
    # the startup log says which implementation each fused op takes, one line per op
    (report,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernels on cpu:")]
    for op in ("rms_norm", "layer_norm", "swiglu", "apply_rope", "cross_entropy", "flash_attention"):
        assert any(line.split()[:1] == [op] for line in report.splitlines()[1:]), report
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "consumed_samples"):
        assert all(key in r for r in records), key
    assert records[-1]["consumed_samples"] == 6 * 8
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 6]  # every train.eval_every, and at the end
    assert records[-1]["tokens_per_s"] > 0
    # the run log: one line per row and one per evaluation (metrics.step_lines), each said once
    said = [m for m in caplog.messages if re.match(r"step \d+/6 \| ", m)]
    assert said == [line for r in records for line in step_lines(r, 6, 8 * 32)], said
    # and one closing line: this launch's steps, wall time, mean tokens/s, last losses, last checkpoint
    (summary,) = [m for m in caplog.messages if m.startswith("run summary: ")]
    assert caplog.messages[-2:] == ["trackers closed", summary], caplog.messages[-2:]
    last, where = records[-1], re.escape(str(run / "checkpoints" / "step_00000006"))
    m = re.fullmatch(
        rf"run summary: steps 1-6 of 6 \(6 this launch\) in {WALL} \| ([\d,]+) tokens/s \| "
        rf"final loss {last['loss']:.4f} \| eval loss {last['eval_loss']:.4f} \(step 6\) \| checkpoint {where}",
        summary,
    )
    assert m, summary
    rates = [r["tokens_per_s"] for r in records]  # the mean over the steps' time lies among the rows' rates
    assert min(rates) - 1 <= int(m[1].replace(",", "")) <= max(rates) + 1, (summary, rates)
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    # every checkpoint.every steps, and at the end
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]


def test_same_seed_gives_bitwise_identical_losses(tiny_args, tmp_path):
    a = [*tiny_args[:-1], f"log.dir={tmp_path / 'a'}"]
    b = [*tiny_args[:-1], f"log.dir={tmp_path / 'b'}"]
    assert main(["train", *a]) == 0 and main(["train", *b]) == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    c = [*tiny_args[:-1], f"log.dir={tmp_path / 'c'}", "train.seed=7"]
    assert main(["train", *c]) == 0
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


def test_stop_and_resume_continues_the_same_curve(tiny_args, tmp_path, caplog):
    straight = [*tiny_args[:-1], f"log.dir={tmp_path / 's'}"]
    assert main(["train", *straight]) == 0
    parts = [*tiny_args[:-1], f"log.dir={tmp_path / 'p'}"]
    assert main(["train", *parts, "train.exit_after=2"]) == 0
    with caplog.at_level(logging.INFO):
        assert main(["train", *parts, "train.exit_after=2"]) == 0  # resumed once
    assert "resumed from" in caplog.text and "other data" not in caplog.text  # the same data: no warning
    assert "learning-rate schedule" not in caplog.text and OTHER_RUN not in caplog.text  # its own checkpoint
    # a variant started from the run's config.yaml in another log.dir starts fresh in its own checkpoints
    # (the file holds no train.exit_after: a relaunch from it trains to the end unless told otherwise)
    relaunch = ["train", "--config", str(tmp_path / "p" / "config.yaml")]
    assert main([*relaunch, f"log.dir={tmp_path / 'v'}", "train.exit_after=2"]) == 0
    assert losses(tmp_path / "v") == losses(tmp_path / "s")[:2]
    assert (tmp_path / "v" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert (tmp_path / "p" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert main(relaunch) == 0  # while a relaunch in the same log.dir resumes, to the end
    assert losses(tmp_path / "p") == losses(tmp_path / "s")
    assert OTHER_RUN not in caplog.text  # no run so far resumed another run's checkpoint
    # a config naming the run's checkpoint.dir (a config.yaml written with it filled in) in another log.dir
    # resumes that run's checkpoint and saves next to it: one startup warning says so and how to start fresh,
    # and checkpoint.keep=2 prunes only the new run's own checkpoints there, on its relaunch too
    ckpt, other = tmp_path / "p" / "checkpoints", [*relaunch, f"checkpoint.dir={tmp_path / 'p' / 'checkpoints'}"]
    other += [f"log.dir={tmp_path / 'w'}", "checkpoint.every=1"]
    caplog.clear()
    assert main([*other, "train.steps=9"]) == 0
    (said,) = [m for m in caplog.messages if OTHER_RUN in m]
    runs = tmp_path.resolve()  # both log.dir as the warning compares them: resolved, absolute
    assert said.startswith(
        f"checkpoint.dir={str(ckpt)!r} {OTHER_RUN} (log.dir {runs / 'p'}): this run (log.dir {runs / 'w'}) "
    )
    assert "resumes from its step 6 and saves its checkpoints there too" in said, said
    assert said.endswith(f"or checkpoint.dir=null for this log.dir's own ({tmp_path / 'w' / 'checkpoints'})"), said
    assert [json.loads(line)["step"] for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()] == [
        7,
        8,
        9,
    ]
    assert sorted(p.name[-2:] for p in ckpt.glob("step_*")) == ["04", "06", "08", "09"]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main([*other, "train.steps=10"]) == 0  # the new run relaunched in its log.dir: its own checkpoint
    assert "resumed from" in caplog.text and OTHER_RUN not in caplog.text
    assert sorted(p.name[-2:] for p in ckpt.glob("step_*")) == ["04", "06", "09", "10"]


def test_loss_falls(tiny_args, tmp_path):
    args = [*tiny_args, "train.steps=30", "optim.warmup=5"]
    assert main(["train", *args]) == 0
    curve = losses(tmp_path / "run")
    assert curve[-1] < curve[0] - 1.0, curve


def test_a_diverged_run_warns_at_each_skipped_step_then_stops_naming_the_fix(
    tiny_args, tmp_path, capsys, caplog, monkeypatch
):
    """Without a loss scaler (fp32, bf16) a step whose gradient norm is not finite is skipped, with a
    warning; ten in a row stop the run (exit 2), its trackers closed as failed. No periodic checkpoint
    is saved during the skips: with checkpoint.keep it would rotate out the ones to resume from."""
    closed = []
    real_close = Trackers.close
    monkeypatch.setattr(Trackers, "close", lambda self, failed=False: closed.append(failed) or real_close(self, failed))
    args = [*tiny_args, "train.steps=40", "optim.lr=1e4", "optim.min_lr=1e3", "optim.clip_grad=0"]
    with caplog.at_level(logging.WARNING, logger="megatron_lite.training.fault"):
        assert main(["train", *args, "checkpoint.every=1", "checkpoint.keep=2"]) == 2
    assert closed == [True]  # TensorBoard and W&B flushed, and W&B told the run failed
    err = one_error_line(capsys)
    assert "training diverged: 10 steps in a row were skipped" in err and "optim.lr" in err, err
    skipped = [r.getMessage() for r in caplog.records if "the optimizer step was skipped" in r.getMessage()]
    assert len(skipped) == 10 and skipped[0].startswith("step "), skipped
    # the step that stops the run has its row, counting its own skip: steps 3-12 of "(steps 3-12, ...)"
    first, last = map(int, re.search(r"\(steps (\d+)-(\d+),", err).groups())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, last + 1)), rows
    assert [r["skipped_steps"] for r in rows[first - 1 :]] == list(range(1, 11)), rows
    assert rows[-1]["grad_norm"] is None and rows[-1]["consumed_samples"] == last * 8, rows[-1]
    assert "eval_loss" not in rows[-1], rows[-1]  # no evaluation of diverged weights
    # a skipped step does not advance the learning-rate schedule (Megatron's convention)
    optim = load_config(tmp_path / "run" / "config.yaml", []).optim
    skipped_before = [0] + [r["skipped_steps"] for r in rows[:-1]]
    assert [r["lr"] for r in rows] == [lr_at(r["step"] - 1 - n, optim) for r, n in zip(rows, skipped_before)]
    assert rows[first - 2]["lr"] != rows[first - 1]["lr"] == rows[-1]["lr"], rows
    kept = sorted(int(p.name[5:]) for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == [first - 2, first - 1], kept  # the two saved before the skips began
    held = [r.getMessage() for r in caplog.records if "checkpoint not saved" in r.getMessage()]
    assert len(held) == 9 and held[0] == (
        f"step {first}: checkpoint not saved: the last 1 steps were skipped (gradient norm not finite); "
        f"the checkpoints from before step {first} are kept"
    ), held
    assert f"resume from an earlier checkpoint (those of steps before {first} are kept)" in err, err
    # a run that ends during the skips still saves the step it stops at, its periodic save held back
    short = [*args, f"log.dir={tmp_path / 'short'}", f"train.steps={first + 1}", "checkpoint.every=1"]
    assert main(["train", *short, "checkpoint.keep=3"]) == 0
    kept = sorted(int(p.name[5:]) for p in (tmp_path / "short" / "checkpoints").glob("step_*"))
    assert kept == [first - 2, first - 1, first + 1], kept
    # ... with the streak it stopped in: its relaunch stops at the streak's tenth skip, naming where it began
    capsys.readouterr()
    assert main(["train", *args, f"log.dir={tmp_path / 'short'}", "checkpoint.every=1"]) == 2
    err = one_error_line(capsys)
    assert f"training diverged: 10 steps in a row were skipped, their gradient norm not finite (steps {first}-" in err
    assert f"(steps {first}-{first + 9}, " in err, err
    # fp16: the loss scaler's skips are routine while it backs off, not once the loss is not finite
    fp16 = [*args, f"log.dir={tmp_path / 'fp16'}", "train.dtype=fp16"]
    assert main(["train", *fp16]) == 2
    assert "training diverged" in one_error_line(capsys)


def test_log_lines_during_the_loop_print_above_the_progress_bar(tiny_args):
    """On a terminal a warning in the loop (each skipped step here) gets a line of its own, not the end
    of the bar's; the bar is drawn (it is off where stderr is a file: tests/unit/test_progress.py)."""
    args = [*tiny_args, "log.progress=true", "train.steps=40", "optim.lr=1e4", "optim.min_lr=1e4", "optim.clip_grad=0"]
    status, out = on_a_terminal([sys.executable, "-m", "megatron_lite.cli", "train", *args])
    assert status == 2, out[-3000:]
    segments = [s for line in out.split("\n") for s in line.split("\r")]
    warned = [s for s in segments if "the optimizer step was skipped" in s]
    assert len(warned) == 10 and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING ", s) for s in warned), warned
    assert any("/40 [" in s and "step/s" in s for s in segments), out[-3000:]  # tqdm's "12/40 [00:01<..., 9.1step/s"


@pytest.mark.parametrize(
    "argv, overrides",
    [
        (["train", "train.steps=1", "--config", "F", "log.dir=X"], ["train.steps=1", "log.dir=X"]),
        (["plan", "--config", "F", "a=b", "--world-size", "2", "c=d", "--json"], ["a=b", "c=d"]),
        (["launch", "slurm", "a=1", "--nodes", "2", "x=y", "--dry-run", "z=w"], ["a=1", "x=y", "z=w"]),
    ],
)
def test_overrides_on_both_sides_of_options(argv, overrides):
    args = parse_args(argv)
    assert args.overrides == overrides and args.config in (None, "F")
    with pytest.raises(SystemExit):  # an unknown option is still refused
        parse_args([*argv, "--bogus"])


def test_console_script_and_module_entry_points(tiny_args, tmp_path):
    """The installed `megatron-lite` script and `python -m megatron_lite.train` are the same command."""
    args = [a for a in tiny_args[:-1] if a not in ("log.progress=false", "train.steps=6")]  # the bar on, as it is
    config = tmp_path / "two_steps.yaml"  # DESIGN's form: --config FILE, then overrides
    config.write_text("train:\n  steps: 2\n")
    exe = [sys.executable, "-c", "import sys; from megatron_lite.cli import main; sys.exit(main())"]
    commands = [
        [*exe, "train", "--config", str(config), *args, f"log.dir={tmp_path / 'x'}"],
        [sys.executable, "-m", "megatron_lite.train", "--config", str(config), *args, f"log.dir={tmp_path / 'y'}"],
        ["megatron-lite", "train", *args, "train.steps=-1"],
    ]
    # started together: each spends most of its time importing torch, which the 2 cores can overlap
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:  # one that hangs past its bound: none is left running
        for p in procs:
            p.kill()
    r1, r2, r3 = (subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outs))
    assert r1.returncode == 0, r1.stderr
    for r in (r1, r2):  # stderr is a file here: no bar, and one line for each logged step
        assert "\r" not in r.stderr and "step/s" not in r.stderr, r.stderr
        said = [line.split(": ", 1)[1].split(" | ")[0] for line in r.stderr.splitlines() if " | loss " in line]
        assert said == ["step 1/2", "step 2/2"], r.stderr
    assert r2.returncode == 0, r2.stderr
    assert losses(tmp_path / "x") == losses(tmp_path / "y")
    assert r3.returncode == 2 and r3.stderr.startswith("error: train.steps must be a positive integer, got -1"), (
        r3.stderr
    )


def test_compiled_blocks_train_like_eager(tiny_args, tmp_path):
    """train.compile=true compiles each block in place (inductor): the same losses up to the
    reordering of fused elementwise ops (rtol 1e-5 in fp32)."""
    from torch._dynamo.utils import counters

    eager = [*tiny_args[:-1], f"log.dir={tmp_path / 'eager'}", "train.steps=3"]
    compiled = [*tiny_args[:-1], f"log.dir={tmp_path / 'compiled'}", "train.steps=3", "train.compile=true"]
    counters.clear()
    assert main(["train", *eager]) == 0
    assert counters["stats"]["unique_graphs"] == 0  # eager: dynamo captured nothing
    assert main(["train", *compiled]) == 0
    # equal losses alone would pass if the flag were ignored: dynamo must have captured the blocks
    assert counters["stats"]["unique_graphs"] > 0 and counters["frames"]["ok"] > 0, dict(counters)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)


def test_only_rank_zero_prints_a_launch_wide_error_at_once(monkeypatch, capsys):
    """Under torchrun every rank reaches the same verdict; rank 0 prints the one `error:` line at
    once, dated and naming its rank as every other line of the job log does, so a reader can tell
    which rank said it and when. Another rank waits (the launcher stops it when
    rank 0 exits) and only then prints it, so the error is never lost when rank 0 is slower, or when
    the error is that rank's alone: its exit would make torchrun kill rank 0 before rank 0 said
    anything (seen with parallel.tp=3 on 4 ranks: torchrun's ChildFailedError, exit code 2, and no
    reason anywhere)."""
    import megatron_lite.cli as cli

    waits = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun sets both
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "train.stpes=3"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(job_log_error(0, 4, "unknown config key 'train.stpes'") + r".*\n", err), err
    assert waits == []
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "train.stpes=3"]) == 2
    assert waits == [cli.ERROR_GRACE_S] and cli.ERROR_GRACE_S >= 5
    err = capsys.readouterr().err
    assert re.fullmatch(job_log_error(1, 4, "unknown config key 'train.stpes'") + r".*\n", err), err
    told = UserError("the data holds token id 600")  # a loop failure that every rank has logged
    told.told_every_rank = True
    cli._report(told)
    assert waits == [cli.ERROR_GRACE_S]  # printed at once: rank 0 has nothing more to say
    assert re.fullmatch(job_log_error(1, 4, "the data holds token id 600") + "\n", capsys.readouterr().err)


def test_a_verdict_every_rank_reached_is_printed_once_per_machine(capsys, monkeypatch):
    """A verdict shared at the rendezvous is the same text on every rank: rank 0 says it, and after
    the wait only the first rank of each other machine (its log may be a file of its own); an srun
    step's ranks are placed by SLURM_PROCID / SLURM_LOCALID."""
    import megatron_lite.cli as cli

    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    verdict = UserError("rank 1 failed before joining the process group: unknown config key 'train.stepz'")
    verdict.raised_on_every_rank = True
    said = []
    for rank, local in ((0, 0), (1, 1), (2, 0), (3, 1)):
        cli._report(verdict, {"RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(local)})
        said.append(capsys.readouterr().err)
    assert [bool(e) for e in said] == [True, False, True, False], said
    assert re.fullmatch(job_log_error(2, 4, str(verdict)) + "\n", said[2]), said
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}
    cli._report(verdict, srun)
    assert capsys.readouterr().err == ""
    cli._report(verdict, {**srun, "SLURM_LOCALID": "0"})
    assert re.fullmatch(job_log_error(5, 8, str(verdict)) + "\n", capsys.readouterr().err)
    cli._report(verdict, {"RANK": "0", "WORLD_SIZE": "1"})  # one process: the bare line
    assert capsys.readouterr().err == f"error: {verdict}\n"
