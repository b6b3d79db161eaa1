"""Shared by the `megatron-lite convert` tests: a trained checkpoint, its export, a random checkpoint, a
random Llama saved by transformers, and the check that a command failed with one clear error line."""

import shutil
from pathlib import Path

import pytest
import torch
from train_checks import one_error_line

from megatron_lite.checkpoint.writer import save_weights
from megatron_lite.cli import main
from megatron_lite.config import Config, fill_defaults, validate
from megatron_lite.models.transformer import build_model


@pytest.fixture(scope="module", name="trained")
def trained_fixture(small_corpus, tmp_path_factory) -> Path:
    """Checkpoint root of a llama (4 heads, 2 kv heads, untied head) trained 2 steps by the CLI."""
    prefix, tok = small_corpus
    run = tmp_path_factory.mktemp("run")
    args = ["model.layers=2", "model.hidden=64", "model.heads=4", "model.kv_heads=2", "model.seq_len=32"]
    args += ["train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=2", "optim.warmup=1"]
    args += [f"data.path={prefix}", f"data.tokenizer={tok}", "log.progress=false", f"log.dir={run}"]
    assert main(["train", *args]) == 0
    return run / "checkpoints"


@pytest.fixture(scope="module", name="exported")
def exported_fixture(trained, tmp_path_factory) -> Path:
    """``trained``'s step 2 exported by the CLI, in several shards."""
    out = tmp_path_factory.mktemp("export") / "hf"
    args = ["--checkpoint", str(trained), "--step", "2", "--out", str(out), "--max-shard-size", "40KB"]
    assert main(["convert", "to-hf", *args]) == 0
    return out


def noisy_checkpoint(root: Path, tok: Path, **model) -> Path:
    """A random model whose norms and biases are not 1 and 0 (so a swapped mapping shows)."""
    cfg = Config()
    for key, value in dict(layers=2, hidden=64, heads=4, seq_len=32, **model).items():
        setattr(cfg.model, key, value)
    validate(fill_defaults(cfg, vocab_size=512))
    net = build_model(cfg.model, seed=5)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return Path(save_weights(root, 3, net.state_dict(), cfg.to_dict(), files={"tokenizer.model": tok}))


def tiny_llama(out: Path, tok: Path, cls: str = "LlamaForCausalLM", vocab: int = 512) -> Path:
    """A random Llama of class ``cls`` saved by transformers into ``out``, with the tokenizer ``tok`` copied in;
    its norms are not all 1 (so a swapped mapping shows)."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, cls)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(out))
    shutil.copyfile(tok, out / "tokenizer.model")
    return out


def run_error(args: list[str], capsys) -> str:
    """stderr of ``megatron-lite ARGS``, which must exit 2 with one ``error:`` line and no traceback."""
    capsys.readouterr()  # drop what the test's own setup printed
    assert main(args) == 2
    return one_error_line(capsys)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (a file itself too) with its bytes."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
