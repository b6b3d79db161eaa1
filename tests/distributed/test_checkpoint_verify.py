"""Every rank reaches the same checkpoint verdict, whichever rank found the problem.

Files are verified round-robin (file i by rank i % world), so a corrupt file is seen by one rank
only; the verdict must still be the same on all. Likewise a write that fails on one rank only
must fail the save on every rank, and never commit it.
"""

import os
from pathlib import Path

from test_trainer_parity import corpus, overrides  # noqa: F401 (corpus is a fixture)

from megatron_lite.checkpoint import writer
from megatron_lite.checkpoint.collectives import barrier
from megatron_lite.checkpoint.reader import resolve_resume
from megatron_lite.config import load_config
from megatron_lite.errors import UserError
from megatron_lite.training.trainer import Trainer


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _verdicts(rank: int, world: int, base: list[str], root: Path, port: int) -> dict:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = [*base, "parallel.tp=2", "train.steps=4", "checkpoint.every=2"]
    Trainer(load_config(None, [*args, f"log.dir={root / 'a'}"])).fit()
    if rank == 0:
        _flip_byte(root / "a" / "checkpoints" / "step_00000004" / "rank_00001.safetensors")  # checked by rank 1
    barrier()
    found = resolve_resume(root / "a" / "checkpoints", "auto").name

    real, calls = writer.write_tensor_file, []

    def fails_on_rank1(path, tensors):
        calls.append(path)
        if rank == 1 and len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, tensors)

    writer.write_tensor_file = fails_on_rank1
    try:
        Trainer(load_config(None, [*args, f"log.dir={root / 'b'}", "checkpoint.async=true"])).fit()
        error = None
    except UserError as e:
        error = str(e)
    finally:
        writer.write_tensor_file = real
    return {"resume": found, "error": error}


def test_all_ranks_agree_on_corrupt_and_failed_checkpoints(world2, corpus, tmp_path):  # noqa: F811
    prefix, tok = corpus
    base = overrides(prefix, str(tok), str(tmp_path / "unused"))[:-2]
    per_rank = world2.run(_verdicts, base, tmp_path, 29500, timeout=120)
    assert [r["resume"] for r in per_rank] == ["step_00000002", "step_00000002"]
    for r in per_rank:
        assert r["error"] == (
            "checkpoint of step 4 was not saved: rank 1: OSError: [Errno 28] No space left on device"
        ), r["error"]
    ckpt = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000002"]
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
