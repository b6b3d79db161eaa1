"""Two runs in one run directory: the second is refused at startup, on every rank, with one error
naming the directory, the live holder and the fix, and leaves the directory as it was (a run sharing
it would resume from the live run's checkpoint, write into its metrics.jsonl, and the two would prune
each other's checkpoints). A holder killed with SIGKILL (a crash, a requeue, a
torchrun restart) holds nothing: the next run goes on. The holder is a real child process holding
the lock through the run's own code (``run_lock.lock_run_dirs``)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from test_fail_together import _outputs, _plain_launch
from train_checks import job_log_error

from megatron_lite.cli import main

HOLDER = """
import sys, time
from megatron_lite.config import Config, fill_defaults
from megatron_lite.training.run_lock import lock_run_dirs

cfg = Config()
cfg.log.dir = sys.argv[1]
held = lock_run_dirs(fill_defaults(cfg))  # log.dir and its checkpoints/, as a run holds them
print("held", flush=True)
time.sleep(600)
"""
# `megatron-lite train` whose rank 1 ends at once after rank 0's error (no launcher ends it when rank 0 exits)
DRIVER = """
import sys
from megatron_lite import cli

cli.ERROR_GRACE_S = 0
sys.exit(cli.main(["train", *sys.argv[1:]]))
"""


def _hold(run: Path) -> subprocess.Popen:
    """A child process holding ``run``'s directories locked, as a live run does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # no exit handler runs: only the kernel lets the lock go
    proc.wait(timeout=60)


def _state(folder: Path) -> dict:
    """Every path under ``folder`` (itself included) with its bytes and modification time."""
    paths = [folder, *sorted(folder.rglob("*"))]
    return {str(p): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in paths}


def _in_use(run: Path, holder: subprocess.Popen) -> str:
    return f"log.dir={str(run)!r} is in use by another run (host {socket.gethostname()}, pid {holder.pid}, started "


def test_a_live_run_keeps_a_second_out_and_a_killed_one_does_not(tiny_args, tmp_path, capsys):
    assert main(["train", *tiny_args, "train.exit_after=2"]) == 0
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        before = _state(run)
        assert main(["train", *tiny_args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {_in_use(run, holder)}"), err
        assert err[0].endswith("wait for that run to end, stop it, or choose another log.dir"), err
        assert _state(run) == before
    finally:
        _kill(holder)
    assert main(["train", *tiny_args]) == 0  # resumed from step 2, as after a crash
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_two_ranks_are_both_refused_before_touching_the_directory(tiny_args, tmp_path):
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        (run / "metrics.jsonl").write_text('{"step": 60}\n')
        before = _state(run)
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        procs = _plain_launch(script, tiny_args, fail_rank=0)
        (out0, out1), _ = _outputs(procs, timeout_s=120)
        assert [p.returncode for p in procs] == [2, 2], (out0[-3000:], out1[-3000:])
        refused = f"rank 0 failed during locking the run directories: {_in_use(run, holder)}"
        assert re.match(job_log_error(0, 2, refused), out0.strip().splitlines()[-1]), out0[-3000:]
        # the same verdict, from rank 0's machine: its second rank adds no copy of the line
        assert "error: " not in out1, out1[-3000:]
        assert _state(run) == before
    finally:
        _kill(holder)
