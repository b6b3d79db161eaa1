"""The literal name maps against both models, transforms, config mapping, refusals, shard writer."""

import os

import pytest
import torch
from safetensors.torch import load_file

from megatron_lite.amounts import parse_size
from megatron_lite.checkpoint.hf import ADAPTERS, adapter_for, export_config, export_type, import_config
from megatron_lite.cli import main
from megatron_lite.config import Config, ModelConfig, fill_defaults
from megatron_lite.convert.compare import tensor_difference
from megatron_lite.convert.io import ShardedWriter
from megatron_lite.errors import UserError
from megatron_lite.models.transformer import Transformer

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def model_config(**kw) -> ModelConfig:
    cfg = Config()
    cfg.model = ModelConfig(layers=2, hidden=64, heads=4, seq_len=32, **kw)
    return fill_defaults(cfg, vocab_size=300).model


CASES = {
    "llama-gqa-untied": dict(kv_heads=2),
    "llama-tied": dict(kv_heads=1, tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-6),
    "gpt2-tied": dict(arch="gpt2"),
    "gpt2-untied": dict(arch="gpt2", tie_embeddings=False),
}


@pytest.mark.parametrize("case", CASES)
def test_name_map_covers_our_model_and_transformers_model(case):
    m = model_config(**CASES[case])
    name_map = ADAPTERS[m.arch].name_map(m)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in Transformer(m).state_dict().items()}
        hf_model = transformers.AutoModelForCausalLM.from_config(export_config(m, IDS))
    theirs = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    if m.tie_embeddings:
        theirs.pop("lm_head.weight")  # HF ties it to the embedding; it is never saved
    assert set(name_map) == set(ours)
    mapped = {}
    for name, (hf_names, transform) in name_map.items():
        mapped.update(zip(hf_names, transform.hf_shapes(ours[name], m)))
    assert mapped == theirs


@pytest.mark.parametrize("case", CASES)
def test_transforms_invert_bitwise_and_config_round_trips(case):
    m = model_config(**CASES[case])
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(m).state_dict().items()}
    for name, (hf_names, transform) in ADAPTERS[m.arch].name_map(m).items():
        t = torch.randn(shapes[name], generator=g)
        parts = transform.to_hf(t, m)
        assert len(parts) == len(hf_names)
        assert torch.equal(transform.from_hf(parts, m), t), name
    assert import_config(export_config(m, IDS)) == m


def test_llama_imported_from_mistral_exports_as_mistral():
    m = model_config(kv_heads=2)
    origin = {"model_type": "mistral", "hf_config": {"sliding_window": 16}}  # shorter than seq_len 32: dropped
    assert export_type(m, origin) == "mistral" and export_type(m, None) == "llama"
    assert export_type(m, {"model_type": "qwen2"}) == "llama"  # see checkpoint/hf.py: the tokenizer
    assert export_type(model_config(arch="gpt2"), origin) == "gpt2"
    cfg = export_config(m, IDS, origin=origin)
    assert (cfg.model_type, cfg.architectures, cfg.sliding_window) == ("mistral", ["MistralForCausalLM"], None)
    assert import_config(cfg) == m
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in Transformer(m).state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in transformers.AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    mapped = {}
    for name, (hf_names, transform) in ADAPTERS["mistral"].name_map(m).items():
        mapped.update(zip(hf_names, transform.hf_shapes(ours[name], m)))
    assert mapped == theirs
    covering = export_config(m, IDS, origin={"model_type": "mistral", "hf_config": {"sliding_window": 32}})
    assert covering.sliding_window == 32 and import_config(covering) == m  # covers seq_len: never binds, kept


def test_qkv_rows_split_into_grouped_query_heads():
    m = model_config(kv_heads=2)
    (q, k, v), transform = ADAPTERS["llama"].name_map(m)["layers.0.attn.qkv.weight"]
    assert (q, k, v) == tuple(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    rows = torch.arange(128.0)[:, None].expand(128, 64)  # 4 q heads + 2 k + 2 v heads of 16 rows
    parts = transform.to_hf(rows, m)
    assert [p.shape[0] for p in parts] == [64, 32, 32]
    assert parts[1][0, 0] == 64 and parts[2][0, 0] == 96


def test_vocab_padding_rows_are_stripped():
    m = model_config(kv_heads=2)
    (hf_name,), transform = ADAPTERS["llama"].name_map(m)["embed.weight"]
    padded = torch.randn(m.vocab_size + 12, m.hidden)
    assert transform.hf_shapes(tuple(padded.shape), m) == [(m.vocab_size, m.hidden)]
    assert torch.equal(transform.to_hf(padded, m)[0], padded[: m.vocab_size])


def test_unsupported_architectures_and_features_are_refused():
    with pytest.raises(UserError, match=r"'bert' is not supported; supported: llama, mistral, qwen2"):
        adapter_for("bert")
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaled = transformers.LlamaConfig(rope_parameters={**llama3, "original_max_position_embeddings": 8192})
    with pytest.raises(UserError, match="RoPE scaling 'llama3'"):
        import_config(scaled)
    with pytest.raises(UserError, match="activation 'relu'"):
        import_config(transformers.GPT2Config(activation_function="relu"))
    small = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2)
    for hf_config, what in [
        (transformers.LlamaConfig(**small, hidden_act="gelu"), "llama model cannot be imported: activation 'gelu'"),
        (transformers.LlamaConfig(**small, attention_bias=True), "llama model cannot be imported: attention biases"),
        (transformers.LlamaConfig(**small, mlp_bias=True), "llama model cannot be imported: MLP biases"),
        (transformers.LlamaConfig(**small, head_dim=8), "llama model cannot be imported: head_dim 8 != hidden / heads"),
        (transformers.GPT2Config(add_cross_attention=True), "gpt2 model cannot be imported: cross-attention"),
        (
            transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True),
            "gpt2 model .*: non-standard attention scaling",
        ),
    ]:
        with pytest.raises(
            UserError, match=f"^this {what}.*; megatron-lite.s model does not compute it.* the standard architecture"
        ):
            import_config(hf_config)
    with pytest.raises(UserError, match="norm=rmsnorm and activation=swiglu"):
        export_config(model_config(norm="layernorm"), IDS)
    with pytest.raises(UserError, match="no grouped-query attention"):
        export_config(model_config(arch="gpt2", kv_heads=2), IDS)


def test_mistral_window_caps_the_sequence_length():
    c = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
    )
    c.sliding_window, c.max_position_embeddings = 16, 64
    assert import_config(c).seq_len == 16  # sequences within the window see plain causal attention


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_context_past_what_model_seq_len_may_be_is_refused_naming_the_hf_key(model_type):
    """It would become model.seq_len, for which the model builds its position tables at start."""
    if model_type == "gpt2":
        c, key = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=2**20 + 1), "n_positions"
    else:
        c = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
        c.max_position_embeddings, key = 10**12, "max_position_embeddings"
    with pytest.raises(UserError, match=rf"this {model_type} model's {key} is [\d,]+, more than the 1,048,576"):
        import_config(c)
    setattr(c, key, 2**20)
    assert import_config(c).seq_len == 2**20


def test_parse_size(tmp_path, capsys):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64KiB") == 65536 and parse_size("123") == 123
    args = ["convert", "to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]
    assert main([*args, "--max-shard-size", "5 gigs"]) == 2
    assert capsys.readouterr().err == (
        "error: --max-shard-size '5 gigs' is not a size: give a number of bytes, or one like 5GB, 500MB, 64KiB\n"
    )


def test_sharded_writer_accepts_any_arrival_order(tmp_path):
    tensors = {f"t{i}": torch.randn(i + 1, 8).to(dtype) for i, dtype in enumerate([torch.float32, torch.bfloat16] * 3)}
    plan = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=100)
    for name in reversed(tensors):
        writer.write(name, tensors[name])
    writer.close()
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = {k: v for s in shards for k, v in load_file(s).items()}
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_tensor_difference_allows_the_coarser_dtypes_rounding_only():
    t = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    assert tensor_difference(t, t.clone()) is None
    assert tensor_difference(t, t.bfloat16()) is None  # re-saved in bf16: within its rounding
    nudged = t.clone()
    nudged[5, 7] *= 1 + 2 * torch.finfo(torch.bfloat16).eps
    assert "1 of 2048 elements (first at [5, 7]" in tensor_difference(t, nudged.bfloat16())
    assert "1 of 2048" in tensor_difference(t, nudged)  # fp32 on both sides: fp32's rounding
    assert "has shape (32, 64)" in tensor_difference(t, t.t())
    t[0, 0] = nudged[0, 0] = float("nan")
    assert tensor_difference(t, t.clone()) is None
