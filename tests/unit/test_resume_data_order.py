"""A resume that would train on other samples than the original run says so, naming the setting."""

from megatron_lite.config import Config
from megatron_lite.training.resume import data_order_changes


def _saved(cfg: Config) -> dict:
    return cfg.to_dict()


def test_the_same_settings_change_nothing():
    cfg = Config()
    assert data_order_changes(_saved(cfg), cfg, 100) == []
    assert data_order_changes({}, cfg, 100) == []  # a checkpoint without its config: nothing to compare


def test_another_valid_fraction_is_named_with_both_values():
    """The train split is drawn from valid_fraction: changing it moves held-out documents into training."""
    old, new = Config(), Config()
    old.data.valid_fraction, new.data.valid_fraction = 0.01, 0.05
    (warning,) = data_order_changes(_saved(old), new, 100)
    assert "data.valid_fraction=0.05 differs from the checkpoint's 0.01" in warning
    assert "resume with data.valid_fraction=0.01" in warning


def test_another_seed_is_named_with_both_values():
    old, new = Config(), Config()
    old.train.seed, new.train.seed = 1234, 7
    (warning,) = data_order_changes(_saved(old), new, 3)
    assert "train.seed=7 differs from the checkpoint's train.seed=1234" in warning and "step 3" in warning
