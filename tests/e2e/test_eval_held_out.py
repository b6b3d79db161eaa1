"""`megatron-lite eval --held-out`: a checkpoint's loss on the samples its run evaluates is the run's
eval_loss at that step; a run without held-out samples is one error saying to use --text."""

import json
import shutil
from pathlib import Path

import pytest
from train_checks import one_error_line

from megatron_lite.cli import main
from megatron_lite.data.preprocess import preprocess
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


def test_a_dataset_rebuilt_since_the_run_is_refused(tiny_args, small_corpus, corpus_files, tmp_path, capsys):
    """A dataset of data.path rebuilt from other text with the same tokenizer reads as a valid dataset,
    but its held-out samples are not the run's: one error naming both fingerprints."""
    prefix, tok = small_corpus
    copy = tmp_path / "copy"
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, str(copy) + ext)
    assert main(["train", *tiny_args, "train.steps=1", f"data.path={copy}"]) == 0
    size = (tmp_path / "copy.bin").stat().st_size
    preprocess([str(p) for p in corpus_files[1:]], tok, copy, progress=False, overwrite=True)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--held-out"]) == 2
    err = one_error_line(capsys)
    assert f", .bin {size} bytes), and eval --held-out reads {copy} (.idx sha256 " in err
    assert err.endswith("restore the run's data there, or score a text file with --text\n"), err


def test_a_runs_relative_data_paths_are_relative_to_where_it_started(
    tiny_args, corpus_files, tmp_path, monkeypatch, capsys, caplog
):
    """A run on the embedded corpus keeps it in data.cache_dir, relative (.cache/megatron-lite) by
    default: eval --held-out from another directory built a second corpus there. It reads the run's,
    relative to the directory the run started in; where that directory is gone (a moved project),
    relative to eval's own, with a warning saying so."""
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
    assert built == [project / ".cache" / "megatron-lite"] and not any(elsewhere.iterdir())  # the run's, read
    moved = tmp_path / "moved"
    project.rename(moved)
    monkeypatch.chdir(moved)
    assert not [m for m in caplog.messages if "relative data paths" in m]
    assert _eval_json(tmp_path / "run" / "checkpoints", capsys) == got
    assert len(built) == 1  # the moved project's corpus, read as it is
    step = tmp_path / "run" / "checkpoints" / "step_00000003"
    assert [m for m in caplog.messages if "relative data paths" in m] == [
        f"checkpoint {step}'s run started in {project}, no directory here: its relative data paths "
        f"(data.cache_dir=.cache/megatron-lite) are read relative to this directory, {moved}"
    ]


def _drop_from_lineage(checkpoint: Path, key: str) -> None:
    """Make ``checkpoint`` one whose lineage records no ``key`` (metadata.json is not checksummed)."""
    meta_path = checkpoint / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["lineage"][key]
    meta_path.write_text(json.dumps(meta))


def test_an_embedded_corpus_rebuilt_from_another_standard_library_is_refused(
    tiny_args, corpus_files, tmp_path, monkeypatch, capsys, caplog
):
    """A run on the embedded corpus held out documents of its Python's standard library. Eval under
    another Python reads the run's corpus where it is still there (its lineage's fingerprint), building
    none; where it is gone, the corpus built from this standard library holds other documents: one error
    naming both corpora (the lineage's .idx hash), not a loss that is no held-out loss. A checkpoint
    whose lineage records no datasets cannot be checked: a warning says so."""
    real, files, built = build.prepare_default_corpus, [corpus_files], []

    def stdlib(cache_dir, vocab_size, progress=True):  # this interpreter's standard library: files[0]
        built.append(len(files[0]))
        return real(cache_dir, vocab_size, progress=progress, files=files[0])

    monkeypatch.setattr(build, "prepare_default_corpus", stdlib)
    monkeypatch.chdir(tmp_path)
    own = [a for a in tiny_args if not a.startswith(("data.path=", "data.tokenizer="))]
    assert main(["train", *own, "data.vocab_size=512", "train.steps=1", "train.eval_every=1"]) == 0
    eval_loss = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    files[0] = corpus_files[:-1]  # another Python: one module fewer in its standard library
    assert _eval_json(step, capsys)["loss"] == pytest.approx(eval_loss, rel=1e-6)
    assert built == [len(corpus_files)]  # training's build only
    run = json.loads((step / "metadata.json").read_text())["lineage"]["datasets"][0]
    shutil.rmtree(Path(run["prefix"]).parent)  # the run's corpus is gone (a cleared cache, another machine)
    assert main(["eval", "--checkpoint", str(step), "--held-out", "--device", "cpu"]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: checkpoint {step}'s run trained on the embedded corpus"), err
    assert "eval --held-out built it here from Python" in err and run["idx_sha256"][:12] in err and "--text" in err
    _drop_from_lineage(step, "datasets")
    assert _eval_json(step, capsys)["tokens"] == 8 * 32
    assert "cannot check that the held-out samples it reads are the run's" in caplog.text
