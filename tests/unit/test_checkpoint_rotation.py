"""Pruning after a commit, with interrupted saves lying around: ``checkpoint.keep`` counts committed
checkpoints only, what a local save cut short left behind is removed, never counted, and a step
directory without metadata.json (nothing shows whose) is left, never counted. A failed save is every
rank's verdict, and a save waiting for the other ranks' files is still in flight."""

import logging
from pathlib import Path

import pytest
import torch

from megatron_lite.checkpoint import writer as checkpoint_writer
from megatron_lite.checkpoint.boxes import full_box
from megatron_lite.checkpoint.reader import resolve_resume
from megatron_lite.checkpoint.shards import Piece
from megatron_lite.checkpoint.writer import Checkpointer
from megatron_lite.errors import UserError


def _save(writer: Checkpointer, step: int) -> None:
    t = torch.full((4, 3), float(step))
    meta = {"step": step, "weights_only": True, "config": {}, "optimizer": None, "trainer": None, "lineage": None}
    meta["layout"] = {"world_size": 1, "param_dtype": "float32"}
    writer.save(step, [Piece("model/w", (4, 3), full_box((4, 3)), t)], {}, (0, 0, 0), meta)


def _full_disk(path: Path, tensors: dict) -> None:
    raise OSError(28, "No space left on device")


def _names(root) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_keep_counts_committed_checkpoints_and_removes_local_partial_saves(tmp_path, caplog):
    root = tmp_path / "ckpt"
    writer = Checkpointer(root, keep=2, async_save=False)
    for step in (2, 4):
        _save(writer, step)
    (root / "step_00000005").mkdir()  # an object-store save cut short, a copy arriving: whose, nothing shows
    (root / "step_00000005" / "rank_00000.safetensors").write_bytes(b"partial")
    (root / ".tmp-step_00000003").mkdir()  # a local save killed mid-write (another checkpoint.every)
    (root / ".tmp-step_00000003" / "rank_00000.safetensors").write_bytes(b"partial")
    with caplog.at_level(logging.INFO):
        _save(writer, 6)
    (root / ".tmp-replaced-step_00000006").mkdir()  # left by a crash between the renames of a re-save
    _save(writer, 6)  # a re-save (resumed from an older checkpoint): the old one goes only once replaced
    writer.close()
    assert _names(root) == ["latest", "step_00000004", "step_00000005", "step_00000006"]  # keep=2 usable ones
    assert (
        "step_00000005" not in caplog.text and ".tmp-step_00000003" in caplog.text and "never committed" in caplog.text
    )
    assert resolve_resume(root, "auto").name == "step_00000006"


def test_another_runs_checkpoints_are_neither_pruned_nor_counted(tmp_path):
    """``spared`` (the step directories another run saved there, ``resume.other_runs_checkpoints``)."""
    root = tmp_path / "ckpt"
    theirs = Checkpointer(root, keep=2, async_save=False)
    for step in (2, 4):
        _save(theirs, step)
    theirs.close()
    ours = Checkpointer(root, keep=2, async_save=False, spared=["step_00000002", "step_00000004"])
    for step in (5, 6, 7):
        _save(ours, step)
    ours.close()
    assert _names(root) == ["latest", "step_00000002", "step_00000004", "step_00000006", "step_00000007"]


def test_a_spared_step_directory_saved_again_by_this_run_is_pruned_as_its_own(tmp_path):
    """A step directory spared at startup (no metadata.json: an object-store save cut short) that this run
    then saves again holds this run's checkpoint: ``checkpoint.keep`` counts and prunes it."""
    root = tmp_path / "ckpt"
    (root / "step_00000005").mkdir(parents=True)
    (root / "step_00000005" / "rank_00000.safetensors").write_bytes(b"partial")
    ours = Checkpointer(root, keep=2, async_save=False, spared=["step_00000005"])
    for step in (5, 6, 7):
        _save(ours, step)
    ours.close()
    assert _names(root) == ["latest", "step_00000006", "step_00000007"]


def test_a_failure_after_the_commit_is_a_warning_not_a_lost_checkpoint(tmp_path, monkeypatch, caplog):
    """The step directory is in place once renamed: a full disk when replacing ``latest`` (which no
    reader needs) or pruning must not report the checkpoint as not saved, nor stop the run."""
    from megatron_lite.checkpoint import storage

    root, real = tmp_path / "ckpt", storage.os.replace

    def full_disk(src, dst):
        if str(dst).endswith("latest"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    writer = Checkpointer(root, keep=1, async_save=False)
    _save(writer, 2)
    monkeypatch.setattr(storage.os, "replace", full_disk)
    with caplog.at_level(logging.WARNING):
        _save(writer, 4)  # raised "checkpoint of step 4 was not saved" although it was
    writer.close()
    assert "saved checkpoint" in caplog.text and "could not replace" in caplog.text and "No space left" in caplog.text
    assert _names(root) == ["latest", "step_00000004"]  # pruned all the same; no .latest.tmp left
    assert resolve_resume(root, "auto").name == "step_00000004"


def test_pruning_leaves_directories_that_are_not_saves(tmp_path):
    """A ``convert to-hf`` export staged (``.tmp-NAME``) or installed (even as ``step_00000005``) in the
    checkpoint directory is not a save cut short: pruning must not remove it."""
    root = tmp_path / "ckpt"
    writer = Checkpointer(root, keep=1, async_save=False)
    _save(writer, 2)
    for name in (".tmp-hf", "step_00000005", ".tmp-step_00000007"):
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
        (root / name / "model.safetensors").write_bytes(b"weights")
    (root / ".tmp-step_00000003").mkdir()  # a save of ours killed mid-write: still removed
    (root / ".tmp-step_00000003" / "rank_00000.safetensors").write_bytes(b"partial")
    _save(writer, 8)
    writer.close()
    assert _names(root) == [".tmp-hf", ".tmp-step_00000007", "latest", "step_00000005", "step_00000008"]
    assert (root / ".tmp-hf" / "model.safetensors").read_bytes() == b"weights"


def _crash_between_renames(monkeypatch, writer: Checkpointer, step: int) -> None:
    """Re-save ``step`` with the process 'killed' after the old copy was set aside, before the new one
    went into place (the second ``os.replace`` of ``Storage.commit`` raises)."""
    import megatron_lite.checkpoint.storage as storage

    def replace(src, dst):
        if Path(src).name == f".tmp-step_{step:08d}":
            raise KeyboardInterrupt("killed between the renames")
        return real(src, dst)

    real = storage.os.replace
    monkeypatch.setattr(storage.os, "replace", replace)
    try:
        _save(writer, step)
    except KeyboardInterrupt:
        pass
    finally:
        monkeypatch.setattr(storage.os, "replace", real)


def test_a_resave_killed_between_its_renames_loses_no_checkpoint(tmp_path, monkeypatch):
    """The re-saved step comes back at resume (the new, complete copy), and the next save's pruning
    does not delete it; when the staged copy never got its metadata.json, the old copy comes back."""
    root = tmp_path / "ckpt"
    writer = Checkpointer(root, keep=3, async_save=False)
    for step in (2, 4):
        _save(writer, step)
    (root / "step_00000004" / "origin.json").write_text("{}")  # tells the old copy from the new one
    _crash_between_renames(monkeypatch, writer, 4)
    assert "step_00000004" not in _names(root) and ".tmp-replaced-step_00000004" in _names(root)
    assert resolve_resume(root, "auto").name == "step_00000004"
    assert not (root / "step_00000004" / "origin.json").exists()  # the new copy
    writer = Checkpointer(root, keep=3, async_save=False)
    _save(writer, 6)
    writer.close()
    assert _names(root) == ["latest", "step_00000002", "step_00000004", "step_00000006"]

    (root / "step_00000006" / "origin.json").write_text("{}")
    _crash_between_renames(monkeypatch, writer, 6)
    staged = root / ".tmp-step_00000006" / "metadata.json"
    staged.unlink()  # the staged copy is not complete: the old copy goes back
    assert resolve_resume(root, "auto").name == "step_00000006"
    assert (root / "step_00000006" / "origin.json").is_file()  # the old copy


def test_a_resave_killed_after_its_renames_keeps_the_new_copy_and_a_clean_one_leaves_nothing_aside(tmp_path, caplog):
    root = tmp_path / "ckpt"
    writer = Checkpointer(root, keep=3, async_save=False)
    for step in (4, 4):  # a clean re-save: the old copy set aside is removed by the commit, not by pruning
        with caplog.at_level(logging.WARNING):
            _save(writer, step)
    assert _names(root) == ["latest", "step_00000004"] and "never committed" not in caplog.text, caplog.text
    # killed after both renames, before removing the old copy: the new one is in place and stays
    (root / ".tmp-replaced-step_00000004").mkdir()
    (root / ".tmp-replaced-step_00000004" / "origin.json").write_text("{}")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(root, "auto").name == "step_00000004"
    assert not (root / "step_00000004" / "origin.json").exists()
    assert caplog.messages == [], caplog.messages  # nothing to put back, and nothing failed trying


@pytest.mark.parametrize("where", ["write", "staging"])
def test_a_failed_save_is_a_verdict_of_every_rank(tmp_path, monkeypatch, caplog, where):
    """Every rank learns a save's outcome from the same broadcast and raises it at the same call, so no
    rank is the one that failed: marked so, a failure watch posts nothing (with several ranks each
    logged "rank R failed at step S: checkpoint of step ... not saved; stopping every rank") and the
    CLI says it once (the writer logged it too, on every rank: the CLI's error line came twice)."""
    root = tmp_path / "ckpt"
    writer = Checkpointer(root, keep=2, async_save=False)
    if where == "write":
        monkeypatch.setattr(checkpoint_writer, "write_tensor_file", _full_disk)
    else:
        root.write_text("not a directory")  # checkpoint.dir replaced by a file mid-run
    with pytest.raises(UserError, match="checkpoint of step 2 was not saved") as error:
        _save(writer, 2)
    assert error.value.raised_on_every_rank
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_failed_save_settled_after_the_loop_failed_is_logged_once(tmp_path, monkeypatch, caplog):
    """The loop's own error is the one raised: the save's failure is logged, not lost."""
    monkeypatch.setattr(checkpoint_writer, "write_tensor_file", _full_disk)
    writer = Checkpointer(tmp_path / "ckpt", keep=2, async_save=True)
    _save(writer, 2)
    writer.settle(commit=True)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("checkpoint of step 2 was not saved: rank 0: OSError"), errors


def test_a_save_waiting_for_the_other_ranks_files_is_still_in_flight(tmp_path, monkeypatch):
    """A rank stopped by a peer's failure inside the commit's gather names the save it leaves unsaved
    (``unsaved_note``): the save was dropped from the writer before the gather, and rank 0's last line
    said nothing of it."""
    writer = Checkpointer(tmp_path / "ckpt", keep=2, async_save=True)
    gather, notes = checkpoint_writer.collectives.all_gather, []
    monkeypatch.setattr(
        checkpoint_writer.collectives, "all_gather", lambda obj: notes.append(writer.unsaved_note()) or gather(obj)
    )
    _save(writer, 2)
    writer.wait()
    assert notes == ["checkpoint of step 2, still in flight, was not saved"]
    assert writer.unsaved_note() is None and (tmp_path / "ckpt" / "step_00000002" / "metadata.json").exists()
