"""The pieces of the sharded format that need no process group: box arithmetic, the tensor file
writer, reading a box assembled from several stored boxes, the metadata keys, lineage counts."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_lite.checkpoint.boxes import box_numel, flat_range_boxes, intersect, relative
from megatron_lite.checkpoint.format import box_key, sha256_file, write_tensor_file
from megatron_lite.checkpoint.lineage import _schedule, consumed_per_dataset
from megatron_lite.checkpoint.reader import find_checkpoint
from megatron_lite.checkpoint.shards import Piece
from megatron_lite.checkpoint.writer import Checkpointer, save_weights
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
    meta["layout"] = {"param_dtype": "float32"}
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
    holed = _save_boxes(tmp_path / "b", pieces[:1])
    with pytest.raises(UserError, match=r"model/w\[\(0, 6\), \(0, 4\)\] is only partly stored"):
        holed.read_tensor("model/w")
    assert box_key("model/w", ((0, 2), (0, 4))) == "model/w[0:2,0:4]"


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


def test_consumed_samples_per_dataset_follow_the_blend():
    weights = [0.5, 0.3, 0.2]
    slot_dataset, _ = _schedule(tuple(weights))
    for consumed in (0, 1, 7, 10, 123):
        brute = np.bincount([slot_dataset[i % slot_dataset.size] for i in range(consumed)], minlength=3)
        assert consumed_per_dataset(SimpleNamespace(weights=weights), consumed) == brute.tolist()
    assert consumed_per_dataset(SimpleNamespace(weights=weights), 1000) == [500, 300, 200]
