"""`megatron-lite train` refusing bad input at setup: one clear error line, before step 1, nothing saved over."""

import json
import re
import sys
from pathlib import Path

import pytest
from train_checks import one_error_line

from megatron_lite.cli import main
from megatron_lite.training.run_lock import LOCK_FILE


@pytest.mark.parametrize(
    "extra,message",
    [
        (["train.steps=0"], "train.steps must be a positive integer"),
        (["model.hidden=30"], r"30 % 4 = 2"),
        (["model.layrs=2"], "did you mean 'model.layers'"),
        (["data.path=/nonexistent/prefix"], "does not exist"),
        (["model.vocab_size=100"], "smaller than the tokenizer's vocabulary"),
        (["checkpoint.resume=/nonexistent/ckpt"], "does not exist, nor does '/nonexistent'"),
    ],
)
def test_bad_input_is_one_clear_error(tiny_args, extra, message, capsys):
    assert main(["train", *tiny_args, *extra]) == 2
    err = one_error_line(capsys)
    assert re.search(message, err), err


@pytest.mark.parametrize("key", ["checkpoint.dir", "log.dir"])
def test_unusable_run_directory_fails_at_setup_naming_key_path_and_reason(tiny_args, tmp_path, key, capsys):
    afile = tmp_path / "afile"
    afile.write_text("a regular file")
    run = tmp_path / "run"
    for bad, reason in [(afile / "sub", "Not a directory"), (afile, "exists and is not a directory")]:
        assert main(["train", *tiny_args, f"{key}={bad}"]) == 2
        err = one_error_line(capsys)
        assert f"{key}='{bad}'" in err and reason in err, err
        assert not (run / "metrics.jsonl").exists()  # refused before training, not at the first save
    if Path("/proc/self").is_dir():  # procfs refuses new directories, even to root
        assert main(["train", *tiny_args, f"{key}=/proc/megatron-lite-ck"]) == 2
        err = one_error_line(capsys)
        assert f"{key}='/proc/megatron-lite-ck'" in err and "No such file or directory" in err, err


@pytest.mark.parametrize(
    "key,module,package",
    [("log.wandb", "wandb", "wandb"), ("log.tensorboard", "torch.utils.tensorboard", "tensorboard")],
)
def test_a_tracker_asked_for_without_its_package_fails_at_setup(
    tiny_args, tmp_path, monkeypatch, key, module, package, capsys
):
    monkeypatch.setitem(sys.modules, module, None)  # what an import of a package not installed meets
    assert main(["train", *tiny_args, f"{key}=true"]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {key}=true but {module} cannot be imported (") and err.endswith(
        f"): install it (pip install {package}) or set {key}=false\n"
    ), err
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.suffix in (".yaml", ".jsonl")]  # before setup wrote


def test_resume_none_refuses_to_save_over_an_earlier_run(tiny_args, tmp_path, capsys):
    args = [*tiny_args, "train.steps=2", "checkpoint.resume=none"]
    assert main(["train", *args]) == 0  # a fresh directory: resume=none starts from scratch
    ckpt = tmp_path / "run" / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.name != LOCK_FILE}  # it names each holder
    assert main(["train", *args, "train.steps=3"]) == 2
    err = one_error_line(capsys)
    assert f"checkpoint.dir='{ckpt}'" in err and "newest: step 2" in err, err
    assert "checkpoint.resume=auto" in err and "new checkpoint.dir" in err, err
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.name != LOCK_FILE} == before  # nothing saved
    # the run's config.yaml relaunches it as it continues (resume=auto), not as this launch's one-off none
    assert "resume: auto" in (tmp_path / "run" / "config.yaml").read_text()
    assert main(["train", "--config", str(tmp_path / "run" / "config.yaml"), "train.steps=3"]) == 0
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_triton_backend_without_cuda_fails_at_setup(tiny_args, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/kernels sets it for the whole session
    assert main(["train", *tiny_args, "kernels.backend=triton"]) == 2
    err = one_error_line(capsys)
    assert "kernels.backend=triton needs a CUDA GPU (or TRITON_INTERPRET=1" in err, err
    assert "use kernels.backend=auto" in err and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_dataset_made_with_another_tokenizer_is_refused(tiny_args, small_corpus, tmp_path, capsys):
    prefix, tok = small_corpus
    for ext in (".bin", ".idx"):
        (tmp_path / f"data{ext}").write_bytes(Path(prefix + ext).read_bytes())
    meta = json.loads(Path(prefix + ".json").read_text())
    (tmp_path / "data.json").write_text(
        json.dumps({**meta, "tokenizer": "/elsewhere/big.model", "tokenizer_sha256": "ab" * 32})
    )
    assert main(["train", *tiny_args, f"data.path={tmp_path / 'data'}"]) == 2
    err = one_error_line(capsys)
    assert "/elsewhere/big.model" in err and f"data.tokenizer={tok}" in err and "megatron-lite preprocess" in err


def test_missing_config_file_and_corrupt_idx(tiny_args, tmp_path, small_corpus, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    prefix, _ = small_corpus
    bad = tmp_path / "bad"
    (tmp_path / "bad.bin").write_bytes(Path(prefix + ".bin").read_bytes())
    (tmp_path / "bad.idx").write_bytes(Path(prefix + ".idx").read_bytes()[:-7])  # truncated index
    assert main(["train", *tiny_args, f"data.path={bad}"]) == 2
    assert "idx" in capsys.readouterr().err


def test_a_data_path_entry_that_is_no_dataset_prefix_is_refused_naming_the_fix(
    tiny_args, small_corpus, tmp_path, capsys
):
    """A dataset's file, a directory or glob of datasets, a text file not tokenized yet: each refused
    with the prefixes to give (or the command that makes one), not as a missing PATH.bin."""
    prefix, _ = small_corpus
    data, empty = tmp_path / "data", tmp_path / "empty"
    data.mkdir(), empty.mkdir()
    for name in ("a", "b"):
        for ext in (".bin", ".idx"):
            (data / (name + ext)).symlink_to(prefix + ext)
    (data / "notes.txt").write_text("x = 1\n")
    text, tok = tmp_path / "text", small_corpus[1]
    text.mkdir()
    (text / "a.txt").write_text("x = 1\n")
    listed = f"list the datasets: data.path={data}/a,{data}/b"
    for given, want in (
        (f"{prefix}.bin", f"data.path takes dataset prefixes without .bin/.idx/.json: {prefix}.bin -> {prefix}"),
        (f"{data}/a.json", f"without .bin/.idx/.json: {data}/a.json -> {data}/a"),
        (str(data), f"data.path={data} is a directory, not a dataset prefix (PREFIX for PREFIX.bin/.idx); {listed}"),
        (f"{data}/*", f"data.path={data}/* is a glob, not a dataset prefix (PREFIX for PREFIX.bin/.idx); {listed}"),
        (str(empty), "it holds no dataset (PREFIX.bin with PREFIX.idx): build one with `megatron-lite preprocess"),
        (f"{data}/notes.txt", f"tokenize it first: `megatron-lite preprocess --input {data}/notes.txt --tokenizer"),
        # a folder of text files: the command to run, its glob and the run's data.tokenizer filled in
        (str(text), f"--input '{text}/*.txt' --tokenizer {tok} --output data/NAME`, then data.path=data/NAME"),
    ):
        assert main(["train", *tiny_args, f"data.path={given}"]) == 2
        assert want in one_error_line(capsys), given
