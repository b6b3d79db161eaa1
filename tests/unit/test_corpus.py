"""Preprocessing streams files into a dataset that decodes back to its inputs; the stdlib cache is safe."""

import json
import logging
import re
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data import corpus as corpus_mod
from megatron_lite.data.corpus import default_corpus_files, prepare_default_corpus
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.data.preprocess import check_dataset_tokenizer, preprocess
from megatron_lite.data.tokenizer import Tokenizer, train_tokenizer
from megatron_lite.errors import UserError

VOCAB = 400


def _small_stdlib_files(n=3):
    """A few small real files, so the corpus tests exercise real code in well under a second."""
    files = [p for p in default_corpus_files() if 2_000 < p.stat().st_size < 12_000]
    return files[:n]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return Tokenizer(train_tokenizer(_small_stdlib_files(), root / "tok", VOCAB, progress=False))


def test_default_corpus_files_are_stdlib_python():
    files = default_corpus_files()
    assert files == sorted(files) and len(files) > 50
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert all(p.suffix == ".py" and p.is_relative_to(stdlib) for p in files)
    assert not any("site-packages" in p.parts for p in files)
    assert stdlib / "json" / "decoder.py" in files  # packages are included, not only top-level modules


def test_preprocess_plain_files_round_trip(tok, tmp_path):
    files = _small_stdlib_files()
    stats = preprocess([str(p) for p in files], tok.path, tmp_path / "d", progress=False)
    ds = IndexedDataset(tmp_path / "d")
    assert stats["documents"] == len(ds) == len(files)
    assert stats["tokens"] == ds.num_tokens
    assert stats["bytes"] == sum(p.stat().st_size for p in files)
    for i, path in enumerate(files):
        ids = ds.get(i)
        assert ids[-1] == tok.eos_id
        assert tok.decode(ids[:-1]) == path.read_text()
    meta = json.loads((tmp_path / "d.json").read_text())
    assert meta["tokenizer_sha256"] == tok.sha256


def test_preprocess_jsonl_and_globs(tok, tmp_path):
    docs = ["first doc\n", "  second\tdoc ünï\n\n", ""]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    (tmp_path / "b.jsonl").write_text("\n" + json.dumps({"body": "third"}) + "\n")
    stats = preprocess([str(tmp_path / "*.jsonl")], tok.path, tmp_path / "out", "body", False, False)
    ds = IndexedDataset(tmp_path / "out")
    assert stats["documents"] == len(ds) == 4
    assert [tok.decode(ds.get(i)) for i in range(4)] == [*docs, "third"]
    assert ds.dtype == np.uint16


def test_an_input_named_with_glob_characters_is_that_file(tok, tmp_path):
    """``shard[1].jsonl`` read as a pattern matched ``shard1.jsonl`` (or nothing) instead of itself."""
    (tmp_path / "shard[1].jsonl").write_text(json.dumps({"text": "the bracketed file"}) + "\n")
    (tmp_path / "shard1.jsonl").write_text(json.dumps({"text": "another file"}) + "\n")
    preprocess([str(tmp_path / "shard[1].jsonl")], tok.path, tmp_path / "out", progress=False)
    ds = IndexedDataset(tmp_path / "out")
    assert [tok.decode(ds.get(i)[:-1]) for i in range(len(ds))] == ["the bracketed file"]
    preprocess([str(tmp_path / "shard[0-9].jsonl")], tok.path, tmp_path / "pat", progress=False)  # still a pattern
    assert tok.decode(IndexedDataset(tmp_path / "pat").get(0)[:-1]) == "another file"


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"text": "ok"}\n{"other": "x"}\n', r"bad.jsonl:2: no key 'text'"),
        ('{"text": "ok"}\nnot json\n', r"bad.jsonl:2: invalid JSON"),
        (
            '{"text": 5}\n',
            r"bad.jsonl:1: 'text' holds a JSON number, not a string; give each document's text as a JSON string "
            "there, or name the key holding the text with --json-key$",
        ),
        ('{"text": null}\n', r"bad.jsonl:1: 'text' holds JSON null, not a string;"),  # JSON's words, not Python's
        ('{"text": ["a"]}\n', r"bad.jsonl:1: 'text' holds a JSON array, not a string;"),
        ('{"text": true}\n', r"bad.jsonl:1: 'text' holds a JSON boolean, not a string;"),
        ('["a", "b"]\n', r"bad.jsonl:1: a JSON array, not an object; a .jsonl/.json input holds one JSON object"),
        ('"a"\n', r"bad.jsonl:1: a JSON string, not an object;"),
        ("null\n", r"bad.jsonl:1: JSON null, not an object;"),
        # a .json file as many tools save one: the fix converts it to JSON Lines
        ('[\n  {"text": "a"}\n]\n', r"bad.jsonl:1: invalid JSON .* looks like one JSON array: convert it, e.g. jq -c"),
        ('[{"text": "a"}]\n', r"bad.jsonl:1: a JSON array, not an object; .* looks like one JSON array: convert it"),
        ('{\n  "text": "a"\n}\n', r"bad.jsonl:1: invalid JSON .*looks like one JSON object over several lines: e"),
        ('{"text": "a\tb"}\n', r"bad.jsonl:1: invalid JSON \(Invalid control character at column 12\)"),
        ("[" * 100_000 + "]" * 100_000 + "\n", r"bad.jsonl:1: invalid JSON \(nested too deeply\)"),
    ],
)
def test_preprocess_bad_json_lines(tok, tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(UserError, match=match):
        preprocess([str(tmp_path / "bad.jsonl")], tok.path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out.idx").exists() and not list(tmp_path.glob(".out*"))


def test_preprocess_bad_inputs(tok, tmp_path):
    (tmp_path / "a.txt").write_text("x = 1\n")
    with pytest.raises(UserError, match=r"--output .*w1.bin ends in its file's extension; give the prefix, --output "):
        preprocess([str(tmp_path / "a.txt")], tok.path, tmp_path / "w1.bin", progress=False)  # unchecked: w1.bin.bin
    assert not list(tmp_path.glob("w1*"))
    with pytest.raises(
        UserError, match=r"--output .*/ names a directory, not a file prefix; give a name inside it, e\.g\."
    ):
        preprocess([str(tmp_path / "a.txt")], tok.path, f"{tmp_path}/", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with pytest.raises(UserError, match="matches no files"):
        preprocess([str(tmp_path / "*.jsonl")], tok.path, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="missing.txt not found"):
        preprocess([str(tmp_path / "missing.txt")], tok.path, tmp_path / "out", progress=False)
    for given in (str(tmp_path), f"{tmp_path}/"):  # the glob it suggests is well formed either way
        with pytest.raises(UserError) as e:
            preprocess([given], tok.path, tmp_path / "out", progress=False)
        assert str(e.value) == f"input {given} is a directory; pass files or a glob such as '{tmp_path}/*.txt'"
    for files, want in (  # the glob names the files the directory holds: directly in it, else beneath it
        (["a/x.py", "a/y.py", "a/n.txt", "a/.x.lock", "a/.h.lock", "a/.i.lock", "a/d.jsonl/z.txt"], "a/*.py"),
        (["b/1/x.txt", "b/2/y.txt", "b/z.md"], "b/*.md"),
        (["c/1/x.py", "c/2/y.py", "c/3/z.txt"], "c/**/*.py"),
        (["e/1/README"], "e/*.jsonl"),
    ):
        for name in files:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("x = 1\n")
        with pytest.raises(UserError, match=f"pass files or a glob such as '{re.escape(str(tmp_path / want))}'$"):
            preprocess([str(tmp_path / files[0].split("/")[0])], tok.path, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match=r"no inputs given \(an empty list\): pass at least one input file or glob"):
        preprocess([], tok.path, tmp_path / "out", progress=False)  # a script's own glob that matched nothing
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(UserError, match="megatron-lite tokenizer train"):
        preprocess([str(tmp_path / "x.txt")], tmp_path / "no.model", tmp_path / "out", progress=False)


def test_dataset_is_read_only_with_its_own_tokenizer(tok, tmp_path):
    files = _small_stdlib_files(1)
    preprocess([str(p) for p in files], tok.path, tmp_path / "d", progress=False)
    check_dataset_tokenizer(tmp_path / "d", tok)
    other = Tokenizer(train_tokenizer(_small_stdlib_files(), tmp_path / "other", VOCAB + 50, progress=False))
    with pytest.raises(UserError) as e:
        check_dataset_tokenizer(tmp_path / "d", other)
    message = str(e.value)
    assert str(tok.path) in message and str(other.path) in message and "d.json" in message
    assert "point data.tokenizer at the tokenizer the data was made with" in message
    assert f"--output {tmp_path / 'd'} --overwrite ..." in message  # the fix as given runs: it must replace
    meta = json.loads((tmp_path / "d.json").read_text())
    del meta["tokenizer_sha256"]  # a dataset without the record: nothing to compare, no error
    (tmp_path / "d.json").write_text(json.dumps(meta))
    check_dataset_tokenizer(tmp_path / "d", other)
    (tmp_path / "d.json").unlink()
    check_dataset_tokenizer(tmp_path / "d", other)


def test_a_record_of_another_dataset_is_not_taken_for_this_ones(tok, tmp_path, caplog):
    """A PREFIX.json copied beside other .bin/.idx (its counts differ) refused the dataset falsely."""
    files = [str(p) for p in _small_stdlib_files(2)]
    preprocess(files, tok.path, tmp_path / "e", progress=False)
    other = Tokenizer(train_tokenizer(_small_stdlib_files(), tmp_path / "other", VOCAB + 50, progress=False))
    preprocess(files, other.path, tmp_path / "o", progress=False)
    with pytest.raises(UserError, match="was tokenized with"):  # its own record names its own tokenizer
        check_dataset_tokenizer(tmp_path / "o", tok)
    shutil.copyfile(tmp_path / "o.json", tmp_path / "e.json")  # other counts: not e's record
    with caplog.at_level(logging.WARNING, logger="megatron_lite.data.preprocess"):
        check_dataset_tokenizer(tmp_path / "e", tok)
    assert f"{tmp_path / 'e.json'} is not the record of dataset {tmp_path / 'e'}" in caplog.text


@pytest.fixture
def copied_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    return [Path(shutil.copy(p, src / p.name)) for p in _small_stdlib_files()]


def test_prepare_corpus_builds_then_reuses(tmp_path, copied_files):
    cache = tmp_path / "cache"
    prefix, model = prepare_default_corpus(cache, VOCAB, progress=False, files=copied_files)
    tok, ds = Tokenizer(model), IndexedDataset(prefix)
    assert len(ds) == len(copied_files)
    assert tok.decode(ds.get(0)[:-1]) == copied_files[0].read_text()
    folder = Path(prefix).parent
    assert folder.name.startswith("stdlib-") and f"-v{VOCAB}-" in folder.name
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temp folders left
    check_dataset_tokenizer(prefix, tok)  # the embedded corpus records its own tokenizer's hash
    # ... and its path where it stays, not in the build folder (messages name it to the user)
    assert json.loads((folder / "data.json").read_text())["tokenizer"] == str(model)
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert prepare_default_corpus(cache, VOCAB, progress=False, files=copied_files) == (prefix, model)
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp


def test_the_corpus_build_reads_empty_and_latin1_files_without_a_warning_each(tmp_path, copied_files, caplog):
    """The standard library has empty ``__init__.py`` files and test files in other encodings: no user
    can act on a warning naming each, so the build reads them as they are and says one line."""
    empty, latin = copied_files[0].parent / "__init__.py", copied_files[0].parent / "latin.py"
    empty.write_bytes(b"")
    latin.write_bytes("s = 'caf\u00e9'\n".encode("latin-1"))
    files = [*copied_files, empty, latin]
    with caplog.at_level(logging.INFO):
        prefix, model = prepare_default_corpus(tmp_path / "cache", VOCAB, progress=True, files=files)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "(1 file is test data in another encoding: read with U+FFFD)" in caplog.messages
    caplog.clear()
    assert len(IndexedDataset(prefix)) == len(files)
    with caplog.at_level(logging.WARNING):  # anywhere else the same inputs are warned about
        preprocess(files, model, tmp_path / "d", progress=False)
    assert len(caplog.records) == 2, [r.getMessage() for r in caplog.records]


def test_interrupted_build_leaves_no_cache(tmp_path, copied_files, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_mod, "preprocess", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_default_corpus(tmp_path / "cache", VOCAB, progress=False, files=copied_files)
    assert list((tmp_path / "cache").iterdir()) == []


def test_damaged_cache_is_rebuilt_and_says_why(tmp_path, copied_files, caplog):
    prefix, _ = prepare_default_corpus(tmp_path / "cache", VOCAB, progress=False, files=copied_files)
    Path(prefix + ".idx").write_bytes(b"garbage")
    with caplog.at_level(logging.INFO, logger="megatron_lite.data.corpus"):  # logged: dated in a job's log
        prefix2, _ = prepare_default_corpus(tmp_path / "cache", VOCAB, progress=True, files=copied_files)
    assert len(IndexedDataset(prefix2)) == len(copied_files)
    said = caplog.text
    assert f"the corpus cache {Path(prefix).parent} cannot be used (" in said and "rebuilding it" in said
    assert "data.idx" in said  # the reason names the damaged file


def test_one_file_named_twice_is_read_once(tok, tmp_path):
    """`a.txt`, its absolute path and a glob matching it are one file: one document, not three."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("only once\n")
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "sub" / ".." / "a.txt"), str(tmp_path / "*.txt")]
    stats = preprocess(inputs, tok.path, tmp_path / "out", progress=False)
    assert stats["documents"] == stats["files"] == 1


def test_a_cache_dir_that_cannot_be_a_directory_is_one_error_naming_the_key(tmp_path):
    """data.cache_dir=/dev/null (or any file) was a FileExistsError traceback from the corpus build."""
    from megatron_lite.config import load_config
    from megatron_lite.training.build import resolve_data_paths

    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad, why in ((afile, "it exists and is not a directory"), (afile / "sub", "Not a directory")):
        cfg = load_config(None, [f"data.cache_dir={bad}"])
        with pytest.raises(UserError, match=rf"^data.cache_dir='{bad}' cannot be made a directory .*: {why}; "):
            resolve_data_paths(cfg, progress=False)
    assert afile.read_text() == "x"
    # eval --held-out reads a run's corpus: the fix is where to run eval, not another directory to choose
    with pytest.raises(UserError) as refused:
        resolve_data_paths(cfg, progress=False, checkpoint="runs/x/checkpoints/step_00000004")
    assert str(refused.value).endswith(
        "Not a directory; checkpoint runs/x/checkpoints/step_00000004's run keeps the embedded corpus there, and eval "
        "--held-out reads its held-out split from it: run eval where that directory can be reached, or score a text "
        "file with --text"
    ), refused.value
