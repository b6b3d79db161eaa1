"""Saving a resolved config: the round trip, and ``config.yaml`` for relaunching (``save(relaunch=True)``),
which a relaunch on another world, ``log.dir`` or model continues the run from."""

from pathlib import Path

import pytest
import yaml

from megatron_lite.config import Config, config_from_dict, fill_defaults, load_config, validate
from megatron_lite.errors import UserError


def resolved(*overrides, world=1, vocab=100):
    cfg = load_config(None, list(overrides))
    fill_defaults(cfg, vocab)
    return validate(cfg, world)


def test_save_round_trip(tmp_path):
    cfg = resolved("train.steps=9", "checkpoint.async=true")
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(Config().to_dict()["checkpoint"]["async"], bool)


def test_a_relaunch_config_derives_dp_again_and_keeps_a_dp_given(tmp_path):
    """A one-rank run's config.yaml (``save(relaunch=True)``) relaunched on two ranks: the dp it
    derived from its world size is derived again, while a dp the user gave is kept, and refused where
    it does not fit the new world. A checkpoint's config (no relaunch) keeps the dp it ran with."""
    path = tmp_path / "config.yaml"
    resolved("train.micro_batch_size=4").save(path, relaunch=True)
    again = fill_defaults(load_config(path), 100)
    assert again.parallel.dp is None
    assert validate(again, world_size=2).parallel.dp == 2
    resolved("train.micro_batch_size=4").save(path)
    assert load_config(path).parallel.dp == 1
    # the global batch is kept: where the new dp does not divide it, the error says where dp came from
    resolved("train.micro_batch_size=8", "train.global_batch_size=8").save(path, relaunch=True)
    with pytest.raises(
        UserError, match=r"= 8 x 2 = 16 \(dp = world size 2 / \(tp x pp\)\); set train.global_batch_size=16"
    ):
        validate(fill_defaults(load_config(path), 100), world_size=2)
    resolved("train.micro_batch_size=4", "parallel.dp=1").save(path, relaunch=True)
    fixed = fill_defaults(load_config(path), 100)
    assert fixed.parallel.dp == 1
    with pytest.raises(UserError, match=r"parallel.dp=1 = 1 does not equal world size 2: .*leave parallel.dp empty"):
        validate(fixed, world_size=2)


def test_a_relaunch_config_leaves_keys_derived_from_other_keys_empty(tmp_path):
    """checkpoint.dir filled from log.dir (and model sizes filled from heads/hidden/arch) are written
    empty, so a relaunch with another log.dir or model.heads derives them from its own; keys the user
    gave are kept. A checkpoint's config (no relaunch) keeps them resolved."""
    path = tmp_path / "config.yaml"
    resolved("log.dir=runs/a").save(path, relaunch=True)
    saved = yaml.safe_load(path.read_text())
    assert saved["checkpoint"]["dir"] is None
    assert [saved["model"][k] for k in ("kv_heads", "ffn_hidden", "norm", "activation", "tie_embeddings")] == [None] * 5
    assert saved["optim"]["decay_steps"] is not None  # kept resolved on purpose (README)
    again = fill_defaults(load_config(path, ["log.dir=runs/b", "model.heads=2", "model.hidden=16"]), 100)
    assert again.checkpoint.dir == str(Path("runs/b") / "checkpoints")
    assert again.model.kv_heads == 2
    given = ["log.dir=runs/a", "checkpoint.dir=ckpts", "model.kv_heads=1", "model.norm=layernorm"]
    resolved(*given).save(path, relaunch=True)
    saved = yaml.safe_load(path.read_text())
    assert (saved["checkpoint"]["dir"], saved["model"]["kv_heads"], saved["model"]["norm"]) == ("ckpts", 1, "layernorm")
    resolved("log.dir=runs/a").save(path)
    assert load_config(path).checkpoint.dir == str(Path("runs/a") / "checkpoints")


def test_a_relaunch_config_continues_the_run_to_its_end(tmp_path):
    """How one process started and stopped (``checkpoint.resume=none``, ``train.exit_after=5``) is not
    the run's: a relaunch from its config.yaml resumes and trains on to ``train.steps``. A checkpoint's
    config (no relaunch) records them as they were."""
    path = tmp_path / "config.yaml"
    run = resolved("checkpoint.resume=none", "train.exit_after=5")
    run.save(path, relaunch=True)
    again = load_config(path)
    assert (again.checkpoint.resume, again.train.exit_after) == ("auto", None)
    run.save(path)
    assert (load_config(path).checkpoint.resume, load_config(path).train.exit_after) == ("none", 5)
