"""The trainer's preflight refuses to train weights that carry no tokenizer on the embedded corpus."""

from pathlib import Path

import pytest
import torch

from megatron_lite.checkpoint.writer import save_weights
from megatron_lite.config import Config
from megatron_lite.errors import UserError
from megatron_lite.training.preflight import check_start_tokenizer


def weights(root: Path, tokenizer: bool) -> Path:
    files = {}
    if tokenizer:
        (root.parent / "tok.model").write_bytes(b"stand-in")
        files["tokenizer.model"] = root.parent / "tok.model"
    return Path(save_weights(root, 0, {"w": torch.ones(2)}, Config().to_dict(), files))


def config(tmp_path: Path, **checkpoint) -> Config:
    cfg = Config()
    cfg.checkpoint.dir = str(tmp_path / "run" / "checkpoints")
    for key, value in checkpoint.items():
        setattr(cfg.checkpoint, key, value)
    return cfg


def test_a_start_without_tokenizer_on_the_embedded_corpus_is_refused(tmp_path):
    bare = weights(tmp_path / "bare", tokenizer=False)
    for key, cfg in [
        ("checkpoint.init_from", config(tmp_path, init_from=str(bare.parent))),  # a root: its newest step
        ("checkpoint.init_from", config(tmp_path, init_from=str(bare), resume="none")),
        ("checkpoint.resume", config(tmp_path, resume=str(bare))),
        ("checkpoint.dir", config(tmp_path, dir=str(bare.parent))),  # resume=auto finds the import
    ]:
        with pytest.raises(UserError, match=f"^{key}=.* carry no tokenizer megatron-lite can use"):
            check_start_tokenizer(cfg)


def test_a_start_with_a_tokenizer_or_with_data_given_passes(tmp_path):
    bare, with_tok = weights(tmp_path / "bare", tokenizer=False), weights(tmp_path / "tok", tokenizer=True)
    check_start_tokenizer(config(tmp_path, init_from=str(with_tok)))
    check_start_tokenizer(config(tmp_path))  # a fresh run
    own = config(tmp_path, dir=str(with_tok.parent), init_from=str(bare))  # the run's own checkpoint comes first
    check_start_tokenizer(own)
    given = config(tmp_path, init_from=str(bare))
    given.data.path, given.data.tokenizer = ["prefix"], "tok.model"
    check_start_tokenizer(given)
