"""`megatron-lite convert`'s bad paths: used output directories, damaged inputs, failed writes,
tampered exports. Each is one clear error line (rc 2) and leaves nothing behind."""

import errno
import importlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from convert_fixtures import exported_fixture, run_error, snapshot, trained_fixture  # noqa: F401 (fixtures)
from safetensors.torch import load_file, save_file

from megatron_lite.checkpoint import shards
from megatron_lite.checkpoint.format import sha256_file
from megatron_lite.cli import main
from megatron_lite.config import load_config
from megatron_lite.convert import io

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
to_hf_module = importlib.import_module("megatron_lite.convert.to_hf")  # `convert.to_hf` is the function


def test_from_hf_refuses_a_used_out_and_changes_nothing_there(exported, tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.yaml").write_text("keep\n")
    (used / "latest").write_text("step_00000007\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep\n")
    for out, says in [(used, "already exists and is not an empty directory; choose a new one"), (a_file, "is a file")]:
        before = snapshot(out)
        err = run_error(["convert", "from-hf", "--hf", str(exported), "--out", str(out)], capsys)
        assert f"--out {out} {says}" in err and "checkpoint.dir" not in err and snapshot(out) == before, err


@pytest.mark.parametrize("stage", ["weights", "tokenizer"])
def test_to_hf_on_a_full_disk_is_one_error_and_leaves_nothing(trained, tmp_path, monkeypatch, stage, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(
        *(io.ShardedWriter, "write") if stage == "weights" else (to_hf_module, "write_hf_tokenizer"), full
    )
    out = tmp_path / "parent" / "hf"
    err = run_error(["convert", "to-hf", "--checkpoint", str(trained), "--out", str(out), "--no-verify"], capsys)
    assert f"cannot write the export to {out}: OSError: [Errno 28] No space left on device" in err
    assert "planned but never written" not in err and list((tmp_path / "parent").iterdir()) == []


def test_to_hf_into_the_current_directory(trained, tmp_path, monkeypatch, capsys):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["convert", "to-hf", "--checkpoint", str(trained), "--out", ".", "--no-verify"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in Path().iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["here"]  # no .tmp-* left beside it
    assert not Path(to_hf_module.STAGING_MARKER).exists()
    err = run_error(["convert", "to-hf", "--checkpoint", str(trained), "--out", "."], capsys)
    assert "--out . already exists and is not an empty directory" in err


def test_to_hf_never_overwrites_a_file_saved_into_out_while_it_ran(trained, tmp_path, monkeypatch, capsys):
    """--out an empty directory at the start; a file saved there during the verification stays as it is."""
    out = tmp_path / "hf"
    out.mkdir()
    real_verify = to_hf_module.verify

    def verify_while_the_user_saves(*args, **kwargs):
        (out / "tokenizer.json").write_text("mine\n")
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(to_hf_module, "verify", verify_while_the_user_saves)
    err = run_error(["convert", "to-hf", "--checkpoint", str(trained), "--out", str(out)], capsys)
    assert f"{out / 'tokenizer.json'} appeared while the export was being written, and it is not overwritten" in err
    assert snapshot(out) == {"tokenizer.json": b"mine\n"} and [p.name for p in tmp_path.iterdir()] == ["hf"]


def damage(hf_dir: Path, kind: str) -> str:
    """Damage the sharded export ``hf_dir`` in one way; returns what the error must say."""
    shards = sorted(hf_dir.glob("model-*.safetensors"))
    if kind == "truncated shard":
        shards[1].write_bytes(shards[1].read_bytes()[: shards[1].stat().st_size // 2])
        return f"{shards[1]} is not a readable safetensors file (Error while deserializing header: incomplete"
    if kind == "missing shard":
        shards[1].unlink()
        return f"model.safetensors.index.json lists {shards[1].name}, which is not in {hf_dir}"
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


def test_a_run_root_of_unreadable_checkpoints_is_named_for_conversion_not_training(trained, tmp_path, capsys):
    broken = tmp_path / "checkpoints"
    shutil.copytree(trained, broken)
    for step in broken.glob("step_*"):
        (step / "tokenizer.model").unlink()
    (tmp_path / "t.txt").write_text("def f(x):\n    return x\n")
    for args in (
        ["convert", "to-hf", "--checkpoint", str(broken), "--out", str(tmp_path / "hf")],
        ["eval", "--checkpoint", str(broken), "--text", str(tmp_path / "t.txt")],
    ):
        err = run_error(args, capsys)
        assert f"every checkpoint under {broken} is incomplete or corrupt (newest: step_00000002: tokenizer" in err
        assert "point at a good step directory" in err and "start from scratch" not in err


@pytest.mark.parametrize("verb", ["to-hf", "verify"])
def test_step_with_a_step_directory_asks_for_its_parent(trained, exported, tmp_path, verb, capsys):
    """``--step`` picks a step under the run's checkpoint directory, not under a step directory."""
    step_dir = trained / "step_00000002"
    target = ["--out", str(tmp_path / "hf")] if verb == "to-hf" else ["--hf", str(exported)]
    err = run_error(["convert", verb, "--checkpoint", str(step_dir), "--step", "1", *target], capsys)
    assert f"--checkpoint {step_dir} is a step directory, and --step needs the run's checkpoint directory" in err
    assert f"use --checkpoint {trained} --step 1, or drop --step to convert {step_dir}" in err, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "edit, says",
    [
        ({"hidden": 96}, "embed.weight is stored with shape (512, 64), but its model config makes it (512, 96)"),
        (
            {"heads": 2, "kv_heads": 2},
            "layers.0.attn.qkv.weight is stored with shape (128, 64), but its model config makes it (192, 64)",
        ),
        ({"layers": 3}, "its tensors are not those of its model config (missing ['layers.2."),
        ({"heads": 0}, "its model config builds no model (ZeroDivisionError: integer division or modulo by zero)"),
    ],
)
def test_a_metadata_config_that_disagrees_with_the_tensors_is_one_error(
    trained, exported, tmp_path, edit, says, capsys
):
    """A hand-edited (or damaged) model config in metadata.json failed deep in a transform, with a traceback."""
    step = tmp_path / "checkpoints" / "step_00000002"
    shutil.copytree(trained / "step_00000002", step)
    meta = json.loads((step / "metadata.json").read_text())
    meta["config"]["model"].update(edit)
    (step / "metadata.json").write_text(json.dumps(meta))
    for args in (["to-hf", "--out", str(tmp_path / "hf")], ["verify", "--hf", str(exported)]):
        err = run_error(["convert", args[0], "--checkpoint", str(step), *args[1:]], capsys)
        assert f"checkpoint {step}: {says}" in err and "metadata.json's config was edited or damaged" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


@pytest.mark.parametrize("text", ["[]\n", "{not json\n", "[" * 100_000 + "]" * 100_000], ids=["list", "text", "nested"])
def test_an_origin_json_that_is_no_json_object_is_one_error(exported, tmp_path, text, capsys):
    """origin.json (checksummed in files, so a crafted checkpoint passes verification) is read for the export."""
    assert main(["convert", "from-hf", "--hf", str(exported), "--out", str(tmp_path / "imported")]) == 0
    step = tmp_path / "imported" / "step_00000000"
    (step / "origin.json").write_text(text)
    meta = json.loads((step / "metadata.json").read_text())
    meta["files"]["origin.json"] = {"sha256": sha256_file(step / "origin.json"), "bytes": len(text)}
    (step / "metadata.json").write_text(json.dumps(meta))
    err = run_error(["convert", "to-hf", "--checkpoint", str(step), "--out", str(tmp_path / "hf")], capsys)
    assert f"checkpoint {step}: its origin.json is not a JSON object (edited or damaged)" in err, err
    assert not (tmp_path / "hf").exists()


def test_a_metadata_config_with_a_crafted_layer_count_is_refused_before_building_it(
    trained, exported, tmp_path, monkeypatch, capsys
):
    """A model of 10**9 layers, even on the meta device, would exhaust memory before its shapes are compared."""
    step = tmp_path / "checkpoints" / "step_00000002"
    shutil.copytree(trained / "step_00000002", step)
    meta = json.loads((step / "metadata.json").read_text())
    meta["config"]["model"]["layers"] = 10**9
    (step / "metadata.json").write_text(json.dumps(meta))

    def never(*args, **kwargs):
        raise AssertionError("a model of the crafted config was built")

    monkeypatch.setattr(shards, "state_shapes", never)
    for args in (["to-hf", "--out", str(tmp_path / "hf")], ["verify", "--hf", str(exported)]):
        err = run_error(["convert", args[0], "--checkpoint", str(step), *args[1:]], capsys)
        assert f"checkpoint {step}: its model config says model.layers=1000000000, more layers than its " in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


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
