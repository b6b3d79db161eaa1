"""Continued pretraining from a Hugging Face import: `checkpoint.init_from` loads weights only."""

import json

import torch
from convert_fixtures import tiny_llama
from safetensors.torch import load_file

from megatron_lite.cli import main
from megatron_lite.convert import from_hf, to_hf


def first_loss(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_train_continues_from_an_hf_import(tiny_args, tmp_path, capsys):
    base = [*tiny_args[:-1], f"log.dir={tmp_path / 'base'}"]
    assert main(["train", *base, "train.steps=30", "optim.warmup=5"]) == 0
    hf, imported = tmp_path / "hf", tmp_path / "imported"
    assert main(["convert", "to-hf", "--checkpoint", str(tmp_path / "base" / "checkpoints"), "--out", str(hf)]) == 0
    assert main(["convert", "from-hf", "--hf", str(hf), "--out", str(imported)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(" data.path=PREFIX log.dir=RUN_DIR")  # its tokenizer came
    fresh = [*tiny_args[:-1], f"log.dir={tmp_path / 'fresh'}", "train.steps=2"]
    cont = [*tiny_args[:-1], f"log.dir={tmp_path / 'cont'}", "train.steps=2", f"checkpoint.init_from={imported}"]
    assert main(["train", *fresh]) == 0 and main(["train", *cont]) == 0
    assert first_loss(tmp_path / "cont") < first_loss(tmp_path / "fresh") - 0.5
    # the run's own checkpoint now wins over init_from: a rerun resumes at step 2, not from the import
    assert main(["train", *cont[:-2], "train.steps=3", f"checkpoint.init_from={imported}"]) == 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "cont" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_import_without_a_sentencepiece_tokenizer_never_trains_on_the_embedded_corpus(
    tiny_args, small_corpus, tmp_path, caplog, capsys
):
    """A byte-level BPE model (tokenizer.json only) imports with a warning; its config alone, which
    would feed it megatron-lite's own token ids, refuses to start before the corpus is built."""
    base = [*tiny_args[:-1], f"log.dir={tmp_path / 'base'}", "train.steps=1"]
    assert main(["train", *base]) == 0
    hf, imported = tmp_path / "hf", tmp_path / "imported"
    assert main(["convert", "to-hf", "--checkpoint", str(tmp_path / "base" / "checkpoints"), "--out", str(hf)]) == 0
    for name in ("tokenizer.model", "megatron_lite.json"):  # as GPT-2 or Llama 3 ship: tokenizer.json only
        (hf / name).unlink()
    assert main(["convert", "from-hf", "--hf", str(hf), "--out", str(imported)]) == 0
    assert f"the tokenizer of {hf} is not sentencepiece" in caplog.text
    hint = capsys.readouterr().out.splitlines()[-1]  # data.path alone is refused: the hint names data.tokenizer too
    assert hint.endswith(" data.path=PREFIX data.tokenizer=MODEL log.dir=RUN_DIR"), hint
    cache, run = tmp_path / "corpus_cache", f"log.dir={tmp_path / 'run'}"
    config = ["--config", str(imported / "config.yaml"), run, f"data.cache_dir={cache}", "log.progress=false"]
    assert main(["train", *config, "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.init_from=" in err and "carry no tokenizer megatron-lite can use" in err, err
    assert not cache.exists() and not (tmp_path / "run" / "config.yaml").exists()
    prefix, tok = small_corpus  # datasets the user tokenized with the model's own tokenizer: trains
    data = [f"data.path={prefix}", f"data.tokenizer={tok}", "train.global_batch_size=2", "train.micro_batch_size=2"]
    assert main(["train", *config, *data, "train.steps=1"]) == 0


def test_a_transformers_llama_exports_back_bitwise_and_trains_from_its_import(small_corpus, tmp_path):
    """A Llama (GQA, untied head) built by transformers: import, then export, gives its tensors back bit for
    bit; a run from the import trains, and its export is verified against our model (logits, tensors)."""
    src = tiny_llama(tmp_path / "src", small_corpus[1])
    imported = from_hf(src, tmp_path / "imported")
    back = to_hf(tmp_path / "imported", tmp_path / "back").out
    before, back = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert before.keys() == back.keys()
    assert all(before[k].dtype == back[k].dtype and torch.equal(before[k], back[k]) for k in before)
    run = [f"data.path={small_corpus[0]}", f"log.dir={tmp_path / 'run'}", "train.steps=2", "log.progress=false"]
    run += ["train.global_batch_size=2", "train.micro_batch_size=2"]
    assert main(["train", "--config", str(imported.config_path), *run]) == 0
    result = to_hf(tmp_path / "run" / "checkpoints", tmp_path / "trained")
    assert result.check.passed and result.check.tokenizer_equal
    trained = load_file(tmp_path / "trained" / "model.safetensors")
    assert trained.keys() == before.keys() and not any(torch.equal(before[k], trained[k]) for k in before)
