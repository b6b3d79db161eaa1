"""`megatron-lite train` on datasets with no held-out split or with token ids past the vocabulary."""

import json
import logging
from pathlib import Path

from train_checks import args_dir, one_error_line

from megatron_lite.cli import main


def test_single_document_dataset_trains_without_evaluation(tiny_args, small_corpus, tmp_path, caplog):
    prefix, tok = small_corpus
    text = tmp_path / "one.txt"  # a plain text file is one document
    text.write_text(Path(json.__file__).read_text())
    out = tmp_path / "one"
    assert main(["preprocess", "--input", str(text), "--tokenizer", str(tok), "--output", str(out), "--quiet"]) == 0
    args = [*tiny_args, f"data.path={out}", "data.valid_fraction=0.01", "train.eval_every=1"]
    with caplog.at_level(logging.WARNING):
        assert main(["train", *args]) == 0
    assert "holds a single document, so it has no held-out split" in caplog.text
    records = [json.loads(x) for x in (Path(args_dir(args)) / "metrics.jsonl").read_text().splitlines()]
    assert records and not any("eval_loss" in r for r in records)  # no evaluation ran: no key, not null


def test_no_held_out_split_runs_no_evaluation_and_says_so_once(tiny_args, tmp_path, caplog):
    """data.valid_fraction=0: no evaluation step writes "eval_loss" (not even null), and one line says why."""
    with caplog.at_level(logging.INFO, logger="megatron_lite.training.trainer"):
        assert main(["train", *tiny_args, "data.valid_fraction=0", "train.eval_every=2"]) == 0
    said = [m for m in caplog.messages if m.startswith("data.valid_fraction=0: no held-out split")]
    assert len(said) == 1 and "metrics.jsonl has no eval_loss" in said[0], caplog.messages
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and not any("eval_loss" in r for r in records)
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "consumed_samples"):  # DESIGN's fields
        assert all(key in r for r in records), key


def _dataset_of_a_larger_vocabulary(prefix: Path) -> None:
    from megatron_lite.data.indexed import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix)  # no PREFIX.json: the tokenizer hash check cannot help
    for _ in range(4):
        builder.add_document(list(range(100)) + [512])  # the first id past the tokenizer's 512
    builder.finalize()


def test_token_ids_past_the_vocabulary_are_one_clear_error(tiny_args, small_corpus, tmp_path, capsys):
    _, tok = small_corpus
    _dataset_of_a_larger_vocabulary(tmp_path / "big")
    assert main(["train", *tiny_args, f"data.path={tmp_path / 'big'}", "data.valid_fraction=0"]) == 2
    err = one_error_line(capsys)
    assert "token id 512 but model.vocab_size is 512 (the largest, read from" in err and str(tok) in err
    assert not (Path(args_dir(tiny_args)) / "metrics.jsonl").exists()  # refused before step 1


def test_token_ids_past_the_vocabulary_are_caught_as_read_where_the_data_is_too_large_to_check_first(
    tiny_args, small_corpus, tmp_path, capsys, caplog, monkeypatch
):
    from megatron_lite.data import token_range

    _, tok = small_corpus
    monkeypatch.setattr(token_range, "SCAN_LIMIT_BYTES", 0)  # as for a .bin of terabytes without its record
    _dataset_of_a_larger_vocabulary(tmp_path / "big")
    with caplog.at_level(logging.WARNING):
        assert main(["train", *tiny_args, f"data.path={tmp_path / 'big'}", "data.valid_fraction=0"]) == 2
    assert f"dataset {tmp_path / 'big'} has no record of its largest token id" in caplog.text
    err = one_error_line(capsys)
    assert "the data holds token id 512 but model.vocab_size is 512 (step 1)" in err and str(tok) in err


def test_held_out_token_ids_past_the_vocabulary_are_caught_as_the_evaluation_reads_them(
    tiny_args, small_corpus, tmp_path, capsys, monkeypatch
):
    """Held-out documents are never in a training batch: the evaluation checks its own batches."""
    import numpy as np

    from megatron_lite.data import token_range
    from megatron_lite.data.gpt_dataset import split_documents
    from megatron_lite.data.indexed import IndexedDatasetBuilder

    monkeypatch.setattr(token_range, "SCAN_LIMIT_BYTES", 0)  # as for a .bin of terabytes without its record
    sizes = np.arange(100, 110)
    (held,) = split_documents(sizes, "valid", 0.1)
    with IndexedDatasetBuilder(tmp_path / "big") as builder:
        for d, size in enumerate(sizes):
            builder.add_document([512 if d == held else 7, *range(size - 1)])
    args = [*tiny_args, f"data.path={tmp_path / 'big'}", "data.valid_fraction=0.1", "train.eval_every=2"]
    assert main(["train", *args]) == 2
    err = one_error_line(capsys)
    assert "the data holds token id 512 but model.vocab_size is 512 (the evaluation at step 2)" in err
    rows = [json.loads(x) for x in (Path(args_dir(args)) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]  # steps 1 and 2 trained on the good documents
