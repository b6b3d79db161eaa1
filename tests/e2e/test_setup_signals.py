"""A signal during setup, before the first step (building the model, restoring a checkpoint): the run
ends at once with one line saying so and exit status 128 + the signal's number, and the checkpoint
being restored is left as it was (SIGTERM's and SIGUSR1's default action would end it silently)."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lite.cli import main
from megatron_lite.training.run_lock import LOCK_FILE

# `megatron-lite train` that says when it starts restoring its checkpoint, and restores slowly
SLOW_RESTORE = """
import sys, time
from megatron_lite.cli import main
from megatron_lite.training import trainer

restore = trainer.Trainer._restore

def slow_restore(self, *args):
    print("restoring", flush=True)
    time.sleep(600)  # a large checkpoint: the signal comes meanwhile
    restore(self, *args)

trainer.Trainer._restore = slow_restore
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _contents(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and p.name != LOCK_FILE  # names the last holder
    }


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_while_restoring_ends_the_run_with_one_line_and_leaves_the_checkpoint(tiny_args, tmp_path, sig):
    assert main(["train", *tiny_args, "train.exit_after=2"]) == 0
    run = tmp_path / "run"
    before = {**_contents(run / "checkpoints"), "metrics": _contents(run)["metrics.jsonl"]}
    script = tmp_path / "slow_restore.py"
    script.write_text(SLOW_RESTORE)
    proc = subprocess.Popen(
        [sys.executable, str(script), *tiny_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "restoring\n"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-3000:]
    said = [line for line in err.splitlines() if "received" in line]
    assert len(said) == 1 and "Traceback" not in err, err[-3000:]
    assert said[0].endswith(f"received {sig.name} during setup (before the first step); no checkpoint saved; exiting")
    # the checkpoint and the metrics as the first run left them
    assert {**_contents(run / "checkpoints"), "metrics": _contents(run)["metrics.jsonl"]} == before
