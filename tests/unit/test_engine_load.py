"""`checkpoint.init_from` into a model that does not fit: one error with each kind of problem in
its own list (missing, unexpected, other shapes), empty ones left out; the whole model checked
before any layout is built."""

import pytest
import torch

from megatron_lite.checkpoint.writer import save_weights
from megatron_lite.config import fill_defaults, load_config
from megatron_lite.errors import UserError
from megatron_lite.models.transformer import build_model
from megatron_lite.training.engine import _load_single_device_state
from megatron_lite.training.resume import start_from

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


def test_init_from_weights_that_do_not_fit_are_refused_before_any_layout_is_built(tmp_path):
    """A pipeline stage loads only its own layers and cannot tell that the checkpoint has more, so the
    whole model is checked once, before the engine: a deeper checkpoint is refused in every layout
    (pp=2 as one process), naming the checkpoint and the setting to change."""
    deeper = fill_defaults(load_config(None, [*TINY, "model.layers=3"]), vocab_size=100)
    start = save_weights(tmp_path / "import", 0, model("model.layers=3").state_dict(), deeper.to_dict(), files={})
    run = [f"checkpoint.dir={tmp_path / 'run'}", f"checkpoint.init_from={start}"]
    tok = tmp_path / "tokenizer.model"  # never read: only a resume compares tokenizers
    for pp in ("parallel.pp=1", "parallel.pp=2"):
        cfg = fill_defaults(load_config(None, [*TINY, "model.layers=2", pp, *run]), vocab_size=100)
        with pytest.raises(UserError) as e:
            start_from(cfg, rank=0, tokenizer=tok)
        msg = str(e.value)
        assert msg.startswith(f"checkpoint.init_from={start!r}: the weights in {start} do not fit this model"), msg
        assert "model/layers.2.attn.qkv.weight: checkpoint [192, 64], model none" in msg, msg
        assert "its model settings differ: model.layers: checkpoint 3, now 2" in msg, msg
    fits = fill_defaults(load_config(None, [*TINY, "model.layers=3", *run]), vocab_size=100)
    reader, weights = start_from(fits, rank=0, tokenizer=tok)
    assert reader.location == start and sorted(weights) == sorted(model("model.layers=3").state_dict())
