"""A resume on the embedded corpus under another Python (another standard library) is refused before the
corpus is built, naming both Pythons and the run's own corpus as the way on; a patch release with the
same standard library resumes on the cached corpus. The standard library here is a few of its files
(``corpus.default_corpus_files`` patched) and the other Python a patched ``platform.python_version``."""

import json
import platform
from pathlib import Path

import pytest
from train_checks import one_error_line

from megatron_lite.cli import main
from megatron_lite.data import corpus
from megatron_lite.training import build


@pytest.fixture
def run(tiny_args, corpus_files, tmp_path, monkeypatch) -> tuple[list[str], dict]:
    """(train arguments on the embedded corpus, the lineage of its step-1 checkpoint), in ``tmp_path``."""
    monkeypatch.setattr(corpus, "default_corpus_files", lambda: list(corpus_files))
    monkeypatch.chdir(tmp_path)
    own = [a for a in tiny_args if not a.startswith(("data.path=", "data.tokenizer="))] + ["data.vocab_size=512"]
    assert main(["train", *own, "train.exit_after=1"]) == 0
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    return own, json.loads((step / "metadata.json").read_text())["lineage"]


def _run_data(tmp_path: Path, lineage: dict) -> str:
    prefix, tok = (tmp_path / p for p in (lineage["datasets"][0]["prefix"], lineage["tokenizer"]["path"]))
    return f"data.path={prefix} data.tokenizer={tok}"


def test_another_python_is_refused_before_the_build_naming_the_runs_corpus(run, tmp_path, monkeypatch, capsys):
    own, lineage = run
    ran, cache = platform.python_version(), tmp_path / ".cache" / "megatron-lite"
    cached = sorted(cache.iterdir())
    monkeypatch.setattr(platform, "python_version", lambda: "3.99.0")
    monkeypatch.setattr(corpus, "_build", lambda *a, **k: pytest.fail("the corpus was built"))
    assert main(["train", *own]) == 2
    err, step = one_error_line(capsys), tmp_path / "run" / "checkpoints" / "step_00000001"
    assert f"checkpoint {step}'s run trained on the embedded corpus built by Python {ran}; this Python, 3.99.0," in err
    assert f"Resume with the run's embedded corpus, while it is there: {_run_data(tmp_path, lineage)} (" in err, err
    assert f"the run's Python: {ran})" in err and f"checkpoint.init_from={step}" in err
    assert sorted(cache.iterdir()) == cached  # nothing built, nothing replaced
    assert main(["train", *own, *_run_data(tmp_path, lineage).split()]) == 0  # the way on it named


def test_a_patch_release_with_the_same_standard_library_resumes_on_the_cache(run, monkeypatch):
    own, lineage = run
    major, minor, _ = platform.python_version().split(".")
    monkeypatch.setattr(platform, "python_version", lambda: f"{major}.{minor}.99")
    monkeypatch.setattr(corpus, "_build", lambda *a, **k: pytest.fail("the corpus was built"))
    assert main(["train", *own]) == 0


def test_a_cached_corpus_of_another_standard_library_is_refused_before_it_is_opened(
    run, corpus_files, tmp_path, monkeypatch, capsys
):
    """This Python's corpus is cached, built from other files than the run's (a standard library patched
    in place): preflight gives the resume's tokenizer refusal before the data is prepared."""
    own, lineage = run
    monkeypatch.setattr(corpus, "default_corpus_files", lambda: list(corpus_files[:-1]))
    _, tok = corpus.prepare_default_corpus(Path(".cache/megatron-lite"), 512, progress=False)
    monkeypatch.setattr(build, "prepare_default_corpus", lambda *a, **k: pytest.fail("the data was prepared"))
    assert main(["train", *own]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: the tokenizer {tok} is not the one checkpoint ")
    assert f"Resume with the run's embedded corpus, while it is there: {_run_data(tmp_path, lineage)} (" in err, err


def test_a_run_on_its_own_data_is_left_to_the_resume_checks(tiny_args, corpus_files, tmp_path, monkeypatch):
    """A run that trained on data.path (here: the same files, so the same tokenizer as the embedded corpus
    built here), resumed on the embedded corpus under another Python: preflight refuses no embedded corpus
    the run never trained on; the resume's checks judge the corpus once it is built, and pass it."""
    monkeypatch.setattr(corpus, "default_corpus_files", lambda: list(corpus_files))
    monkeypatch.chdir(tmp_path)
    assert main(["train", *tiny_args, "train.exit_after=1"]) == 0
    own = [a for a in tiny_args if not a.startswith(("data.path=", "data.tokenizer="))] + ["data.vocab_size=512"]
    monkeypatch.setattr(platform, "python_version", lambda: "3.99.0")
    assert main(["train", *own]) == 0
