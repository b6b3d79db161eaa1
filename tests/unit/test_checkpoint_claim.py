"""An object-store checkpoint.dir is claimed by one run: a second run is refused at startup, a run
whose claim was overwritten stops at its next save before writing, and a dead run's claim is taken
over by a later start of its launch or by a run in its log.dir. fsspec's ``memory://`` filesystem
stands in for the object store (the same client API; tests/e2e/test_checkpoint_s3.py runs against
S3); another run is this process with another run id (``tempfiles.RUN_ID``)."""

import json
import logging
import os
import uuid

import fsspec
import pytest
import torch

from megatron_lite.checkpoint.boxes import full_box
from megatron_lite.checkpoint.claim import CLAIM, read_claim
from megatron_lite.checkpoint.shards import Piece
from megatron_lite.checkpoint.storage import Storage
from megatron_lite.checkpoint.writer import Checkpointer
from megatron_lite.config import Config, fill_defaults
from megatron_lite.data import tempfiles
from megatron_lite.data.tempfiles import holder_info, open_locked
from megatron_lite.errors import UserError
from megatron_lite.training.run_lock import LOCK_FILE, hold_run_dirs, lock_run_dirs, release


@pytest.fixture
def store():
    """A fresh ``memory://`` checkpoint.dir (the memory filesystem is one per process)."""
    url = f"memory://ckpt-{uuid.uuid4().hex[:12]}/run"
    fsspec.filesystem("memory").mkdir(url.removeprefix("memory://"))
    yield url
    fsspec.filesystem("memory").rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def _cfg(log_dir, ckpt) -> Config:
    cfg = Config()
    cfg.log.dir, cfg.checkpoint.dir = str(log_dir), ckpt
    return fill_defaults(cfg)


def _as_run(monkeypatch, run: str) -> None:
    """This process from here on as the run ``run``, another process than the one before."""
    monkeypatch.setattr(tempfiles, "RUN_ID", run)


def _listing(url: str) -> dict:
    fs = fsspec.filesystem("memory")
    return {p: fs.cat_file(p) for p in fs.find(url.removeprefix("memory://"))}


def _save(writer: Checkpointer, step: int) -> None:
    meta = {"step": step, "weights_only": True, "config": {}, "optimizer": None, "trainer": None, "lineage": None}
    meta["layout"] = {"world_size": 1, "param_dtype": "float32"}
    writer.save(step, [Piece("model/w", (2,), full_box((2,)), torch.ones(2))], {}, (0, 0, 0), meta)


def test_a_second_run_is_refused_at_startup_and_the_claim_goes_when_the_first_ends(
    tmp_path, store, monkeypatch, caplog
):
    _as_run(monkeypatch, "a" * 32)
    with caplog.at_level(logging.INFO), hold_run_dirs(_cfg(tmp_path / "a", store), rank=0):
        assert read_claim(Storage(store))["run"] == "a" * 32
        assert (
            f"checkpoint.dir={store!r} is an object store, which has no locks: this run claims it with " in caplog.text
        )
        before = _listing(store)
        _as_run(monkeypatch, "b" * 32)
        with pytest.raises(UserError) as refused:
            lock_run_dirs(_cfg(tmp_path / "b", store))
        message = str(refused.value)
        assert message.startswith(f"checkpoint.dir={store!r} is claimed by another run (host ")
        assert f"pid {os.getpid()}, started 20" in message and f"claim object {store}/{CLAIM})" in message
        assert message.endswith(
            f"(if that run is gone without ending, e.g. its machine crashed, delete {store}/{CLAIM})"
        )
        assert _listing(store) == before  # nothing written there
        fd, taken = open_locked(tmp_path / "b" / LOCK_FILE)  # the refused run let go of its log.dir
        assert taken is True
        release([fd])
        _as_run(monkeypatch, "a" * 32)
    assert read_claim(Storage(store)) is None  # the first run ended: its claim is gone
    _as_run(monkeypatch, "b" * 32)
    release(lock_run_dirs(_cfg(tmp_path / "b", store)))
    assert read_claim(Storage(store))["run"] == "b" * 32


def test_a_run_whose_claim_was_overwritten_stops_at_its_next_save_before_writing(tmp_path, store, monkeypatch):
    """Two runs started at one moment both read no claim; the later write wins, the other is stopped."""
    _as_run(monkeypatch, "a" * 32)
    release(lock_run_dirs(_cfg(tmp_path / "a", store)))
    writer = Checkpointer(store, keep=2, async_save=False)
    _save(writer, 2)
    Storage(store).write_text(CLAIM, json.dumps({**holder_info(), "run": "b" * 32}))
    before = _listing(store)
    with pytest.raises(UserError) as refused:
        _save(writer, 4)
    assert str(refused.value).startswith(f"checkpoint of step 4 was not saved: checkpoint.dir={store!r} is claimed by")
    assert _listing(store) == before  # step 2 and latest untouched, no step 4
    writer.close()


def test_a_dead_runs_claim_is_taken_over_by_its_next_start_or_its_log_dir(tmp_path, store, monkeypatch, caplog):
    """A claim left by a crash: a requeue of its SLURM job, or a run in its log.dir, takes it over;
    a run in another log.dir outside that job is refused."""
    dead = {**holder_info(), "run": "d" * 32, "slurm_job": "77", "slurm_restart": "0"}
    Storage(store).write_text(CLAIM, json.dumps(dead))
    (tmp_path / "dead").mkdir()
    (tmp_path / "dead" / LOCK_FILE).write_text(json.dumps(dead))  # its log.dir lock file, no holder now
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    with pytest.raises(UserError, match=r"is claimed by another run \(.*, SLURM job 77; claim object"):
        lock_run_dirs(_cfg(tmp_path / "other", store))
    with caplog.at_level(logging.INFO):
        release(lock_run_dirs(_cfg(tmp_path / "dead", store)))  # its log.dir: it has ended
    assert read_claim(Storage(store))["run"] == tempfiles.RUN_ID
    assert "taking over the claim of host " in caplog.text
    Storage(store).write_text(CLAIM, json.dumps(dead))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    release(lock_run_dirs(_cfg(tmp_path / "requeued", store)))  # a requeue of its job, in any log.dir
    assert read_claim(Storage(store))["run"] == tempfiles.RUN_ID


def test_a_claim_that_cannot_be_read_or_deleted(tmp_path, store, monkeypatch, caplog):
    real = Storage.read_text

    def denied(self, rel):
        if rel == CLAIM:
            raise PermissionError("Access Denied")
        return real(self, rel)

    monkeypatch.setattr(Storage, "read_text", denied)
    with pytest.raises(UserError) as refused:
        lock_run_dirs(_cfg(tmp_path, store))
    assert str(refused.value) == (
        f"checkpoint.dir={store!r}: its claim object {store}/{CLAIM} cannot be read or written: PermissionError: "
        "Access Denied; check the bucket, the credentials and the endpoint (AWS_ENDPOINT_URL)"
    )
    fd, taken = open_locked(tmp_path / LOCK_FILE)  # log.dir let go
    assert taken is True
    release([fd])
    monkeypatch.undo()
    remove = Storage.remove

    def lost(self, rel):
        if rel == CLAIM:
            raise OSError("lost")
        remove(self, rel)

    monkeypatch.setattr(Storage, "remove", lost)
    with hold_run_dirs(_cfg(tmp_path, store), rank=0):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"the claim object {store}/{CLAIM} of this run could not be deleted (OSError: lost): a run in another "
        "log.dir is refused there until it is deleted"
    ]


@pytest.mark.parametrize("content", [b"", b"not json", b'{"run": "x"}', b"\xff\xfe binary"])
def test_a_claim_object_that_names_no_run_is_refused_and_kept(tmp_path, store, monkeypatch, content):
    """A claim object that is not a run's claim (empty, not JSON, no holder, not text) was read as no
    claim and overwritten: a run started over whatever uses the directory. Starting and each save are
    refused naming the object and the fix; the run's end leaves the object as it is."""
    release(lock_run_dirs(_cfg(tmp_path / "a", store)))
    writer = Checkpointer(store, keep=2, async_save=False)
    _save(writer, 2)
    fsspec.filesystem("memory").pipe_file(f"{store.removeprefix('memory://')}/{CLAIM}", content)
    before = _listing(store)
    why = f"checkpoint.dir={store!r} holds a claim object {store}/{CLAIM} that names no run (it holds "
    fix = f"; if none does, delete {store}/{CLAIM}, else choose another checkpoint.dir"
    with pytest.raises(UserError) as refused:
        _save(writer, 4)
    assert str(refused.value).startswith(f"checkpoint of step 4 was not saved: {why}"), refused.value
    assert str(refused.value).endswith(fix)
    writer.close()
    _as_run(monkeypatch, "b" * 32)
    with pytest.raises(UserError) as refused, hold_run_dirs(_cfg(tmp_path / "b", store), rank=0):
        pass
    assert str(refused.value).startswith(why) and str(refused.value).endswith(fix), refused.value
    shown = "bytes that are not UTF-8 text" if content.startswith(b"\xff") else repr(content.decode())
    assert f"(it holds {shown}, not a run's claim" in str(refused.value)
    assert _listing(store) == before  # the object kept, nothing written


def test_rank_0_probes_an_object_store_once_and_a_bucket_it_cannot_write_gets_the_probes_error(
    tmp_path, store, monkeypatch
):
    """The claim at startup and the trainer's preflight each wrote and deleted a probe object on rank 0:
    the preflight's probe alone stays; a claim that fails still reports the probe's error first."""
    from megatron_lite.training.preflight import check_checkpoint_dir

    written = []
    real = Storage.write_text
    monkeypatch.setattr(Storage, "write_text", lambda self, rel, text: written.append(rel) or real(self, rel, text))
    cfg = _cfg(tmp_path, store)
    with hold_run_dirs(cfg, rank=0):
        check_checkpoint_dir(cfg)  # as Trainer._preflight runs it on every rank
    probes = [rel for rel in written if rel.startswith(".megatron-lite-probe-")]
    assert len(probes) == 1 and written.count(CLAIM) == 1, written

    def no_bucket(self, rel, text):
        raise FileNotFoundError(f"NoSuchBucket: {rel}")

    monkeypatch.setattr(Storage, "write_text", no_bucket)
    with pytest.raises(UserError) as refused:
        lock_run_dirs(_cfg(tmp_path / "b", store))
    assert str(refused.value).startswith(f"checkpoint.dir={store!r} is not writable: FileNotFoundError: NoSuchBucket")
