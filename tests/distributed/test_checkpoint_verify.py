"""Every rank reaches the same checkpoint verdict, whichever rank found the problem.

Files are verified round-robin (file i by rank i % world), so a corrupt file is seen by one rank
only; the verdict must still be the same on all. Likewise a write that fails on one rank only
must fail the save on every rank, and never commit it; a staging directory rank 0 cannot prepare
fails the save on every rank too; and a ``checkpoint.dir`` that one rank cannot write (its own
machine's filesystem) stops every rank at startup, not at the first save.
"""

import os
from pathlib import Path

import pytest
from test_trainer_parity import corpus, overrides  # noqa: F401 (corpus is a fixture)

from megatron_lite.checkpoint import storage, writer
from megatron_lite.checkpoint.collectives import barrier
from megatron_lite.checkpoint.reader import resolve_resume
from megatron_lite.config import load_config
from megatron_lite.errors import UserError
from megatron_lite.training.trainer import Trainer


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _error(run) -> str | None:
    try:
        run()
    except UserError as e:
        return str(e)
    return None


def _unwritable_on_rank1(rank: int, args: list[str], root: Path) -> str | None:
    """Rank 1's checkpoint.dir lies under a file, as a path missing from one machine's filesystem."""
    ckpt = root / "c" / "checkpoints"
    if rank == 1:
        (root / "blocker").write_text("a file, not a directory")
        ckpt = root / "blocker" / "checkpoints"
    return _error(lambda: Trainer(load_config(None, [*args, f"log.dir={root / 'c'}", f"checkpoint.dir={ckpt}"])))


def _staging_fails_on_rank0(rank: int, args: list[str], root: Path) -> str | None:
    """Rank 0 cannot prepare step 4's staging directory (checkpoint.dir became unwritable)."""
    real, calls = storage.Storage.begin, []

    def unwritable(self, final):
        calls.append(final)
        if rank == 0 and len(calls) == 2:
            raise PermissionError(13, "Permission denied")
        return real(self, final)

    storage.Storage.begin = unwritable
    try:
        return _error(lambda: Trainer(load_config(None, [*args, f"log.dir={root / 'd'}"])).fit())
    finally:
        storage.Storage.begin = real


def _verdicts(rank: int, world: int, base: list[str], root: Path, port: int) -> dict:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = [*base, "parallel.tp=2", "train.steps=4", "checkpoint.every=2"]
    setup_error = _unwritable_on_rank1(rank, args, root)
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
    staging_error = _staging_fails_on_rank0(rank, args, root)
    return {"resume": found, "error": error, "setup_error": setup_error, "staging_error": staging_error}


@pytest.fixture(scope="module")
def verdicts(world2, corpus, tmp_path_factory):  # noqa: F811
    prefix, tok = corpus
    root = tmp_path_factory.mktemp("verdicts")
    base = overrides(prefix, str(tok), str(root / "unused"))[:-2]
    return world2.run(_verdicts, base, root, 29500, timeout=150), root


def test_all_ranks_agree_on_corrupt_and_failed_checkpoints(verdicts):
    per_rank, root = verdicts
    assert [r["resume"] for r in per_rank] == ["step_00000002", "step_00000002"]
    for r in per_rank:
        assert r["error"] == (
            "checkpoint of step 4 was not saved: rank 1: OSError: [Errno 28] No space left on device (checkpoint.dir="
            f"'{root / 'b' / 'checkpoints'}'); the checkpoints saved before it are untouched: fix the cause (a full "
            "disk: free space there, or lower checkpoint.keep), then rerun with checkpoint.resume=auto to continue "
            "from the newest"
        ), r["error"]
    ckpt = root / "b" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000002"]
    assert (ckpt / "latest").read_text().strip() == "step_00000002"


def test_checkpoint_dir_unwritable_on_one_rank_stops_every_rank_at_startup(verdicts):
    per_rank, root = verdicts
    expected = (
        f"rank 1 failed during checking the kernels and run directories: checkpoint.dir="
        f"'{root / 'blocker' / 'checkpoints'}' is not a writable directory: Not a directory"
    )
    for r in per_rank:
        assert r["setup_error"] is not None and r["setup_error"].startswith(expected), r["setup_error"]
        assert "shared filesystem or an object store" in r["setup_error"]


def test_staging_directory_rank0_cannot_prepare_is_one_error_on_every_rank(verdicts):
    per_rank, root = verdicts
    ckpt = root / "d" / "checkpoints"
    expected = (
        f"checkpoint of step 4 was not saved: rank 0: cannot prepare {ckpt / '.tmp-step_00000004'}: "
        f"PermissionError: [Errno 13] Permission denied; checkpoint.dir='{ckpt}' must stay a writable directory"
    )
    for r in per_rank:
        assert r["staging_error"] is not None and r["staging_error"].startswith(expected), r["staging_error"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000002"]  # step 2 kept, nothing new
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert resolve_resume(ckpt, "auto").name == "step_00000002"
