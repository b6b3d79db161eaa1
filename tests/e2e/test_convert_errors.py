"""`megatron-lite convert`'s bad paths: used output directories, damaged inputs, failed writes,
tampered exports. Each is one clear error line (rc 2) and leaves nothing behind."""

import os
from pathlib import Path

import pytest
from convert_fixtures import exported_fixture, run_error, trained_fixture  # noqa: F401 (fixtures)

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")


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
