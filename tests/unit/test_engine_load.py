"""`checkpoint.init_from` into a model that does not fit: one error with each kind of problem in
its own list (missing, unexpected, other shapes), empty ones left out."""

import pytest
import torch

from megatron_lite.config import fill_defaults, load_config
from megatron_lite.errors import UserError
from megatron_lite.models.transformer import build_model
from megatron_lite.training.engine import _load_single_device_state

TINY = ["model.hidden=64", "model.heads=4", "model.seq_len=16"]


def model(*extra: str, seed: int = 0):
    return build_model(fill_defaults(load_config(None, [*TINY, *extra]), vocab_size=100).model, seed, "cpu")


def load_error(saved, into, whole: bool = True) -> str:
    with pytest.raises(UserError) as e:
        _load_single_device_state(into, saved.state_dict(), whole=whole)
    return str(e.value)


def test_a_deeper_checkpoint_lists_only_the_unexpected_tensors():
    msg = load_error(model("model.layers=3"), model("model.layers=2"))
    assert msg.startswith("the checkpoint does not fit this model (changed model.* settings?): unexpected: layers.2.")
    assert "missing" not in msg and "shape" not in msg and "[]" not in msg, msg


def test_each_kind_of_problem_is_its_own_list():
    msg = load_error(model("model.layers=2", "model.kv_heads=2"), model("model.layers=3", "model.kv_heads=4"))
    assert "missing: layers.2.attn_norm.weight, " in msg and "unexpected" not in msg, msg
    assert "; shape mismatches: layers.0.attn.qkv.weight (checkpoint [128, 64], model [192, 64])" in msg, msg
    assert msg.index("missing:") < msg.index("shape mismatches:")
    msg = load_error(model("model.layers=4"), model("model.layers=2", "model.ffn_hidden=64"))
    assert ": unexpected: layers.2." in msg and "; shape mismatches: layers.0.mlp." in msg and "missing" not in msg, msg
    assert "layers.3.attn.qkv.weight, ... 4 more; shape mismatches" in msg, msg  # 12 unexpected: the first 8 named


def test_a_fitting_checkpoint_loads():
    saved, into = model("model.layers=2"), model("model.layers=2", seed=3)  # other initial weights
    assert not torch.equal(saved.layers[0].attn.qkv.weight, into.layers[0].attn.qkv.weight)
    _load_single_device_state(into, saved.state_dict(), whole=True)
    assert all((a == b).all() for a, b in zip(saved.state_dict().values(), into.state_dict().values(), strict=True))
