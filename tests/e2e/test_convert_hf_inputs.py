"""`megatron-lite convert from-hf` and `verify` given damaged, tampered or inconsistent Hugging Face
directories: each is one clear error line (rc 2) naming the file, and leaves nothing behind."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from convert_fixtures import exported_fixture, run_error, tiny_llama, trained_fixture  # noqa: F401 (fixtures)
from safetensors.torch import load_file, save_file

from megatron_lite.cli import main
from megatron_lite.config import load_config

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")


def damage(hf_dir: Path, kind: str) -> str:
    """Damage the sharded export ``hf_dir`` in one way; returns what the error must say."""
    shards = sorted(hf_dir.glob("model-*.safetensors"))
    if kind == "truncated shard":
        shards[1].write_bytes(shards[1].read_bytes()[: shards[1].stat().st_size // 2])
        return f"{shards[1]} is not a readable safetensors file (Error while deserializing header: incomplete"
    if kind == "missing shard":
        shards[1].unlink()
        return f"model.safetensors.index.json lists {shards[1].name}, which is not in {hf_dir}"
    if kind == "index missing":  # shards whose index was not copied: transformers finds no weights either
        (hf_dir / "model.safetensors.index.json").unlink()
        return (
            f"no model.safetensors or model.safetensors.index.json in {hf_dir}: found {shards[0].name} (and "
            f"{len(shards) - 1} more): copy in the model.safetensors.index.json that maps tensors to them"
        )
    if kind in ("no weights", "pytorch weights"):
        for p in [*shards, hf_dir / "model.safetensors.index.json"]:
            p.unlink()
        if kind == "no weights":
            return f"no model.safetensors or model.safetensors.index.json in {hf_dir}: copy the model's weights (its"
        (hf_dir / "pytorch_model.bin").write_bytes(b"")
        return f"in {hf_dir}: found pytorch_model.bin: re-save with save_pretrained(safe_serialization=True)"
    if kind in ("shard outside", "shard absolute"):  # an index naming weights outside the directory
        outside = shards[1].rename(hf_dir.parent / shards[1].name)
        name = f"../{outside.name}" if kind == "shard outside" else str(outside)
        index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: name if v == outside.name else v for k, v in index["weight_map"].items()}
        (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
        return f"model.safetensors.index.json names {name!r} as a shard, which is not a file inside {hf_dir}"
    if kind == "shard left out of the index":  # transformers reads only the listed shards; so does the import
        index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shards[-1].name}
        (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
        return (
            f"model.safetensors.index.json does not list {shards[-1].name}, which is in {hf_dir}: if it holds those "
            "weights, restore the index from the model's source, else correct config.json"
        )
    if kind == "index without weight_map":
        (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}}))
        return "model.safetensors.index.json has no weight_map of tensor names to files; restore it from the model's"
    if kind == "config not an object":
        (hf_dir / "config.json").write_text("[]\n")
        return f"{hf_dir / 'config.json'} is not a Hugging Face config (a JSON object); restore it from the model's"
    if kind == "deeply nested config":  # json.loads raises RecursionError, not a ValueError
        (hf_dir / "config.json").write_text("[" * 100_000 + "]" * 100_000)
        return f"{hf_dir / 'config.json'} is not valid JSON (nested too deeply)"
    if kind == "export record not an object":  # megatron_lite.json, read for the tokenizer
        (hf_dir / "megatron_lite.json").write_text("[]\n")
        return f"{hf_dir / 'megatron_lite.json'} is not a JSON object (what `convert to-hf` writes); restore it"
    if kind == "absurd context":  # would become model.seq_len, whose position tables are built at start
        config = json.loads((hf_dir / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 10**12}))
        return "this llama model's max_position_embeddings is 1,000,000,000,000, more than the 1,048,576 (2**20)"
    if kind == "malformed config":
        (hf_dir / "config.json").write_text('{"model_type": "llama",\n')
        return f"{hf_dir / 'config.json'} is not valid JSON"
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": "four"}))
    return f"transformers cannot load the config in {hf_dir}: "


@pytest.mark.parametrize(
    "kind",
    [
        "truncated shard",
        "missing shard",
        "shard left out of the index",
        "index missing",
        "no weights",
        "pytorch weights",
        "index without weight_map",
        "shard outside",
        "shard absolute",
        "malformed config",
        "deeply nested config",
        "export record not an object",
        "config not an object",
        "absurd context",
        "bad field",
    ],
)
def test_damaged_hf_directory_is_one_error_naming_the_file(trained, exported, tmp_path, kind, capsys):
    hf_dir = tmp_path / "hf"
    shutil.copytree(exported, hf_dir)
    expected = damage(hf_dir, kind)
    err = run_error(["convert", "from-hf", "--hf", str(hf_dir), "--out", str(tmp_path / "out")], capsys)
    assert expected in err and not (tmp_path / "out").exists()
    err = run_error(["convert", "verify", "--checkpoint", str(trained), "--hf", str(hf_dir)], capsys)
    assert expected in err


def test_verify_names_a_damaged_tokenizer(trained, exported, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    shutil.copytree(exported, hf_dir)
    (hf_dir / "tokenizer.json").write_text((exported / "tokenizer.json").read_text()[:1000])
    err = run_error(["convert", "verify", "--checkpoint", str(trained), "--hf", str(hf_dir)], capsys)
    assert f"transformers cannot load the tokenizer in {hf_dir}: " in err


def test_verify_fails_on_a_tampered_tensor_the_logits_do_not_reach(trained, exported, tmp_path, capsys):
    """One embedding row of an id the sample text and the random ids never select, changed by 1.0."""
    tampered = tmp_path / "tampered"
    shutil.copytree(exported, tampered)
    index = json.loads((tampered / "model.safetensors.index.json").read_text())["weight_map"]
    shard = tampered / index["model.embed_tokens.weight"]
    tensors = load_file(shard)
    used = set(torch.randint(0, 512, (32,), generator=torch.Generator().manual_seed(1)).tolist())
    row = max(set(range(300, 512)) - used)
    tensors["model.embed_tokens.weight"][row] += 1.0
    save_file(tensors, shard, metadata={"format": "pt"})
    err = run_error(["convert", "verify", "--checkpoint", str(trained), "--hf", str(tampered)], capsys)
    assert (
        f"verification failed: tensor model.embed_tokens.weight differs from the checkpoint in 64 of {512 * 64}" in err
    )
    assert f"first at [{row}, 0]" in err


def test_a_sentencepiece_tokenizer_to_hf_cannot_convert_is_named_at_import(exported, tmp_path, caplog, capsys):
    """Llama 2's tokenizer.model adds a dummy prefix: it imports and trains, but cannot be exported back."""
    from sentencepiece import sentencepiece_model_pb2

    hf_dir = tmp_path / "hf"
    shutil.copytree(exported, hf_dir)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((hf_dir / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = True
    (hf_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    assert main(["convert", "from-hf", "--hf", str(hf_dir), "--out", str(tmp_path / "imported")]) == 0
    assert f"{hf_dir / 'tokenizer.model'} uses a dummy prefix: megatron-lite trains with it, but" in caplog.text
    assert "`convert to-hf` cannot export it back" in caplog.text
    err = run_error(
        ["convert", "to-hf", "--checkpoint", str(tmp_path / "imported"), "--out", str(tmp_path / "o")], capsys
    )
    assert "cannot be converted exactly (a dummy prefix)" in err and not (tmp_path / "o").exists()
    (hf_dir / "tokenizer.model").write_bytes(b"\xff" * 64)
    err = run_error(["convert", "from-hf", "--hf", str(hf_dir), "--out", str(tmp_path / "o")], capsys)
    assert f"{hf_dir / 'tokenizer.model'} is not a sentencepiece model" in err and not (tmp_path / "o").exists()


def test_an_hf_directory_without_a_tokenizer_asks_for_its_files(exported, tmp_path, capsys):
    """A download of the weights and config.json alone: the import says which tokenizer files it needs."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(exported, hf_dir)
    for name in ("tokenizer.model", "tokenizer.json"):
        (hf_dir / name).unlink()
    err = run_error(["convert", "from-hf", "--hf", str(hf_dir), "--out", str(tmp_path / "out")], capsys)
    assert f"no tokenizer in {hf_dir}: expected tokenizer.model (sentencepiece; copied into the checkpoint) or " in err
    assert "copy the model's tokenizer files from its source into it" in err and not (tmp_path / "out").exists()


def test_import_of_a_mistral_with_a_short_sliding_window_says_it_shortens_seq_len(exported, tmp_path, caplog):
    cfg = transformers.MistralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=16,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "mistral"))
    shutil.copyfile(exported / "tokenizer.model", tmp_path / "mistral" / "tokenizer.model")
    assert main(["convert", "from-hf", "--hf", str(tmp_path / "mistral"), "--out", str(tmp_path / "ckpt")]) == 0
    assert "sliding window of 16 tokens, fewer than its max_position_embeddings (64): model.seq_len is set to 16" in (
        caplog.text
    )
    assert load_config(tmp_path / "ckpt" / "config.yaml").model.seq_len == 16


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"num_hidden_layers": 3}, "it says num_hidden_layers=3, the weights hold 2 layers (model.layers.0 to "),
        ({"num_hidden_layers": 1}, "it says num_hidden_layers=1, the weights hold 2 layers"),
        (
            {"hidden_size": 128, "head_dim": 32},
            "model.embed_tokens.weight is (512, 64) in the weights, but (512, 128) in the model it describes "
            "(hidden_size=128, ",
        ),
        ({"num_key_value_heads": 4}, "model.layers.0.self_attn.k_proj.weight is (32, 64) in the weights, but (64, 64)"),
        ({"tie_word_embeddings": True}, "it says tie_word_embeddings=true (the output head is model.embed_tokens"),
    ],
    ids=["more layers", "fewer layers", "hidden", "kv heads", "tied"],
)
def test_a_config_json_that_disagrees_with_the_weights_is_one_error_without_transformers_report(
    trained, exported, tmp_path, change, expected, capfd, caplog
):
    """transformers' load report (MISSING / UNEXPECTED / MISMATCH rows) must not come before our line:
    the mismatch is found from the headers first. transformers' handler writes to the stderr it found at
    import, which capsys does not see, so its records are checked in caplog and stderr in capfd."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(exported, hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
    head = f"error: {hf_dir / 'config.json'} does not match the weights in {hf_dir}: "
    fix = "; correct config.json to describe the weights (or restore both from the model's source)"
    for args in (
        ["convert", "verify", "--checkpoint", str(trained), "--hf", str(hf_dir)],
        ["convert", "from-hf", "--hf", str(hf_dir), "--out", str(tmp_path / "imported")],
    ):
        caplog.clear()
        err = run_error(args, capfd)
        assert err.startswith(head) and expected in err and err.rstrip().endswith(fix), err
        assert "REPORT" not in err and "transformers" not in err
        assert not [r.getMessage() for r in caplog.records if r.name.startswith("transformers")]
    assert not (tmp_path / "imported").exists()


@pytest.mark.parametrize("verb", ["from-hf", "verify"])
def test_a_crafted_layer_count_is_refused_before_transformers_reads_config_json(
    trained, exported, tmp_path, monkeypatch, verb, capsys
):
    """transformers builds per-layer state from config.json (about 60 bytes a layer): 10**9 layers
    would exhaust memory before the layers are compared with the weights."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(exported, hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))

    def never(*args, **kwargs):
        raise AssertionError("transformers read a config.json claiming 10**9 layers")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", never)
    args = [
        "--hf",
        str(hf_dir),
        *(["--out", str(tmp_path / "o")] if verb == "from-hf" else ["--checkpoint", str(trained)]),
    ]
    err = run_error(["convert", verb, *args], capsys)
    assert (
        f"{hf_dir / 'config.json'} does not match the weights in {hf_dir}: it says num_hidden_layers=1000000000, "
        "more layers than its" in err
    ), err
    assert not (tmp_path / "o").exists()


def test_a_gpt2_config_json_with_other_layers_names_its_own_key(exported, tmp_path, capfd):
    """GPT-2's keys (n_layer, n_embd) are named, for a base-model file whose names lack ``transformer.``."""
    ids = dict(bos_token_id=0, eos_token_id=0)  # within the vocabulary: no warning from transformers
    cfg = transformers.GPT2Config(vocab_size=512, n_positions=32, n_embd=32, n_layer=2, n_head=4, **ids)
    transformers.GPT2Model(cfg).save_pretrained(str(tmp_path / "gpt2"))
    shutil.copyfile(exported / "tokenizer.model", tmp_path / "gpt2" / "tokenizer.model")
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    for change, expected in (
        ({"n_layer": 3}, "it says n_layer=3, the weights hold 2 layers (transformer.h.0 to transformer.h.1)"),
        (
            {"n_embd": 64},
            "transformer.wte.weight is (512, 32) in the weights, but (512, 64) in the model it describes (n_embd=64",
        ),
    ):
        (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**config, **change}))
        err = run_error(["convert", "from-hf", "--hf", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o")], capfd)
        assert expected in err and not (tmp_path / "o").exists(), err


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (
            "LlamaForSequenceClassification",
            "describes a LlamaForSequenceClassification (its architectures), a model for another task than predicting "
            "the next token; megatron-lite imports causal language models (LlamaForCausalLM): import this model's ",
        ),
        (
            "LlamaModel",
            "describes a LlamaModel (its architectures), a base model without the output head that predicts tokens "
            "(no lm_head.weight, and tie_word_embeddings is false); import this model's LlamaForCausalLM checkpoint",
        ),
    ],
)
def test_a_model_without_a_language_model_head_is_refused_as_such(small_corpus, tmp_path, cls, expected, capsys):
    """Not "the weights lack lm_head.weight ...; correct config.json": config.json is right, the model is not an LM."""
    hf_dir = tiny_llama(tmp_path / "hf", small_corpus[1], cls)
    for args in (
        ["convert", "from-hf", "--hf", str(hf_dir), "--out", str(tmp_path / "out")],
        ["convert", "verify", "--checkpoint", str(tmp_path), "--hf", str(hf_dir)],
    ):
        err = run_error(args, capsys)
        assert f"error: {hf_dir / 'config.json'} {expected}" in err, err
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_with_more_pieces_than_the_vocab_size_is_refused_at_import(small_corpus, tmp_path, capsys):
    """Its ids past vocab_size have no embedding row. A run from such an import is refused at startup with
    advice the weights rule out (leave model.vocab_size empty), so the import says what is wrong."""
    hf_dir = tiny_llama(tmp_path / "hf", small_corpus[1], vocab=400)
    err = run_error(["convert", "from-hf", "--hf", str(hf_dir), "--out", str(tmp_path / "out")], capsys)
    assert (
        f"{hf_dir / 'tokenizer.model'} has 512 pieces, more than the vocab_size=400 of {hf_dir / 'config.json'}: ids "
        "400 and up have no embedding row, so it is not the tokenizer these weights were trained with; copy the "
        "model's own tokenizer.model into the directory"
    ) in err, err
    assert not (tmp_path / "out").exists()
