"""The preemption handler: SIGTERM and SIGUSR1 set a flag (no exit), and the old handlers come back;
what it says when the run is stopping for a failure; and which errors say a peer rank is gone."""

import os
import signal
import threading

import pytest
import torch
import torch.distributed as dist

from megatron_lite.errors import SetupInterrupted, UserError
from megatron_lite.launcher import failure_watch
from megatron_lite.training.fault import SETUP_SIGNALS, PreemptionHandler, SetupSignals, any_rank


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_flag_and_uninstall_restores(sig):
    before = signal.getsignal(sig)
    with PreemptionHandler() as handler:
        assert not handler.requested
        os.kill(os.getpid(), sig)  # delivered to the main thread before the next bytecode
        assert handler.requested
    assert signal.getsignal(sig) == before


def test_a_launched_rank_ignores_the_second_copy_of_a_preemption_signal():
    """SLURM signals every process of a step and torchrun passes its own copy on: one arriving after
    the rank saved and left the loop killed it."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with PreemptionHandler(ignore_after_request=True):  # no signal came: SIGTERM's handler comes back
            pass
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
        # a SIGUSR1 after the loop has nothing left to save: ignored (`sbatch --signal=USR1@120` can fire
        # while a rank that finished training closes its trackers; its default action killed the rank)
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR1)
        with PreemptionHandler(ignore_after_request=True) as handler:
            os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.requested and all(signal.getsignal(sig) == signal.SIG_IGN for sig in before)
        os.kill(os.getpid(), signal.SIGUSR1)  # the late copy: ignored (the default action would end pytest)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_rank_stopped_by_a_peers_signal_ignores_its_own_late_copy():
    """srun signals the ranks one by one: a rank that stopped for its peer's signal and saved got its
    own SIGTERM after the loop, and its default action ended it with 143 (the job counted as failed)."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        with PreemptionHandler(ignore_after_request=True) as handler:
            handler.peer_requested()
        assert not handler.requested and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # the late copy: ignored (the default action would end pytest)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_any_rank_is_identity_in_one_process():
    assert any_rank([True, False], torch.device("cpu")) == [True, False]


def test_the_signal_message_promises_no_save_that_may_not_come(caplog, monkeypatch):
    """A rank torchrun tears down after a peer failed said it was saving a checkpoint; it never did."""
    with PreemptionHandler() as handler:
        signal.raise_signal(signal.SIGTERM)
    assert handler.requested
    assert (
        "received SIGTERM: stopping at the end of this step with a checkpoint (if the step can finish)" in caplog.text
    )
    assert "saving a checkpoint" not in caplog.text
    caplog.clear()
    monkeypatch.setattr(failure_watch, "_handling", threading.Event())
    failure_watch._handling.set()  # the FailureWatch is stopping this rank for a failure
    with PreemptionHandler():
        signal.raise_signal(signal.SIGTERM)
    assert "received SIGTERM while the run stops for a failure: exiting without a checkpoint" in caplog.text


@pytest.mark.parametrize(
    "error, gone",
    [
        (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:1"), True),
        (RuntimeError("[gloo/transport/tcp/pair.cc:598] Read error [127.0.0.1]:2: Connection reset by peer"), True),
        (dist.DistBackendError("NCCL error: remote process exited or there was a network error"), True),
        (dist.DistNetworkError("failed to recv, got 0 bytes"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"), False),
        (ValueError("connection closed by peer"), False),  # not a collective's error
        (UserError("the data holds token id 1000000"), False),
    ],
)
def test_a_collective_failing_for_a_gone_peer_is_told_from_this_ranks_own_failure(error, gone):
    assert failure_watch.peer_gone(error) is gone


def test_a_signal_during_setup_raises_once_naming_it_and_uninstall_restores():
    """SLURM signals every process of a step and torchrun passes its own copy on: a second copy must
    not interrupt the rank on its way out (posting its failure to the other ranks)."""
    before = {sig: signal.getsignal(sig) for sig in SETUP_SIGNALS}
    with SetupSignals() as signals:
        with pytest.raises(SetupInterrupted) as error:
            os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)  # the second copy: ignored
        os.kill(os.getpid(), signal.SIGTERM)
    assert error.value.exit_status == 143 and signals.received == signal.SIGTERM
    assert str(error.value) == "received SIGTERM during setup (before the first step); no checkpoint saved"
    assert {sig: signal.getsignal(sig) for sig in SETUP_SIGNALS} == before


def test_a_signal_during_setup_leaves_a_failure_on_its_way_out_to_finish(monkeypatch, caplog):
    """Raising there would cut short the post that tells the other ranks why this one stops."""
    monkeypatch.setattr(failure_watch, "_handling", threading.Event())
    failure_watch._handling.set()  # the FailureWatch is posting this rank's failure
    with SetupSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)  # no SetupInterrupted
    assert signals.received == signal.SIGTERM
    assert "received SIGTERM while the run stops for a failure: exiting" in caplog.text
