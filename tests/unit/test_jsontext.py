"""JSON read from files: lists nested past Python's stack (``json.loads`` raises RecursionError there,
not ValueError) are handled as each reader handles any other invalid JSON. Readers tested elsewhere
with such a file: checkpoint metadata and rank-file headers (test_checkpoint_file_checks.py), a dataset's
record (test_token_range.py), JSON Lines inputs (test_corpus.py), the epoch index cache
(test_index_cache.py), an HF config (e2e/test_convert_hf_inputs.py) and a checkpoint's origin.json
(e2e/test_convert_errors.py)."""

import json
import math

import pytest

from megatron_lite import jsontext
from megatron_lite.convert.to_hf import STAGING_MARKER, _remove_stale_staging
from megatron_lite.data import corpus, preprocess, tempfiles, tokenizer_train
from megatron_lite.errors import UserError
from megatron_lite.training import metrics, trackers

NESTED = "[" * 100_000 + "]" * 100_000


def test_loads_names_nesting_past_pythons_stack_as_a_value_error():
    with pytest.raises(RecursionError):
        json.loads(NESTED)
    with pytest.raises(ValueError, match=r"^nested too deeply$"):
        jsontext.loads(NESTED)
    with pytest.raises(ValueError, match=r"^nested too deeply$"):
        jsontext.loads(NESTED.encode())
    assert jsontext.loads(b'{"a": [[1]]}') == {"a": [[1]]}


def _lock_holder(tmp_path, monkeypatch):
    """A lock file's holder that is not JSON is no holder (read as empty, as a torn write is)."""
    assert tempfiles.read_holder(NESTED) is None
    assert tempfiles.read_holder(NESTED.encode()) is None


def _metrics_row(tmp_path, monkeypatch):
    """A metrics.jsonl line that is not JSON is a torn last line: past any step."""
    assert trackers._row_step(NESTED) == math.inf


def _cpu_peak_cache(tmp_path, monkeypatch):
    """An unreadable CPU peak cache is measured again and replaced."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(metrics, "measure_cpu_peak", lambda: 8e10)
    metrics._cpu_cache_path().parent.mkdir(parents=True)
    metrics._cpu_cache_path().write_text(NESTED)
    assert metrics.cpu_peak_flops() == 8e10
    assert list(json.loads(metrics._cpu_cache_path().read_text()).values()) == [8e10]


def _corpus_manifest(tmp_path, monkeypatch):
    """A default-corpus build whose manifest is not JSON is no complete build (it is rebuilt)."""
    (tmp_path / "manifest.json").write_text(NESTED)
    assert corpus._cache_problem(tmp_path, {}) == "no readable manifest.json (ValueError)"


def _tokenizer_record(tmp_path, monkeypatch):
    """``tokenizer train`` keeps a PREFIX.json it cannot read as its own record."""
    (tmp_path / "tok.json").write_text(NESTED)
    with pytest.raises(UserError, match=r"tok.json exists and is not a tokenizer record written by"):
        tokenizer_train._output_paths([], tmp_path / "tok")
    assert (tmp_path / "tok.json").read_text() == NESTED


def _dataset_record(tmp_path, monkeypatch):
    """``preprocess`` keeps a PREFIX.json it cannot read as a dataset record."""
    (tmp_path / "d.json").write_text(NESTED)
    with pytest.raises(UserError, match=r"d.json exists and is not a dataset record written by"):
        preprocess._check_outputs([], tmp_path / "d", overwrite=True)
    assert (tmp_path / "d.json").read_text() == NESTED


def _export_staging_marker(tmp_path, monkeypatch):
    """to-hf's staging marker that is not JSON names no run; its directory, locked by none, is removed."""
    staging = tmp_path / ".tmp-hf"
    staging.mkdir()
    (staging / STAGING_MARKER).write_text(NESTED)
    _remove_stale_staging(staging, tmp_path / "hf")
    assert not staging.exists()


READERS = {
    "lock holder": _lock_holder,
    "metrics.jsonl row": _metrics_row,
    "cpu peak cache": _cpu_peak_cache,
    "corpus manifest": _corpus_manifest,
    "tokenizer record": _tokenizer_record,
    "dataset record": _dataset_record,
    "to-hf staging marker": _export_staging_marker,
}


@pytest.mark.parametrize("reader", READERS, ids=list(READERS))
def test_a_file_nested_past_pythons_stack_is_read_as_invalid_json(tmp_path, monkeypatch, reader):
    READERS[reader](tmp_path, monkeypatch)
