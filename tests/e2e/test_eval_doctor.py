"""`megatron-lite eval` and `megatron-lite doctor`."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_lite import kernels
from megatron_lite.cli import main
from megatron_lite.training.evaluate import load_model


def test_eval_reports_mean_loss_over_overlapping_windows(tiny_args, tmp_path, capsys):
    assert main(["train", *tiny_args]) == 0
    text = tmp_path / "sample.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 12 + "print(add(1, 2))\n")
    capsys.readouterr()
    ckpt = tmp_path / "run" / "checkpoints"
    assert main(["eval", "--checkpoint", str(ckpt), "--text", str(text), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert list(result) == ["loss", "tokens"]  # exactly the documented line
    # independent computation: one prediction per token after the first, windows of seq_len+1
    model, tok = load_model(ckpt, torch.device("cpu"))
    ids = tok.encode(text.read_text())
    assert result["tokens"] == len(ids) and len(ids) > model.cfg.seq_len + 1  # more than one window
    per_token = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, model.cfg.seq_len):
            w = torch.tensor([ids[start : start + model.cfg.seq_len + 1]])
            per_token += F.cross_entropy(model(w[:, :-1])[0], w[0, 1:], reduction="none").tolist()
    assert len(per_token) == len(ids) - 1
    assert abs(result["loss"] - sum(per_token) / len(per_token)) < 1e-5
    # the step directory itself is accepted too
    step_dir = ckpt / "step_00000006"
    assert main(["eval", "--checkpoint", str(step_dir), "--text", str(text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == result
    assert main(["eval", "--checkpoint", str(step_dir), "--text", str(text)]) == 0
    assert "perplexity" in capsys.readouterr().out  # the human-readable line keeps it
    # the run directory instead of its checkpoints: the error says where they are
    assert main(["eval", "--checkpoint", str(ckpt.parent), "--text", str(text)]) == 2
    assert f"a run directory keeps its checkpoints in {str(ckpt)!r}" in capsys.readouterr().err
    # a file of the checkpoint directory (Megatron's habit: its tracker file) names the directory to give
    for file, holder in ((ckpt / "latest", ckpt), (step_dir / "metadata.json", step_dir)):
        assert main(["eval", "--checkpoint", str(file), "--text", str(text)]) == 2
        assert f"; it is a file: give the directory holding it, {str(holder)!r}" in capsys.readouterr().err


def test_eval_bad_paths(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello")
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--text", str(tmp_path / "t.txt")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path), "--text", str(tmp_path)]) == 2
    assert "is a directory; give one UTF-8 text file" in capsys.readouterr().err
    argv = ["eval", "--checkpoint", str(tmp_path), "--text", str(tmp_path / "t.txt"), "--device", "gpu"]
    assert main(argv) == 2  # one error naming the choices, no traceback
    assert "--device gpu is not one of: auto, cpu, cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        argv = ["eval", "--checkpoint", str(tmp_path), "--text", str(tmp_path / "t.txt"), "--device", "cuda"]
        assert main(argv) == 2
        assert "--device cuda but no CUDA device is available" in capsys.readouterr().err


def test_eval_json_failure_is_one_json_line(tmp_path, capsys):
    """`eval --json` printed nothing on stdout for a failure other than a NaN loss (plan --json prints
    its failures as JSON): a script reading the line got no JSON to parse."""
    (tmp_path / "t.txt").write_text("hello")
    for ckpt, text, cause in (
        (tmp_path / "none", tmp_path / "t.txt", "no checkpoint found at"),
        (tmp_path, tmp_path / "missing.txt", "does not exist"),
    ):
        assert main(["eval", "--checkpoint", str(ckpt), "--text", str(text), "--json"]) == 2
        out, err = capsys.readouterr()
        assert err == "" and len(out.splitlines()) == 1, (out, err)
        got = json.loads(out)
        assert list(got) == ["loss", "tokens", "error"] and got["loss"] is None and got["tokens"] is None, got
        assert cause in got["error"], got


def test_eval_text_that_is_no_regular_file_says_what_it_is(tmp_path, capsys):
    """A pipe (`--text <(cmd)`, /dev/stdin) and a dangling link were each said not to exist."""
    fifo, link = tmp_path / "fifo", tmp_path / "link.txt"
    os.mkfifo(fifo)
    link.symlink_to(tmp_path / "gone.txt")
    assert main(["eval", "--checkpoint", str(tmp_path), "--text", str(fifo)]) == 2
    err = capsys.readouterr().err
    assert f"error: --text {str(fifo)!r} is not a regular file (a pipe or a device), and eval reads" in err, err
    assert main(["eval", "--checkpoint", str(tmp_path), "--text", str(link)]) == 2
    err = capsys.readouterr().err
    assert f"does not exist; it is a symbolic link to {str(tmp_path / 'gone.txt')!r}, which does not exist" in err


def test_eval_json_key_of_a_plain_text_file_is_refused(tmp_path, capsys):
    """`--json-key body` on a .txt was ignored: the file was scored on its JSON syntax, without a word
    (and with --held-out, which reads no text)."""
    (tmp_path / "docs.txt").write_text('{"body": "hello"}\n')
    assert (
        main(["eval", "--checkpoint", str(tmp_path), "--text", str(tmp_path / "docs.txt"), "--json-key", "body"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: --json-key body names the text of JSON Lines documents, and {str(tmp_path / 'docs.txt')!r}"
    )
    assert "rename it if it holds JSON Lines, or leave --json-key out" in err, err
    # with --held-out, whose samples are tokens already, the key was ignored as well
    assert main(["eval", "--checkpoint", str(tmp_path), "--held-out", "--json-key", "body"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: --json-key body names the text of a JSON Lines --text, and --held-out scores the run's held-out "
        "samples, tokenized already: leave --json-key out\n"
    ), err


@pytest.mark.parametrize("name, content", [("empty.txt", ""), ("empty.jsonl", '\n{"text": ""}\n')])
def test_eval_of_a_file_without_text_is_refused_before_the_checkpoint_is_read(tmp_path, capsys, name, content):
    """An empty file was refused only after the checkpoint was loaded (minutes for a large model)."""
    (tmp_path / name).write_text(content)
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--text", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: text file {str(tmp_path / name)!r} has 0 tokens, and a score needs at least 2"), err


def test_eval_of_no_checkpoint_names_the_path_to_give(tmp_path, capsys):
    """A run's own file (its config.yaml) was answered with its directory, the run directory eval refuses
    next; a step that is not there was no more than "no checkpoint found"."""
    run, text = tmp_path / "run", tmp_path / "t.txt"
    text.write_text("hello")
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "checkpoints" / "step_00000020").mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    assert main(["eval", "--checkpoint", str(run / "config.yaml"), "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert f"; it is a file of a run directory, whose checkpoints are in {str(run / 'checkpoints')!r}" in err, err
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "step_00000030"), "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert f"; it does not exist, and the steps in {str(run / 'checkpoints')!r} are 10, 20\n" in err, err
    # a step directory without its metadata.json: a save cut short, or one still being written
    (run / "checkpoints" / "step_00000010" / "metadata.json").write_text("{}")
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "step_00000020"), "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert "; it holds no metadata.json: a save that never committed (cut short, or still being written); the " in err
    assert f"committed steps in {str(run / 'checkpoints')!r} are 10\n" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_doctor_says_triton_kernels_need_cuda_or_the_interpreter(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/kernels sets it for the whole session
    assert main(["doctor", "--json"]) == 0
    triton = json.loads(capsys.readouterr().out)["optional"]["triton"]
    assert not triton["usable"] and "needs a CUDA GPU (or TRITON_INTERPRET=1" in triton["detail"], triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["doctor", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["optional"]["triton"]["usable"] == kernels.triton_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_doctor_counts_the_cpu_threads_in_words_that_fit_one(monkeypatch, capsys):
    """One thread per rank is what the sbatch templates set for several ranks per node."""
    for threads, words in ((1, "cpu (1 thread)"), (4, "cpu (4 threads)")):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=threads: n)
        assert main(["doctor", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["devices"] == [words]


def test_doctor_reports_the_kernels_of_the_backend_asked_for(monkeypatch, capsys):
    """``doctor --backend B`` shows what a run with kernels.backend=B takes on this machine, and leaves
    the process's own choice as it was."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["doctor", "--json", "--backend", "torch"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kernel_backend"] == "torch" and info["kernels"]["swiglu"] == "torch: set_backend('torch')"
    if kernels.triton_available() and not torch.cuda.is_available():
        assert main(["doctor", "--json", "--backend", "triton"]) == 0
        swiglu = json.loads(capsys.readouterr().out)["kernels"]["swiglu"]
        assert swiglu.startswith("triton: set_backend('triton')") and "UNUSABLE here" in swiglu, swiglu
    assert kernels.get_backend() == "auto"
    with pytest.raises(SystemExit):
        main(["doctor", "--backend", "cuda"])
    assert "argument --backend: invalid choice: 'cuda'" in capsys.readouterr().err


def test_doctor_reports_versions_and_backends(capsys):
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert set(info["kernels"]) >= {
        "rms_norm",
        "layer_norm",
        "swiglu",
        "apply_rope",
        "cross_entropy",
        "flash_attention",
    }
    assert {"triton", "apex", "transformer_engine", "wandb", "tensorboard"} <= set(info["optional"])
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "kernels (backend=" in out
    # one column for every row, transformer_engine's 18 characters included (it pushed its own row right)
    block = out.split("kernels (backend=")[1].split("optional packages:")[0].splitlines()[1:]
    assert len({len(line) - len(line[2:].split(" ", 1)[1].lstrip()) for line in block}) == 1, block


def test_doctor_json_has_its_documented_keys_for_every_package(capsys):
    """apex and transformer_engine had no "detail" (the text report showed no reason they were not
    usable), and no key of `doctor --json` was documented."""
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {name: sorted(o) for name, o in info["optional"].items()} == {
        name: ["detail", "usable", "version"] for name in info["optional"]
    }
    for name in ("apex", "transformer_engine"):
        o = info["optional"][name]
        assert (o["detail"] == "ok") == o["usable"], (name, o)
        assert o["usable"] or o["detail"] in info["kernels"][name], (name, o)  # the reason the kernels line gives
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    start = readme.index("`doctor --json` prints one object:")
    doc = readme[start : start + 600]
    missing = [k for k in [*info, *info["distributed_backends"], "usable", "version", "detail"] if f"`{k}`" not in doc]
    assert missing == [], missing


def test_doctor_json_failure_is_one_json_line(monkeypatch, capsys):
    """`doctor --json --backend triton` without an importable Triton printed its error on stderr only."""

    def no_triton(name: str) -> None:
        if name == "triton":
            raise RuntimeError("Triton is not installed")

    before = kernels.get_backend()
    monkeypatch.setattr(kernels, "set_backend", no_triton)
    assert main(["doctor", "--json", "--backend", "triton"]) == 2
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out) == {"error": "doctor --backend triton: Triton is not installed"}, (out, err)
    assert main(["doctor", "--backend", "triton"]) == 2
    assert capsys.readouterr().err == "error: doctor --backend triton: Triton is not installed\n"
    assert kernels.get_backend() == before
