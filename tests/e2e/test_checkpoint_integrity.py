"""Partial, corrupt and failed checkpoints are detected and never silently trained from; loading
never unpickles anything; a model that changed shape is one clear error naming the tensors."""

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from train_checks import one_error_line

from megatron_lite.checkpoint.reader import resolve_resume
from megatron_lite.cli import main
from megatron_lite.convert.io import open_checkpoint
from megatron_lite.training.evaluate import load_model
from megatron_lite.training.run_lock import LOCK_FILE


@pytest.fixture(scope="module")
def saved(small_corpus, tmp_path_factory) -> tuple[list[str], Path]:
    """(args, run dir) of a run with checkpoints at steps 2, 4 and 6."""
    prefix, tok = small_corpus
    run = tmp_path_factory.mktemp("saved") / "run"
    args = [f"data.path={prefix}", f"data.tokenizer={tok}", "model.layers=2", "model.hidden=64", "model.heads=4"]
    args += ["model.kv_heads=2", "model.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=8"]
    args += ["train.steps=6", "optim.warmup=2", "log.progress=false", "data.valid_fraction=0"]
    args += ["checkpoint.every=2", "checkpoint.keep=3", "log.every=1"]
    assert main(["train", *args, f"log.dir={run}"]) == 0
    return args, run


def copy_run(saved, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(saved[1], run)
    return run / "checkpoints"


def missing_shard(step: Path) -> None:
    (step / "rank_00000.safetensors").unlink()


def flipped_byte(step: Path) -> None:
    path = step / "rank_00000.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncated(step: Path) -> None:
    path = step / "rank_00000.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def bad_tokenizer(step: Path) -> None:
    (step / "tokenizer.model").write_bytes(b"not a tokenizer")


def never_committed(step: Path) -> None:
    (step / "metadata.json").unlink()


def _edit_metadata(step: Path, edit) -> None:
    meta = json.loads((step / "metadata.json").read_text())
    edit(meta)
    (step / "metadata.json").write_text(json.dumps(meta))


def no_trainer_state(step: Path) -> None:  # valid JSON, once a KeyError at resume
    _edit_metadata(step, lambda meta: meta.pop("trainer"))


def ranks_short_of_the_world(step: Path) -> None:  # valid JSON, once an IndexError at resume
    _edit_metadata(step, lambda meta: meta.update(ranks=meta["ranks"][:-1]))


def copied_from_another_step(step: Path) -> None:  # intact, but resuming it would restart at step 4
    shutil.rmtree(step)
    shutil.copytree(step.parent / "step_00000004", step)


@pytest.mark.parametrize(
    "damage,why",
    [
        (missing_shard, "rank_00000.safetensors is missing"),
        (flipped_byte, "does not match its sha256"),
        (truncated, "expected"),
        (bad_tokenizer, "tokenizer.model"),
        (never_committed, "metadata.json is missing"),
        (no_trainer_state, "metadata.json is damaged: it has no 'trainer' key"),
        (ranks_short_of_the_world, "metadata.json is damaged: ranks has 0 entries but the checkpoint's world"),
        (copied_from_another_step, "metadata.json is of step 4, not of step_00000006 (renamed or copied?)"),
    ],
)
def test_auto_resume_falls_back_to_the_newest_good_checkpoint(saved, tmp_path, caplog, damage, why):
    ckpt = copy_run(saved, tmp_path)
    damage(ckpt / "step_00000006")
    with caplog.at_level(logging.WARNING):
        reader = resolve_resume(ckpt, "auto")
    assert reader.name == "step_00000004"
    assert "skipping checkpoint" in caplog.text and why in caplog.text and "step_00000006" in caplog.text
    assert "the run replaces it when it saves that step again (move it out of checkpoint.dir" in caplog.text
    # end to end: the run resumes at step 4 and trains 5 and 6 again, logged once each (the first
    # attempt's rows of steps 5 and 6 go, and so does a line torn by a crash mid-write)
    with (ckpt.parent / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')
    args, _ = saved
    assert main(["train", *args, f"log.dir={ckpt.parent}", "checkpoint.dir=" + str(ckpt)]) == 0
    steps = [json.loads(x)["step"] for x in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_readers_that_only_read_skip_a_corrupt_step_without_the_runs_advice(saved, tmp_path, caplog):
    """eval and convert take the newest good step too, but they save nothing: the warning says what
    they skip and why, not what a resuming run's next save does to it."""
    ckpt = copy_run(saved, tmp_path)
    (ckpt / "step_00000006" / "metadata.json").write_text("{not json")
    for read in (lambda: load_model(ckpt, torch.device("cpu"))[0], lambda: open_checkpoint(ckpt)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert read() is not None
        assert f"skipping checkpoint {ckpt / 'step_00000006'}: metadata.json is not valid JSON" in caplog.text
        assert "the run replaces it" not in caplog.text and "checkpoint.dir" not in caplog.text, caplog.text
    assert open_checkpoint(ckpt).meta["step"] == 4


def test_all_corrupt_is_an_error_not_a_fresh_start(saved, tmp_path, capsys):
    ckpt = copy_run(saved, tmp_path)
    for step in ("step_00000002", "step_00000004"):
        flipped_byte(ckpt / step)
    truncated(ckpt / "step_00000006")
    args, _ = saved
    assert main(["train", *args, f"log.dir={ckpt.parent}"]) == 2
    assert "refusing to start from scratch" in one_error_line(capsys)
    resume = f"checkpoint.resume={ckpt / 'step_00000004'}"
    assert main(["train", *args, f"log.dir={ckpt.parent}", resume]) == 2
    assert "is unusable: rank_00000.safetensors does not match its sha256" in one_error_line(capsys)


def test_resuming_a_missing_step_lists_the_steps_there(saved, tmp_path, capsys):
    ckpt = copy_run(saved, tmp_path)
    files = lambda: {p: p.read_bytes() for p in ckpt.parent.rglob("*") if p.is_file() and p.name != LOCK_FILE}  # noqa: E731
    before = files()  # (a write probe touches dirs; the lock file names each run's holder)
    args, _ = saved
    for resume, says in [
        (ckpt / "step_00000099", f"does not exist (steps in {ckpt}: 2, 4, 6)"),
        ("latest", "use checkpoint.resume=auto for the newest good checkpoint"),
    ]:
        assert main(["train", *args, f"log.dir={ckpt.parent}", f"checkpoint.resume={resume}"]) == 2
        err = one_error_line(capsys)
        assert says in err, err
    assert files() == before


def test_rewinding_past_newer_checkpoints_is_refused(saved, tmp_path, capsys):
    """Resuming step 2 by path beside steps 4 and 6: this run would save over them, and a restart
    with resume=auto would have continued the abandoned run from step 6. Nothing is touched."""
    ckpt = copy_run(saved, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.name != LOCK_FILE}  # it names each run's holder
    args, _ = saved
    rewind = [*args, f"log.dir={ckpt.parent}", f"checkpoint.resume={ckpt / 'step_00000002'}", "train.exit_after=1"]
    assert main(["train", *rewind]) == 2
    err = one_error_line(capsys)
    assert "rewinds to step 2" in err and "(step_00000004, step_00000006)" in err and "move them out" in err, err
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.name != LOCK_FILE} == before
    aside = tmp_path / "rewound"  # the advice works, and a restart then continues the rewound run
    aside.mkdir()
    for step in ("step_00000004", "step_00000006"):
        (ckpt / step).rename(aside / step)
    assert main(["train", *rewind]) == 0
    assert resolve_resume(ckpt, "auto").name == "step_00000003"


def test_changed_model_is_one_error_listing_the_settings(saved, tmp_path, capsys):
    ckpt = copy_run(saved, tmp_path)
    config = (ckpt.parent / "config.yaml").read_bytes()
    args, _ = saved
    assert main(["train", *args, f"log.dir={ckpt.parent}", "model.kv_heads=4", "model.layers=3"]) == 2
    err = one_error_line(capsys)
    assert "other model settings: model.layers: checkpoint 2, now 3; model.kv_heads: checkpoint 2, now 4" in err
    assert "train this model as a new run" in err and "init_from" not in err  # its weights would not fit
    assert (ckpt.parent / "config.yaml").read_bytes() == config  # the refused run saved nothing


def test_checkpoint_without_its_config_is_checked_by_shape(saved, tmp_path, capsys):
    ckpt = copy_run(saved, tmp_path)
    for meta_path in ckpt.glob("step_*/metadata.json"):
        meta = json.loads(meta_path.read_text())
        meta.pop("config", None)
        meta_path.write_text(json.dumps(meta))
    args, _ = saved
    assert main(["train", *args, f"log.dir={ckpt.parent}", "model.kv_heads=4", "model.layers=3"]) == 2
    err = one_error_line(capsys)
    assert "does not fit this model" in err, err
    assert "model/layers.0.attn.qkv.weight: checkpoint [128, 64], model [192, 64]" in err
    assert "model/layers.2.attn.qkv.weight: checkpoint missing, model [192, 64]" in err


class _Payload:
    """Unpickling this runs ``os.system``: what a malicious checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_loading_never_unpickles(saved, tmp_path, monkeypatch):
    ckpt = copy_run(saved, tmp_path)
    step = ckpt / "step_00000006"
    marker = tmp_path / "pwned"
    for name in ("state.pt", "optimizer.pt"):  # planted and listed with valid checksums
        (step / name).write_bytes(pickle.dumps(_Payload(marker)))
    meta = json.loads((step / "metadata.json").read_text())
    for name in ("state.pt", "optimizer.pt"):
        data = (step / name).read_bytes()
        meta["files"][name] = {"sha256": __import__("hashlib").sha256(data).hexdigest(), "bytes": len(data)}
    (step / "metadata.json").write_text(json.dumps(meta))

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    for target, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(target, name, refuse)
    args, _ = saved
    assert main(["train", *args, f"log.dir={ckpt.parent}", "train.steps=7"]) == 0  # resume: one process
    load_model(ckpt, torch.device("cpu"))  # eval's reader
    assert sum(1 for _ in open_checkpoint(ckpt, step=6).tensors()) > 0  # the converter's reader
    assert not marker.exists()
    with pytest.raises(AssertionError):  # the guard works: this pickle would have run its payload
        pickle.loads((step / "state.pt").read_bytes())


def test_failed_async_write_is_reported_and_never_committed(saved, tmp_path, monkeypatch, capsys):
    from megatron_lite.checkpoint import writer

    real, calls = writer.write_tensor_file, []

    def full_disk(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, tensors)

    monkeypatch.setattr(writer, "write_tensor_file", full_disk)
    args, _ = saved
    run = tmp_path / "run"
    assert main(["train", *args, f"log.dir={run}", "checkpoint.async=true", "train.steps=5"]) == 2
    err = one_error_line(capsys)
    assert "checkpoint of step 4 was not saved: rank 0: OSError" in err and "No space left on device" in err
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == [LOCK_FILE, "latest", "step_00000002"]  # no step 4, no temp dir
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert resolve_resume(ckpt, "auto").name == "step_00000002"


def test_failed_async_write_stops_the_run_at_the_next_step(saved, tmp_path, monkeypatch, capsys):
    """Not at the next save, one checkpoint interval of training later, which then also went unsaved."""
    from megatron_lite.checkpoint import writer

    def full_disk(path, tensors):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "write_tensor_file", full_disk)
    args, _ = saved
    run = tmp_path / "run"
    assert main(["train", *args, f"log.dir={run}", "checkpoint.async=true", "checkpoint.every=3", "train.steps=9"]) == 2
    err = one_error_line(capsys)
    assert err.startswith("error: checkpoint of step 3 was not saved: rank 0: OSError") and "No space left" in err
    assert f"(checkpoint.dir='{run / 'checkpoints'}'); the checkpoints saved before it are untouched" in err, err
    assert "free space there, or lower checkpoint.keep), then rerun with checkpoint.resume=auto" in err, err
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] < 6, steps  # the write fails at once: known at step 4 (5 if the thread was slow)


def test_checkpoint_dir_turned_into_a_file_mid_run_is_one_error(saved, tmp_path, monkeypatch, capsys):
    from megatron_lite.checkpoint import writer

    run, real = tmp_path / "run", writer.Checkpointer.save
    ckpt, kept = run / "checkpoints", tmp_path / "kept"

    def replaced_before_step_4(self, step, *args):
        if step == 4:  # another job (or a mistake) moves the directory and leaves a file in its place
            ckpt.rename(kept)
            ckpt.write_text("not a directory")
        return real(self, step, *args)

    monkeypatch.setattr(writer.Checkpointer, "save", replaced_before_step_4)
    args, _ = saved
    assert main(["train", *args, f"log.dir={run}", "train.steps=5"]) == 2
    err = one_error_line(capsys)
    assert err.startswith("error: checkpoint of step 4 was not saved: rank 0: cannot prepare "), err
    assert "NotADirectoryError" in err and f"checkpoint.dir='{ckpt}' must stay a writable directory" in err, err
    assert ckpt.read_text() == "not a directory"  # the error path wrote nothing, removed nothing
    assert resolve_resume(kept, "auto").name == "step_00000002"
