"""`megatron-lite eval --held-out`: a checkpoint's loss on the samples its run evaluates is the run's
eval_loss at that step; a run without held-out samples is one error saying to use --text."""

import json
import shutil
from pathlib import Path

import pytest

from megatron_lite.cli import main
from megatron_lite.training import build


def _eval_json(checkpoint, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--held-out", "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_held_out_loss_of_each_checkpoint_is_the_runs_eval_loss(tiny_args, tmp_path, capsys):
    assert main(["train", *tiny_args, "train.eval_every=3", "checkpoint.every=3", "train.eval_iters=2"]) == 0
    run = tmp_path / "run"
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    for step in (3, 6):
        got = _eval_json(run / "checkpoints" / f"step_{step:08d}", capsys)
        assert got == {"loss": pytest.approx(rows[step]["eval_loss"], rel=1e-6), "tokens": 2 * 8 * 32}
    assert rows[3]["eval_loss"] != rows[6]["eval_loss"]  # two models: the match is no accident


def test_a_run_without_held_out_samples_is_one_error_naming_the_cause(tiny_args, tmp_path, capsys):
    assert main(["train", *tiny_args, "train.steps=1", "data.valid_fraction=0"]) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoints), "--held-out"]) == 2
    err = capsys.readouterr().err
    assert "held out no documents (data.valid_fraction=0); use --text" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # one source of samples at a time
        main(["eval", "--checkpoint", str(checkpoints), "--held-out", "--text", "x.txt"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_run_whose_data_is_gone_is_one_error_naming_the_file(tiny_args, small_corpus, tmp_path, capsys):
    prefix, _ = small_corpus
    copy = tmp_path / "copy"
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, str(copy) + ext)
    assert main(["train", *tiny_args, "train.steps=1", f"data.path={copy}"]) == 0
    (tmp_path / "copy.bin").unlink()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--held-out"]) == 2
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert capsys.readouterr().err == (  # what eval can do about it, not how a new dataset is built
        f"error: dataset file {copy}.bin does not exist; checkpoint {step}'s run trained on it (data.path), and "
        "eval --held-out reads its held-out split from it: restore the file there, or score a text file with --text\n"
    )


def test_a_runs_relative_data_paths_are_relative_to_where_it_started(
    tiny_args, corpus_files, tmp_path, monkeypatch, capsys
):
    """A run on the embedded corpus keeps it in data.cache_dir, relative (.cache/megatron-lite) by
    default: eval --held-out from another directory built a second corpus there. It reads the run's,
    relative to the directory the run started in; where that directory is gone (a moved project),
    relative to eval's own."""
    real, built = build.prepare_default_corpus, []

    def small(cache_dir, vocab_size, progress=True):  # the embedded corpus, of a few files for speed
        built.append(Path(cache_dir).resolve())
        return real(cache_dir, vocab_size, progress=progress, files=corpus_files)

    monkeypatch.setattr(build, "prepare_default_corpus", small)
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(project)
    own = [a for a in tiny_args if not a.startswith(("data.path=", "data.tokenizer="))]
    assert main(["train", *own, "data.vocab_size=512", "train.steps=3", "train.eval_every=3"]) == 0
    eval_loss = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]
    monkeypatch.chdir(elsewhere)
    got = _eval_json(tmp_path / "run" / "checkpoints", capsys)
    assert got["loss"] == pytest.approx(eval_loss, rel=1e-6)
    assert built == [project / ".cache" / "megatron-lite"] * 2 and not any(elsewhere.iterdir())
    moved = tmp_path / "moved"
    project.rename(moved)
    monkeypatch.chdir(moved)
    assert _eval_json(tmp_path / "run" / "checkpoints", capsys) == got
    assert built[-1] == moved / ".cache" / "megatron-lite"
