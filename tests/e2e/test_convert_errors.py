"""`megatron-lite convert`'s bad paths on the megatron-lite side: used output directories, failed
writes, damaged or edited checkpoints. Each is one clear error line (rc 2) and leaves nothing behind."""

import errno
import importlib
import json
import os
import shutil
from pathlib import Path

import pytest
from convert_fixtures import (  # noqa: F401 (fixtures)
    exported_fixture,
    noisy_checkpoint,
    run_error,
    snapshot,
    trained_fixture,
)

from megatron_lite.checkpoint import shards
from megatron_lite.checkpoint.format import sha256_file
from megatron_lite.cli import main
from megatron_lite.convert import io

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
to_hf_module = importlib.import_module("megatron_lite.convert.to_hf")  # `convert.to_hf` is the function


def test_from_hf_refuses_a_used_out_and_changes_nothing_there(exported, tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.yaml").write_text("keep\n")
    (used / "latest").write_text("step_00000007\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep\n")
    for out, says in [(used, "already exists and is not an empty directory; choose a new one"), (a_file, "is a file")]:
        before = snapshot(out)
        err = run_error(["convert", "from-hf", "--hf", str(exported), "--out", str(out)], capsys)
        assert f"--out {out} {says}" in err and "checkpoint.dir" not in err and snapshot(out) == before, err


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
    assert not Path(to_hf_module.STAGING_MARKER).exists()
    err = run_error(["convert", "to-hf", "--checkpoint", str(trained), "--out", "."], capsys)
    assert "--out . already exists and is not an empty directory" in err


def test_to_hf_never_overwrites_a_file_saved_into_out_while_it_ran(trained, tmp_path, monkeypatch, capsys):
    """--out an empty directory at the start; a file saved there during the verification stays as it is."""
    out = tmp_path / "hf"
    out.mkdir()
    real_verify = to_hf_module.verify

    def verify_while_the_user_saves(*args, **kwargs):
        (out / "tokenizer.json").write_text("mine\n")
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(to_hf_module, "verify", verify_while_the_user_saves)
    err = run_error(["convert", "to-hf", "--checkpoint", str(trained), "--out", str(out)], capsys)
    assert f"{out / 'tokenizer.json'} appeared while the export was being written, and it is not overwritten" in err
    assert snapshot(out) == {"tokenizer.json": b"mine\n"} and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_a_run_root_of_unreadable_checkpoints_is_named_for_conversion_not_training(trained, tmp_path, capsys):
    broken = tmp_path / "checkpoints"
    shutil.copytree(trained, broken)
    for step in broken.glob("step_*"):
        (step / "tokenizer.model").unlink()
    (tmp_path / "t.txt").write_text("def f(x):\n    return x\n")
    for args in (
        ["convert", "to-hf", "--checkpoint", str(broken), "--out", str(tmp_path / "hf")],
        ["eval", "--checkpoint", str(broken), "--text", str(tmp_path / "t.txt")],
    ):
        err = run_error(args, capsys)
        assert f"every checkpoint under {broken} is incomplete or corrupt (newest: step_00000002: tokenizer" in err
        assert "point at a good step directory" in err and "start from scratch" not in err


@pytest.mark.parametrize("verb", ["to-hf", "verify"])
def test_step_with_a_step_directory_asks_for_its_parent(trained, exported, tmp_path, verb, capsys):
    """``--step`` picks a step under the run's checkpoint directory, not under a step directory."""
    step_dir = trained / "step_00000002"
    target = ["--out", str(tmp_path / "hf")] if verb == "to-hf" else ["--hf", str(exported)]
    err = run_error(["convert", verb, "--checkpoint", str(step_dir), "--step", "1", *target], capsys)
    assert f"--checkpoint {step_dir} is a step directory, and --step needs the run's checkpoint directory" in err
    assert f"use --checkpoint {trained} --step 1, or drop --step to convert {step_dir}" in err, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "edit, says",
    [
        ({"hidden": 96}, "embed.weight is stored with shape (512, 64), but its model config makes it (512, 96)"),
        (
            {"heads": 2, "kv_heads": 2},
            "layers.0.attn.qkv.weight is stored with shape (128, 64), but its model config makes it (192, 64)",
        ),
        ({"layers": 3}, "its tensors are not those of its model config (missing ['layers.2."),
        ({"heads": 0}, "its model config builds no model (ZeroDivisionError: integer division or modulo by zero)"),
    ],
)
def test_a_metadata_config_that_disagrees_with_the_tensors_is_one_error(
    trained, exported, tmp_path, edit, says, capsys
):
    """A hand-edited (or damaged) model config in metadata.json failed deep in a transform, with a traceback."""
    step = tmp_path / "checkpoints" / "step_00000002"
    shutil.copytree(trained / "step_00000002", step)
    meta = json.loads((step / "metadata.json").read_text())
    meta["config"]["model"].update(edit)
    (step / "metadata.json").write_text(json.dumps(meta))
    for args in (["to-hf", "--out", str(tmp_path / "hf")], ["verify", "--hf", str(exported)]):
        err = run_error(["convert", args[0], "--checkpoint", str(step), *args[1:]], capsys)
        assert f"checkpoint {step}: {says}" in err and "metadata.json's config was edited or damaged" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


@pytest.mark.parametrize("text", ["[]\n", "{not json\n", "[" * 100_000 + "]" * 100_000], ids=["list", "text", "nested"])
def test_an_origin_json_that_is_no_json_object_is_one_error(exported, tmp_path, text, capsys):
    """origin.json (checksummed in files, so a crafted checkpoint passes verification) is read for the export."""
    assert main(["convert", "from-hf", "--hf", str(exported), "--out", str(tmp_path / "imported")]) == 0
    step = tmp_path / "imported" / "step_00000000"
    (step / "origin.json").write_text(text)
    meta = json.loads((step / "metadata.json").read_text())
    meta["files"]["origin.json"] = {"sha256": sha256_file(step / "origin.json"), "bytes": len(text)}
    (step / "metadata.json").write_text(json.dumps(meta))
    err = run_error(["convert", "to-hf", "--checkpoint", str(step), "--out", str(tmp_path / "hf")], capsys)
    assert f"checkpoint {step}: its origin.json is not a JSON object (edited or damaged)" in err, err
    assert not (tmp_path / "hf").exists()


def test_a_metadata_config_with_a_crafted_layer_count_is_refused_before_building_it(
    trained, exported, tmp_path, monkeypatch, capsys
):
    """A model of 10**9 layers, even on the meta device, would exhaust memory before its shapes are compared."""
    step = tmp_path / "checkpoints" / "step_00000002"
    shutil.copytree(trained / "step_00000002", step)
    meta = json.loads((step / "metadata.json").read_text())
    meta["config"]["model"]["layers"] = 10**9
    (step / "metadata.json").write_text(json.dumps(meta))

    def never(*args, **kwargs):
        raise AssertionError("a model of the crafted config was built")

    monkeypatch.setattr(shards, "state_shapes", never)
    for args in (["to-hf", "--out", str(tmp_path / "hf")], ["verify", "--hf", str(exported)]):
        err = run_error(["convert", args[0], "--checkpoint", str(step), *args[1:]], capsys)
        assert f"checkpoint {step}: its model config says model.layers=1000000000, more layers than its " in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_a_checkpoint_whose_tokenizer_outgrows_its_vocabulary_is_one_error(small_corpus, exported, tmp_path, capsys):
    """512 pieces, 400 embedding rows: eval and convert encoded text and stopped with an IndexError."""
    step = noisy_checkpoint(tmp_path / "ckpt", small_corpus[1], vocab_size=400)
    (tmp_path / "t.txt").write_text("x = 1\n" * 20)
    for args in (
        ["convert", "to-hf", "--checkpoint", str(step), "--out", str(tmp_path / "hf")],
        ["convert", "verify", "--checkpoint", str(step), "--hf", str(exported)],
        ["eval", "--checkpoint", str(step), "--text", str(tmp_path / "t.txt")],
    ):
        err = run_error(args, capsys)
        assert (
            f"checkpoint {step}: its tokenizer.model has 512 pieces, more than its model.vocab_size=400: ids 400 "
            in err
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "t.txt"]
