"""`megatron-lite convert`: export to transformers, import back, verify, and every refusal."""

import json
import os
import re
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from convert_fixtures import (  # noqa: F401 (fixtures)
    exported_fixture,
    noisy_checkpoint,
    run_error,
    tiny_llama,
    trained_fixture,
)
from safetensors.torch import load_file, save_file

from megatron_lite.checkpoint.format import sha256_file
from megatron_lite.checkpoint.reader import find_checkpoint
from megatron_lite.cli import main
from megatron_lite.config import Config, ModelConfig, load_config
from megatron_lite.convert import from_hf, io, to_hf
from megatron_lite.convert.verify import RELATIVE_TOLERANCE
from megatron_lite.training.evaluate import evaluate_text, load_model

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4  # fp32 max abs logits difference; why: megatron_lite/convert/verify.py


def logits_both(checkpoint: Path, hf_dir: Path, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, _ = load_model(checkpoint, torch.device("cpu"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return ours(ids), theirs(input_ids=ids).logits


def assert_bitwise(a_dir: Path, b_dir: Path) -> None:
    a, b = find_checkpoint(a_dir).model_state(), find_checkpoint(b_dir).model_state()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_to_hf_writes_a_sharded_directory_transformers_loads(trained, exported):
    files = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 1
    config = json.loads((exported / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_heads"], config["tie_word_embeddings"]) == ("llama", 2, False)
    ours, theirs = logits_both(trained, exported, config["vocab_size"])
    assert (ours - theirs).abs().max() <= TOL
    card = (exported / "README.md").read_text()
    assert "tokens: 512 = 16 consumed samples x 32" in card and "LlamaForCausalLM" in card
    assert load_config(trained.parent / "config.yaml").data.path[0] in card  # the datasets trained on


def test_evals_loss_on_a_text_is_the_loss_transformers_gives_the_export(small_corpus, tmp_path):
    """What a user fine-tuning elsewhere checks first: `eval --text` of the checkpoint and transformers on the
    export, with its tokenizer, over the same windows (seq_len + 1 tokens overlapping by one, the last shorter).
    Tolerance: verify.py bounds the logits difference by RELATIVE_TOLERANCE x max |logit|; a cross-entropy
    moves by at most twice its logits' largest change."""
    ckpt = noisy_checkpoint(tmp_path / "ckpt", small_corpus[1], init_std=0.3)  # confident: losses differ per token
    exported = to_hf(ckpt, tmp_path / "hf", check=False).out
    text = tmp_path / "text.py"
    text.write_text((ROOT / "megatron_lite" / "cli.py").read_text()[:3000])
    ours = evaluate_text(ckpt, text, device="cpu")
    tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    ids, seq = torch.tensor(tok(text.read_text())["input_ids"]), model.config.max_position_embeddings
    total, top = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq):
            window = ids[start : start + seq + 1][None]  # (1, <= T+1)
            logits = model(input_ids=window[:, :-1]).logits[0]
            total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            top = max(top, logits.abs().max().item())
    assert ours["tokens"] == len(ids)
    assert abs(ours["loss"] - total / (len(ids) - 1)) <= 2 * RELATIVE_TOLERANCE * max(1.0, top)


def test_the_model_cards_code_is_ruff_formatted(exported):
    # README's `convert to-hf --out hf/quickstart` puts the card inside the checkout, where
    # tools/run_tests.sh's `ruff format --check .` formats the Markdown's Python block: it failed
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed")
    r = subprocess.run([ruff, "format", "--check", "--no-cache", str(exported / "README.md")], capture_output=True)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def test_from_hf_of_the_export_is_bitwise_with_a_run_config(trained, exported, tmp_path, capsys):
    back = tmp_path / "back"
    assert main(["convert", "from-hf", "--hf", str(exported), "--out", str(back)]) == 0
    assert "step_00000000" in capsys.readouterr().out
    assert_bitwise(sorted(trained.glob("step_*"))[-1], back / "step_00000000")
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(load_model(trained, "cpu")[0](ids), load_model(back, "cpu")[0](ids))
    cfg = load_config(back / "config.yaml")
    assert cfg.checkpoint.init_from == str((back / "step_00000000").resolve())
    recorded = json.loads((exported / "megatron_lite.json").read_text())["config"]["model"]
    assert cfg.model == ModelConfig(**recorded)
    # the defaults but for what the weights fix: nothing of the source run's layout (its parallel.dp
    # refused another world size), length and schedule (train.steps=2 and its decay), data or dirs
    expected = Config()
    expected.model, expected.checkpoint.init_from = cfg.model, cfg.checkpoint.init_from
    expected.data.tokenizer = str((back / "step_00000000" / "tokenizer.model").resolve())
    assert cfg.to_dict() == expected.to_dict()
    meta = find_checkpoint(back / "step_00000000").meta
    assert (meta["weights_only"], meta["step"], meta["optimizer"], meta["trainer"]) == (True, 0, None, None)
    assert all(name.startswith("model/") for name in meta["tensors"])


@pytest.mark.parametrize(
    "model",
    [dict(kv_heads=1, tie_embeddings=True), dict(arch="gpt2"), dict(arch="gpt2", tie_embeddings=False)],
    ids=["llama-mqa-tied", "gpt2-tied", "gpt2-untied"],
)
def test_tied_llama_and_gpt2_match_logits_and_round_trip(small_corpus, tmp_path, model):
    ckpt = noisy_checkpoint(tmp_path / "ckpt", small_corpus[1], **model)
    result = to_hf(ckpt, tmp_path / "hf")
    assert result.check.passed and result.check.tokenizer_equal
    ours, theirs = logits_both(ckpt, tmp_path / "hf", 512)
    assert (ours - theirs).abs().max() <= TOL
    assert_bitwise(ckpt, from_hf(tmp_path / "hf", tmp_path / "back").checkpoint)


def test_a_llama_config_json_has_rope_theta_and_dtype_where_transformers_4_reads_them(small_corpus, tmp_path):
    """transformers 5 writes rope_theta only in rope_parameters and the dtype as ``dtype``; transformers 4
    (vLLM's, many fine-tuning setups') reads the top-level rope_theta and, without it, runs the model with
    theta 10000, silently; before 4.56 it reads ``torch_dtype`` and, without it, loads the weights in fp32."""
    ckpt = noisy_checkpoint(tmp_path / "ckpt", small_corpus[1], rope_theta=500000.0)
    out = to_hf(ckpt, tmp_path / "hf").out
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 500000.0
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert transformers.AutoConfig.from_pretrained(str(out)).rope_parameters["rope_theta"] == 500000.0
    back = from_hf(out, tmp_path / "back")
    assert load_config(back.config_path).model.rope_theta == 500000.0
    assert_bitwise(ckpt, back.checkpoint)


def test_weights_of_mixed_dtypes_export_back_without_rounding(small_corpus, tmp_path):
    """bf16 matrices beside fp32 norms: the import records fp32, so its export holds every value exactly (in
    the embedding's dtype the norms would be rounded, and verification allows the coarser dtype's rounding)."""
    src = tiny_llama(tmp_path / "src", small_corpus[1])
    weights = {k: v if "norm" in k else v.bfloat16() for k, v in load_file(src / "model.safetensors").items()}
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    back = load_file(to_hf(from_hf(src, tmp_path / "imported").checkpoint, tmp_path / "back").out / "model.safetensors")
    assert back.keys() == weights.keys() and {t.dtype for t in back.values()} == {torch.float32}
    assert all(torch.equal(weights[k].float(), back[k]) for k in weights)


def test_gpt2_saved_as_base_model_with_buffers_imports(small_corpus, tmp_path):
    """Old GPT-2 files name tensors without ``transformer.`` and carry the causal-mask buffers."""
    ckpt = noisy_checkpoint(tmp_path / "ckpt", small_corpus[1], arch="gpt2")
    hf_dir = to_hf(ckpt, tmp_path / "hf", check=False).out
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(hf_dir / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    assert_bitwise(ckpt, from_hf(hf_dir, tmp_path / "back").checkpoint)


def test_fine_tuning_in_plain_transformers_lowers_the_loss(exported):
    tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    batch = tok(["def add(a, b):\n    return a + b\n"] * 2, return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def hf_llama_family(tmp_path: Path, tok: Path, kind: str) -> Path:
    """A tiny random Mistral or Qwen2 (``qwen2``: non-zero biases) saved by transformers, with our tokenizer."""
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    common.update(num_key_value_heads=2, max_position_embeddings=64)
    cfg = transformers.MistralConfig(**common) if kind == "mistral" else transformers.Qwen2Config(**common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):  # Qwen2's q/k/v biases: zero (importable) or not
                p.copy_(torch.zeros_like(p) if kind == "qwen2-zero-bias" else torch.randn_like(p))
    out = tmp_path / kind
    model.save_pretrained(str(out))
    shutil.copyfile(tok, out / "tokenizer.model")
    return out


@pytest.mark.parametrize("kind", ["mistral", "qwen2-zero-bias"])
def test_import_mistral_and_bias_free_qwen2_matches_logits(small_corpus, tmp_path, kind, capsys):
    hf_dir = hf_llama_family(tmp_path, small_corpus[1], kind)
    assert main(["convert", "from-hf", "--hf", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "verify", "--checkpoint", str(tmp_path / "ckpt"), "--hf", str(hf_dir)]) == 0
    assert "max |logits diff|" in capsys.readouterr().out
    ours, theirs = logits_both(tmp_path / "ckpt" / "step_00000000", hf_dir, 512)
    assert (ours - theirs).abs().max() <= TOL
    # exported (and verified) as Mistral again, Qwen2 as Llama (checkpoint/hf.py says why); then bitwise
    back = to_hf(tmp_path / "ckpt", tmp_path / "hf_again").out
    config = json.loads((back / "config.json").read_text())
    expected = ("mistral", ["MistralForCausalLM"]) if kind == "mistral" else ("llama", ["LlamaForCausalLM"])
    assert (config["model_type"], config["architectures"]) == expected
    assert_bitwise(tmp_path / "ckpt" / "step_00000000", from_hf(back, tmp_path / "again").checkpoint)
    if kind == "mistral":  # trained further from the import, it is still exported as a Mistral
        run = [f"data.path={small_corpus[0]}", f"log.dir={tmp_path / 'run'}", "train.steps=1", "log.progress=false"]
        assert main(["train", "--config", str(tmp_path / "ckpt" / "config.yaml"), *run, "train.global_batch_size=2",
                     "train.micro_batch_size=2"]) == 0  # fmt: skip
        trained = to_hf(tmp_path / "run" / "checkpoints", tmp_path / "hf_trained").out
        assert json.loads((trained / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]


def test_unsupported_or_incomplete_inputs_are_one_clear_error(trained, exported, small_corpus, tmp_path, capsys):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    err = run_error(["convert", "from-hf", "--hf", str(bert), "--out", str(tmp_path / "o1")], capsys)
    assert "'bert' is not supported; supported: llama, mistral, qwen2" in err and "gpt2" in err
    no_tok = tmp_path / "no_tok"
    shutil.copytree(exported, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    err = run_error(["convert", "from-hf", "--hf", str(no_tok), "--out", str(tmp_path / "o2")], capsys)
    assert "no tokenizer" in err and "tokenizer.model" in err and "tokenizer.json" in err
    qwen = hf_llama_family(tmp_path, small_corpus[1], "qwen2")
    err = run_error(["convert", "from-hf", "--hf", str(qwen), "--out", str(tmp_path / "o3")], capsys)
    assert re.search(r"[qkv]_proj\.bias is non-zero", err), err
    bare = tmp_path / "bare"
    shutil.copytree(sorted(trained.glob("step_*"))[-1], bare, ignore=shutil.ignore_patterns("tokenizer*"))
    meta = json.loads((bare / "metadata.json").read_text())
    meta["files"] = {k: v for k, v in meta["files"].items() if not k.startswith("tokenizer")}
    (bare / "metadata.json").write_text(json.dumps(meta))
    err = run_error(["convert", "to-hf", "--checkpoint", str(bare), "--out", str(tmp_path / "o4")], capsys)
    assert "has no tokenizer.model" in err
    (tmp_path / "t.txt").write_text("x = 1\n" * 20)
    err = run_error(["eval", "--checkpoint", str(bare), "--text", str(tmp_path / "t.txt")], capsys)
    assert "has no tokenizer.model, and eval tokenizes the text with the sentencepiece model" in err, err
    err = run_error(["convert", "to-hf", "--checkpoint", str(trained), "--out", str(exported)], capsys)
    assert "already exists" in err
    err = run_error(
        ["convert", "to-hf", "--checkpoint", str(trained), "--step", "7", "--out", str(tmp_path / "o5")], capsys
    )
    assert "no checkpoint of step 7" in err and "steps there: 2" in err


def test_a_tokenizer_record_that_is_not_json_is_one_error_before_the_export(trained, tmp_path, capsys):
    """The run copies PREFIX.json from beside its tokenizer into each checkpoint as it is: to-hf names
    it when it is not JSON, before writing anything (not a traceback from json)."""
    step = tmp_path / "copy" / sorted(trained.glob("step_*"))[-1].name
    shutil.copytree(trained / step.name, step)
    meta = json.loads((step / "metadata.json").read_text())
    assert "tokenizer.json" in meta["files"]
    (step / "tokenizer.json").write_text('{"vocab_size": 512,\n')
    meta["files"]["tokenizer.json"] = {
        "sha256": sha256_file(step / "tokenizer.json"),
        "bytes": (step / "tokenizer.json").stat().st_size,
    }
    (step / "metadata.json").write_text(json.dumps(meta))
    err = run_error(["convert", "to-hf", "--checkpoint", str(step), "--out", str(tmp_path / "o")], capsys)
    assert f"{step / 'tokenizer.json'} is not valid JSON (" in err and "(data.tokenizer, PREFIX.json)" in err, err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


@pytest.mark.parametrize("model", [dict(norm="layernorm"), dict(activation="gelu")], ids=["layernorm", "gelu"])
def test_llama_without_an_hf_class_is_refused_as_such(small_corpus, tmp_path, model, capsys):
    """The unsupported architecture is named, not the tensor-name mismatch it also causes."""
    ckpt = noisy_checkpoint(tmp_path / "ckpt", small_corpus[1], **model)
    err = run_error(["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")], capsys)
    assert "has no Hugging Face class; Llama needs norm=rmsnorm and activation=swiglu" in err, err
    assert "does not match" not in err and not (tmp_path / "hf").exists()


def test_failed_verification_is_a_failure(trained, exported, tmp_path, monkeypatch, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(exported, tampered)
    index = json.loads((tampered / "model.safetensors.index.json").read_text())["weight_map"]
    shard = tampered / index["model.layers.1.self_attn.k_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"].flip(0)
    save_file(tensors, shard, metadata={"format": "pt"})
    err = run_error(["convert", "verify", "--checkpoint", str(trained), "--hf", str(tampered)], capsys)
    assert "verification failed: tensor model.layers.1.self_attn.k_proj.weight differs from the checkpoint" in err
    # a conversion bug (k and v heads swapped) must stop to-hf before it reports success
    from megatron_lite.checkpoint import hf

    monkeypatch.setattr(hf.QKV, "to_hf", lambda t, m: [t.split(hf._qkv_rows(m))[i] for i in (0, 2, 1)])
    err = run_error(["convert", "to-hf", "--checkpoint", str(trained), "--out", str(tmp_path / "bad")], capsys)
    assert "verification failed" in err and not (tmp_path / "bad").exists()


def test_export_streams_one_tensor_at_a_time(trained, tmp_path, monkeypatch):
    original, live = io.iter_model_tensors, []

    def tracked(path):
        refs = []
        for name, t in original(path):
            refs.append(weakref.ref(t))
            live.append(sum(r() is not None for r in refs))
            yield name, t

    monkeypatch.setattr(io, "iter_model_tensors", tracked)
    to_hf(trained, tmp_path / "hf", check=False)
    assert len(live) > 10 and max(live) <= 2  # the current tensor and, briefly, a view of the previous one


def test_tool_script_runs_on_cpu_without_gpu_libraries(trained, tmp_path):
    """The conversion imports no GPU library; verification (which imports transformers' models, and
    through them torch._dynamo, which imports Triton when installed) works where Triton is absent."""
    code = (
        "import runpy, sys, torch\n"
        "ckpt, out = sys.argv[1:3]\n"
        "def tool(*args):\n"
        "    sys.argv = ['tools/convert_checkpoint.py', *args]\n"
        "    try:\n        runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "    except SystemExit as e:\n        assert e.code == 0, e.code\n"
        "tool('to-hf', '--checkpoint', ckpt, '--out', out, '--no-verify')\n"
        "gpu = [m for m in sys.modules if m.split('.')[0] in ('triton', 'apex', 'transformer_engine')]\n"
        "assert not gpu, gpu\n"
        "sys.modules['triton'] = None  # as on a CPU-only machine without Triton: import fails\n"
        "tool('verify', '--checkpoint', ckpt, '--hf', out)\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    args = [sys.executable, "-c", code, str(trained), str(tmp_path / "hf")]
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "not verified (--no-verify)" in r.stdout and "max |logits diff|" in r.stdout
