"""Inputs that are not UTF-8 text, for ``preprocess``, ``tokenizer train`` and ``eval``: a binary file
(NUL bytes in its first block, compressed or not) is one error naming it before any input is read in
full; text with bytes that are not UTF-8 is read, each such byte replaced, with a warning naming the
file and how many of its documents (or sampled lines) held any."""

import gzip
import json
import logging

import pytest

from megatron_lite.cli import main
from megatron_lite.data import preprocess as pp
from megatron_lite.data.tokenizer import train_tokenizer
from megatron_lite.errors import UserError
from megatron_lite.training import evaluate

pytestmark = pytest.mark.usefixtures("enough_cpus")

TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 20
BINARY = bytes(range(256)) * 8  # a NUL at byte 0 and every 256 bytes after
LATIN1 = "café au lait\nnaïve\nplain line\n".encode("latin-1")


@pytest.fixture(name="binaries")
def binaries_fixture(tmp_path):
    """Binary inputs, each named: a dataset's .bin, a gzipped binary, UTF-16 text (ASCII + NULs)."""
    (tmp_path / "data.bin").write_bytes(b"x" * 100 + BINARY)
    (tmp_path / "blob.txt.gz").write_bytes(gzip.compress(BINARY))
    (tmp_path / "utf16.txt").write_bytes(TEXT.encode("utf-16-le"))
    return {"data.bin": 100, "blob.txt.gz": 0, "utf16.txt": 1}


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_refuses_a_binary_input_before_reading_any(tok, tmp_path, binaries, workers):
    (tmp_path / "good.txt").write_text(TEXT)
    for name, first in binaries.items():
        with pytest.raises(UserError) as e:
            pp.preprocess([tmp_path / "good.txt", tmp_path / name], tok, tmp_path / "out" / "d", workers=workers)
        assert str(e.value) == (
            f"input {tmp_path / name} is not text: it holds NUL bytes (the first at byte {first}), as binary files "
            "and UTF-16/UTF-32 text do; leave it out of --input, or convert it to UTF-8 text first"
        )
        assert not (tmp_path / "out").exists()


def test_the_clis_refuse_a_binary_input_in_one_line(tok, tmp_path, binaries, capsys):
    out = str(tmp_path / "d")
    text = ["--text", str(tmp_path / "data.bin")]
    for argv in (
        ["preprocess", "--input", str(tmp_path / "data.bin"), "--tokenizer", str(tok.path), "--output", out],
        ["tokenizer", "train", "--input", str(tmp_path / "data.bin"), "--output", out, "--vocab-size", "300"],
        ["eval", "--checkpoint", str(tmp_path / "no_checkpoint"), *text],  # refused before the checkpoint is read
    ):
        assert main([*argv, *(["--quiet"] if argv[0] != "eval" else [])]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"error: input {tmp_path / 'data.bin'} is not text: it holds NUL bytes")
            and len(err.strip().splitlines()) == 1
        ), err
    assert not list(tmp_path.glob("d.*")) and not list(tmp_path.glob(".d*"))


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_warns_of_text_that_is_not_utf8_naming_the_file(tok, tmp_path, caplog, workers):
    (tmp_path / "latin.txt").write_bytes(LATIN1)
    docs = [{"text": "ok"}, {"text": "fine"}]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join([json.dumps(d).encode() for d in docs] + [
        b'{"text": "caf\xe9"}', b'{"text": "na\xefve \xff"}', b""]))  # fmt: skip
    (tmp_path / "good.txt").write_text(TEXT)
    files = [tmp_path / "latin.txt", tmp_path / "mixed.jsonl", tmp_path / "good.txt"]
    with caplog.at_level(logging.WARNING):
        stats = pp.preprocess(files, tok, tmp_path / "d", progress=False, workers=workers)
    tail = ", each such byte replaced by U+FFFD; if the file is text in another encoding, convert it to UTF-8 first"
    assert [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()] == [
        f"input {files[0]}: documents with bytes that are not UTF-8: 1 of 1{tail} (e.g. iconv -f LATIN1 -t UTF-8)",
        f"input {files[1]}: documents with bytes that are not UTF-8: 2 of 4{tail} (e.g. iconv -f LATIN1 -t UTF-8)",
    ]
    assert stats["decode_errors"] == 3 and stats["documents"] == 6
    assert json.loads((tmp_path / "d.json").read_text())["decode_errors"] == 3


def test_tokenizer_train_warns_of_sampled_lines_that_are_not_utf8(tmp_path, caplog):
    (tmp_path / "latin.txt").write_bytes(TEXT.encode() + LATIN1)
    (tmp_path / "good.txt").write_text(TEXT)
    with caplog.at_level(logging.WARNING):
        train_tokenizer([tmp_path / "latin.txt", tmp_path / "good.txt"], tmp_path / "tok", 300, progress=False)
    warned = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    lines = TEXT.count("\n") + LATIN1.count(b"\n")
    assert warned == [
        f"input {tmp_path / 'latin.txt'}: sampled lines with bytes that are not UTF-8: 2 of {lines}, each such byte "
        "replaced by U+FFFD; if the file is text in another encoding, convert it to UTF-8 first (e.g. iconv -f "
        "LATIN1 -t UTF-8)"
    ]


def test_eval_refuses_a_binary_text_file(tmp_path, binaries):
    with pytest.raises(UserError, match="utf16.txt is not text: it holds NUL bytes"):
        evaluate.evaluate_text(tmp_path / "ckpt", tmp_path / "utf16.txt", device="cpu")
