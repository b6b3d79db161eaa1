"""The on-disk sample index (``data.index_cache``): the same samples as the in-memory one, built once per
node, reused across a restart, never read when damaged, and refused up front where it cannot be written.

The bit-for-bit digests of the cached index over blends, odd sizes and far epochs are in
``test_gpt_dataset_index.py`` (``test_cached_index_serves_the_same_samples``).
"""

import json
import logging
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data import gpt_dataset, index_cache
from megatron_lite.data.gpt_dataset import GPTDataset
from megatron_lite.data.indexed import IndexedDatasetBuilder
from megatron_lite.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SEQ = 13
EPOCHS = 3


def _make(path, n_docs=120, seed=0, max_len=70):
    sizes = np.random.default_rng(seed).integers(0, max_len, n_docs)
    with IndexedDatasetBuilder(path, np.int32) as builder:
        for i, size in enumerate(sizes):
            builder.add_document(np.arange(size) + 1000 * i)
    return str(path)


def _samples(ds: GPTDataset) -> np.ndarray:
    """Every sample of EPOCHS epochs of the first dataset, and a few of a far epoch."""
    n = EPOCHS * ds.samples_per_epoch[0]
    return np.stack([ds[i] for i in [*range(n), 10**5 + 3, 10**5 + 4]])


def _counting_builds(monkeypatch) -> list[int]:
    built: list[int] = []
    real = gpt_dataset.build_epoch

    def counted(*args):
        built.append(args[-1])
        return real(*args)

    monkeypatch.setattr(gpt_dataset, "build_epoch", counted)
    return built


@pytest.fixture
def prefix(tmp_path):
    return _make(tmp_path / "d")


def test_second_dataset_maps_every_epoch_without_building(prefix, tmp_path, monkeypatch):
    want = _samples(GPTDataset([prefix], None, SEQ, seed=4))
    built = _counting_builds(monkeypatch)
    first = _samples(GPTDataset([prefix], None, SEQ, seed=4, index_cache=tmp_path / "ix"))
    assert len(built) == EPOCHS + 1 and np.array_equal(first, want)
    second = GPTDataset([prefix], None, SEQ, seed=4, index_cache=tmp_path / "ix")
    assert np.array_equal(_samples(second), want) and len(built) == EPOCHS + 1  # nothing built again
    ep = second._sources[0]._epoch(0)
    assert all(isinstance(getattr(ep, a), np.memmap) for a in index_cache.ARRAYS)


_RESTART = """
import sys, numpy as np
from megatron_lite.data import gpt_dataset
from megatron_lite.data.gpt_dataset import GPTDataset
def never(*args):
    raise AssertionError("built an epoch the cache holds")
gpt_dataset.build_epoch = never
ds = GPTDataset([sys.argv[1]], None, int(sys.argv[2]), seed=4, index_cache=sys.argv[3])
n = int(sys.argv[4])
np.save(sys.argv[5], np.stack([ds[i] for i in [*range(n), 10**5 + 3, 10**5 + 4]]))
"""


def test_a_restarted_process_maps_the_epochs_it_would_build(prefix, tmp_path):
    ds = GPTDataset([prefix], None, SEQ, seed=4, index_cache=tmp_path / "ix")
    want = _samples(ds)
    out = tmp_path / "restart.npy"
    n = str(EPOCHS * ds.samples_per_epoch[0])
    args = [prefix, str(SEQ), str(tmp_path / "ix"), n, str(out)]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", _RESTART, *args], check=True, env={**os.environ, "PYTHONPATH": path})
    assert np.array_equal(np.load(out), want)


def _racer(prefix: str, cache: str, barrier, queue) -> None:
    built: list[int] = []
    real = gpt_dataset.build_epoch
    gpt_dataset.build_epoch = lambda *args: built.append(args[-1]) or real(*args)
    ds = GPTDataset([prefix], None, SEQ, seed=4, index_cache=cache)
    barrier.wait()  # both open the cache together, before any epoch exists
    queue.put((built, _samples(ds)))


def test_two_processes_racing_build_each_epoch_once(prefix, tmp_path):
    want = _samples(GPTDataset([prefix], None, SEQ, seed=4))
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(prefix, str(tmp_path / "ix"), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _, samples in results:
        assert np.array_equal(samples, want)
    builds = sorted(e for built, _ in results for e in built)
    assert builds == sorted({*builds}) and len(builds) == EPOCHS + 1  # the lock: each epoch built by one


def test_a_mapped_epoch_keeps_its_bytes_when_the_files_are_rewritten(prefix, tmp_path):
    ds = GPTDataset([prefix], None, SEQ, seed=4, index_cache=tmp_path / "ix")
    mapped = ds._sources[0]._epoch(0)
    before = {a: np.array(getattr(mapped, a)) for a in index_cache.ARRAYS}
    files = sorted((tmp_path / "ix").glob("train-e0-*.npy"))
    inodes = [f.stat().st_ino for f in files]
    for f in (tmp_path / "ix").glob("train-e0-*.json"):
        f.unlink()  # as if its writer had died before the JSON: the next dataset rewrites epoch 0
    GPTDataset([prefix], None, SEQ, seed=4, index_cache=tmp_path / "ix")[0]
    assert all(f.stat().st_ino != i for f, i in zip(files, inodes, strict=True))  # new files, renamed in
    assert all(np.array_equal(getattr(mapped, a), before[a]) for a in index_cache.ARRAYS)


def test_a_cache_removed_while_in_use_is_written_again(prefix, tmp_path):
    want = _samples(GPTDataset([prefix], None, SEQ, seed=4))
    ds = GPTDataset([prefix], None, SEQ, seed=4, index_cache=tmp_path / "ix")
    assert np.array_equal(ds[0], want[0])
    shutil.rmtree(tmp_path / "ix")
    assert np.array_equal(_samples(ds), want)
    # epoch 0 stays mapped (its unlinked files live on); epochs 1, 2 and the far one are written anew
    assert len(list((tmp_path / "ix").glob("train-e*.json"))) == EPOCHS


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def _retype(path):
    np.save(path, np.load(path).astype(np.int64))


def _rekey(path):
    meta = json.loads(path.read_text())
    meta["key"]["seq_len"] += 1
    path.write_text(json.dumps(meta))


DAMAGE = {
    "truncated": ("perm.npy", _truncate),
    "flipped byte": ("shuffle.npy", _flip_last_byte),
    "other dtype": ("perm.npy", _retype),
    "other key": ("json", _rekey),
    "json not json": ("json", lambda p: p.write_text("{")),
    "json nested too deeply": ("json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000)),
    "missing array": ("starts.npy", lambda p: p.unlink()),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_epoch_is_rebuilt_with_a_warning(prefix, tmp_path, monkeypatch, caplog, damage):
    want = _samples(GPTDataset([prefix], None, SEQ, seed=4))
    _samples(GPTDataset([prefix], None, SEQ, seed=4, index_cache=tmp_path / "ix"))
    suffix, spoil = DAMAGE[damage]
    (target,) = (tmp_path / "ix").glob(f"train-e1-*.{suffix}")
    spoil(target)
    built = _counting_builds(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=index_cache.__name__):
        assert np.array_equal(_samples(GPTDataset([prefix], None, SEQ, seed=4, index_cache=tmp_path / "ix")), want)
    assert built == [1]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "train-e1-" in warning and "unusable" in warning and "rebuilding it" in warning
    caplog.clear()
    _samples(GPTDataset([prefix], None, SEQ, seed=4, index_cache=tmp_path / "ix"))
    assert built == [1] and not caplog.records  # rewritten whole: read back without a word


@pytest.mark.parametrize(
    "change",
    [dict(seed=5), dict(seq_len=SEQ + 1), dict(valid_fraction=0.2), dict(split="valid"), dict(files="other")],
    ids=["seed", "seq_len", "valid_fraction", "split", "files"],
)
def test_a_change_to_anything_the_index_depends_on_gets_its_own_files(prefix, tmp_path, change):
    kw = dict(seq_len=SEQ, seed=4, split="train", valid_fraction=0.1)
    GPTDataset([prefix], None, **kw, index_cache=tmp_path / "ix")[0]  # epoch 0 of the unchanged split
    if change.pop("files", None):
        prefix = _make(tmp_path / "other", seed=1)  # as many documents, of other sizes
    kw.update(change)
    want = GPTDataset([prefix], None, **kw)
    cached = GPTDataset([prefix], None, **kw, index_cache=tmp_path / "ix")
    assert all(np.array_equal(cached[i], want[i]) for i in range(2 * cached.samples_per_epoch[0]))
    assert len(list((tmp_path / "ix").glob("*-e0-*.json"))) == 2


def test_an_unwritable_cache_is_refused_when_the_dataset_opens(prefix, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError) as err:
        GPTDataset([prefix], None, SEQ, seed=4, index_cache=tmp_path / "file" / "ix")
    message = str(err.value)
    assert f"data.index_cache={tmp_path / 'file' / 'ix'}" in message and "writable directory" in message
    assert "leave data.index_cache empty" in message


def test_a_failed_write_serves_the_epoch_from_memory_with_a_warning(prefix, tmp_path, monkeypatch, caplog):
    want = _samples(GPTDataset([prefix], None, SEQ, seed=4))
    ds = GPTDataset([prefix], None, SEQ, seed=4, index_cache=tmp_path / "ix")

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_cache, "write_atomic", full)
    with caplog.at_level(logging.WARNING, logger=index_cache.__name__):
        assert np.array_equal(_samples(ds), want)
    assert "No space left on device" in caplog.records[0].getMessage()
    assert "serving it from memory" in caplog.records[0].getMessage()
    assert not list((tmp_path / "ix").glob("*.npy"))
