"""A rank whose training loop raises stops every rank within seconds, and their logs name its error:
the other ranks were blocked in their next collective until parallel.timeout_s (here 300 s), and
reported only a timeout. Driven through `megatron-lite train`, launched plainly (rank 0 hosts the
rendezvous store) and under torchrun (its agent hosts it)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ports import free_port
from test_torchrun_launch import clean_env
from train_checks import job_log_error

from megatron_lite.cli import main
from megatron_lite.data.gpt_dataset import PretrainingLoader

FOREIGN_TOKEN = 10**6  # an id of another tokenizer: the trainer's check refuses it before the embedding
# `megatron-lite train` whose data hands rank FAIL_RANK (alone) a token id beyond the vocabulary at step 3
DRIVER = f"""
import os, sys
from megatron_lite.cli import main
from megatron_lite.data.gpt_dataset import PretrainingLoader

next_step = PretrainingLoader.next_step

def next_step_with_a_foreign_token(self):
    step = self.consumed_samples // self.global_batch_size + 1
    micro = next_step(self)
    if step == 3 and os.environ["RANK"] == os.environ["FAIL_RANK"]:
        micro[0][0, 0] = {FOREIGN_TOKEN}
    return micro

PretrainingLoader.next_step = next_step_with_a_foreign_token
sys.exit(main(["train", *sys.argv[1:]]))
"""
MESSAGE = f"failed at step 3: the data holds token id {FOREIGN_TOKEN} but model.vocab_size is 512 (step 3)"
PROMPT_S = 60  # start-up, 3 steps and the stop; the collective timeout is 300 s
ASYNC_SAVE_AT_2 = ["parallel.timeout_s=300", "checkpoint.async=true", "checkpoint.every=2"]


def _outputs(procs: list[subprocess.Popen], timeout_s: float) -> tuple[list[str], list[float]]:
    """(outputs, seconds until each process exited); whatever still runs after ``timeout_s`` is killed."""
    start, outs, ended = time.monotonic(), [], []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - start)))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(q.pid, signal.SIGKILL)
            outs.append(p.communicate()[0])
        ended.append(time.monotonic() - start)
    return outs, ended


def _plain_launch(script: Path, args: list[str], fail_rank: int) -> list[subprocess.Popen]:
    """Ranks 0 and 1 of ``script`` launched without torchrun (rank 0 hosts the store)."""
    port = str(free_port())
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "FAIL_RANK": str(fail_rank)}
    return [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            env=clean_env(RANK=str(r), LOCAL_RANK=str(r), **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in (0, 1)
    ]


def test_store_host_failing_mid_run_stops_the_other_rank_with_its_error(tiny_args, tmp_path):
    """Rank 0 fails while it hosts the store: it stays until rank 1 has read its error. The async
    save of step 2 still in flight is not committed (it would need rank 0), and both logs say so."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    procs = _plain_launch(script, [*tiny_args, *ASYNC_SAVE_AT_2], fail_rank=0)
    (out0, out1), ended = _outputs(procs, timeout_s=120)
    assert max(ended) < PROMPT_S, (ended, out1[-3000:])
    assert [p.returncode for p in procs] == [2, 2], (out0[-3000:], out1[-3000:])
    last = out0.strip().splitlines()[-1]
    assert re.match(job_log_error(0, 2, "the data holds token id"), last), out0[-3000:]
    stopped = [line for line in out1.splitlines() if f"rank 0 {MESSAGE}" in line]
    assert len(stopped) == 1 and "[rank 1/2] ERROR" in stopped[0], out1[-3000:]
    assert stopped[0].endswith("stopping rank 1 too (checkpoint of step 2, still in flight, was not saved)"), stopped
    assert "checkpoint of step 2 was not saved: it was still in flight" in out0, out0[-3000:]
    ckpt = tmp_path / "run" / "checkpoints"
    assert not (ckpt / "latest").exists() and not (ckpt / "step_00000002").exists(), list(ckpt.iterdir())


def test_rank_failing_under_torchrun_stops_rank_zero_with_its_error(tiny_args, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.Popen(
        [*cmd, *tiny_args, *ASYNC_SAVE_AT_2],
        env=clean_env(FAIL_RANK="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    (out,), ended = _outputs([proc], timeout_s=120)
    assert ended[0] < PROMPT_S and proc.returncode != 0, (ended, out[-4000:])
    own = f"[rank 1/2] ERROR megatron_lite.launcher.failure_watch: rank 1 {MESSAGE}"
    assert own in out, out[-4000:]
    assert f"[rank 0/2] ERROR megatron_lite.launcher.failure_watch: rank 1 {MESSAGE}" in out, out[-4000:]


# `megatron-lite train` whose rank FAIL_RANK runs out of memory building its model, after the mesh
SETUP_DRIVER = """
import os, sys
from megatron_lite.cli import main
from megatron_lite.training import trainer

class OutOfMemoryEngine(trainer.Engine):
    def __init__(self, *args, **kwargs):
        if os.environ["RANK"] == os.environ["FAIL_RANK"]:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        super().__init__(*args, **kwargs)

trainer.Engine = OutOfMemoryEngine
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_rank_failing_in_setup_after_the_mesh_stops_the_others_with_its_error(tiny_args, tmp_path):
    """Rank 1 fails building its model; rank 0 went on to its first step's collective, where it
    waited parallel.timeout_s (300 s here) before, then reported only a timeout."""
    script = tmp_path / "driver.py"
    script.write_text(SETUP_DRIVER)
    procs = _plain_launch(script, [*tiny_args, "parallel.timeout_s=300"], fail_rank=1)
    (out0, out1), ended = _outputs(procs, timeout_s=120)
    assert max(ended) < PROMPT_S, (ended, out0[-3000:])
    assert [p.returncode for p in procs] == [1, 1], (out0[-3000:], out1[-3000:])
    why = "rank 1 failed during setup: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"
    # rank 0's watch reads the post first, or its collective fails first as rank 1 unwinds: either way
    # it reports rank 1's error (failure_watch.py's module docstring)
    ways = (f"{why}; stopping rank 0 too", f"{why}; this rank's collective failed with it")
    assert any(way in out0 for way in ways), out0[-3000:]
    assert f"{why}; stopping every rank" in out1, out1[-3000:]


LOST_STORE_SCRIPT = """
import os, signal, time
import torch.distributed as dist
from megatron_lite.launcher import failure_watch
from megatron_lite.parallel.mesh import init_distributed

failure_watch.STORE_LOST_GRACE_S = 1.0  # the pause for the end of rank 0's run, which this run never reaches
env = init_distributed(timeout_s=300)
with failure_watch.FailureWatch(300) as watch:
    dist.barrier()
    if env.rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # killed for memory: no exception, nothing posted
    time.sleep(120)  # as in a NCCL wait for rank 0 (gloo on one machine would raise at once instead)
"""


def test_rank_zero_killed_stops_the_others_naming_it(tmp_path):
    script = tmp_path / "lost.py"
    script.write_text(LOST_STORE_SCRIPT)
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env=clean_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in (0, 1)
    ]
    (_, out1), ended = _outputs(procs, timeout_s=90)
    assert procs[0].returncode == -signal.SIGKILL and procs[1].returncode == 1, out1[-3000:]
    assert ended[1] < PROMPT_S, ended
    assert "rank 0 is gone: the rendezvous store it hosts stopped answering" in out1, out1[-3000:]


# `megatron-lite train` whose rank FAIL_RANK is killed at step 3 (for memory, say): it raises nothing
KILLED_DRIVER = """
import os, signal, sys, time
from megatron_lite.cli import main
from megatron_lite.data.gpt_dataset import PretrainingLoader

next_step = PretrainingLoader.next_step

def next_step_then_killed(self):
    if self.consumed_samples == 2 * self.global_batch_size and os.environ["RANK"] == os.environ["FAIL_RANK"]:
        print(f"killed at {time.time()}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return next_step(self)

PretrainingLoader.next_step = next_step_then_killed
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_survivor_whose_collective_fails_for_a_killed_peer_says_so_and_leaves_at_once(tiny_args, tmp_path):
    """Rank 1 killed at step 3: rank 0's collective fails (gloo: "Connection closed by peer"). Rank 0
    logged "rank 0 failed at step 3" as if the failure were its own, and waited PEER_WAIT_S (15 s)
    for rank 1, dead, to read it."""
    script = tmp_path / "driver.py"
    script.write_text(KILLED_DRIVER)
    procs = _plain_launch(script, [*tiny_args, "parallel.timeout_s=300"], fail_rank=1)
    (out0, out1), _ = _outputs(procs, timeout_s=90)
    ended0 = time.time()  # rank 0 was waited for first: it ended before this
    assert procs[1].returncode == -signal.SIGKILL and procs[0].returncode == 1, (out0[-3000:], out1[-3000:])
    killed = float(out1.split("killed at ")[1].split()[0])
    assert ended0 - killed < 8, (ended0 - killed, out0[-3000:])
    gone = "rank 0 found at step 3 that a peer rank is gone (its collective failed: RuntimeError: "
    assert gone in out0 and "stopping every rank" in out0, out0[-3000:]
    assert "rank 0 failed" not in out0, out0[-3000:]
    assert "Traceback" not in out0, out0[-3000:]  # the line above says it all; where the collective was adds nothing


def test_the_survivor_of_a_killed_store_host_says_so_without_a_traceback(tiny_args, tmp_path):
    """Rank 0, which hosts the store, killed at step 3: rank 1's collective fails and the store is gone
    with it, so rank 1 can tell nobody. Its line says a peer is gone; a traceback of the collective
    followed it, which adds nothing."""
    script = tmp_path / "driver.py"
    script.write_text(KILLED_DRIVER)
    procs = _plain_launch(script, [*tiny_args, "parallel.timeout_s=300"], fail_rank=0)
    (_, out1), ended = _outputs(procs, timeout_s=90)
    assert procs[0].returncode == -signal.SIGKILL and procs[1].returncode == 1, out1[-3000:]
    assert ended[1] < PROMPT_S, ended
    assert "rank 1 found at step 3 that a peer rank is gone (its collective failed: " in out1, out1[-3000:]
    assert "Traceback" not in out1, out1[-3000:]


def _fail_at_step_3(monkeypatch, error: BaseException) -> None:
    next_step = PretrainingLoader.next_step

    def failing(self):
        if self.consumed_samples == 2 * self.global_batch_size:
            raise error
        return next_step(self)

    monkeypatch.setattr(PretrainingLoader, "next_step", failing)


def test_one_process_commits_the_save_in_flight_when_it_fails(tiny_args, tmp_path, monkeypatch):
    """No peer to wait for: the async save of step 2, complete, is committed before the error exits."""
    _fail_at_step_3(monkeypatch, OSError(5, "Input/output error"))
    with pytest.raises(OSError, match="Input/output error"):
        main(["train", *tiny_args, *ASYNC_SAVE_AT_2])
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000002" and (ckpt / "step_00000002/metadata.json").exists()


def test_one_process_interrupted_drops_the_save_in_flight_saying_so(tiny_args, tmp_path, monkeypatch, caplog):
    _fail_at_step_3(monkeypatch, KeyboardInterrupt())
    assert main(["train", *tiny_args, *ASYNC_SAVE_AT_2]) == 130
    assert "checkpoint of step 2 was not saved: it was still in flight (checkpoint.async)" in caplog.text
    ckpt = tmp_path / "run" / "checkpoints"
    assert not (ckpt / "latest").exists() and not (ckpt / "step_00000002").exists()


# `megatron-lite train` whose rank FAIL_RANK gets SIGTERM while it opens the data, before the mesh
SIGNAL_IN_SETUP_DRIVER = """
import os, signal, sys
from megatron_lite.cli import main
from megatron_lite.training import trainer

build_data = trainer.build.build_data

def build_data_then_terminated(*args, **kwargs):
    if os.environ["RANK"] == os.environ["FAIL_RANK"]:
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. its torchrun was killed (launcher/orphan.py)
    return build_data(*args, **kwargs)

trainer.build.build_data = build_data_then_terminated
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_signal_to_one_rank_during_setup_stops_every_rank_naming_it(tiny_args, tmp_path):
    """Both ranks exit 143 naming the signalled rank: without the setup handler rank 1 would end
    silently (SIGTERM's default action) and rank 0 fail in a setup collective (NCCL: hang)."""
    script = tmp_path / "driver.py"
    script.write_text(SIGNAL_IN_SETUP_DRIVER)
    procs = _plain_launch(script, [*tiny_args, "parallel.timeout_s=300"], fail_rank=1)
    (out0, out1), _ = _outputs(procs, timeout_s=120)
    assert [p.returncode for p in procs] == [143, 143], (out0[-3000:], out1[-3000:])
    signalled = "received SIGTERM during setup (before the first step); no checkpoint saved"
    assert f"[rank 1/2] WARNING megatron_lite.training.fault: {signalled}; exiting" in out1, out1[-3000:]
    assert f"rank 1 failed during setup: SetupInterrupted: {signalled}; stopping rank 0 too" in out0, out0[-3000:]
    assert "Traceback" not in out0 + out1, (out0[-3000:], out1[-3000:])
