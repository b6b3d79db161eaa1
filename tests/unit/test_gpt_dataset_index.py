"""The compact sample index serves exactly the samples of the int64 one, in less memory.

The digests below were taken from ``GPTDataset`` before the index was made compact (commit
d5b5efc: four int64 arrays per epoch, two epochs cached): every sample of four epochs and
two far ones, per case, must still hash the same. The valid split orders its samples by a fixed
seed (``gpt_dataset._SPLIT_SEED``) whatever the seed given, so its cases hash as that code's samples
at seed 0x5EED5.
"""

import hashlib
import tracemalloc

import numpy as np
import pytest

from megatron_lite.data import gpt_dataset, sample_index
from megatron_lite.data.gpt_dataset import GPTDataset, _PackedSplit, split_documents
from megatron_lite.data.index_reference import reference_epoch, reference_sample
from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megatron_lite.data.sample_index import build_epoch, index_dtype, permutation


def _make(path, n_docs, seed, max_len):
    """Documents of random length in [0, max_len) (some empty), token ids unique per dataset."""
    sizes = np.random.default_rng(seed).integers(0, max_len, n_docs)
    next_id = seed * 1_000_000
    with IndexedDatasetBuilder(path, np.int32) as builder:
        for size in sizes:
            builder.add_document(np.arange(next_id, next_id + size))
            next_id += size
    return str(path)


# (datasets as (n_docs, seed, max_len), weights, seq_len, seed, split, valid_fraction), samples, digest
CASES = [
    ([(40, 0, 90)], None, 16, 1, "train", 0.01, 439, "e896daef69d3e482"),
    ([(40, 0, 90)], None, 16, 1, "valid", 0.2, 83, "f5e6c96bd2fd5456"),
    ([(300, 1, 30)], None, 7, 5, "train", 0.0, 2559, "203bf614bbd0b697"),
    ([(25, 2, 400)], None, 200, 0, "train", 0.1, 87, "86bd352846706c10"),  # windows span documents
    ([(50, 3, 5)], None, 1, 9, "train", 0.05, 363, "dfcf01031a6a5236"),
    ([(40, 0, 90), (60, 4, 50)], [0.7, 0.3], 16, 2, "train", 0.01, 855, "1a9d6003457c9bfb"),
    ([(40, 0, 90), (60, 4, 50), (10, 5, 200)], None, 12, 3, "train", 0.01, 1455, "62bed7b055e8964f"),
    ([(40, 0, 90), (60, 4, 50), (10, 5, 200)], [1.0, 2.0, 0.5], 12, 3, "valid", 0.3, 371, "fc31361ac48121f9"),
]


def _digest(tmp_path, case, index_cache=None) -> tuple[int, str]:
    specs, weights, seq, seed, split, vf = case[:6]
    prefixes = [_make(tmp_path / f"d{i}", *spec) for i, spec in enumerate(specs)]
    ds = GPTDataset(prefixes, weights, seq, seed, split=split, valid_fraction=vf, index_cache=index_cache)
    n = 4 * sum(ds.samples_per_epoch) + 3
    h = hashlib.sha256()
    for i in [*range(n), 10**6 + 7, 10**9]:
        h.update(ds[i].tobytes())
    return n, h.hexdigest()[:16]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_samples_match_the_int64_index(tmp_path, case):
    assert _digest(tmp_path, case) == tuple(case[6:])


def _never_built(*args):
    raise AssertionError(f"epoch built although its index is cached: {args[-1]}")


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_cached_index_serves_the_same_samples(tmp_path, monkeypatch, case):
    # First read: each epoch built and written; second: every epoch mapped from its files, none built.
    cache = tmp_path / "index"
    assert _digest(tmp_path, case, cache) == tuple(case[6:])
    monkeypatch.setattr(gpt_dataset, "build_epoch", _never_built)
    assert _digest(tmp_path, case, cache) == tuple(case[6:])


def test_int64_fallback_serves_the_same_samples(tmp_path, monkeypatch):
    # As if every count were past 2**31: permutations are drawn in int64, samples do not change.
    monkeypatch.setattr(sample_index, "_INT32_MAX", 5)
    assert index_dtype(6) == np.int64
    for case in (CASES[0], CASES[5]):
        assert _digest(tmp_path / str(id(case)), case) == tuple(case[6:])
        # and cached: int64 arrays written, then mapped
        assert _digest(tmp_path / str(id(case)), case, tmp_path / "index") == tuple(case[6:])
        assert _digest(tmp_path / str(id(case)), case, tmp_path / "index") == tuple(case[6:])
    assert {np.load(f).dtype for f in (tmp_path / "index").glob("*.npy")} == {np.dtype(np.int64)}


def _split(tmp_path, n_docs=200, seq=13, max_len=60):
    data = IndexedDataset(_make(tmp_path / "s", n_docs, 7, max_len))
    return _PackedSplit(data, split_documents(data.sizes, "train", 0.1), seq, 11, "train")


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_every_sample_matches_the_reference_twin(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sample_index, "_CHUNK", chunk)  # token starts summed in chunks: carry exact
    split = _split(tmp_path)
    S = split.samples_per_epoch
    docs = split.docs.astype(np.int64)
    for epoch in range(3):
        ref = reference_epoch(split.data.sizes, docs, split.seq_len, S, split._seed, epoch)
        ours = build_epoch(split.data.sizes, split.docs, S, split._seed, epoch)
        assert np.array_equal(ours.docs[ours.perm], ref[0]) and np.array_equal(ours.starts, ref[1])
        for j in range(S):
            expected = reference_sample(split.data, split.seq_len, ref, j)
            assert np.array_equal(split.sample(epoch * S + j), expected), (epoch, j)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 1000, 65_537])
def test_permutation_draws_as_rng_permutation(n):
    ours, ref = np.random.default_rng([3, n]), np.random.default_rng([3, n])
    assert np.array_equal(permutation(ours, n), ref.permutation(n))
    assert ours.integers(1 << 40) == ref.integers(1 << 40)  # and leaves the generator in step


def test_index_dtype_is_the_smallest_exact_one():
    assert index_dtype(0) == index_dtype(2**31 - 1) == np.int32
    assert index_dtype(2**31) == index_dtype(2**40) == np.int64


def test_epoch_holds_12_bytes_per_document_and_4_per_sample(tmp_path):
    split = _split(tmp_path)
    ep = split._epoch(0)
    D, S = split.docs.size, split.samples_per_epoch
    dtypes = (ep.perm.dtype, ep.starts.dtype, ep.shuffle.dtype, split.docs.dtype)
    assert dtypes == (np.int32, np.int64, np.int32, np.int32)
    assert ep.nbytes == 4 * D + 8 * (D + 1) + 4 * S


def test_reading_on_never_holds_two_epochs(tmp_path):
    split = _split(tmp_path, n_docs=3000)
    S = split.samples_per_epoch
    one_epoch = split._epoch(0).nbytes
    split._cached = None
    tracemalloc.start()
    try:
        for k in (0, S, 2 * S + 1, 3 * S - 1):
            split.sample(k)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # One epoch held plus the build's temporaries (one chunk of ids and sizes: 12 bytes a document).
    assert peak < one_epoch + 12 * split.docs.size + 64 * 1024
    assert split._cached[0] == 2
