"""What a resume names of a config changed since its checkpoint: every setting that changed, in the
one startup line (``config_changes``), and which model settings refuse it (``model_changes``)."""

from types import SimpleNamespace

import pytest

from megatron_lite.checkpoint.shards import state_shapes
from megatron_lite.config import Config, fill_defaults
from megatron_lite.errors import UserError
from megatron_lite.training.resume import check_resume, config_changes, model_changes


def _resolved(vocab: int = 512, **changes: object) -> Config:
    """A config as the trainer resolves it with a tokenizer of ``vocab`` pieces, with ``section.key``
    values from ``changes`` (``__`` for the dot)."""
    cfg = Config()
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return fill_defaults(cfg, vocab_size=vocab)


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
    assert model_changes(saved, now) == ["model.rope_theta: checkpoint 10000.0, now 500000.0"]
    assert config_changes(saved, now) == ["model.rope_theta 10000.0 -> 500000.0", "model.init_std 0.02 -> 0.01"]


def test_a_vocabulary_the_embedded_corpus_takes_from_data_vocab_size_is_named_by_that_key():
    """With the embedded corpus, data.vocab_size sets its tokenizer's vocabulary and so model.vocab_size:
    the refusal named model.vocab_size, a key the user had not changed."""
    before = _resolved(vocab=8192)
    saved = before.to_dict()
    now = _resolved(vocab=4096, data__vocab_size=4096)
    reader = SimpleNamespace(
        weights_only=False,
        meta={"config": saved},
        location="c/step_00000004",
        shapes=lambda kind: state_shapes(before.model),
    )
    with pytest.raises(UserError) as refused:
        check_resume(now, reader, rank=0, tokenizer=None)
    assert str(refused.value) == (
        "checkpoint c/step_00000004 was saved with other model settings: data.vocab_size: checkpoint 8192, now 4096 "
        "(the embedded corpus's tokenizer is trained to it, and model.vocab_size is that tokenizer's vocabulary). "
        "Resume with the checkpoint's values of these settings, or train this model as a new run, in a new "
        "checkpoint.dir (or log.dir)"
    )
    # model.vocab_size set apart from the tokenizer's, or a tokenizer of the user's: model.vocab_size is the key
    explicit = _resolved(vocab=4096, data__vocab_size=4096, model__vocab_size=4160)
    assert model_changes(saved, explicit) == ["model.vocab_size: checkpoint 8192, now 4160"]
    for data in ({"data__path": ["/d/x"], "data__tokenizer": "/d/x.model"}, {"data__tokenizer": "/d/x.model"}):
        assert model_changes(_resolved(vocab=8192, **data).to_dict(), _resolved(vocab=4096, **data)) == [
            "model.vocab_size: checkpoint 8192, now 4096"
        ]
