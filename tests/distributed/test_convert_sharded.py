"""A checkpoint saved at tp=2 x pp=2 exports to Hugging Face directly, with matching logits."""

import os

import torch
from test_trainer_parity import corpus, overrides  # noqa: F401 (corpus is a fixture)

from megatron_lite.cli import main
from megatron_lite.config import load_config
from megatron_lite.training.evaluate import load_model
from megatron_lite.training.trainer import Trainer


def _train(rank: int, world: int, args: list[str], port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    Trainer(load_config(None, args)).fit()


def test_tp2_pp2_checkpoint_exports_with_matching_logits(world4, corpus, tmp_path):  # noqa: F811
    prefix, tok = corpus
    args = [
        *overrides(prefix, str(tok), str(tmp_path / "run")),
        "parallel.tp=2",
        "parallel.pp=2",
        "model.kv_heads=2",
        "model.tie_embeddings=false",
        "train.steps=2",
    ]
    world4.run(_train, args, 29502)
    ckpt, hf = tmp_path / "run" / "checkpoints", tmp_path / "hf"
    assert main(["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(hf)]) == 0  # verifies too
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ours, _ = load_model(ckpt, torch.device("cpu"))
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        diff = (theirs(input_ids=ids).logits - ours(ids)).abs().max().item()
    assert diff < 1e-4, diff
