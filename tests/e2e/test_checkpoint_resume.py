"""Stopping and resuming is invisible in the losses: by `train.exit_after`, by SIGTERM, with async saves.

fp32 on CPU, one process: the resumed run must continue bitwise on the straight run's curve
(metrics.jsonl of the stopped-and-resumed run, appended across processes, equals the straight one).
"""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from convert_fixtures import noisy_checkpoint
from train_checks import one_error_line

from megatron_lite.cli import main
from megatron_lite.config import load_config
from megatron_lite.training import build
from megatron_lite.training.run_lock import LOCK_FILE
from megatron_lite.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def test_async_saves_resume_twice_bitwise(tiny_args, tmp_path):
    straight = [*tiny_args[:-1], f"log.dir={tmp_path / 's'}"]
    assert main(["train", *straight]) == 0
    parts = [*tiny_args[:-1], f"log.dir={tmp_path / 'p'}", "checkpoint.async=true", "checkpoint.every=1"]
    assert main(["train", *parts, "train.exit_after=2"]) == 0
    assert main(["train", *parts, "train.exit_after=2"]) == 0  # resumed once
    assert main(["train", *parts]) == 0  # and again, to the end
    assert losses(tmp_path / "p") == losses(tmp_path / "s")
    ckpt = tmp_path / "p" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == [LOCK_FILE, "latest", "step_00000005", "step_00000006"]  # keep=2
    _assert_self_describing(ckpt / "step_00000006", steps=6, global_batch=8)


def _assert_self_describing(step_dir: Path, steps: int, global_batch: int) -> None:
    """DESIGN's list, each found in the files: resolved config, parallel layout, global shapes, RNG, data
    position, scheduler and optimizer state, checksums."""
    from safetensors import safe_open

    meta = json.loads((step_dir / "metadata.json").read_text())
    cfg = meta["config"]
    assert cfg["checkpoint"]["async"] is True and cfg["model"]["kv_heads"] == 2  # resolved: given and derived
    assert isinstance(cfg["model"]["ffn_hidden"], int) and isinstance(cfg["optim"]["decay_steps"], int)
    assert {k: meta["layout"][k] for k in ("world_size", "tp", "pp", "vp", "dp")} == dict.fromkeys(
        ("world_size", "tp", "pp", "vp", "dp"), 1
    )
    model = {k.removeprefix("model/") for k in meta["tensors"] if k.startswith("model/")}
    assert meta["tensors"]["model/embed.weight"]["shape"] == [cfg["model"]["vocab_size"], 64]
    # optimizer state: both AdamW moments of every parameter, and its step, which with the saved optim
    # keys is the whole LR schedule's state (it has none of its own)
    for kind in ("exp_avg", "exp_avg_sq"):
        assert {k.removeprefix(f"{kind}/") for k in meta["tensors"] if k.startswith(f"{kind}/")} == model, kind
    assert meta["optimizer"]["step"] == steps and meta["trainer"]["skipped_steps"] == 0
    assert {"lr", "min_lr", "warmup", "decay_steps", "decay_style"} <= set(cfg["optim"])
    assert meta["trainer"]["consumed_samples"] == steps * global_batch  # the data position
    assert meta["lineage"]["datasets"][0]["consumed_samples"] == steps * global_batch
    (rank,) = meta["ranks"]
    with safe_open(step_dir / rank["file"], "pt") as f:
        assert rank["rng"] and set(rank["rng"]) <= set(f.keys())  # this rank's RNG state, stored
    for name, info in meta["files"].items():  # every file beside metadata.json, with its checksum
        data = (step_dir / name).read_bytes()
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name
    assert set(meta["files"]) == {p.name for p in step_dir.iterdir()} - {"metadata.json"}


def test_async_save_runs_behind_training(tiny_args, tmp_path, monkeypatch):
    """The write happens in a thread: while a slow disk writes step 2, training goes on to step 4
    (where the next save waits for it); every checkpoint is still committed."""
    from megatron_lite.checkpoint import writer

    slow, progressed, holder = writer.write_tensor_file, [], {}

    def delayed(path, tensors):
        # the first two writes last until training is two steps further (or 20 s pass: a save that
        # blocked training would never see it move), whatever the machine's load
        before, deadline = holder["trainer"].step, time.monotonic() + 20
        while len(progressed) < 2 and holder["trainer"].step < before + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        progressed.append(holder["trainer"].step - before)
        return slow(path, tensors)

    monkeypatch.setattr(writer, "write_tensor_file", delayed)
    holder["trainer"] = Trainer(load_config(None, [*tiny_args, "checkpoint.async=true", "checkpoint.every=2"]))
    holder["trainer"].fit()
    assert progressed[:2] == [2, 2], progressed  # steps 3-4 and 5-6 ran during the writes of 2 and 4
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_sigterm_saves_at_the_step_boundary_and_exits_zero(tiny_args, tmp_path):
    """SIGTERM to `python -m megatron_lite.train`: exit 0 with a checkpoint of the step it reached,
    and the resumed run continues the straight curve bitwise."""
    common = [*tiny_args[:-1], "train.steps=300", "train.eval_iters=1"]
    run = [*common, f"log.dir={tmp_path / 'p'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_lite.train", *run], env=env, stderr=subprocess.PIPE)
    metrics = tmp_path / "p" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be signalled"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    stopped = losses(tmp_path / "p")[-1][0]
    assert 2 <= stopped < 300, stopped
    latest = (tmp_path / "p" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped:08d}"
    assert main(["train", *run]) == 0  # resume to the end
    assert main(["train", *common, f"log.dir={tmp_path / 's'}"]) == 0
    assert losses(tmp_path / "p") == losses(tmp_path / "s")


@pytest.mark.parametrize("stop", ["exit_after", "signal"])
def test_the_step_a_run_stops_at_is_logged_once_and_the_resumed_run_goes_on_from_it(stop, tiny_args, tmp_path):
    """log.every=4, stopped at step 3 by train.exit_after or a preemption signal: step 3 has its
    metrics row (it had none: not a multiple of 4), and the resumed run logs on from step 4."""
    args = [*(a for a in tiny_args if not a.startswith("log.every=")), "log.every=4"]
    first = Trainer(load_config(None, [*args, "train.exit_after=3"] if stop == "exit_after" else args))
    if stop == "signal":
        train_step = first.train_step

        def signalled_at_step_3() -> dict:
            out = train_step()
            if first.step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler: stop at this step's end
            return out

        first.train_step = signalled_at_step_3
    assert [r["step"] for r in first.fit()] == [3]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert main(["train", *args]) == 0  # resumed, to train.steps=6
    assert [step for step, _ in losses(tmp_path / "run")] == [3, 4, 6]


def _mtimes(root: Path) -> dict[Path, int]:
    """Every path under ``root`` but the lock file (it names the last run that held the directory)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.name != LOCK_FILE}


def test_resume_with_other_model_settings_is_refused_naming_each(tiny_args, tmp_path, capsys, caplog):
    """Settings that keep every tensor shape (rope_theta, seq_len) still change the model: resuming
    with them is one error listing each with both values; a new run from the weights is the way."""
    args = [*tiny_args, "train.steps=2"]
    assert main(["train", *args]) == 0
    ckpt = tmp_path / "run" / "checkpoints"
    before = _mtimes(ckpt)
    changed = ["model.rope_theta=500000.0", "model.seq_len=64"]
    assert main(["train", *args, "train.steps=3", *changed]) == 2
    err = one_error_line(capsys)
    assert "model.rope_theta: checkpoint 10000.0, now 500000.0" in err, err
    assert "model.seq_len: checkpoint 32, now 64" in err, err
    assert err.count("checkpoint ") >= 2 and "vocab_size" not in err and "kv_heads" not in err, err
    assert f"checkpoint.init_from={ckpt / 'step_00000002'}" in err and "new checkpoint.dir" in err, err
    assert _mtimes(ckpt) == before  # nothing saved is touched
    # the advice works: a new run from these weights with the new settings
    new = [*tiny_args[:-1], f"log.dir={tmp_path / 'new'}", "train.steps=1", *changed]
    assert main(["train", *new, f"checkpoint.init_from={ckpt / 'step_00000002'}"]) == 0
    # resolved against resolved: spelling out the values that defaults and the tokenizer filled in is the same run;
    # another seed resumes, with a warning that the data order changes
    same = ["model.vocab_size=512", "model.norm=rmsnorm", "model.activation=swiglu", "model.tie_embeddings=false"]
    caplog.set_level(logging.INFO, logger="megatron_lite")
    assert main(["train", *args, "train.steps=3", *same, "train.seed=7"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("train.seed=7 differs from the checkpoint's train.seed=1234" in w for w in warnings), warnings
    assert "resumed from" in caplog.text and losses(tmp_path / "run")[-1][0] == 3


def test_a_resume_naming_another_init_from_warns_and_keeps_recording_the_runs_start(tiny_args, tmp_path, caplog):
    """Two imports trained in one log.dir: the second config's init_from B was never loaded, yet the
    resumed run's checkpoints recorded B as their start."""
    base = [a for a in tiny_args if not a.startswith("train.steps=")]
    assert main(["train", *base, "train.steps=2"]) == 0
    start = str(tmp_path / "run" / "checkpoints" / "step_00000002")  # model A
    other = tmp_path / "b"  # model B
    other.mkdir()
    args = [*base[:-1], f"log.dir={tmp_path / 'x'}"]
    assert main(["train", *args, "train.steps=2", f"checkpoint.init_from={start}", "train.exit_after=1"]) == 0
    caplog.set_level(logging.INFO, logger="megatron_lite")
    assert main(["train", *args, "train.steps=2", f"checkpoint.init_from={other}"]) == 0
    (warned,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    want = f"checkpoint.init_from={str(other)!r} is not loaded: this run resumes from its own checkpoint"
    assert warned.startswith(want) and "at step 1" in warned and f"checkpoint.init_from={start!r}" in warned, warned
    assert "new log.dir (or checkpoint.dir)" in warned, warned
    meta = json.loads((tmp_path / "x" / "checkpoints" / "step_00000002" / "metadata.json").read_text())
    assert meta["config"]["checkpoint"]["init_from"] == start
    assert load_config(tmp_path / "x" / "config.yaml", []).checkpoint.init_from == start
    caplog.clear()  # the same start, spelled as given or left out: nothing to say
    for same in ([f"checkpoint.init_from={start}"], []):
        assert main(["train", *args, "train.steps=3", *same]) == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING], caplog.messages


def test_a_resume_from_a_weights_only_checkpoint_records_it_as_the_runs_start(
    tiny_args, small_corpus, tmp_path, caplog
):
    """checkpoint.resume naming an import (weights only) starts from its weights: the run's checkpoints and
    config.yaml name that import as checkpoint.init_from, not the init_from the config happened to carry."""
    imported = noisy_checkpoint(tmp_path / "imp", small_corpus[1], kv_heads=2)
    args = [a for a in tiny_args if not a.startswith("train.steps=")]
    caplog.set_level(logging.INFO, logger="megatron_lite")
    unused = tmp_path / "unused"
    assert (
        main(["train", *args, "train.steps=4", f"checkpoint.resume={imported}", f"checkpoint.init_from={unused}"]) == 0
    )
    # the import is a start, not a run to continue: nothing of its config's data settings is compared
    (warned,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned.startswith(f"checkpoint.init_from={str(unused)!r} is not loaded: this run starts from {imported}")
    assert "set checkpoint.resume=none" in warned, warned
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "metadata.json").read_text())
    assert meta["config"]["checkpoint"]["init_from"] == str(imported)
    assert load_config(tmp_path / "run" / "config.yaml", []).checkpoint.init_from == str(imported)
    caplog.clear()  # the same start named both ways, or by its root: nothing to say
    for n, same in enumerate((imported, imported.parent)):
        again = [*args[:-1], f"log.dir={tmp_path / str(n)}", "train.steps=2", f"checkpoint.resume={imported}"]
        assert main(["train", *again, f"checkpoint.init_from={same}"]) == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING], caplog.messages


def test_resume_at_or_past_train_steps_says_nothing_to_train(tiny_args, tmp_path, caplog):
    args = [*tiny_args, "train.steps=2"]
    assert main(["train", *args]) == 0
    ckpt = tmp_path / "run" / "checkpoints"
    before = _mtimes(ckpt)
    caplog.set_level(logging.INFO, logger="megatron_lite.training.trainer")
    for steps in (2, 1):
        caplog.clear()
        assert main(["train", *args, f"train.steps={steps}"]) == 0
        said = f"checkpoint step 2 >= train.steps {steps}: nothing to train; to train on, raise train.steps above 2"
        assert any(m.startswith(said) for m in caplog.messages), caplog.messages
    assert _mtimes(ckpt) == before  # the loaded checkpoint is not saved again


def test_exit_after_says_why_it_stopped(tiny_args, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="megatron_lite.training.trainer")
    assert main(["train", *tiny_args, "train.exit_after=2"]) == 0
    want = "stopped after train.exit_after=2 steps at step 2 of 6; rerun with checkpoint.resume=auto to continue"
    assert caplog.messages[-2:][0] == want, caplog.messages
    # then the launch's summary, the last line, naming the checkpoint to resume from
    summary = "run summary: steps 1-2 of 6 (2 this launch) in "
    assert caplog.messages[-1].startswith(summary), caplog.messages
    assert caplog.messages[-1].endswith(f" | checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_00000002'}")
    caplog.clear()
    assert main(["train", *tiny_args, "train.exit_after=10"]) == 0  # reaches train.steps: nothing to say
    assert not any(m.startswith("stopped") for m in caplog.messages), caplog.messages
    assert caplog.messages[-1].startswith("run summary: steps 3-6 of 6 (4 this launch) in "), caplog.messages


def test_a_resume_with_other_steps_batch_sizes_and_dtype_trains_on_and_names_each_change_in_one_line(
    tiny_args, tmp_path, caplog
):
    """Settings a run may change on resume (as Megatron allows): it trains on from the checkpoint's
    samples (consumed_samples carries over into the larger global batch), and one startup line names
    each change; a relaunch that changes nothing (train.exit_after is this process's) names none."""
    kept = [a for a in tiny_args if not a.startswith(("train.steps=", "train.micro_batch_size=", "train.global"))]
    base = [*kept, "optim.decay_steps=2"]  # the learning-rate schedule of train.steps=4 throughout
    run = [*base, "train.steps=3", "train.micro_batch_size=4", "train.global_batch_size=8"]
    assert main(["train", *run, "train.exit_after=2"]) == 0
    caplog.set_level(logging.INFO, logger="megatron_lite")
    assert main(["train", *run]) == 0
    assert not [m for m in caplog.messages if m.startswith("settings changed")], caplog.messages
    caplog.clear()
    changed = ["train.steps=4", "train.micro_batch_size=2", "train.global_batch_size=16", "train.dtype=bf16"]
    assert main(["train", *base, *changed, "model.init_std=0.01"]) == 0
    (line,) = [m for m in caplog.messages if m.startswith("settings changed")]
    assert line == (
        "settings changed since the checkpoint (saved -> now): model.init_std 0.02 -> 0.01; train.steps 3 -> 4; "
        "train.micro_batch_size 4 -> 2; train.global_batch_size 8 -> 16; train.dtype auto -> bf16"
    ), line
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.messages
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["consumed_samples"]) for r in rows] == [(1, 8), (2, 16), (3, 24), (4, 40)]


def _swapped_tokenizer(tok: Path, out: Path) -> Path:
    """``tok`` with two of its pieces' ids swapped: the same vocabulary size, other ids."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.read_bytes())
    a, b = proto.pieces[300], proto.pieces[301]
    a.piece, b.piece = b.piece, a.piece
    out.write_bytes(proto.SerializeToString())
    return out


def test_a_resume_with_another_tokenizer_of_the_same_size_is_refused_naming_both(
    tiny_args, small_corpus, tmp_path, capsys
):
    """Every tensor fits, but token ids stand for other text: one error naming both tokenizers and the
    two ways on (the checkpoint's tokenizer, or a new run from the weights); nothing saved is touched."""
    prefix, tok = small_corpus
    assert main(["train", *tiny_args, "train.exit_after=2"]) == 0
    other = tmp_path / "other"
    for suffix in (".bin", ".idx"):  # the same tokens, with no record of the tokenizer that made them
        other.with_suffix(suffix).write_bytes(Path(prefix + suffix).read_bytes())
    swapped = _swapped_tokenizer(tok, tmp_path / "swapped.model")
    ckpt = tmp_path / "run" / "checkpoints"
    before = _mtimes(ckpt)
    assert main(["train", *tiny_args, f"data.path={other}", f"data.tokenizer={swapped}"]) == 2
    err = one_error_line(capsys)
    step = ckpt / "step_00000002"
    assert f"the tokenizer {swapped} is not the one checkpoint {step} was trained with, {tok}" in err, err
    assert f"data.tokenizer={tok}" in err and f"checkpoint.init_from={step}" in err, err
    assert _mtimes(ckpt) == before


def test_a_resume_on_an_embedded_corpus_of_another_python_names_the_runs_corpus(
    tiny_args, corpus_files, tmp_path, monkeypatch, capsys
):
    """Under another Python the embedded corpus and its tokenizer are built from another standard library:
    the resume is refused (another tokenizer), and the way on it names is the run's own corpus, as its
    lineage records it (setting data.tokenizer alone is refused: the embedded corpus has its own)."""
    real, files = build.prepare_default_corpus, [corpus_files]

    def stdlib(cache_dir, vocab_size, progress=True):  # this interpreter's standard library: files[0]
        return real(cache_dir, vocab_size, progress=progress, files=files[0])

    monkeypatch.setattr(build, "prepare_default_corpus", stdlib)
    monkeypatch.chdir(tmp_path)
    own = [a for a in tiny_args if not a.startswith(("data.path=", "data.tokenizer="))]
    assert main(["train", *own, "data.vocab_size=512", "train.exit_after=1"]) == 0
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    lineage = json.loads((step / "metadata.json").read_text())["lineage"]
    files[0] = corpus_files[:-1]  # another Python: one module fewer in its standard library
    assert main(["train", *own, "data.vocab_size=512"]) == 2
    err = one_error_line(capsys)
    prefix, tok = (tmp_path / p for p in (lineage["datasets"][0]["prefix"], lineage["tokenizer"]["path"]))
    run_data = f"data.path={prefix} data.tokenizer={tok}"
    assert (
        "the tokenizer .cache/megatron-lite/" in err
        and f"the run's embedded corpus, while it is there: {run_data} (" in err
    )
    assert main(["train", *own, "data.vocab_size=512", *run_data.split()]) == 0  # the way on it named
