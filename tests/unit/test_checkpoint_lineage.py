"""A checkpoint's data lineage, with no process group: samples consumed per dataset of a blend, what
changed in the data since the checkpoint, its tokenizer record, a dataset's fingerprint."""

from types import SimpleNamespace

import numpy as np
import pytest

from megatron_lite.checkpoint.format import sha256_file
from megatron_lite.checkpoint.lineage import _schedule, consumed_per_dataset, dataset_fingerprint
from megatron_lite.data.indexed import IndexedDatasetBuilder
from megatron_lite.errors import UserError


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


def test_a_lineage_no_save_writes_records_no_workdir_and_no_datasets():
    """eval --held-out reads both (training/evaluate.py): an edited lineage is none, not an AttributeError."""
    from megatron_lite.checkpoint.lineage import recorded_datasets, recorded_workdir

    for crafted in (None, "x", ["t"], {}, {"workdir": 3, "datasets": "a"}, {"workdir": "", "datasets": [1]}):
        assert recorded_workdir(crafted) is None and recorded_datasets(crafted) is None, crafted
    assert recorded_workdir({"workdir": "/w"}) == "/w" and recorded_datasets({"datasets": []}) == []


@pytest.mark.parametrize("lineage", ["x", ["t"], {"tokenizer": "t"}, {"tokenizer": ["sha256"]}])
def test_a_lineage_no_save_writes_is_no_tokenizer_record(tmp_path, lineage):
    """lineage comes from metadata.json (not checksummed): an edited one records no tokenizer, as a
    checkpoint without lineage records none (no TypeError or AttributeError on resume)."""
    from megatron_lite.training.resume import check_tokenizer

    (tmp_path / "tok.model").write_bytes(b"t")
    reader = SimpleNamespace(meta={"lineage": lineage, "files": {}}, location=str(tmp_path))
    assert check_tokenizer(reader, tmp_path / "tok.model") is None
    reader.meta["lineage"] = {"tokenizer": {"path": "other.model", "sha256": "0" * 64}}
    with pytest.raises(UserError, match="is not the one checkpoint .* was trained with, other.model"):
        check_tokenizer(reader, tmp_path / "tok.model")


def test_the_way_on_names_the_runs_embedded_corpus_only_where_the_run_trained_on_it(tmp_path):
    """A resume on the embedded corpus with another tokenizer: the run's own corpus is the way on where
    that run trained on the embedded corpus too; a run on data of its own is pointed at its tokenizer."""
    from megatron_lite.training.resume import check_tokenizer

    (tmp_path / "tok.model").write_bytes(b"t")
    lineage = {
        "tokenizer": {"path": "run/tok.model", "sha256": "0" * 64},
        "datasets": [{"prefix": "run/corpus"}],
        "workdir": "/w",
        "python": "3.99.0",
    }
    for data, expected in (({"path": None}, "the run's embedded corpus"), ({"path": "mine"}, "data.tokenizer=")):
        reader = SimpleNamespace(meta={"lineage": lineage, "files": {}, "config": {"data": data}}, location="ck")
        with pytest.raises(UserError) as err:
            check_tokenizer(reader, tmp_path / "tok.model", embedded=True)
        assert expected in str(err.value), (data, str(err.value))
        assert ("embedded corpus" in str(err.value)) == (data["path"] is None), str(err.value)


def test_a_dataset_fingerprint_is_the_idx_hash_and_the_bin_size_and_mtime(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "d", np.uint16) as builder:
        builder.add_document([1, 2, 3])
    stat = (tmp_path / "d.bin").stat()
    assert dataset_fingerprint(str(tmp_path / "d")) == {
        "idx_sha256": sha256_file(tmp_path / "d.idx"),
        "bin_bytes": 6,  # three uint16 tokens
        "bin_mtime": stat.st_mtime,
    }
