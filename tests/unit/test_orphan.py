"""A rank under torchrun gets SIGTERM when its launcher dies: a tiny launcher -> rank chain of plain
Python processes (no torch, no process group) through the function ``init_distributed`` calls."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_lite.launcher.orphan import exit_with_launcher

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

RANK = """
import os, signal, sys, time
start_parent = os.getppid()
import megatron_lite  # records the parent this process started with
from megatron_lite.launcher.orphan import exit_with_launcher

report = open(sys.argv[1], "a", buffering=1)

def on_sigterm(signum, frame):  # what the trainer's preemption handler would turn into a save
    report.write("SIGTERM\\n")
    os._exit(0)

signal.signal(signal.SIGTERM, on_sigterm)
print("imported", flush=True)
if sys.argv[2] == "late":  # ask only once the launcher is gone (it died while we imported torch)
    deadline = time.monotonic() + 20
    while os.getppid() == start_parent and time.monotonic() < deadline:
        time.sleep(0.01)
report.write(f"armed={exit_with_launcher()}\\n")
time.sleep(20)
report.write("still running\\n")
"""

LAUNCHER = """
import os, subprocess, sys, time
env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
rank = subprocess.Popen([sys.executable, *sys.argv[1:]], stdout=subprocess.PIPE, env=env)
rank.stdout.readline()  # it has imported megatron_lite
print(rank.pid, flush=True)
if sys.argv[3] == "late":
    os._exit(0)
time.sleep(60)
"""


def _wait_for(path: Path, text: str, timeout_s: float = 15.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = path.read_text() if path.exists() else ""
        if text in got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not reported within {timeout_s} s; got {got!r}")


@contextlib.contextmanager
def _launch(tmp_path: Path, mode: str):
    """Start launcher -> rank; yields (launcher, rank pid, report file); kills what is left."""
    (tmp_path / "rank.py").write_text(RANK)
    report = tmp_path / "report"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path / "rank.py"), str(report), mode], stdout=subprocess.PIPE
    )
    rank_pid = None
    try:
        rank_pid = int(launcher.stdout.readline())
        yield launcher, rank_pid, report
    finally:
        launcher.kill()
        launcher.wait()
        if rank_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank_pid, signal.SIGKILL)


def test_rank_gets_sigterm_when_its_launcher_is_killed(tmp_path):
    with _launch(tmp_path, "early") as (launcher, _, report):
        _wait_for(report, "armed=True")
        launcher.kill()  # SIGKILL: the launcher forwards nothing
        assert _wait_for(report, "SIGTERM").splitlines() == ["armed=True", "SIGTERM"]


def test_rank_whose_launcher_died_before_it_asked_signals_itself(tmp_path):
    with _launch(tmp_path, "late") as (launcher, _, report):
        launcher.wait()
        assert _wait_for(report, "SIGTERM").splitlines() == ["SIGTERM"]  # before exit_with_launcher returned


def test_nothing_is_requested_outside_torchrun():
    assert exit_with_launcher({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}) is False
