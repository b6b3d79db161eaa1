"""`megatron-lite train` end to end: metrics, checkpoints, resume, determinism, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lite.cli import main


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_metrics_config_and_checkpoint(tiny_args, tmp_path):
    assert main(["train", *tiny_args]) == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "consumed_samples"):
        assert all(key in r for r in records), key
    assert records[-1]["consumed_samples"] == 6 * 8
    assert "eval_loss" in records[-1] and records[-1]["tokens_per_s"] > 0
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_same_seed_gives_bitwise_identical_losses(tiny_args, tmp_path):
    a = [*tiny_args[:-1], f"log.dir={tmp_path / 'a'}"]
    b = [*tiny_args[:-1], f"log.dir={tmp_path / 'b'}"]
    assert main(["train", *a]) == 0 and main(["train", *b]) == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    c = [*tiny_args[:-1], f"log.dir={tmp_path / 'c'}", "train.seed=7"]
    assert main(["train", *c]) == 0
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


def test_stop_and_resume_continues_the_same_curve(tiny_args, tmp_path):
    straight = [*tiny_args[:-1], f"log.dir={tmp_path / 's'}"]
    assert main(["train", *straight]) == 0
    parts = [*tiny_args[:-1], f"log.dir={tmp_path / 'p'}"]
    assert main(["train", *parts, "train.exit_after=2"]) == 0
    assert main(["train", *parts, "train.exit_after=2"]) == 0  # resumed once
    assert main(["train", *parts]) == 0  # and again, to the end
    assert losses(tmp_path / "p") == losses(tmp_path / "s")


def test_loss_falls(tiny_args, tmp_path):
    args = [*tiny_args, "train.steps=30", "optim.warmup=5"]
    assert main(["train", *args]) == 0
    curve = losses(tmp_path / "run")
    assert curve[-1] < curve[0] - 1.0, curve


@pytest.mark.parametrize(
    "extra,message",
    [
        (["train.steps=0"], "train.steps must be a positive integer"),
        (["model.hidden=30"], r"30 % 4 = 2"),
        (["model.layrs=2"], "did you mean 'model.layers'"),
        (["data.path=/nonexistent/prefix"], "does not exist"),
        (["model.vocab_size=100"], "smaller than the tokenizer's vocabulary"),
        (["checkpoint.resume=/nonexistent/ckpt"], "is not a checkpoint directory"),
    ],
)
def test_bad_input_is_one_clear_error(tiny_args, extra, message, capsys):
    assert main(["train", *tiny_args, *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_missing_config_file_and_corrupt_idx(tiny_args, tmp_path, small_corpus, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    prefix, _ = small_corpus
    bad = tmp_path / "bad"
    (tmp_path / "bad.bin").write_bytes(Path(prefix + ".bin").read_bytes())
    (tmp_path / "bad.idx").write_bytes(Path(prefix + ".idx").read_bytes()[:-7])  # truncated index
    assert main(["train", *tiny_args, f"data.path={bad}"]) == 2
    assert "idx" in capsys.readouterr().err


def test_console_script_and_module_entry_points(tiny_args, tmp_path):
    """The installed `megatron-lite` script and `python -m megatron_lite.train` are the same command."""
    args = [*tiny_args[:-1], "train.steps=2"]
    exe = [sys.executable, "-c", "import sys; from megatron_lite.cli import main; sys.exit(main())"]
    r1 = subprocess.run([*exe, "train", *args, f"log.dir={tmp_path / 'x'}"], capture_output=True, text=True)
    r2 = subprocess.run(
        [sys.executable, "-m", "megatron_lite.train", *args, f"log.dir={tmp_path / 'y'}"],
        capture_output=True,
        text=True,
    )
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    assert losses(tmp_path / "x") == losses(tmp_path / "y")
    r3 = subprocess.run(["megatron-lite", "train", *args, "train.steps=-1"], capture_output=True, text=True)
    assert r3.returncode == 2 and r3.stderr.startswith("error: train.steps"), r3.stderr


def test_compiled_blocks_train_like_eager(tiny_args, tmp_path):
    """train.compile=true compiles each block in place (inductor): the same losses up to the
    reordering of fused elementwise ops (rtol 1e-5 in fp32)."""
    eager = [*tiny_args[:-1], f"log.dir={tmp_path / 'eager'}", "train.steps=3"]
    compiled = [*tiny_args[:-1], f"log.dir={tmp_path / 'compiled'}", "train.steps=3", "train.compile=true"]
    assert main(["train", *eager]) == 0 and main(["train", *compiled]) == 0
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)


def test_only_rank_zero_prints_a_launch_wide_error(monkeypatch, capsys):
    """Under torchrun every rank reaches the same verdict; one `error:` line, not one per rank."""
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "train.stpes=3"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "train.stpes=3"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown config key 'train.stpes'")
