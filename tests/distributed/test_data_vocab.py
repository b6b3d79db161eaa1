"""A dataset made with a larger tokenizer than the run's is refused at startup, by every rank with
one message, instead of by the one rank that reads the first offending batch while the rest hang."""

import os

import numpy as np
import pytest

from megatron_lite.config import load_config
from megatron_lite.data.indexed import IndexedDatasetBuilder
from megatron_lite.data.tokenizer import Tokenizer, train_tokenizer
from megatron_lite.errors import UserError
from megatron_lite.training.trainer import Trainer


def _start(rank: int, world: int, args: list[str], port: int) -> str | None:
    """The error this rank's trainer refuses to start with, None if it starts."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        Trainer(load_config(None, args))
    except UserError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    (root / "a.txt").write_text("def f(x):\n    return x * 2  # a comment\n" * 50)
    return Tokenizer(train_tokenizer([root / "a.txt"], root / "tok", 300, progress=False))


def test_a_dataset_of_a_larger_vocabulary_is_refused_by_every_rank_at_startup(world2, tok, tmp_path):
    prefix = tmp_path / "bigger"
    ids = np.random.default_rng(0).integers(0, 300, size=(20, 40))
    ids[13, 7] = 650  # a larger tokenizer's id, deep in the data; no PREFIX.json record: the .bin is read
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for doc in ids:
            b.add_document(doc)
    args = [f"data.path={prefix}", f"data.tokenizer={tok.path}", "model.layers=2", "model.hidden=32"]
    args += ["model.heads=2", "model.seq_len=16", "train.micro_batch_size=2", "train.global_batch_size=4"]
    args += ["data.valid_fraction=0", "log.progress=false", f"log.dir={tmp_path / 'run'}"]
    errors = world2.run(_start, args, 29503)
    assert errors[0] == errors[1]
    assert errors[0].startswith("rank 0 failed during checking the config: ")
    assert (
        f"dataset {prefix} holds token id 650 but model.vocab_size is 300 (the largest, read from {prefix}.bin)"
        in errors[0]
    )
    assert f"preprocess --tokenizer {tok.path} --output {prefix}" in errors[0]
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run wrote anything
