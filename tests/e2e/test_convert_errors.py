"""`megatron-lite convert`'s bad paths: used output directories, damaged inputs, failed writes,
tampered exports. Each is one clear error line (rc 2) and leaves nothing behind."""

import errno
import importlib
import os
from pathlib import Path

import pytest
from convert_fixtures import exported_fixture, run_error, trained_fixture  # noqa: F401 (fixtures)

from megatron_lite.cli import main
from megatron_lite.convert import io

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
to_hf_module = importlib.import_module("megatron_lite.convert.to_hf")  # `convert.to_hf` is the function


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (a file itself too) with its bytes."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_from_hf_refuses_a_used_out_and_changes_nothing_there(exported, tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.yaml").write_text("keep\n")
    (used / "latest").write_text("step_00000007\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep\n")
    for out in (used, a_file):
        before = snapshot(out)
        err = run_error(["convert", "from-hf", "--hf", str(exported), "--out", str(out)], capsys)
        assert f"--out {out} already exists and is not an empty directory; choose a new one" in err
        assert "checkpoint.dir" not in err and snapshot(out) == before


@pytest.mark.parametrize("stage", ["weights", "tokenizer"])
def test_to_hf_on_a_full_disk_is_one_error_and_leaves_nothing(trained, tmp_path, monkeypatch, stage, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(
        *(io.ShardedWriter, "write") if stage == "weights" else (to_hf_module, "write_hf_tokenizer"), full
    )
    out = tmp_path / "parent" / "hf"
    err = run_error(["convert", "to-hf", "--checkpoint", str(trained), "--out", str(out), "--no-verify"], capsys)
    assert f"cannot write the export to {out}: OSError: [Errno 28] No space left on device" in err
    assert "planned but never written" not in err and list((tmp_path / "parent").iterdir()) == []


def test_to_hf_into_the_current_directory(trained, tmp_path, monkeypatch, capsys):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["convert", "to-hf", "--checkpoint", str(trained), "--out", ".", "--no-verify"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in Path().iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["here"]  # no .tmp-* left beside it
    err = run_error(["convert", "to-hf", "--checkpoint", str(trained), "--out", "."], capsys)
    assert "--out . already exists and is not an empty directory" in err
