"""Checkpoints saved across 4 ranks export to Hugging Face directly, with matching logits: tp=2 x pp=2,
and pp=2 with two virtual chunks per rank x dp=2 with the sharded (ZeRO-1) optimizer. The export is
byte for byte the export of the same weights saved by one process."""

import os

import pytest
import torch
from test_trainer_parity import corpus, overrides  # noqa: F401 (corpus is a fixture)

from megatron_lite.checkpoint.reader import find_checkpoint
from megatron_lite.checkpoint.writer import save_weights
from megatron_lite.cli import main
from megatron_lite.config import load_config
from megatron_lite.training.evaluate import load_model
from megatron_lite.training.trainer import Trainer


def _train(rank: int, world: int, args: list[str], port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    Trainer(load_config(None, args)).fit()


LAYOUTS = {
    # vocab 513: tp=2 pads the layout's vocabulary to 514 rows; the checkpoint and the export hold 513
    "tp2_pp2": ["parallel.tp=2", "parallel.pp=2", "model.kv_heads=2", "model.vocab_size=513"],
    "pp2_vp2_dp2_zero1": [
        "parallel.pp=2",
        "parallel.vp=2",
        "parallel.dp=2",
        "parallel.schedule=interleaved",
        "optim.distributed=true",
        "model.layers=4",
    ],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_checkpoint_exports_with_matching_logits(world4, corpus, tmp_path, layout):  # noqa: F811
    prefix, tok = corpus
    args = [
        *overrides(prefix, str(tok), str(tmp_path / "run")),
        *LAYOUTS[layout],
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
    # the same weights saved by one process: the weights, config and tokenizer files are the same bytes
    reader, single = find_checkpoint(ckpt), tmp_path / "single"
    save_weights(single, reader.meta["step"], reader.model_state(), reader.config.to_dict(), {"tokenizer.model": tok})
    assert main(["convert", "to-hf", "--checkpoint", str(single), "--out", str(tmp_path / "hf1"), "--no-verify"]) == 0
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (hf / name).read_bytes() == (tmp_path / "hf1" / name).read_bytes(), name
