"""`megatron-lite plan --json` speaks JSON on failure too: one `{"error": ...}` line, exit 2."""

import json
from pathlib import Path

import pytest
from tiny_config import tiny

from megatron_lite.cli import main

TINY = tiny(4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["parallel.tp=2"], "parallel.tp=2 x parallel.pp=1 = 2 does not divide world size 3"),
        (["model.layrs=2"], "did you mean 'model.layers'"),
    ],
)
def test_json_error_is_one_json_line(extra, message, capsys):
    assert main(["plan", "--world-size", "3", *TINY, "train.global_batch_size=48", *extra, "--json"]) == 2
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 1 and err == "", (out, err)
    got = json.loads(lines[0])
    assert list(got) == ["error"] and message in got["error"], got


def test_text_error_stays_one_error_line(capsys):
    assert main(["plan", "--world-size", "3", *TINY, "train.global_batch_size=48", "parallel.tp=2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (out, err)


def test_json_lists_the_startup_warnings(capsys):
    """The text report's ``warning:`` lines (here: a warmup longer than the run) are in the JSON too."""
    args = ["plan", "--world-size", "1", *TINY, "train.global_batch_size=8", "--json"]
    assert main([*args, "train.steps=20", "optim.warmup=10"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []
    assert main([*args, "train.steps=5", "optim.warmup=30"]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert len(warnings) == 1 and "optim.warmup=30" in warnings[0] and "train.steps=5" in warnings[0], warnings


def _readme() -> str:
    """README.md with its line breaks as spaces, as a reader sees a wrapped sentence."""
    return " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())


def test_readme_documents_every_key_of_the_json(capsys):
    """`plan --json` was documented nowhere: a script reading it had only the code to go by."""
    assert main(["plan", "--world-size", "2", *TINY, "train.global_batch_size=16", "parallel.pp=2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    start = _readme().index("`plan --json` prints one line:")
    doc = _readme()[start : start + 800]
    missing = [k for k in [*got, *got["memory_by_stage"][0]] if f"`{k}`" not in doc]
    assert missing == [], missing
    assert 'one line `{"error": ...}`, and exit status 2' in doc
