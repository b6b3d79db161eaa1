"""Continued pretraining from a Hugging Face import: `checkpoint.init_from` loads weights only."""

import json

from megatron_lite.cli import main


def first_loss(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_train_continues_from_an_hf_import(tiny_args, tmp_path):
    base = [*tiny_args[:-1], f"log.dir={tmp_path / 'base'}"]
    assert main(["train", *base, "train.steps=30", "optim.warmup=5"]) == 0
    hf, imported = tmp_path / "hf", tmp_path / "imported"
    assert main(["convert", "to-hf", "--checkpoint", str(tmp_path / "base" / "checkpoints"), "--out", str(hf)]) == 0
    assert main(["convert", "from-hf", "--hf", str(hf), "--out", str(imported)]) == 0
    fresh = [*tiny_args[:-1], f"log.dir={tmp_path / 'fresh'}", "train.steps=2"]
    cont = [*tiny_args[:-1], f"log.dir={tmp_path / 'cont'}", "train.steps=2", f"checkpoint.init_from={imported}"]
    assert main(["train", *fresh]) == 0 and main(["train", *cont]) == 0
    assert first_loss(tmp_path / "cont") < first_loss(tmp_path / "fresh") - 0.5
    # the run's own checkpoint now wins over init_from: a rerun resumes at step 2, not from the import
    assert main(["train", *cont[:-2], "train.steps=3", f"checkpoint.init_from={imported}"]) == 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "cont" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
