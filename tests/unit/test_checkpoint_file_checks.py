"""Verification of a checkpoint's files, with no process group: rank files whose headers disagree with
metadata.json or claim more than they hold, file names outside the step directory, JSON nested past
Python's stack, and each rank's share of the files to hash."""

import json
from pathlib import Path

import pytest
import torch
from checkpoint_fixtures import rename_file, save_boxes

from megatron_lite.checkpoint.format import sha256_file
from megatron_lite.checkpoint.reader import find_checkpoint
from megatron_lite.checkpoint.shards import Piece
from megatron_lite.checkpoint.step_dir import _check_files
from megatron_lite.checkpoint.storage import Storage
from megatron_lite.errors import UserError


def test_a_rank_file_not_holding_the_boxes_metadata_lists_is_corrupt(tmp_path):
    """metadata.json is not checksummed: a box edited there (its file intact) would read other elements
    than the ones saved. Verification compares every listed key with the file's own header."""
    full = torch.arange(8.0)
    reader = save_boxes(tmp_path / "a", [Piece("model/w", (8,), ((0, 8),), full)])
    path = reader.storage.url(f"{reader.name}/metadata.json")
    meta = json.loads(Path(path).read_text())
    shard = meta["tensors"]["model/w"]["shards"][0]
    meta["tensors"]["model/w"].update(shape=[4], shards=[{**shard, "box": [[0, 4]]}])
    Path(path).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"unusable: rank_00000.safetensors holds 'model/w\[0:8\]' as F32 \[8\], but "
                       r"metadata.json lists it as F32 \[4\]"):  # fmt: skip
        find_checkpoint(reader.location)
    meta["tensors"]["model/w"].update(shape=[8], shards=[{**shard, "key": "model/w[0:9]"}])
    Path(path).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"rank_00000.safetensors has no tensor 'model/w\[0:9\]', which metadata"):
        find_checkpoint(reader.location)


def test_a_file_outside_the_step_directory_is_never_read(tmp_path):
    """A downloaded checkpoint whose metadata.json names ``../NAME`` (with that file's true checksum)
    would otherwise pass verification and load tensors from outside its step directory."""
    full = torch.arange(4.0)
    reader = save_boxes(tmp_path / "a", [Piece("model/w", (4,), ((0, 4),), full)])
    step = Path(reader.location)
    (step.parent / "outside.safetensors").write_bytes((step / "rank_00000.safetensors").read_bytes())
    meta = json.loads((step / "metadata.json").read_text())
    rename_file(meta, "../outside.safetensors")
    (step / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"unusable: metadata.json is damaged: file name '../outside.safetensors' is "
                       r"not a file directly inside the step directory"):  # fmt: skip
        find_checkpoint(step)


def test_a_shape_or_header_claiming_more_than_the_files_hold_is_refused_before_reading(tmp_path):
    """The reader allocates a whole box before safetensors reads it: a metadata.json shape, or a rank
    file header (with its true checksum) claiming 4 TiB for 8 bytes, must not reach the allocation."""
    reader = save_boxes(tmp_path / "a", [Piece("model/w", (2,), ((0, 2),), torch.ones(2))])
    step = Path(reader.location)
    meta = json.loads((step / "metadata.json").read_text())
    meta["tensors"]["model/w"]["shape"] = [2**40]
    (step / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(
        UserError, match=r"has shape \[1099511627776\] \(1099511627776 elements\) but its shards hold 2"
    ):
        find_checkpoint(step)
    key = f"model/w[0:{2**40}]"
    blob = json.dumps({key: {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 8]}}).encode()
    (step / "rank_00000.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(8))
    meta["tensors"]["model/w"]["shards"] = [{"file": "rank_00000.safetensors", "key": key, "box": [[0, 2**40]]}]
    meta["ranks"][0]["rng"] = []
    meta["files"]["rank_00000.safetensors"] = {
        "sha256": sha256_file(step / "rank_00000.safetensors"),
        "bytes": (step / "rank_00000.safetensors").stat().st_size,
    }
    (step / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"rank_00000.safetensors holds 'model/w\[0:1099511627776\]' with data_offsets "
                       r"\[0, 8\], not its 4398046511104 bytes within the file's 8 bytes of data"):  # fmt: skip
        find_checkpoint(step)
    # two boxes whose keys share the file's 8 bytes: each within the file, together twice what it holds
    header = {k: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]} for k in ("model/w[0:2]", "model/w[2:4]")}
    blob = json.dumps(header).encode()
    (step / "rank_00000.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(8))
    meta["tensors"]["model/w"].update(
        shape=[4],
        shards=[{"file": "rank_00000.safetensors", "key": k, "box": [[i, i + 2]]} for k, i in zip(header, (0, 2))],
    )
    meta["files"]["rank_00000.safetensors"] = {
        "sha256": sha256_file(step / "rank_00000.safetensors"),
        "bytes": (step / "rank_00000.safetensors").stat().st_size,
    }
    (step / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(
        UserError, match=r"rank_00000.safetensors holds 'model/w\[2:4\]' in bytes another listed tensor"
    ):
        find_checkpoint(step)


def test_json_nested_past_pythons_stack_is_a_corrupt_checkpoint(tmp_path):
    """json.loads raises RecursionError (no ValueError) for 100,000 nested lists: verification must name the
    file as damaged (resume=auto then falls back to an older checkpoint), not stop with a traceback."""
    nested = "[" * 100_000 + "]" * 100_000
    reader = save_boxes(tmp_path / "a", [Piece("model/w", (2,), ((0, 2),), torch.ones(2))])
    step = Path(reader.location)
    meta_text = (step / "metadata.json").read_text()
    (step / "metadata.json").write_text(nested)
    with pytest.raises(UserError, match=r"unusable: metadata.json is not valid JSON"):
        find_checkpoint(step)
    blob = nested.encode()
    (step / "rank_00000.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob)
    meta = json.loads(meta_text)
    meta["files"]["rank_00000.safetensors"] = {
        "sha256": sha256_file(step / "rank_00000.safetensors"),
        "bytes": 8 + len(blob),
    }
    (step / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(
        UserError,
        match=r"rank_00000.safetensors is not a safetensors file: its header is not valid JSON \(nested too deeply\)",
    ):
        find_checkpoint(step)


def test_each_rank_hashes_only_its_round_robin_share_of_the_files(tmp_path, monkeypatch):
    """File i (in sorted order) is hashed by rank i % world only: a world of N ranks reads a
    checkpoint's bytes once, not N times; the verdicts are then gathered (tests/distributed)."""
    (tmp_path / "step").mkdir()
    files = {}
    for i in range(5):
        path = tmp_path / "step" / f"rank_{i:05d}.safetensors"
        path.write_bytes(bytes([i]) * (i + 1))
        files[path.name] = {"sha256": sha256_file(path), "bytes": i + 1}
    meta = {"files": files, "tensors": {}, "ranks": []}  # no keys listed: only sizes and checksums are checked
    storage, hashed = Storage(tmp_path), []
    real = storage.sha256
    monkeypatch.setattr(storage, "sha256", lambda rel: hashed.append(rel.split("/")[-1]) or real(rel))
    assert _check_files(storage, "step", meta, 1, 2) is None
    assert hashed == ["rank_00001.safetensors", "rank_00003.safetensors"]
    files["rank_00002.safetensors"]["sha256"] = "0" * 64  # rank 0's share: rank 1 does not see it
    assert _check_files(storage, "step", meta, 1, 2) is None
    assert _check_files(storage, "step", meta, 0, 2) == "rank_00002.safetensors does not match its sha256 (corrupt)"
