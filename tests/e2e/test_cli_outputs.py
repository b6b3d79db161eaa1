"""Every verb that writes files refuses, before any work, an output whose directory cannot be
created: one ``error:`` line naming the flag, exit 2, no traceback."""

from __future__ import annotations

import pytest

from megatron_lite.cli import main

VERBS = {
    "preprocess": ["preprocess", "--input", "{src}", "--tokenizer", "{tok}", "--output", "{out}"],
    "tokenizer": ["tokenizer", "train", "--input", "{src}", "--output", "{out}", "--vocab-size", "300"],
    "to-hf": ["convert", "to-hf", "--checkpoint", "{ckpt}", "--out", "{out}"],
    "from-hf": ["convert", "from-hf", "--hf", "{ckpt}", "--out", "{out}"],
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_output_under_a_file_is_one_clear_error(verb, tmp_path, capsys):
    src = tmp_path / "text.txt"
    src.write_text("some text\n" * 50)
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    fill = {"src": src, "tok": tmp_path / "t.model", "ckpt": tmp_path / "missing", "out": blocker / "out"}
    argv = [a.format(**fill) for a in VERBS[verb]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    flag = "--out" if verb in ("to-hf", "from-hf") else "--output"
    assert err.startswith(f"error: the directory of {flag}=") and "is not a directory" in err, err
    assert len(err.splitlines()) == 1, err
    assert blocker.read_text() == "not a directory"
