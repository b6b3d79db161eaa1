"""The pieces of the sharded format that need no process group: box arithmetic, the tensor file
writer, reading a box assembled from several stored boxes, the metadata keys and the check of
their structure, lineage counts."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_lite.checkpoint.boxes import box_numel, flat_range_boxes, intersect, relative, tiles
from megatron_lite.checkpoint.format import FORMAT, box_key, metadata_problem, sha256_file, write_tensor_file
from megatron_lite.checkpoint.lineage import _schedule, consumed_per_dataset, dataset_fingerprint
from megatron_lite.checkpoint.reader import _check_files, find_checkpoint
from megatron_lite.checkpoint.shards import Piece
from megatron_lite.checkpoint.storage import Storage
from megatron_lite.checkpoint.writer import Checkpointer, save_weights
from megatron_lite.data.indexed import IndexedDatasetBuilder
from megatron_lite.errors import UserError


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 3)])
def test_flat_range_boxes_cover_the_range_in_order(shape):
    flat = np.arange(math.prod(shape)).reshape(shape)
    for lo in range(flat.size):
        for hi in range(lo + 1, flat.size + 1):
            boxes = flat_range_boxes(shape, lo, hi)
            got = np.concatenate([flat[tuple(slice(a, b) for a, b in box)].ravel() for box in boxes])
            assert got.tolist() == list(range(lo, hi)), (shape, lo, hi, boxes)
            assert len(boxes) <= 2 * len(shape) - 1


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (0, 3), ()])
def test_boxes_tile_a_tensor_only_when_each_element_is_held_once(shape):
    n = math.prod(shape)
    cuts = sorted({0, n, n // 3, n // 2 + 1} & set(range(n + 1)))  # ranges as ranks of a distributed optimizer
    split = [b for lo, hi in zip(cuts, cuts[1:]) for b in flat_range_boxes(shape, lo, hi)] or [
        tuple((0, d) for d in shape)
    ]
    assert tiles(shape, split)
    if n > 1:  # the first element twice, the last never: the element counts still agree
        first = tuple((0, 1) for _ in shape)
        last = tuple((d - 1, d) for d in shape)
        moved = [first if b == last else b for b in flat_range_boxes(shape, 0, n - 1)] + [first]
        assert sum(map(box_numel, moved)) == n and not tiles(shape, moved)
    assert not n or not tiles(shape, split + split) and not tiles(shape, split[1:])  # an empty tensor holds none


def test_intersect_and_relative():
    assert intersect(((0, 4), (2, 6)), ((3, 8), (0, 3))) == ((3, 4), (2, 3))
    assert intersect(((0, 4),), ((4, 8),)) is None
    assert relative(((3, 4), (2, 3)), ((2, 6), (1, 9))) == (slice(1, 2), slice(1, 2))
    assert box_numel(((3, 4), (2, 5))) == 3


def test_tensor_file_is_safetensors_from_views_sharing_storage(tmp_path):
    flat = torch.randn(24)
    tensors = {"a": flat[:6].view(2, 3), "b": flat[6:].view(3, 6), "c": torch.randn(5).to(torch.bfloat16)}
    digest, nbytes = write_tensor_file(tmp_path / "x.safetensors", tensors)
    assert digest == sha256_file(tmp_path / "x.safetensors") and nbytes == (tmp_path / "x.safetensors").stat().st_size
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def _save_boxes(root, pieces):
    meta = {"step": 1, "weights_only": True, "config": {}, "optimizer": None, "trainer": None, "lineage": None}
    meta["layout"] = {"world_size": 1, "param_dtype": "float32"}
    writer = Checkpointer(root, keep=1, async_save=False)
    writer.save(1, pieces, {}, (0, 0, 0), meta)
    writer.close()
    return find_checkpoint(root)


def test_read_box_assembles_stored_boxes_and_refuses_holes(tmp_path):
    full = torch.arange(24.0).view(6, 4)
    pieces = [
        Piece("model/w", (6, 4), ((0, 2), (0, 4)), full[:2]),
        Piece("model/w", (6, 4), ((2, 6), (0, 4)), full[2:]),
    ]
    reader = _save_boxes(tmp_path / "a", pieces)
    assert torch.equal(reader.read_box("model/w", ((1, 4), (1, 3))), full[1:4, 1:3])
    assert torch.equal(reader.read_tensor("model/w"), full)
    with pytest.raises(
        UserError, match=r"tensors\['model/w'\] has shape \[6, 4\] \(24 elements\) but its shards hold 8"
    ):
        _save_boxes(tmp_path / "b", pieces[:1])  # verification refuses a tensor with a hole
    overlapping = [  # rows 2 stored twice, row 5 never: 12 + 12 elements, as many as the shape holds
        Piece("model/w", (6, 4), ((0, 3), (0, 4)), full[:3]),
        Piece("model/w", (6, 4), ((2, 5), (0, 4)), full[2:5]),
    ]
    with pytest.raises(UserError, match=r"tensors\['model/w'\] has shards whose boxes overlap"):
        _save_boxes(tmp_path / "c", overlapping)  # read_tensor would return row 5 uninitialized
    meta = json.loads(json.dumps(reader.meta))
    del meta["tensors"]["model/w"]["shards"][1]
    with pytest.raises(UserError, match=r"model/w\[\(0, 6\), \(0, 4\)\] is only partly stored"):
        type(reader)(reader.storage, reader.name, meta).read_tensor("model/w")
    assert box_key("model/w", ((0, 2), (0, 4))) == "model/w[0:2,0:4]"
    # metadata.json listing a key its file lacks (edited by hand): one error naming both, not safetensors' own
    meta = json.loads(json.dumps(reader.meta))
    meta["tensors"]["model/w"]["shards"][1]["key"] = "model/w[2:6,0:9]"
    edited = type(reader)(reader.storage, reader.name, meta)
    with pytest.raises(UserError, match=r"rank_00000.safetensors has no tensor 'model/w\[2:6,0:9\]'.*damaged"):
        edited.read_tensor("model/w")


def test_weights_only_checkpoint_has_every_documented_key(tmp_path):
    state = {"embed.weight": torch.randn(5, 3), "final_norm.weight": torch.ones(3)}
    path = save_weights(tmp_path / "w", 0, state, {"model": {"layers": 1}}, files={})
    meta = json.loads((tmp_path / "w" / "step_00000000" / "metadata.json").read_text())
    assert path.endswith("step_00000000")
    documented = {"format", "step", "weights_only", "config", "layout", "tensors", "optimizer", "trainer"}
    assert set(meta) == documented | {"ranks", "lineage", "files"}
    assert meta["tensors"]["model/embed.weight"] == {
        "shape": [5, 3],
        "dtype": "F32",
        "shards": [{"file": "rank_00000.safetensors", "key": "model/embed.weight[0:5,0:3]", "box": [[0, 5], [0, 3]]}],
    }
    assert {k: torch.equal(v, state[k]) for k, v in find_checkpoint(tmp_path / "w").model_state().items()} == {
        "embed.weight": True,
        "final_norm.weight": True,
    }


def _training_meta() -> dict:
    """The metadata of a one-rank training checkpoint, as the writer records it."""
    files = {"rank_00000.safetensors": {"sha256": "0" * 64, "bytes": 8}}
    shard = {"file": "rank_00000.safetensors", "key": "model/w[0:2]", "box": [[0, 2]]}
    return {
        "format": FORMAT,
        "step": 4,
        "weights_only": False,
        "config": {},
        "layout": {"world_size": 1, "tp": 1, "pp": 1, "vp": 1, "dp": 1, "param_dtype": "float32"},
        "tensors": {"model/w": {"shape": [2], "dtype": "F32", "shards": [shard]}},
        "optimizer": {"step": 4},
        "trainer": {"skipped_steps": 0, "consumed_samples": 32, "scaler": None},
        "ranks": [{"file": "rank_00000.safetensors", "coordinate": [0, 0, 0], "rng": ["rng/torch"]}],
        "lineage": None,
        "files": files,
    }


def _rename_file(meta: dict, name: str) -> None:
    """Refer to the one rank file as ``name`` everywhere in ``meta`` (shards, ranks, files)."""
    meta["tensors"]["model/w"]["shards"][0]["file"] = meta["ranks"][0]["file"] = name
    meta["files"] = {name: meta["files"]["rank_00000.safetensors"]}


@pytest.mark.parametrize(
    "damage,why",
    [
        (lambda m: m.pop("trainer"), "it has no 'trainer' key"),
        (lambda m: m["trainer"].pop("consumed_samples"), "trainer has no 'consumed_samples' key"),
        (lambda m: m.update(trainer=None), "trainer is null, not an object"),  # only weights-only may
        (lambda m: m.update(ranks=[]), "ranks has 0 entries but the checkpoint's world (layout.world_size) is 1"),
        (lambda m: m["layout"].update(world_size=2), "ranks has 1 entries but the checkpoint's world"),
        (lambda m: m.update(step="4"), "step is a string, not an integer"),
        (lambda m: m["optimizer"].update(step=True), "optimizer.step is a boolean, not an integer"),
        (lambda m: m["tensors"]["model/w"]["shards"][0].pop("box"), "tensors['model/w'].shards[0] has no 'box' key"),
        (lambda m: m["ranks"][0].update(file="rank_00001.safetensors"), "rank_00001.safetensors is referred to"),
        (lambda m: m.update(format="megatron-lite/sharded-v0"), "written by another megatron-lite version"),
        # values in range: resumed as they are, they would train on silently broken
        (lambda m: m["optimizer"].update(step=-3), "optimizer.step is -3, not a count >= 0"),
        (lambda m: m["optimizer"].update(step=5), "optimizer.step is 5, past the checkpoint's step 4"),
        (lambda m: m["trainer"].update(consumed_samples=-1), "trainer.consumed_samples is -1, not a count >= 0"),
        (lambda m: m["layout"].update(param_dtype="float99"), "layout.param_dtype 'float99' is not one of"),
        (lambda m: m["tensors"]["model/w"].update(dtype="F99"), "tensors['model/w'].dtype 'F99' is not"),
        (lambda m: m["tensors"]["model/w"].update(shape=[1]), "shards[0]: box [[0, 2]] is not inside the shape [1]"),
        (lambda m: m["tensors"]["model/w"]["shards"][0].update(box=[[0, 1], [0, 1]]), "is not 1 [start, stop] pairs"),
        # every element stored once: a shape beyond its boxes would be allocated whole on read
        (lambda m: m["tensors"]["model/w"].update(shape=[3]), "has shape [3] (3 elements) but its shards hold 2"),
        (
            lambda m: (
                m["tensors"]["model/w"]["shards"].append({**m["tensors"]["model/w"]["shards"][0], "box": [[2, 4]]})
                or m["tensors"]["model/w"].update(shape=[4])
            ),
            "key 'model/w[0:2]' is listed for more than one box",
        ),
        # a file name is a name inside the step directory: a path would read a file outside it
        (lambda m: _rename_file(m, "../rank_00000.safetensors"), "file name '../rank_00000.safetensors' is not a file"),
        (lambda m: _rename_file(m, "/tmp/rank_00000.safetensors"), "file name '/tmp/rank_00000.safetensors' is not"),
        (lambda m: _rename_file(m, ".."), "file name '..' is not a file directly inside the step directory"),
        (lambda m: m["files"].update({"sub\\x": {"sha256": "0" * 64, "bytes": 1}}), "file name 'sub\\\\x' is not"),
    ],
)
def test_damaged_metadata_is_named_in_one_problem(damage, why):
    assert metadata_problem(_training_meta()) is None
    meta = _training_meta()
    damage(meta)
    problem = metadata_problem(meta)
    assert problem is not None and why in problem, problem


def test_a_rank_file_not_holding_the_boxes_metadata_lists_is_corrupt(tmp_path):
    """metadata.json is not checksummed: a box edited there (its file intact) would read other elements
    than the ones saved. Verification compares every listed key with the file's own header."""
    full = torch.arange(8.0)
    reader = _save_boxes(tmp_path / "a", [Piece("model/w", (8,), ((0, 8),), full)])
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
    reader = _save_boxes(tmp_path / "a", [Piece("model/w", (4,), ((0, 4),), full)])
    step = Path(reader.location)
    (step.parent / "outside.safetensors").write_bytes((step / "rank_00000.safetensors").read_bytes())
    meta = json.loads((step / "metadata.json").read_text())
    _rename_file(meta, "../outside.safetensors")
    (step / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"unusable: metadata.json is damaged: file name '../outside.safetensors' is "
                       r"not a file directly inside the step directory"):  # fmt: skip
        find_checkpoint(step)


def test_a_shape_or_header_claiming_more_than_the_files_hold_is_refused_before_reading(tmp_path):
    """The reader allocates a whole box before safetensors reads it: a metadata.json shape, or a rank
    file header (with its true checksum) claiming 4 TiB for 8 bytes, must not reach the allocation."""
    reader = _save_boxes(tmp_path / "a", [Piece("model/w", (2,), ((0, 2),), torch.ones(2))])
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
    reader = _save_boxes(tmp_path / "a", [Piece("model/w", (2,), ((0, 2),), torch.ones(2))])
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


def test_weights_only_metadata_may_have_no_trainer_state():
    meta = {**_training_meta(), "weights_only": True, "optimizer": None, "trainer": None}
    assert metadata_problem(meta) is None
    del meta["config"]  # an older checkpoint without its config: checked by shapes at resume
    assert metadata_problem(meta) is None


def test_consumed_samples_per_dataset_follow_the_blend():
    weights = [0.5, 0.3, 0.2]
    slot_dataset, _ = _schedule(tuple(weights))
    for consumed in (0, 1, 7, 10, 123):
        brute = np.bincount([slot_dataset[i % slot_dataset.size] for i in range(consumed)], minlength=3)
        assert consumed_per_dataset(SimpleNamespace(weights=weights), consumed) == brute.tolist()
    assert consumed_per_dataset(SimpleNamespace(weights=weights), 1000) == [500, 300, 200]


def test_data_changes_names_what_differs_from_the_checkpoints_lineage():
    from megatron_lite.checkpoint.lineage import data_changes

    def lineage(*datasets, tok="t1"):
        return {"datasets": [dict(zip(("prefix", "idx_sha256", "bin_bytes", "weight"), d)) for d in datasets],
                "tokenizer": {"path": "tok.model", "sha256": tok}}  # fmt: skip

    saved = lineage(("/d/a", "h1", 10, 0.5), ("/d/b", "h2", 20, 0.5))
    assert data_changes(saved, lineage(("/d/a", "h1", 10), ("/d/b", "h2", 20)), [0.5, 0.5]) == []
    moved = lineage(("/e/a", "h1", 10), ("/e/b", "h2", 20))  # copied elsewhere: the same content
    assert data_changes(saved, moved, [0.5, 0.5]) == []
    assert data_changes(None, moved, [0.5, 0.5]) == []  # a checkpoint without lineage (an HF import)
    rebuilt = data_changes(saved, lineage(("/d/a", "h1", 10), ("/d/b", "h3", 24)), [0.5, 0.5])
    assert rebuilt == ["/d/b changed since (.idx rebuilt, .bin 20 -> 24 bytes)"]
    edited = data_changes(saved, lineage(("/d/a", "h1", 10), ("/d/b", "h2", 24)), [0.5, 0.5])
    assert edited == ["/d/b changed since (.idx same, .bin 20 -> 24 bytes)"]  # every document length kept
    other = data_changes(saved, lineage(("/d/c", "h4", 10)), [1.0])
    assert other == ["data.path names other data (/d/a, /d/b -> /d/c)"]
    assert data_changes(saved, lineage(("/d/a", "h1", 10), ("/d/b", "h2", 20)), [0.7, 0.3]) == [
        "data.weights [0.5, 0.5] -> [0.7, 0.3]"
    ]
    retok = data_changes(saved, lineage(("/d/a", "h1", 10), ("/d/b", "h2", 20), tok="t2"), [0.5, 0.5])
    assert retok == []  # not a data change: a resume refuses another tokenizer (training/resume.py)
    for crafted in ("x", {"datasets": None}, {"datasets": ["/d/a"]}, {"datasets": {"a": 1}}):  # an edited lineage
        assert data_changes(crafted, moved, [0.5, 0.5]) == [], crafted  # no record, as without one


@pytest.mark.parametrize("lineage", ["x", ["t"], {"tokenizer": "t"}, {"tokenizer": ["sha256"]}])
def test_a_lineage_no_save_writes_is_no_tokenizer_record(tmp_path, lineage):
    """lineage comes from metadata.json (not checksummed): an edited one was a TypeError or AttributeError
    on resume; it records no tokenizer, as a checkpoint without lineage records none."""
    from megatron_lite.training.resume import check_tokenizer

    (tmp_path / "tok.model").write_bytes(b"t")
    reader = SimpleNamespace(meta={"lineage": lineage, "files": {}}, location=str(tmp_path))
    assert check_tokenizer(reader, tmp_path / "tok.model") is None
    reader.meta["lineage"] = {"tokenizer": {"path": "other.model", "sha256": "0" * 64}}
    with pytest.raises(UserError, match="is not the one checkpoint .* was trained with, other.model"):
        check_tokenizer(reader, tmp_path / "tok.model")


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


def test_a_dataset_fingerprint_is_the_idx_hash_and_the_bin_size_and_mtime(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "d", np.uint16) as builder:
        builder.add_document([1, 2, 3])
    stat = (tmp_path / "d.bin").stat()
    assert dataset_fingerprint(str(tmp_path / "d")) == {
        "idx_sha256": sha256_file(tmp_path / "d.idx"),
        "bin_bytes": 6,  # three uint16 tokens
        "bin_mtime": stat.st_mtime,
    }
