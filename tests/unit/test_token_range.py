"""The largest token id of a dataset: recorded by the builder and ``preprocess``, read from the
``.bin`` when there is no record, and checked against the model's vocabulary before training."""

import json
import re
import struct

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_lite.data.indexed import MAGIC, IndexedDataset, IndexedDatasetBuilder
from megatron_lite.data.preprocess import check_dataset_tokenizer, preprocess
from megatron_lite.data.token_range import check_batch_ids, check_token_ids, largest_token_id
from megatron_lite.data.tokenizer import Tokenizer, train_tokenizer
from megatron_lite.errors import UserError


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    (root / "a.txt").write_text("def f(x):\n    return x * 2  # a comment\n" * 50)
    return Tokenizer(train_tokenizer([root / "a.txt"], root / "tok", 300, progress=False))


def _build(prefix, docs, dtype=np.uint16) -> IndexedDataset:
    with IndexedDatasetBuilder(prefix, dtype) as b:
        for doc in docs:
            b.add_document(doc)
    return IndexedDataset(prefix)


def test_builder_tracks_the_largest_id(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "d")
    assert b.max_token_id is None
    b.add_document([])
    assert b.max_token_id is None
    b.add_tokens([5, 900])
    b.add_tokens([7])
    b.end_document()
    b.add_document([3])
    assert b.max_token_id == 900
    b.abort()


def test_preprocess_records_the_largest_id(tok, tmp_path):
    (tmp_path / "a.txt").write_text("def g(y):\n    return y + 1\n")
    preprocess([tmp_path / "a.txt"], tok, tmp_path / "d", progress=False)
    record = json.loads((tmp_path / "d.json").read_text())
    assert record["max_token_id"] == IndexedDataset(tmp_path / "d").max_token_id() > 260  # a learned piece


@pytest.mark.parametrize("recorded", [12345, ["ab"], {"sha256": "ab"}])
def test_a_record_whose_tokenizer_hash_is_no_string_is_one_error(tok, tmp_path, recorded):
    """A downloaded dataset's PREFIX.json is read before training: a crafted hash was a TypeError."""
    (tmp_path / "a.txt").write_text("def g(y):\n    return y\n")
    preprocess([tmp_path / "a.txt"], tok, tmp_path / "d", progress=False)
    record = json.loads((tmp_path / "d.json").read_text())
    (tmp_path / "d.json").write_text(json.dumps({**record, "tokenizer_sha256": recorded}))
    fix = re.escape(f"re-run `megatron-lite preprocess --tokenizer {tok.path} --output {tmp_path / 'd'} --overwrite")
    with pytest.raises(UserError, match=rf"d.json records tokenizer_sha256 .*, not a sha256: .* is damaged; {fix}"):
        check_dataset_tokenizer(tmp_path / "d", tok)


def test_an_idx_keeps_the_version_1_layout(tmp_path):
    """The largest id is not in the .idx: a reader of version 1 (which refuses a longer file) opens it."""
    _build(tmp_path / "d", [[1, 2, 3], [], [9]])
    data = (tmp_path / "d.idx").read_bytes()
    assert struct.unpack("<8sQQQQ", data[:40]) == (MAGIC, 1, 1, 3, 4)
    assert len(data) == 40 + 16 * 3


def test_without_a_record_the_bin_is_read(tmp_path):
    data = _build(tmp_path / "d", [[1, 2], [], [40_000, 3]])
    assert data.max_token_id() == 40_000
    assert largest_token_id(data, 300) == (40_000, f"the largest, read from {data.bin_path}")
    assert largest_token_id(data, 300, scan_limit=data.bin_path.stat().st_size - 1) is None  # too large to read
    assert largest_token_id(data, 300, scan_limit=data.bin_path.stat().st_size)[0] == 40_000  # the limit itself is read
    assert _build(tmp_path / "e", [[], []]).max_token_id() == -1


def _record(prefix, **fields) -> None:
    (prefix.parent / (prefix.name + ".json")).write_text(json.dumps(fields))


def test_a_record_is_used_only_when_it_describes_the_files(tmp_path):
    data = _build(tmp_path / "d", [[1, 2], [700]])
    _record(tmp_path / "d", documents=2, tokens=3, max_token_id=700)
    assert largest_token_id(data, 300, scan_limit=0) == (
        700,
        f"the largest, recorded in {data.prefix}.json",
    )  # nothing read
    _record(tmp_path / "d", documents=2, tokens=99, max_token_id=5)  # another dataset's record
    assert largest_token_id(data, 300) == (700, f"the largest, read from {data.bin_path}")


def test_a_record_nested_past_pythons_stack_is_no_record(tok, tmp_path):
    """json.loads raises RecursionError (no ValueError) for 100,000 nested lists: a downloaded dataset's
    PREFIX.json like that is unreadable, as a truncated one is, and the .bin is read instead."""
    data = _build(tmp_path / "d", [[1, 2], [700]])
    (tmp_path / "d.json").write_text("[" * 100_000 + "]" * 100_000)
    assert largest_token_id(data, 300) == (700, f"the largest, read from {data.bin_path}")
    assert check_dataset_tokenizer(tmp_path / "d", tok) is None  # no hash to compare: the ids are checked


def test_an_older_record_bounds_the_ids_by_its_tokenizer(tmp_path):
    data = _build(tmp_path / "d", [[1, 2], [250]])
    _record(tmp_path / "d", documents=2, tokens=3, vocab_size=300)  # no max_token_id yet
    assert largest_token_id(data, 300, scan_limit=0)[0] == 299
    assert largest_token_id(data, 280) == (250, f"the largest, read from {data.bin_path}")  # the bound says too little


def test_ids_beyond_the_vocabulary_are_refused_naming_the_dataset_and_fix(tok, tmp_path):
    small = _build(tmp_path / "small", [[1, 299]])
    big = _build(tmp_path / "big", [[1, 2], [512, 7]])
    assert check_token_ids([small], 300, tok) == []
    with pytest.raises(UserError) as e:
        check_token_ids([small, big], 300, tok)
    message = str(e.value)
    assert f"dataset {big.prefix} holds token id 512 but model.vocab_size is 300 (the largest, read from" in message
    assert f"preprocess --tokenizer {tok.path} --output {big.prefix}" in message
    assert "set data.tokenizer to the tokenizer it was made with" in message
    assert check_token_ids([small, big], 513, tok) == []
    with pytest.raises(UserError, match="holds token id 512 but model.vocab_size is 512"):  # ids run 0..vocab_size-1
        check_token_ids([big], 512, tok)


def test_a_dataset_too_large_to_read_is_reported_unchecked(tok, tmp_path):
    big = _build(tmp_path / "big", [[1, 2], [512, 7]])
    assert check_token_ids([big], 300, tok, scan_limit=4) == [big.prefix]


def test_each_batch_is_checked_for_ids_outside_the_vocabulary():
    """The per-batch guard: an id past the vocabulary names the tokenizer; a negative id (a damaged
    int32 .bin) names the rebuild; both before the embedding would raise an IndexError."""
    good = [torch.tensor([[0, 5, 511]]), torch.tensor([[3, 4, 2]])]
    check_batch_ids(good, 512, "step 7", "tok.model")
    with pytest.raises(UserError) as e:
        check_batch_ids([*good, torch.tensor([[1, 512, 0]])], 512, "step 7", "tok.model")
    assert str(e.value) == (
        "the data holds token id 512 but model.vocab_size is 512 (step 7): the dataset was tokenized with another "
        "tokenizer than tok.model"
    )
    with pytest.raises(UserError) as e:
        check_batch_ids([*good, torch.tensor([[1, -3, 0]])], 512, "step 7", "tok.model")
    assert str(e.value) == (
        "the data holds token id -3 (step 7): token ids are never negative, so the dataset's .bin is damaged; "
        "rebuild it with `megatron-lite preprocess`"
    )


def test_a_bin_rewritten_in_place_after_the_startup_check_is_caught_by_the_batch_check(tok, tmp_path):
    """Why the per-batch guard stays when every dataset passed at startup: an open memory map serves a
    .bin rewritten in place (``cp`` over it keeps the inode), so the startup verdict no longer holds."""
    data = _build(tmp_path / "d", [[1, 2, 3], [4, 5, 6]])
    assert check_token_ids([data], 300, tok, scan_limit=1 << 20) == []
    with open(data.bin_path, "r+b") as f:  # as `cp other.bin d.bin` writes: same file, new bytes
        f.write(np.array([1, 299, 700], dtype=np.uint16).tobytes())
    micro = [torch.from_numpy(data.get(0).astype(np.int64))[None]]  # (1, 3): the map the run holds open
    with pytest.raises(UserError, match=r"^the data holds token id 700 but model.vocab_size is 300 \(step 9\)"):
        check_batch_ids(micro, 300, "step 9", "tok.model")


class _CountReductionsAndReads(TorchFunctionMode):
    """Counts the torch calls that reduce a tensor and those that read a value back to Python."""

    REDUCE = {"max", "min", "amax", "amin", "aminmax"}
    READ = {"item", "tolist", "__int__", "__float__", "__index__", "__bool__", "numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.reductions = self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        self.reductions += name in self.REDUCE
        self.reads += name in self.READ
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("microbatches", [1, 3])
def test_the_batch_check_reduces_each_microbatch_once_and_reads_once(microbatches):
    micro = [torch.tensor([[0, 5, 511], [3, 4, 2]]) for _ in range(microbatches)]
    with _CountReductionsAndReads() as counted:
        check_batch_ids(micro, 512, "step 7", "tok.model")
    assert (counted.reductions, counted.reads) == (microbatches, 1)
