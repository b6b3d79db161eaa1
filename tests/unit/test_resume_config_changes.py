"""What a resume names of a config changed since its checkpoint: every setting that changed, in the
one startup line (``config_changes``), and which model settings refuse it (``model_changes``)."""

from megatron_lite.config import Config, fill_defaults
from megatron_lite.training.resume import config_changes, model_changes


def _resolved(**changes: object) -> Config:
    """A config as the trainer resolves it, with ``section.key`` values from ``changes`` (``__`` for the dot)."""
    cfg = Config()
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return fill_defaults(cfg, vocab_size=512)


def test_each_changed_setting_is_named_with_both_values():
    """Resolved values: a longer train.steps stretches the default optim.decay_steps, and both are named."""
    saved = _resolved().to_dict()
    now = _resolved(train__steps=2000, train__global_batch_size=16, parallel__tp=2, data__path=["/d/new"])
    assert config_changes(saved, now) == [
        "parallel.tp 1 -> 2",
        "optim.decay_steps 900 -> 1900",
        "train.steps 1000 -> 2000",
        "train.global_batch_size 8 -> 16",
        "data.path [] -> ['/d/new']",
    ]


def test_the_same_run_and_the_keys_of_one_process_change_nothing():
    """checkpoint.resume and train.exit_after say how this process starts and stops, not what the run is."""
    saved = _resolved().to_dict()
    assert config_changes(saved, _resolved()) == []
    assert config_changes(saved, _resolved(checkpoint__resume="runs/x/step_00000004", train__exit_after=3)) == []


def test_model_defaults_and_keys_one_side_lacks_are_not_changes():
    """A saved model section as given (kv_heads unset) is resolved before it is compared; a key this
    version does not know, or one the checkpoint's version did not have, is not compared."""
    saved = _resolved().to_dict()
    saved["model"] = {**Config().to_dict()["model"], "vocab_size": 512}  # kv_heads, ffn_hidden... unset
    saved["train"]["retired_key"] = 1
    del saved["train"]["eval_iters"]
    assert config_changes(saved, _resolved(train__eval_iters=9)) == []


def test_init_std_is_named_but_is_no_model_change():
    """model.init_std is read only to initialise weights, which a resume loads: it does not refuse a resume."""
    saved = _resolved().to_dict()
    now = _resolved(model__init_std=0.01, model__rope_theta=500000.0)
    assert model_changes(saved["model"], now) == ["model.rope_theta: checkpoint 10000.0, now 500000.0"]
    assert config_changes(saved, now) == ["model.rope_theta 10000.0 -> 500000.0", "model.init_std 0.02 -> 0.01"]
