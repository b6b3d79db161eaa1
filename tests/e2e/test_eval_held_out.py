"""`megatron-lite eval --held-out`: a checkpoint's loss on the samples its run evaluates is the run's
eval_loss at that step; a run without held-out samples is one error saying to use --text."""

import json
import shutil

import pytest

from megatron_lite.cli import main


def _eval_json(checkpoint, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--held-out", "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_held_out_loss_of_each_checkpoint_is_the_runs_eval_loss(tiny_args, tmp_path, capsys):
    assert main(["train", *tiny_args, "train.eval_every=3", "checkpoint.every=3", "train.eval_iters=2"]) == 0
    run = tmp_path / "run"
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    for step in (3, 6):
        got = _eval_json(run / "checkpoints" / f"step_{step:08d}", capsys)
        assert got == {"loss": pytest.approx(rows[step]["eval_loss"], rel=1e-6), "tokens": 2 * 8 * 32}
    assert rows[3]["eval_loss"] != rows[6]["eval_loss"]  # two models: the match is no accident


def test_a_run_without_held_out_samples_is_one_error_naming_the_cause(tiny_args, tmp_path, capsys):
    assert main(["train", *tiny_args, "train.steps=1", "data.valid_fraction=0"]) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoints), "--held-out"]) == 2
    err = capsys.readouterr().err
    assert "held out no documents (data.valid_fraction=0); use --text" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # one source of samples at a time
        main(["eval", "--checkpoint", str(checkpoints), "--held-out", "--text", "x.txt"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_run_whose_data_is_gone_is_one_error_naming_the_file(tiny_args, small_corpus, tmp_path, capsys):
    prefix, _ = small_corpus
    copy = tmp_path / "copy"
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, str(copy) + ext)
    assert main(["train", *tiny_args, "train.steps=1", f"data.path={copy}"]) == 0
    (tmp_path / "copy.bin").unlink()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--held-out"]) == 2
    assert f"dataset file {copy}.bin does not exist" in capsys.readouterr().err
