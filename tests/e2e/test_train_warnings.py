"""`megatron-lite train`'s startup and resume warnings: a learning-rate schedule that changes or ends
before the run, other data or seed on resume, a warmup or evaluation too long, a model `convert to-hf`
refuses."""

import logging
from pathlib import Path

from megatron_lite.cli import main


def test_resuming_with_another_lr_schedule_warns_naming_the_change(tiny_args, tmp_path, caplog):
    """A longer train.steps stretches the default optim.decay_steps, so the lr rises again: said."""
    assert main(["train", *tiny_args]) == 0  # 6 steps: warmup 2, decay_steps 4
    with caplog.at_level(logging.WARNING, logger="megatron_lite.training.trainer"):
        assert main(["train", *tiny_args, "train.steps=10"]) == 0
    (warned,) = [r.getMessage() for r in caplog.records if "learning-rate schedule" in r.getMessage()]
    assert (
        "optim.decay_steps 4 -> 8" in warned
        and "step 7 trains with lr 0.001515 where the checkpoint's run would use 3e-05" in warned
    ), warned


def test_a_runs_own_config_reused_for_a_longer_run_warns_that_its_decay_ends_early(tiny_args, tmp_path, caplog, capsys):
    """<log.dir>/config.yaml is resolved (optim.decay_steps=4 of a 6-step run): continued with
    train.steps=10, steps 7-10 train at optim.min_lr: plan and train say so."""
    assert main(["train", *tiny_args]) == 0
    again = ["--config", str(tmp_path / "run" / "config.yaml"), "train.steps=10"]
    want = (
        "optim.warmup=2 + optim.decay_steps=4 = 6 is less than train.steps=10: the learning-rate decay ends at step 6"
    )
    capsys.readouterr()
    assert main(["plan", "--world-size", "1", *again]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith(f"warning: {want}")], out
    with caplog.at_level(logging.WARNING, logger="megatron_lite.training.trainer"):
        assert main(["train", *again, "train.exit_after=1"]) == 0  # resumes at step 6, trains step 7
    assert [m for m in caplog.messages if m.startswith(want)], caplog.messages


def test_a_resume_that_trains_nothing_or_the_same_next_lr_warns_of_no_change(tiny_args, small_corpus, tmp_path, caplog):
    """train.steps=2 over a step-6 checkpoint trains nothing, so no resume warning; nor does a
    schedule change whose next lr is the same."""
    assert main(["train", *tiny_args]) == 0  # 6 steps: warmup 2, decay_steps 4; step 7 would be at min_lr
    fewer = ["train.steps=2", "train.seed=7", f"data.path={reversed_dataset(small_corpus[0], tmp_path)}"]
    with caplog.at_level(logging.INFO):
        assert main(["train", *tiny_args, *fewer]) == 0  # decay_steps 4 -> 1, another seed, other data
    assert (
        "checkpoint step 6 >= train.steps 2: nothing to train; to train on, raise train.steps above 6; for a new "
        "run, give another log.dir" in caplog.messages
    )
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # the overrides given twice are the only warnings: no resume warning
    assert sorted(w.split(" is given more than once on the command line")[0] for w in warned) == [
        "data.path",
        "train.steps",
    ], warned
    caplog.clear()
    with caplog.at_level(logging.INFO):  # decay_steps 4 -> 3: steps 7 and 8 train at min_lr in both schedules
        assert main(["train", *tiny_args, "train.steps=8", "optim.decay_steps=3"]) == 0
    assert "resumed from" in caplog.text and "learning-rate schedule" not in caplog.text, caplog.messages


def reversed_dataset(prefix: str, tmp_path: Path) -> Path:
    """The documents of ``prefix``, last first, as a new dataset: other data, the same tokenizer."""
    import numpy as np

    from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetBuilder

    source = IndexedDataset(prefix)
    other = tmp_path / "reversed"
    with IndexedDatasetBuilder(other, source.dtype) as b:
        for doc in reversed(range(len(source))):
            b.add_document(np.asarray(source.get(doc)))
    return other


def test_resuming_on_other_data_warns_naming_the_dataset(tiny_args, small_corpus, tmp_path, caplog):
    """Other data is allowed (a new mixture may be intended) but said: the samples are not the run's,
    and the new data is not read from its start (the data position carries over)."""
    other = reversed_dataset(small_corpus[0], tmp_path)
    assert main(["train", *tiny_args, "train.exit_after=2"]) == 0
    with caplog.at_level(logging.WARNING, logger="megatron_lite.training.trainer"):
        assert main(["train", *tiny_args, f"data.path={other}", "train.exit_after=1"]) == 0
    (warned,) = [r.getMessage() for r in caplog.records if "other data" in r.getMessage()]
    assert warned.startswith("resuming with other data than the checkpoint trained on: data.path names other data")
    assert str(other) in warned and "learning-rate schedule" not in caplog.text
    assert warned.endswith("the blend of this data is read from its sample 16 on"), warned  # 2 steps of 8


def test_startup_warns_of_a_warmup_longer_than_the_run_and_an_evaluation_longer_than_its_data(tiny_args, caplog):
    """Both are valid but likely mistakes: each is named (exit_after=1: the run stops before its one evaluation)."""
    args = [*tiny_args, "optim.warmup=10", "train.eval_iters=100000", "train.exit_after=1"]
    with caplog.at_level(logging.WARNING, logger="megatron_lite.training.trainer"):
        assert main(["train", *args]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("optim.warmup=10 is more than train.steps=6") for w in warned), warned
    assert any(w.startswith("train.eval_iters=100,000 x train.global_batch_size=8") for w in warned), warned


def test_a_llama_with_layernorm_warns_at_startup_that_convert_to_hf_refuses_it(tiny_args, tmp_path, caplog, capsys):
    """Said at startup, not first by the export after the training: no HF class computes it."""
    with caplog.at_level(logging.WARNING, logger="megatron_lite.training.trainer"):
        assert main(["train", *tiny_args, "model.norm=layernorm", "train.steps=2"]) == 0
    (warned,) = [m for m in caplog.messages if m.startswith("`megatron-lite convert to-hf` will refuse")]
    capsys.readouterr()
    ckpt, out = tmp_path / "run" / "checkpoints", tmp_path / "hf"
    assert main(["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert warned.split(": ", 1)[1] in capsys.readouterr().err  # the refusal the warning foretold


def test_a_dataset_smaller_than_one_global_batch_trains_and_warns_that_it_repeats(
    tiny_args, small_corpus, tmp_path, caplog
):
    """A few samples in a global batch of 8: the run trains, reading them many times over, and says so."""
    import json

    text = tmp_path / "short.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 4)
    out = tmp_path / "short"
    assert main(["preprocess", "--input", str(text), "--tokenizer", str(small_corpus[1]), "--output", str(out)]) == 0
    with caplog.at_level(logging.WARNING, logger="megatron_lite.training.trainer"):
        assert main(["train", *tiny_args, f"data.path={out}", "data.valid_fraction=0"]) == 0
    (warned,) = [m for m in caplog.messages if "before it repeats one" in m]
    assert warned.startswith("train.steps=6 x train.global_batch_size=8 = 48 training samples"), warned
    assert f"the run reads dataset {out} " in warned and "one global batch of 8 holds the same sample" in warned
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["consumed_samples"]) for r in records] == [(s, 8 * s) for s in range(1, 7)]
