"""The trainer's preflight refuses, before the embedded corpus is built, to train weights that carry no
tokenizer on it, and to resume a run on it with another data.vocab_size."""

import copy
from pathlib import Path

import pytest
import torch

from megatron_lite.checkpoint.boxes import full_box
from megatron_lite.checkpoint.reader import resolve_resume
from megatron_lite.checkpoint.shards import Piece, state_shapes
from megatron_lite.checkpoint.writer import Checkpointer, save_weights
from megatron_lite.cli import main
from megatron_lite.config import Config, fill_defaults
from megatron_lite.errors import UserError
from megatron_lite.training import build
from megatron_lite.training.preflight import check_start_tokenizer, check_start_vocab
from megatron_lite.training.resume import check_resume


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


def corpus_run(tmp_path: Path, data_vocab: int, **changes) -> Config:
    """A tiny run on the embedded corpus as preflight sees it: model.vocab_size unresolved (the
    tokenizer is not built yet) unless ``changes`` sets it (``section__key``)."""
    cfg = config(tmp_path)
    cfg.model.layers, cfg.model.hidden, cfg.model.heads, cfg.model.seq_len = 1, 64, 4, 16
    cfg.data.vocab_size = data_vocab
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return fill_defaults(cfg)


def save_full(cfg: Config, step: int = 4) -> None:
    """A full checkpoint of ``cfg``'s model (resolved with its tokenizer's ``data.vocab_size`` pieces),
    carrying a stand-in tokenizer file."""
    saved = fill_defaults(copy.deepcopy(cfg), vocab_size=cfg.data.vocab_size)
    pieces = [Piece(f"model/{n}", s, full_box(s), torch.zeros(s)) for n, s in state_shapes(saved.model).items()]
    layout = {"world_size": 1, "tp": 1, "pp": 1, "vp": 1, "dp": 1, "distributed_optimizer": False}
    meta = {
        "step": step,
        "weights_only": False,
        "config": saved.to_dict(),
        "layout": {**layout, "param_dtype": "float32"},
        "optimizer": {"step": step},
        "trainer": {"skipped_steps": 0, "consumed_samples": 0, "scaler": None},
        "lineage": None,
    }
    tok = Path(saved.checkpoint.dir).parent / "tok.model"
    tok.parent.mkdir(parents=True, exist_ok=True)
    tok.write_bytes(b"stand-in")
    files = {"tokenizer.model": tok}
    writer = Checkpointer(saved.checkpoint.dir, keep=1, async_save=False, extra_files=files)
    writer.save(step, pieces, {}, (0, 0, 0), meta)
    writer.close()


def test_a_resume_with_another_data_vocab_size_is_refused_before_the_corpus_is_built(tmp_path):
    """The resume check refuses it once the corpus for the new vocabulary is open (a build of minutes);
    preflight gives the same message from the checkpoint's metadata alone."""
    save_full(corpus_run(tmp_path, 300))
    now = corpus_run(tmp_path, 400)
    with pytest.raises(UserError) as early:
        check_start_vocab(now)
    with pytest.raises(UserError) as late:  # the resume check, once the new corpus is open
        check_resume(fill_defaults(copy.deepcopy(now), 400), resolve_resume(now.checkpoint.dir, "auto"), 0, None)
    assert str(early.value) == str(late.value)
    assert str(early.value).startswith(
        f"checkpoint {now.checkpoint.dir}/step_00000004 was saved with other model settings: data.vocab_size: "
        "checkpoint 300, now 400 (the embedded corpus's tokenizer is trained to it"
    )
    step = f"{now.checkpoint.dir}/step_00000004"
    with pytest.raises(UserError, match="data.vocab_size: checkpoint 300, now 400"):
        check_start_vocab(corpus_run(tmp_path, 400, checkpoint__resume=step))  # a resume by path too


def test_a_start_preflight_cannot_judge_or_that_keeps_the_vocabulary_passes(tmp_path):
    """Same vocabulary; a fresh start; a tokenizer of the user's or model.vocab_size set apart from the
    corpus's (the resume check and the tokenizer check judge those once the data is open); weights only."""
    save_full(corpus_run(tmp_path, 300))
    check_start_vocab(corpus_run(tmp_path, 300))
    check_start_vocab(corpus_run(tmp_path, 400, checkpoint__dir=str(tmp_path / "fresh")))
    check_start_vocab(corpus_run(tmp_path, 400, data__tokenizer="/d/x.model"))
    check_start_vocab(corpus_run(tmp_path, 400, model__vocab_size=300))
    bare = weights(tmp_path / "bare", tokenizer=False)
    check_start_vocab(corpus_run(tmp_path, 400, checkpoint__resume=str(bare)))


def test_the_trainer_refuses_it_before_building_the_corpus(tmp_path, monkeypatch, capsys):
    """`train` stops with that message, exit status 2, before any corpus build starts."""
    save_full(corpus_run(tmp_path, 300))
    built = []
    monkeypatch.setattr(build, "prepare_default_corpus", lambda *a, **k: built.append(a) or pytest.fail("built"))
    run = ["model.layers=1", "model.hidden=64", "model.heads=4", "model.seq_len=16", "log.progress=false"]
    where = [f"log.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["train", *run, *where, "data.vocab_size=400"]) == 2
    err = capsys.readouterr().err
    assert "other model settings: data.vocab_size: checkpoint 300, now 400" in err and not built, err
