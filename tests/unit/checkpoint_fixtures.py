"""Shared by the checkpoint format tests: a one-rank checkpoint saved from pieces, the metadata of a
one-rank training checkpoint, and renaming its rank file in that metadata."""

from megatron_lite.checkpoint.format import FORMAT
from megatron_lite.checkpoint.reader import find_checkpoint
from megatron_lite.checkpoint.writer import Checkpointer


def save_boxes(root, pieces):
    """Save ``pieces`` as step 1 of a one-rank weights-only checkpoint under ``root``; its reader."""
    meta = {"step": 1, "weights_only": True, "config": {}, "optimizer": None, "trainer": None, "lineage": None}
    meta["layout"] = {"world_size": 1, "param_dtype": "float32"}
    writer = Checkpointer(root, keep=1, async_save=False)
    writer.save(1, pieces, {}, (0, 0, 0), meta)
    writer.close()
    return find_checkpoint(root)


def training_meta() -> dict:
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


def rename_file(meta: dict, name: str) -> None:
    """Refer to the one rank file as ``name`` everywhere in ``meta`` (shards, ranks, files)."""
    meta["tensors"]["model/w"]["shards"][0]["file"] = meta["ranks"][0]["file"] = name
    meta["files"] = {name: meta["files"]["rank_00000.safetensors"]}
