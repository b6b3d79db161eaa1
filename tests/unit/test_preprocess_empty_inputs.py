"""Inputs with no text: an error naming each when none has any, a warning each when others have some;
never a dataset of nothing but document ends, and never a dataset lost to the error."""

import gzip
import json
import logging

import pytest

from megatron_lite.cli import main
from megatron_lite.data import preprocess as pp
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.errors import UserError

pytestmark = pytest.mark.usefixtures("enough_cpus")

TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 20
# input name -> (its bytes, what the message says it lacks)
EMPTY = {
    "empty.jsonl": (b"", "is empty"),
    "blank.jsonl": (b"\n   \n\r\n", "has only blank lines"),
    "no_text.jsonl": (b'{"text": ""}\n\n{"text": "", "id": 2}\n', "has 2 documents, all with an empty 'text'"),
    "one.jsonl.gz": (gzip.compress(b'{"text": ""}\n'), "has one document, whose 'text' is empty"),
    "empty.txt": (b"", "is empty"),
    "empty.txt.gz": (gzip.compress(b""), "is empty"),
}


def _inputs(root):
    root.mkdir(exist_ok=True)
    for name, (data, _) in EMPTY.items():
        (root / name).write_bytes(data)
    return [root / name for name in EMPTY]


@pytest.mark.parametrize("workers", [1, 2])
def test_inputs_without_text_are_one_error_naming_each(tok, tmp_path, workers):
    files = _inputs(tmp_path / "in")
    with pytest.raises(UserError) as e:
        pp.preprocess(files, tok, tmp_path / "out" / "data", progress=False, workers=workers)
    message = str(e.value)
    assert message.startswith("no text to tokenize: ")
    for path in files:
        assert f"{path} {EMPTY[path.name][1]}" in message
    assert f"Nothing was written to --output {tmp_path / 'out' / 'data'}" in message and "--json-key" in message
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_the_error_leaves_the_dataset_at_the_prefix_as_it_was(tok, tmp_path, workers):
    (tmp_path / "good.txt").write_text(TEXT)
    out = tmp_path / "out" / "data"
    pp.preprocess([tmp_path / "good.txt"], tok, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    with pytest.raises(UserError, match="no text to tokenize"):
        pp.preprocess(_inputs(tmp_path / "in"), tok, out, progress=False, overwrite=True, workers=workers)
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before  # no temporary either


@pytest.mark.parametrize("workers", [1, 2])
def test_an_input_without_text_beside_others_is_a_warning_naming_it(tok, tmp_path, caplog, workers):
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"text": "x = 1"}) + "\n")
    files = [tmp_path / "good.jsonl", *_inputs(tmp_path / "in")]
    with caplog.at_level(logging.WARNING, logger=pp.__name__):
        stats = pp.preprocess(files, tok, tmp_path / "data", progress=False, workers=workers)
    warned = [r.getMessage() for r in caplog.records]
    tail = ": it adds no text to the dataset (the other inputs have some)"
    # the first five by name, then one line counting the rest (a directory of thousands stays readable)
    assert warned == [f"input {p} {EMPTY[p.name][1]}{tail}" for p in files[1:6]] + [
        "and 1 more input with no text to add (the other inputs have some)"
    ]
    ds = IndexedDataset(tmp_path / "data")
    assert [tok.decode(ds.get(i)) for i in range(2)] == [TEXT, "x = 1"]
    assert stats["documents"] == len(ds) == 2 + 2 + 1 + 1 + 1  # no_text, one, empty.txt, empty.txt.gz: empty documents


def test_the_cli_names_an_input_without_text(tok, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    argv = ["preprocess", "--input", str(tmp_path / "empty.jsonl"), "--tokenizer", str(tok.path), "--quiet"]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert f"error: no text to tokenize: {tmp_path / 'empty.jsonl'} is empty." in capsys.readouterr().err
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_many_inputs_without_text_are_counted_past_the_tenth(tok, tmp_path):
    files = [tmp_path / f"{i:02}.jsonl" for i in range(12)]
    for path in files:
        path.write_bytes(b"")
    with pytest.raises(UserError) as e:
        pp.preprocess(files, tok, tmp_path / "data", progress=False)
    assert f"{files[9]} is empty; and 2 more. Nothing was written" in str(e.value)
