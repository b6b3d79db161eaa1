"""The .bin/.idx pair reads back what was written, and every kind of damage is caught on open."""

import struct
import tracemalloc

import numpy as np
import pytest

from megatron_lite.data import indexed
from megatron_lite.data.indexed import MAGIC, IndexedDataset, IndexedDatasetBuilder, token_dtype
from megatron_lite.errors import UserError

DOCS = [[5, 6, 7], [], [65535, 0], list(range(100)), [42]]


def _write(prefix, docs=DOCS, dtype=np.uint16):
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for doc in docs:
            builder.add_document(doc)
    return prefix


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_write_read_equal(tmp_path, dtype):
    docs = DOCS if dtype == np.uint16 else [*DOCS, [2**31 - 1, 70000]]
    ds = IndexedDataset(_write(tmp_path / "d", docs, dtype))
    assert len(ds) == len(docs)
    assert ds.dtype == np.dtype(dtype)
    assert ds.sizes.tolist() == [len(d) for d in docs]
    assert ds.num_tokens == sum(map(len, docs))
    for i, doc in enumerate(docs):
        assert ds.get(i).tolist() == doc
    assert ds.get(3, offset=10, length=5).tolist() == [10, 11, 12, 13, 14]
    assert ds.get(3, offset=95).tolist() == [95, 96, 97, 98, 99]
    assert not list(tmp_path.glob(".*tmp*"))


def test_get_out_of_range(tmp_path):
    ds = IndexedDataset(_write(tmp_path / "d"))
    with pytest.raises(IndexError, match=rf"^document {len(DOCS)} out of range for {len(DOCS)} documents in "):
        ds.get(len(DOCS))
    with pytest.raises(IndexError, match=rf"^span \[2, 4\) outside document 0 of {len(DOCS[0])} tokens$"):
        ds.get(0, offset=2, length=2)


def test_empty_dataset_opens(tmp_path):
    ds = IndexedDataset(_write(tmp_path / "d", []))
    assert len(ds) == 0 and ds.num_tokens == 0


def test_token_dtype_choice():
    assert token_dtype(8192) == np.uint16
    assert token_dtype(65_499) == np.uint16
    assert token_dtype(65_500) == np.int32
    assert token_dtype(128_256) == np.int32


@pytest.mark.parametrize(
    "dtype, ids, message",
    [
        (np.uint16, [70_000], r"token ids must lie in \[0, 65535\] for uint16, got 70000..70000"),
        (np.uint16, [3, -1], r"token ids must lie in \[0, 65535\] for uint16, got -1..3"),  # would wrap to 65535
        (np.int32, [-5, 7], r"token ids must lie in \[0, 2147483647\] for int32, got -5..7"),
    ],
)
def test_out_of_range_ids_rejected(tmp_path, dtype, ids, message):
    with (
        IndexedDatasetBuilder(tmp_path / "d", dtype) as builder,
        pytest.raises(ValueError, match=message),
    ):
        builder.add_document(ids)


def test_error_inside_builder_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(tmp_path / "d") as builder:
        builder.add_document([1, 2, 3])
        raise RuntimeError("crash mid-build")
    assert list(tmp_path.iterdir()) == []


def test_rebuild_replaces_old_dataset(tmp_path):
    _write(tmp_path / "d")
    _write(tmp_path / "d", [[9, 9]])
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == 1 and ds.get(0).tolist() == [9, 9]


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _corrupt_magic(idx, bin_):
    _patch(idx, 0, b"MMIDIDX\x00")


def _corrupt_version(idx, bin_):
    _patch(idx, 8, struct.pack("<Q", 7))


def _corrupt_dtype(idx, bin_):
    _patch(idx, 16, struct.pack("<Q", 9))


def _truncate_idx(idx, bin_):
    idx.write_bytes(idx.read_bytes()[:-8])


def _truncate_header(idx, bin_):
    idx.write_bytes(idx.read_bytes()[:20])


def _extra_idx_bytes(idx, bin_):
    idx.write_bytes(idx.read_bytes() + b"\x00" * 8)


def _short_bin(idx, bin_):
    bin_.write_bytes(bin_.read_bytes()[:-2])


def _bad_offsets(idx, bin_):
    _patch(idx, 40 + 8 * 2, struct.pack("<q", 1))  # document 2 claims to start at token 1


def _bad_token_count(idx, bin_):
    _patch(idx, 32, struct.pack("<Q", 3))


def _negative_size(idx, bin_):
    _patch(idx, 40 + 8 * len(DOCS), struct.pack("<q", -1))


def _wrapping_sizes(idx, bin_):
    """Three documents (2**63 - 1, 2**63 - 1, 2 tokens) whose int64 ends wrap to 0: without the
    check they match an empty .bin and a header of 0 tokens."""
    big = 2**63 - 1
    offsets = np.array([0, big, 2 * big - 2**64], "<i8")
    idx.write_bytes(
        indexed._HEADER.pack(MAGIC, 1, 1, 3, 0) + offsets.tobytes() + np.array([big, big, 2], "<i8").tobytes()
    )
    bin_.write_bytes(b"")


CORRUPTIONS = [
    (_corrupt_magic, "bad magic"),
    (_corrupt_version, "unsupported version 7"),
    (_corrupt_dtype, "unknown dtype code 9"),
    (_truncate_idx, "truncated"),
    (_truncate_header, "truncated header"),
    (_extra_idx_bytes, "trailing bytes"),
    (_short_bin, "d.bin has 210 bytes"),
    (_bad_offsets, "document 2 starts at token 1"),
    (_bad_token_count, "header says 3 tokens"),
    (_negative_size, "negative document size"),
    (_wrapping_sizes, f"document 1 of {2**63 - 1} tokens ends past the largest offset int64 holds"),
]


@pytest.mark.parametrize("corrupt, what", CORRUPTIONS, ids=[c.__name__ for c, _ in CORRUPTIONS])
def test_corrupt_index_is_user_error(tmp_path, corrupt, what):
    prefix = _write(tmp_path / "d")
    idx, bin_ = tmp_path / "d.idx", tmp_path / "d.bin"
    corrupt(idx, bin_)
    with pytest.raises(UserError) as err:
        IndexedDataset(prefix)
    message = str(err.value)
    assert "corrupt .idx" in message and str(idx) in message
    assert what in message
    assert "megatron-lite preprocess" in message


@pytest.mark.parametrize("missing", ["d.idx", "d.bin"])
def test_missing_file_is_user_error(tmp_path, missing):
    prefix = _write(tmp_path / "d")
    (tmp_path / missing).unlink()
    with pytest.raises(UserError, match="not found") as err:
        IndexedDataset(prefix)
    assert str(tmp_path / missing) in str(err.value)


def test_magic_constant_is_eight_bytes():
    assert len(MAGIC) == 8


def _negative_size_late(idx, bin_):
    _patch(idx, 40 + 8 * (len(DOCS) + 4), struct.pack("<q", -1))


def _first_offset(idx, bin_):
    _patch(idx, 40, struct.pack("<q", 1))


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize(
    "corrupt, what",
    [
        (_bad_offsets, "document 2 starts at token 1,"),
        (_negative_size_late, "negative document size at document 4"),
        (_first_offset, "document 0 starts at token 1,"),
    ],
)
def test_table_checks_see_across_chunks(tmp_path, monkeypatch, chunk, corrupt, what):
    monkeypatch.setattr(indexed, "_CHECK_CHUNK", chunk)  # the table is checked a chunk at a time
    prefix = _write(tmp_path / "d")
    corrupt(tmp_path / "d.idx", tmp_path / "d.bin")
    with pytest.raises(UserError, match=what):
        IndexedDataset(prefix)


def test_document_table_is_mapped_not_copied(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "_CHECK_CHUNK", 1000)
    n = 50_000
    with IndexedDatasetBuilder(tmp_path / "d", np.uint16) as builder:
        for i in range(n):
            builder.add_document([i % 7] * (i % 3))
    tracemalloc.start()
    try:
        ds = IndexedDataset(tmp_path / "d")
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not any(a.flags.owndata or a.flags.writeable for a in (ds.sizes, ds.offsets))  # views of the map
    assert ds.sizes.tolist() == [i % 3 for i in range(n)]
    # Every rank on a node shares the mapped pages; a copy would be 16 bytes a document (800 kB).
    assert held < 64 * 1024 and peak < 256 * 1024, (held, peak)
