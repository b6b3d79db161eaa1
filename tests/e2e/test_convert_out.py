"""``--out`` that would put the converter's output where something else removes or overwrites it, or
that names no path at all: one error naming it, before anything is read or written."""

import os
from pathlib import Path

import pytest
from convert_fixtures import noisy_checkpoint, run_error

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) with its bytes; None for a directory."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.fixture(name="ckpt")
def ckpt_fixture(small_corpus, tmp_path) -> Path:
    """A run's checkpoint directory holding step 3 and ``latest``."""
    step = noisy_checkpoint(tmp_path / "run" / "checkpoints", small_corpus[1])
    return step.parent


@pytest.mark.parametrize("where", ["hf", ".", "step_00000003/hf", "step_00000009", ".tmp-hf/x"])
@pytest.mark.parametrize("source", ["root", "step"])
def test_to_hf_refuses_out_inside_a_checkpoint_directory(ckpt, where, source, capsys):
    """A training run's saves there prune step directories and staging (``.tmp-*``) ones: the export,
    or the ``.tmp-<out>`` it is staged in, would be deleted or replaced."""
    before = tree(ckpt.parent)
    checkpoint = ckpt if source == "root" else ckpt / "step_00000003"
    out = ckpt / where
    err = run_error(["convert", "to-hf", "--checkpoint", str(checkpoint), "--out", str(out), "--no-verify"], capsys)
    assert "the checkpoint directory" in err and str(ckpt) in err, err
    assert f"choose a directory outside it, e.g. --out {ckpt.parent}" in err, err
    assert tree(ckpt.parent) == before


def test_to_hf_refuses_out_inside_the_checkpoint_it_converts_whatever_its_name(ckpt, tmp_path, capsys):
    best = tmp_path / "best"
    (ckpt / "step_00000003").rename(best)  # metadata.json says step 3; the reader takes it under any name
    err = run_error(["convert", "to-hf", "--checkpoint", str(best), "--out", str(best / "hf")], capsys)
    assert f"lies inside the checkpoint directory {best}" in err and not (best / "hf").exists()


@pytest.mark.parametrize("verb", ["to-hf", "from-hf"])
@pytest.mark.parametrize("out", ["", "  "])
def test_a_blank_out_is_named_as_such(ckpt, tmp_path, monkeypatch, verb, out, capsys):
    """``--out "$OUT"`` with OUT unset: not "--out . already exists", nor a directory named by spaces."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    source = ["--checkpoint", str(ckpt)] if verb == "to-hf" else ["--hf", str(tmp_path / "nowhere")]
    err = run_error(["convert", verb, *source, "--out", out], capsys)
    assert "--out is " in err and "names no path" in err and "already exists" not in err, err
    assert list(Path().iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["verify", "--checkpoint", "CKPT", "--hf", ""],
        ["verify", "--checkpoint", " ", "--hf", "HF"],
        ["to-hf", "--checkpoint", "", "--out", "OUT"],
        ["from-hf", "--hf", "  ", "--out", "OUT"],
    ],
)
def test_a_blank_input_path_is_named_as_such(ckpt, tmp_path, monkeypatch, args, capsys):
    """A blank ``--hf`` or ``--checkpoint`` would read the current directory ("config.json is missing")."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    paths = {"CKPT": str(ckpt), "HF": str(tmp_path / "hf"), "OUT": str(tmp_path / "out")}
    args = [paths.get(a, a) for a in args]
    flag = next(a for a, b in zip(args, args[1:]) if a.startswith("--") and not b.strip())
    err = run_error(["convert", *args], capsys)
    assert f"{flag} is " in err and "names no path" in err and "give the path to read" in err, err
    assert list(Path().iterdir()) == [] and not (tmp_path / "out").exists()


def test_a_refused_conversion_leaves_no_directories_behind(tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "hf"
    err = run_error(["convert", "to-hf", "--checkpoint", str(tmp_path / "typo"), "--out", str(out)], capsys)
    assert "no checkpoint found" in err and list(tmp_path.iterdir()) == []


def test_a_used_out_is_refused_before_the_checkpoint_is_read(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine\n")
    err = run_error(
        ["convert", "to-hf", "--checkpoint", str(tmp_path / "typo"), "--out", str(tmp_path / "used")], capsys
    )
    assert "already exists and is not an empty directory" in err
    (tmp_path / "afile").write_text("mine\n")
    err = run_error(
        ["convert", "to-hf", "--checkpoint", str(tmp_path / "typo"), "--out", str(tmp_path / "afile")], capsys
    )
    assert f"--out {tmp_path / 'afile'} is a file; choose a new directory" in err and "empty directory" not in err
    assert (tmp_path / "afile").read_text() == "mine\n"


@pytest.mark.parametrize("when", ["opened", "streaming", "verifying"])
def test_a_checkpoint_pruned_while_it_is_converted_is_one_error(ckpt, tmp_path, monkeypatch, when, capsys):
    """A training run still saving into the checkpoint directory removes old steps (checkpoint.keep)."""
    import importlib
    import shutil

    to_hf_module = importlib.import_module("megatron_lite.convert.to_hf")
    step = ckpt / "step_00000003"
    name = {"opened": "special_ids", "streaming": "_write_export", "verifying": "verify"}[when]
    real = getattr(to_hf_module, name)

    def prune_first(*args, **kwargs):
        shutil.rmtree(step)
        return real(*args, **kwargs)

    monkeypatch.setattr(to_hf_module, name, prune_first)
    out = tmp_path / "hf"
    err = run_error(["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(out)], capsys)
    assert f"checkpoint {step} was removed or replaced while it was being converted" in err, err
    assert "copy the step directory out" in err and not out.exists() and not (tmp_path / ".tmp-hf").exists()


def test_a_checkpoint_pruned_while_it_is_verified_is_one_error(ckpt, tmp_path, monkeypatch, capsys):
    """`convert verify` of a live run's checkpoint directory: the run prunes the step while it is read."""
    import importlib
    import shutil

    from megatron_lite.cli import main

    assert main(["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--no-verify"]) == 0
    verify_module = importlib.import_module("megatron_lite.convert.verify")
    step, real = ckpt / "step_00000003", verify_module.compare_tensors

    def prune_first(*args, **kwargs):
        shutil.rmtree(step)
        return real(*args, **kwargs)

    monkeypatch.setattr(verify_module, "compare_tensors", prune_first)
    err = run_error(["convert", "verify", "--checkpoint", str(ckpt), "--hf", str(tmp_path / "hf")], capsys)
    assert f"checkpoint {step} was removed or replaced while it was being verified" in err, err
    assert "copy the step directory out of the run's checkpoint.dir and verify the copy" in err, err
