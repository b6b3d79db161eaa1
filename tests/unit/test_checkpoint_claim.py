"""An object-store checkpoint.dir is claimed by one run: a second run is refused at startup, a run
whose claim was overwritten stops at its next save before writing, and a dead run's claim is taken
over by a later start of its launch or by a run in its log.dir. fsspec's ``memory://`` filesystem
stands in for the object store (the same client API; tests/e2e/test_checkpoint_s3.py runs against
S3); another run is this process with another run id (``tempfiles.RUN_ID``)."""

import errno
import json
import logging
import os
import uuid

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractFileSystem

from megatron_lite.checkpoint.boxes import full_box
from megatron_lite.checkpoint.claim import CLAIM, CLAIM_TRIES, claim, claimed_by_another, read_claim
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
    for name in ("write_text", "create_text"):
        real = getattr(Storage, name)
        monkeypatch.setattr(
            Storage, name, lambda self, rel, text, real=real: written.append(rel) or real(self, rel, text)
        )
    cfg = _cfg(tmp_path, store)
    with hold_run_dirs(cfg, rank=0):
        check_checkpoint_dir(cfg)  # as Trainer._preflight runs it on every rank
    probes = [rel for rel in written if rel.startswith(".megatron-lite-probe-")]
    assert len(probes) == 1 and written.count(CLAIM) == 2, written  # the claim's create, and its refused repeat

    def no_bucket(self, rel, text):
        raise FileNotFoundError(f"NoSuchBucket: {rel}")

    monkeypatch.setattr(Storage, "write_text", no_bucket)
    monkeypatch.setattr(Storage, "create_text", no_bucket)
    with pytest.raises(UserError) as refused:
        lock_run_dirs(_cfg(tmp_path / "b", store))
    assert str(refused.value).startswith(f"checkpoint.dir={store!r} is not writable: FileNotFoundError: NoSuchBucket")


OTHER = {**holder_info(), "pid": 4242, "run": "b" * 32}  # another run, claiming through claim() itself


def _store_without_conditional_create(monkeypatch, store_kind: str) -> None:
    """The memory filesystem as a store without a conditional create: its client has none (fsspec's
    generic check-then-write), the store ignores the condition, or it answers 501 Not Implemented."""
    real = MemoryFileSystem.pipe_file

    def ignores(self, path, value, mode="overwrite", **kwargs):
        real(self, path, value, **kwargs)

    def rejects(self, path, value, mode="overwrite", **kwargs):
        if mode == "create":
            raise OSError(errno.ENOSYS, "Not Implemented")
        real(self, path, value, **kwargs)

    kinds = {"client": AbstractFileSystem.pipe_file, "ignores": ignores, "rejects": rejects}
    monkeypatch.setattr(MemoryFileSystem, "pipe_file", kinds[store_kind])


def _after(monkeypatch, method: str, store: str) -> None:
    """``OTHER`` claims ``store`` right after this run's first ``Storage.<method>`` of the claim object."""
    real, raced = getattr(Storage, method), []

    def then_other_claims(self, rel, *args):
        try:
            return real(self, rel, *args)
        finally:
            if rel == CLAIM and not raced:
                raced.append(True)
                claim(Storage(store), OTHER, None)

    monkeypatch.setattr(Storage, method, then_other_claims)


@pytest.mark.parametrize("store_kind", ["conditional", "client", "ignores", "rejects"])
def test_two_runs_claiming_at_the_same_moment(tmp_path, store, monkeypatch, caplog, store_kind):
    """Both read no claim, then both claim. With the store's conditional create the second create is
    refused: one run holds the claim and the other is refused at startup, naming it. Without one the
    later write wins, and the run whose claim was overwritten is refused at its first save."""
    if store_kind != "conditional":
        _store_without_conditional_create(monkeypatch, store_kind)
    _after(monkeypatch, "read_text", store)  # the other run reads and claims between our read and our create
    if store_kind == "conditional":
        with pytest.raises(UserError) as refused:
            lock_run_dirs(_cfg(tmp_path, store))
        assert str(refused.value).startswith(f"checkpoint.dir={store!r} is claimed by another run (host ")
        assert "pid 4242, started " in str(refused.value)
        assert read_claim(Storage(store)) == OTHER
        fd, taken = open_locked(tmp_path / LOCK_FILE)  # the refused run let go of its log.dir
        assert taken is True
        release([fd])
        return
    with caplog.at_level(logging.INFO):
        release(lock_run_dirs(_cfg(tmp_path, store)))
    assert read_claim(Storage(store))["run"] == tempfiles.RUN_ID  # the later write won
    assert "the claim was read, then written: the store (or its fsspec client) has no conditional create" in (
        caplog.text
    )
    _as_run(monkeypatch, OTHER["run"])
    assert claimed_by_another(Storage(store)).startswith(f"checkpoint.dir={store!r} is claimed by another run")


def test_a_claim_made_with_the_stores_conditional_create_says_so(tmp_path, store, caplog):
    with caplog.at_level(logging.INFO):
        release(lock_run_dirs(_cfg(tmp_path, store)))
    assert "the claim was created with the store's conditional create: of two runs started at the same " in (
        caplog.text
    )


def test_a_run_claiming_during_a_takeover_wins_and_the_takeover_is_refused_at_startup(tmp_path, store, monkeypatch):
    """A takeover deletes the ended run's claim, then creates its own: a run that claims in between wins
    the create, and the run taking over is refused at startup, naming it."""
    dead = {**holder_info(), "run": "d" * 32}
    Storage(store).write_text(CLAIM, json.dumps(dead))
    (tmp_path / LOCK_FILE).write_text(json.dumps(dead))  # its log.dir: it has ended
    _after(monkeypatch, "remove", store)
    with pytest.raises(UserError, match=r"is claimed by another run \(host .*, pid 4242, started "):
        lock_run_dirs(_cfg(tmp_path, store))
    assert read_claim(Storage(store)) == OTHER


def test_a_create_that_s3_answers_with_a_conflict_reads_the_claim_again(tmp_path, store, monkeypatch):
    """Of concurrent conditional creates S3 lets one win and answers the others 409
    ConditionalRequestConflict (an OSError from s3fs): the loser reads the claim again and is refused."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    real, answered = MemoryFileSystem.pipe_file, []

    def conflict(self, path, value, mode="overwrite", **kwargs):
        if mode == "create" and not answered:
            answered.append(True)
            claim(Storage(store), OTHER, None)  # the other run's create, in flight with this one, wins
            raise translate_boto_error(ClientError({"Error": {"Code": "ConditionalRequestConflict"}}, "PutObject"))
        real(self, path, value, mode, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", conflict)
    with pytest.raises(UserError, match=r"is claimed by another run \(host .*, pid 4242, started "):
        lock_run_dirs(_cfg(tmp_path, store))
    assert read_claim(Storage(store)) == OTHER


def test_claims_that_keep_appearing_and_going_end_in_one_error(tmp_path, store, monkeypatch):
    tries = []

    def taken_and_gone(self, rel, text):
        tries.append(rel)
        raise FileExistsError(rel)

    monkeypatch.setattr(Storage, "create_text", taken_and_gone)
    with pytest.raises(UserError) as refused:
        lock_run_dirs(_cfg(tmp_path, store))
    assert str(refused.value) == (
        f"checkpoint.dir={store!r}: other runs' claims ({store}/{CLAIM}) appeared and went {CLAIM_TRIES} times "
        "while this run claimed it: other runs start and end in it; start one run per checkpoint.dir"
    )
    assert tries == [CLAIM] * CLAIM_TRIES


def test_create_text_refuses_an_existing_object_and_which_clients_create_exclusively(tmp_path, store, monkeypatch):
    for where in (Storage(tmp_path), Storage(store)):
        assert where.creates_exclusively
        where.create_text("x", "first")
        with pytest.raises(FileExistsError):
            where.create_text("x", "second")
        assert where.read_text("x") == "first"
    monkeypatch.setattr(MemoryFileSystem, "pipe_file", AbstractFileSystem.pipe_file)  # fsspec's check-then-write
    assert not Storage(store).creates_exclusively
    monkeypatch.setattr(MemoryFileSystem, "pipe_file", lambda self, path, value, **kwargs: None)  # no mode= at all
    assert not Storage(store).creates_exclusively
