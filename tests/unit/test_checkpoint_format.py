"""The pieces of the sharded format that need no process group: box arithmetic, the tensor file
writer, reading a box assembled from several stored boxes, the metadata keys and the check of
their structure."""

import json
import math

import numpy as np
import pytest
import torch
from checkpoint_fixtures import rename_file, save_boxes, training_meta
from safetensors.torch import load_file

from megatron_lite.checkpoint.boxes import box_numel, flat_range_boxes, intersect, relative, tiles
from megatron_lite.checkpoint.format import box_key, sha256_file, write_tensor_file
from megatron_lite.checkpoint.integrity import metadata_problem
from megatron_lite.checkpoint.reader import find_checkpoint
from megatron_lite.checkpoint.shards import Piece
from megatron_lite.checkpoint.writer import save_weights
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


def test_read_box_assembles_stored_boxes_and_refuses_holes(tmp_path):
    full = torch.arange(24.0).view(6, 4)
    pieces = [
        Piece("model/w", (6, 4), ((0, 2), (0, 4)), full[:2]),
        Piece("model/w", (6, 4), ((2, 6), (0, 4)), full[2:]),
    ]
    reader = save_boxes(tmp_path / "a", pieces)
    assert torch.equal(reader.read_box("model/w", ((1, 4), (1, 3))), full[1:4, 1:3])
    assert torch.equal(reader.read_tensor("model/w"), full)
    with pytest.raises(
        UserError, match=r"tensors\['model/w'\] has shape \[6, 4\] \(24 elements\) but its shards hold 8"
    ):
        save_boxes(tmp_path / "b", pieces[:1])  # verification refuses a tensor with a hole
    overlapping = [  # rows 2 stored twice, row 5 never: 12 + 12 elements, as many as the shape holds
        Piece("model/w", (6, 4), ((0, 3), (0, 4)), full[:3]),
        Piece("model/w", (6, 4), ((2, 5), (0, 4)), full[2:5]),
    ]
    with pytest.raises(UserError, match=r"tensors\['model/w'\] has shards whose boxes overlap"):
        save_boxes(tmp_path / "c", overlapping)  # read_tensor would return row 5 uninitialized
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
        (
            lambda m: m.update(format="megatron-lite/sharded-v0"),
            "written by another megatron-lite version, which this one cannot read; train on from it with the "
            "megatron-lite version that saved it",
        ),
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
        (lambda m: rename_file(m, "../rank_00000.safetensors"), "file name '../rank_00000.safetensors' is not a file"),
        (lambda m: rename_file(m, "/tmp/rank_00000.safetensors"), "file name '/tmp/rank_00000.safetensors' is not"),
        (lambda m: rename_file(m, ".."), "file name '..' is not a file directly inside the step directory"),
        (lambda m: m["files"].update({"sub\\x": {"sha256": "0" * 64, "bytes": 1}}), "file name 'sub\\\\x' is not"),
        # the streak of skipped steps a save was made in, where recorded: two counts
        (lambda m: m["trainer"].update(skip_streak={"in_a_row": 2}), "trainer.skip_streak has no 'since' key"),
        (lambda m: m["trainer"].update(skip_streak=[2, 5]), "trainer.skip_streak is a list, not an object"),
        (lambda m: m["trainer"].update(skip_streak={"in_a_row": -1, "since": 5}), "holds a negative count"),
        (
            lambda m: m["trainer"].update(skip_streak={"in_a_row": 1, "since": 5}),
            "does not fit trainer.skipped_steps=0",
        ),
        (lambda m: m["trainer"].update(skipped_steps=1, skip_streak={"in_a_row": 1, "since": 10**6}), "and step"),
    ],
)
def test_damaged_metadata_is_named_in_one_problem(damage, why):
    assert metadata_problem(training_meta()) is None
    meta = training_meta()
    damage(meta)
    problem = metadata_problem(meta)
    assert problem is not None and why in problem, problem


def test_weights_only_metadata_may_have_no_trainer_state():
    meta = {**training_meta(), "weights_only": True, "optimizer": None, "trainer": None}
    assert metadata_problem(meta) is None
    del meta["config"]  # an older checkpoint without its config: checked by shapes at resume
    assert metadata_problem(meta) is None
