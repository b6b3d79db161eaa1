"""``checkpoint.resume`` naming no step directory (a missing step, ``latest``, a file, the checkpoint
root): one error saying what it names and what to give instead, listing the steps there are."""

from pathlib import Path

import pytest
import torch

from megatron_lite.checkpoint.reader import resolve_resume
from megatron_lite.checkpoint.writer import save_weights
from megatron_lite.config import load_config
from megatron_lite.errors import UserError
from megatron_lite.training.preflight import check_fresh_start


@pytest.fixture(name="root")
def root_fixture(tmp_path, monkeypatch) -> Path:
    """A checkpoint root holding steps 4 and 5, inside the current directory."""
    monkeypatch.chdir(tmp_path)
    for step in (4, 5):  # save_weights keeps one step: each is saved aside and moved in
        moved = Path(save_weights(tmp_path / "aside", step, {"w": torch.zeros(2, 2)}, {}, files={}))
        (tmp_path / "ckpt").mkdir(exist_ok=True)
        moved.rename(tmp_path / "ckpt" / moved.name)
    return Path("ckpt")


def refusal(root: Path, resume: str) -> str:
    with pytest.raises(UserError) as e:
        resolve_resume(root, resume)
    return str(e.value)


def test_a_missing_step_says_so_and_lists_the_steps_there(root):
    err = refusal(root, "ckpt/step_00000099")
    assert "checkpoint.resume='ckpt/step_00000099' does not exist (steps in ckpt: 4, 5)" in err, err
    assert "checkpoint.resume=auto" in err
    err = refusal(root, "typo/step_00000005")
    assert "does not exist, nor does 'typo'" in err, err


@pytest.mark.parametrize("word", ["latest", "last"])
def test_a_word_that_is_not_auto_or_none_points_to_auto(root, word):
    """Megatron loads the newest checkpoint of its --load directory: here that is ``auto``."""
    err = refusal(root, word)
    assert f"checkpoint.resume='{word}' is not auto, none or an existing step directory" in err, err
    assert "use checkpoint.resume=auto for the newest good checkpoint in checkpoint.dir" in err
    assert "(checkpoint.dir='ckpt' holds steps 4, 5)" in err, err


@pytest.mark.parametrize("step", ["step_00000005", "5", "step_5"])
def test_a_bare_step_name_or_number_names_its_path_in_the_checkpoint_dir(root, step):
    """Megatron's --ckpt-step names a step of its --load directory; here a path names it, and the
    error gives that path rather than only saying what the value is not."""
    err = refusal(root, step)
    assert (
        f"checkpoint.resume='{step}' is no directory here: give the step's path, checkpoint.resume='ckpt/step_00000005'"
        in err
    ), err
    assert "(checkpoint.dir='ckpt' holds steps 4, 5)" in err and "checkpoint.resume=auto" in err, err
    err = refusal(root, "300")  # no such step: the ones there are listed
    assert "checkpoint.resume='300' is not auto, none or an existing step directory" in err, err
    assert "(checkpoint.dir='ckpt' holds steps 4, 5)" in err, err


def test_a_file_or_the_checkpoint_root_is_named_as_such(root):
    (root / "latest").write_text("step_00000005\n")
    assert "is a file, not a checkpoint's step directory" in refusal(root, "ckpt/latest")
    (root.parent / "other").mkdir()
    moved = root / "step_00000004"
    moved.rename(root.parent / "other" / moved.name)
    err = refusal(root, "other")
    assert "is a checkpoint directory holding steps 4, not one step's directory" in err, err
    assert "name one (other/step_00000004)" in err and "checkpoint.dir='other' with checkpoint.resume=auto" in err
    # checkpoint.dir itself: it already is checkpoint.dir, so auto is the advice
    for same in ("ckpt", str(root.resolve()), "./ckpt/"):
        err = refusal(root, same)
        assert f"checkpoint.resume={same!r} is checkpoint.dir itself (holding steps 5), not one step's directory" in err
        assert "use checkpoint.resume=auto for its newest good one" in err and "checkpoint.dir=" not in err, err


def test_a_step_directory_resumes(root):
    assert resolve_resume(root, "ckpt/step_00000004").step == 4


def test_a_damaged_step_directory_names_the_problem_and_the_other_steps(root):
    (root / "step_00000004" / "rank_00000.safetensors").unlink()
    err = refusal(root, "ckpt/step_00000004")
    assert err == (
        "checkpoint ckpt/step_00000004 is unusable: rank_00000.safetensors is missing; give another step directory "
        "(the other committed steps in ckpt: 5)"
    ), err


def test_auto_names_the_newest_problem_and_counts_only_committed_steps(root, tmp_path):
    (root / "step_00000005" / "metadata.json").write_text("{")
    (root / "step_00000004" / "rank_00000.safetensors").unlink()
    err = refusal(root, "auto")
    assert "every checkpoint under" in err and "(newest: step_00000005: metadata.json is not valid JSON;" in err, err
    assert err.endswith("Fix or move them, or start a fresh run in a new checkpoint.dir"), err
    # a step a save never committed (no metadata.json) is no checkpoint: auto starts the run fresh
    (tmp_path / "fresh" / "step_00000007").mkdir(parents=True)
    (tmp_path / "fresh" / "step_00000007" / "rank_00000.safetensors").write_bytes(b"partial")
    assert resolve_resume(tmp_path / "fresh", "auto") is None


def test_resume_none_over_another_runs_checkpoints_is_refused_naming_both_fixes(root, tmp_path):
    fresh = load_config(None, [f"checkpoint.dir={root}", "checkpoint.resume=none"])
    with pytest.raises(UserError) as e:
        check_fresh_start(fresh)
    assert str(e.value) == (
        "checkpoint.dir='ckpt' already holds checkpoints of an earlier run (newest: step 5) and "
        "checkpoint.resume=none would save over them; set checkpoint.resume=auto to continue that run, "
        "or choose a new checkpoint.dir (or log.dir) to start a fresh one"
    )
    check_fresh_start(load_config(None, [f"checkpoint.dir={root}", "checkpoint.resume=auto"]))  # continues it
    check_fresh_start(load_config(None, [f"checkpoint.dir={tmp_path / 'new'}", "checkpoint.resume=none"]))


def test_a_step_directory_without_metadata_names_the_committed_steps(root):
    """A save cut short (its step directory holds no metadata.json) is not a checkpoint to resume."""
    (root / "step_00000006").mkdir()
    err = refusal(root, "ckpt/step_00000006")
    assert err.startswith("'ckpt/step_00000006' is not a checkpoint: it has no metadata.json"), err
    assert (
        "give a committed step directory (steps in 'ckpt': 4, 5), or use checkpoint.resume=auto for the newest good"
        in err
    ), err


def test_a_checkpoint_of_the_older_one_process_format_is_refused_never_started_over(root, tmp_path):
    """A step directory of the format before sharded checkpoints (meta.json, model.safetensors,
    state.pt) is committed: auto must not take it for a save cut short and start the run over (its
    next save of that step would replace it), nor resume=none save over it."""
    older = tmp_path / "older"
    step = older / "step_00000006"
    step.mkdir(parents=True)
    (step / "meta.json").write_text('{"step": 6, "format": "megatron-lite/local-v1", "config": {}, "sha256": {}}')
    (step / "model.safetensors").write_bytes(b"weights")
    (step / "state.pt").write_bytes(b"state")
    files = lambda d: {p.name: p.read_bytes() for p in d.iterdir()}  # noqa: E731
    before = files(step)
    says = "it holds meta.json, not metadata.json: a checkpoint of the older one-process format"
    for resume in ("auto", str(step)):
        err = refusal(older, resume)
        assert says in err and "train on from it with the megatron-lite version that saved it" in err, err
    assert "refusing to start from scratch" in refusal(older, "auto")
    with pytest.raises(UserError, match="already holds checkpoints of an earlier run"):
        check_fresh_start(load_config(None, [f"checkpoint.dir={older}", "checkpoint.resume=none"]))
    assert files(step) == before
    # beside a good checkpoint it is skipped, the good one taken
    step.rename(root / step.name)
    assert resolve_resume(root, "auto").step == 5
    assert files(root / step.name) == before
