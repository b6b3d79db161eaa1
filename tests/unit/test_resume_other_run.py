"""A resume from a checkpoint in ``checkpoint.dir`` saved by a run with another ``log.dir``: one startup
warning naming that run, the step and how to start fresh (``other_run_note``); nothing for the run's own
checkpoint, however its ``log.dir`` is spelled, nor for one resumed by path from elsewhere. That run's
checkpoints are never pruned by this one, nor any whose metadata.json cannot show whose it is
(``other_runs_checkpoints``)."""

import logging
import uuid
from types import SimpleNamespace

import fsspec
import pytest
import torch

from megatron_lite.checkpoint.boxes import full_box
from megatron_lite.checkpoint.shards import Piece
from megatron_lite.checkpoint.storage import Storage
from megatron_lite.checkpoint.writer import Checkpointer
from megatron_lite.config import Config, fill_defaults
from megatron_lite.training import resume
from megatron_lite.training.resume import other_run_note


def _cfg(log_dir: str, ckpt: str | None = None, resume: str = "auto") -> Config:
    cfg = Config()
    cfg.log.dir, cfg.checkpoint.dir, cfg.checkpoint.resume = log_dir, ckpt, resume
    return fill_defaults(cfg)


def _saved_by(
    log_dir: str, workdir: str | None, location: str, step: int = 40, ckpt: str | None = None
) -> SimpleNamespace:
    """A checkpoint's reader as far as the note reads it: saved config, lineage, step and location."""
    lineage = {} if workdir is None else {"workdir": workdir}
    config = {"log": {"dir": log_dir}, "checkpoint": {"dir": ckpt or f"{log_dir}/checkpoints"}}
    return SimpleNamespace(meta={"config": config, "lineage": lineage}, step=step, location=location)


def test_the_runs_own_checkpoint_says_nothing_however_its_log_dir_is_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = _saved_by("runs/a", str(tmp_path), "runs/a/checkpoints/step_00000040")
    assert other_run_note(_cfg("runs/a"), own) is None  # a relaunch, a requeue
    assert other_run_note(_cfg(str(tmp_path / "runs" / "a")), own) is None  # the same directory, absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # its relative log.dir is taken against the directory the run started in
    assert other_run_note(_cfg(str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "a" / "checkpoints")), own) is None


def test_another_runs_checkpoint_names_that_run_the_step_and_the_way_to_start_fresh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    theirs = _saved_by("runs/x/../a", str(tmp_path), "runs/a/checkpoints/step_00000040")
    note = other_run_note(_cfg("runs/b", "runs/a/checkpoints"), theirs)
    runs = tmp_path.resolve() / "runs"  # both log.dir resolved and absolute, side by side
    assert note == (
        f"checkpoint.dir='runs/a/checkpoints' holds the checkpoints of another run (log.dir {runs / 'a'}): "
        f"this run (log.dir {runs / 'b'}) resumes from its step 40 and saves its checkpoints there too, next to that "
        "run's, which checkpoint.keep=2 leaves alone (it prunes this run's only); a relaunch of that run then "
        "resumes from this one's. To start fresh instead, add to the train command checkpoint.dir=DIR (an empty "
        "or new directory), or "
        "checkpoint.dir=null for this log.dir's own (runs/b/checkpoints)"
    )
    # checkpoint.dir already <log.dir>/checkpoints (a run directory copied): unsetting it is no way out
    (tmp_path / "runs" / "a").mkdir(parents=True)
    copied = _saved_by("runs/a", str(tmp_path), "runs/b/checkpoints/step_00000040")
    note = other_run_note(_cfg("runs/b"), copied)
    assert note is not None and note.endswith(
        "add to the train command checkpoint.dir=DIR (an empty or new directory)"
    ), note
    # ... whose original saves in its own: a relaunch of it does not resume from this run's
    assert "that run saves in its own checkpoint.dir, from which these were copied" in note, note
    assert "a relaunch of that run" not in note, note
    # a lineage without workdir: the saved log.dir is taken against this directory
    assert other_run_note(_cfg("runs/b", "runs/a/checkpoints"), _saved_by("runs/a", None, theirs.location))


def test_a_run_directory_moved_to_this_log_dir_is_this_runs_own(tmp_path, monkeypatch):
    """``mv runs/a runs/b`` and a relaunch with log.dir=runs/b: the checkpoints that moved with it are
    this run's (no note, pruned by its checkpoint.keep); a copy, whose original remains, is another's."""
    monkeypatch.chdir(tmp_path)
    for name in ("step_00000002", "step_00000004"):
        (tmp_path / "runs" / "b" / "checkpoints" / name).mkdir(parents=True)
    moved = _saved_by("runs/a", str(tmp_path), "runs/b/checkpoints/step_00000004", step=4)
    monkeypatch.setattr(resume, "read_metadata", lambda storage, name: (moved.meta, None))
    assert other_run_note(_cfg("runs/b"), moved) is None
    assert resume.other_runs_checkpoints(_cfg("runs/b"), 0) == []
    # an explicit checkpoint.dir elsewhere: the run that saved there may only have been removed
    assert other_run_note(_cfg("runs/c", "runs/b/checkpoints"), moved) is not None
    # a removed run that had saved into this log.dir's checkpoints by its own explicit checkpoint.dir
    removed = _saved_by("runs/a", str(tmp_path), moved.location, step=4, ckpt="runs/b/checkpoints")
    assert other_run_note(_cfg("runs/b"), removed) is not None
    (tmp_path / "runs" / "a").mkdir()  # the original remains: a copy
    assert other_run_note(_cfg("runs/b"), moved) is not None
    assert resume.other_runs_checkpoints(_cfg("runs/b"), 0) == ["step_00000002", "step_00000004"]


def test_a_checkpoint_resumed_by_path_from_elsewhere_says_nothing(tmp_path, monkeypatch):
    """This run's checkpoints go to its own checkpoint.dir, not among that run's."""
    monkeypatch.chdir(tmp_path)
    step = "runs/a/checkpoints/step_00000040"
    theirs = _saved_by("runs/a", str(tmp_path), step)
    assert other_run_note(_cfg("runs/b", resume=step), theirs) is None
    assert other_run_note(_cfg("runs/b", "runs/a/checkpoints", resume=step), theirs) is not None
    assert other_run_note(_cfg("runs/b"), _saved_by("", None, step)) is None  # no log.dir saved: nothing to compare


def test_pruning_spares_the_checkpoints_another_run_saved_and_those_it_cannot_read(tmp_path, monkeypatch):
    """``other_runs_checkpoints``: the ``Checkpointer``'s ``spared`` (rank 0 prunes: none elsewhere)."""
    monkeypatch.chdir(tmp_path)
    saved_by = {"step_00000002": "runs/a", "step_00000004": "runs/b", "step_00000006": "runs/a"}
    for name in [*saved_by, "step_00000008", "step_00000009"]:
        (tmp_path / "ckpt" / name).mkdir(parents=True)

    def read(storage, name):
        if name == "step_00000008":
            raise RuntimeError("an object store's client error")
        if name == "step_00000009":
            return None, "metadata.json is not valid JSON"
        return _saved_by(saved_by[name], str(tmp_path), "").meta, None

    monkeypatch.setattr(resume, "read_metadata", read)
    cfg = _cfg("runs/b", "ckpt")
    assert resume.other_runs_checkpoints(cfg, 0) == ["step_00000002", "step_00000006", "step_00000008", "step_00000009"]
    assert resume.other_runs_checkpoints(cfg, 1) == []


@pytest.fixture(params=["local", "object store"])
def root(request, tmp_path):
    """checkpoint.dir on a local disk, or on fsspec's ``memory://`` standing in for an object store."""
    if request.param == "local":
        yield str(tmp_path / "ckpt")
        return
    url = f"memory://ckpt-{uuid.uuid4().hex[:12]}/run"
    yield url
    fsspec.filesystem("memory").rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def _save(writer: Checkpointer, step: int) -> None:
    """A checkpoint of the run with log.dir runs/b (taken against the current directory)."""
    meta = {"step": step, "weights_only": True, "optimizer": None, "trainer": None, "lineage": None}
    meta |= {"config": {"log": {"dir": "runs/b"}}, "layout": {"world_size": 1, "param_dtype": "float32"}}
    writer.save(step, [Piece("model/w", (2,), full_box((2,)), torch.ones(2))], {}, (0, 0, 0), meta)


def test_pruning_spares_and_names_once_each_step_directory_whose_metadata_shows_no_run(
    root, tmp_path, monkeypatch, caplog
):
    """metadata.json not valid JSON, missing (never committed, or a copy still arriving) or unreadable:
    nothing shows the directory is this run's, so checkpoint.keep neither deletes nor counts it, on a
    local directory as on an object store; one startup warning each names it and why."""
    monkeypatch.chdir(tmp_path)
    first = Checkpointer(root, keep=4, async_save=False)
    for step in (1, 2, 3, 4):
        _save(first, step)
    first.close()
    storage = Storage(root)
    storage.write_text("step_00000001/metadata.json", '{"format": ')
    storage.remove("step_00000002/metadata.json")
    read_text = Storage.read_text

    def unreadable(self, rel):
        if rel == "step_00000003/metadata.json":
            raise PermissionError(13, "Permission denied")  # s3fs's AccessDenied too
        return read_text(self, rel)

    monkeypatch.setattr(Storage, "read_text", unreadable)
    with caplog.at_level(logging.WARNING):
        spared = resume.other_runs_checkpoints(_cfg("runs/b", root), 0)
        ours = Checkpointer(root, keep=1, async_save=False, spared=spared)
        for step in (5, 6):
            _save(ours, step)
        ours.close()
    assert storage.step_dirs() == ["step_00000001", "step_00000002", "step_00000003", "step_00000006"]
    why = {1: "metadata.json is not valid JSON", 2: "metadata.json is missing", 3: "Permission denied"}
    for step, problem in why.items():
        (said,) = [m for m in caplog.messages if f"step_{step:08d}" in m]
        assert said.startswith(f"checkpoint.keep leaves {storage.url(f'step_{step:08d}')} alone (") and problem in said
        assert said.endswith("nothing in it shows that this run saved it; delete it yourself if no run needs it")
