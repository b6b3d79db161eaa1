"""The preemption handler: SIGTERM and SIGUSR1 set a flag (no exit), and the old handlers come back."""

import os
import signal

import pytest
import torch

from megatron_lite.training.fault import PreemptionHandler, any_rank


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_flag_and_uninstall_restores(sig):
    before = signal.getsignal(sig)
    with PreemptionHandler() as handler:
        assert not handler.requested
        os.kill(os.getpid(), sig)  # delivered to the main thread before the next bytecode
        assert handler.requested
    assert signal.getsignal(sig) == before


def test_any_rank_is_identity_in_one_process():
    assert any_rank([True, False], torch.device("cpu")) == [True, False]
