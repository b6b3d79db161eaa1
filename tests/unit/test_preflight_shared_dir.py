"""checkpoint.dir must be one directory for every rank: a machine-local one is refused at startup.

The collectives are replaced by their single-process effect (the token rank 0 broadcasts; a setup
block that raises); the real multi-rank run of this check happens in every multi-rank training test."""

import contextlib
from pathlib import Path

import pytest

from megatron_lite.config import Config
from megatron_lite.errors import UserError
from megatron_lite.training import preflight


@pytest.fixture
def one_process(monkeypatch):
    sent = {}

    def broadcast(objects, src):
        if objects[0] is None:  # a rank other than 0 receives the token rank 0 sent
            objects[0] = sent["token"]
        sent["token"] = objects[0]

    monkeypatch.setattr(preflight.dist, "broadcast_object_list", broadcast)
    monkeypatch.setattr(preflight, "fail_fast_setup", lambda what: contextlib.nullcontext())
    return sent


def test_a_shared_checkpoint_dir_passes_and_leaves_nothing(tmp_path, one_process):
    cfg = Config()
    cfg.checkpoint.dir = str(tmp_path)
    preflight.check_shared_checkpoint_dir(cfg, rank=0, world_size=2)
    assert list(Path(tmp_path).iterdir()) == []


def test_a_rank_that_does_not_see_rank_0s_file_is_one_error(tmp_path, one_process, monkeypatch):
    """Rank 1 on another machine: rank 0's file is in rank 0's directory, not in this one."""
    monkeypatch.setattr(preflight, "SHARED_WAIT_S", 0.3)
    one_process["token"] = "f" * 32  # what rank 0 sent; its file went to its own machine's disk
    cfg = Config()
    cfg.checkpoint.dir = str(tmp_path / "local")
    (tmp_path / "local").mkdir()
    with pytest.raises(UserError, match=r"not the same directory on every machine: rank 1 .* all machines share"):
        preflight.check_shared_checkpoint_dir(cfg, rank=1, world_size=2)


def test_one_process_or_an_object_store_is_not_checked(tmp_path):
    cfg = Config()
    cfg.checkpoint.dir = str(tmp_path / "absent")  # would fail to write: not touched
    preflight.check_shared_checkpoint_dir(cfg, rank=0, world_size=1)
    cfg.checkpoint.dir = "s3://bucket/run"
    preflight.check_shared_checkpoint_dir(cfg, rank=0, world_size=4)
    assert not (tmp_path / "absent").exists()
