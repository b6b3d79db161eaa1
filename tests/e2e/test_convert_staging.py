"""`convert to-hf`'s staging directory ``.tmp-<out>``: the exporter holds the lock on its marker for
its whole life (``tempfiles.py``), so a later export removes only one whose writer is gone, on any
host, and refuses anything it cannot tell is a dead export of its own."""

import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from convert_fixtures import noisy_checkpoint, run_error, snapshot

import megatron_lite
from megatron_lite.cli import main
from megatron_lite.data import tempfiles

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
to_hf_module = importlib.import_module("megatron_lite.convert.to_hf")  # `convert.to_hf` is the function
ROOT = Path(megatron_lite.__file__).parents[1]

# An export that stops once its weights, configs and tokenizer are staged, and prints its staging
# directory: a run caught mid-export, to be killed or left running. Its marker names another host, as
# a run on another machine sharing the filesystem (or in another pid namespace) would.
_PAUSED_EXPORT = """
import importlib, socket, sys, time
to_hf = importlib.import_module("megatron_lite.convert.to_hf")
socket.gethostname = lambda: "node-b"

def paused(src, tmp):
    print(tmp, flush=True)
    time.sleep(3600)

to_hf._write_lineage = paused
to_hf.to_hf(sys.argv[1], sys.argv[2], check=False)
"""


@pytest.fixture(scope="module", name="ckpt")
def ckpt_fixture(small_corpus, tmp_path_factory) -> Path:
    """A random llama checkpoint (step directory) with its tokenizer."""
    return noisy_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints", small_corpus[1])


def to_hf(ckpt: Path, out: Path) -> list[str]:
    return ["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(out), "--no-verify"]


def test_a_live_exporters_staging_is_kept_and_a_killed_ones_removed_by_the_next_export(ckpt, tmp_path, caplog, capsys):
    out = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-c", _PAUSED_EXPORT, str(ckpt), str(out)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)  # bounds a hang, times nothing
        line = proc.stdout.readline().strip() if ready else ""
        assert line, f"the paused export did not start writing:\n{proc.kill() or proc.communicate()[1]}"
        staging = Path(line)
        assert staging == tmp_path / ".tmp-hf" and (staging / "model.safetensors").is_file()
        before = snapshot(staging)
        err = run_error(to_hf(ckpt, out), capsys)
        run = f"pid {proc.pid} on node-b, started "
        assert f"another to-hf run ({run}" in err and f"is writing the export for --out {out} in {staging}" in err
        assert snapshot(staging) == before and not out.exists() and proc.poll() is None
        proc.kill()  # SIGKILL, mid-export: its lock goes with it
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert main(to_hf(ckpt, out)) == 0
        assert f"removing {staging}, an unfinished export left by an earlier to-hf run ({run}" in caplog.text
        assert not staging.exists() and (out / "megatron_lite.json").is_file()
    finally:
        proc.kill()
        proc.communicate(timeout=60)


def test_without_file_locks_no_staging_directory_is_removed(ckpt, tmp_path, monkeypatch, capsys):
    """No lock can show the run that left it gone: one error naming it and how to remove it by hand."""
    monkeypatch.setattr(tempfiles, "lock", lambda fd, wait: None)
    out, staging = tmp_path / "hf", tmp_path / ".tmp-hf"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"\0" * 8)
    (staging / to_hf_module.STAGING_MARKER).write_text(json.dumps({"pid": 1, "host": "elsewhere"}) + "\n")
    before = snapshot(staging)
    err = run_error(to_hf(ckpt, out), capsys)
    assert f"{staging} holds an unfinished export for --out {out} (pid 1 on elsewhere, started None)" in err
    assert "has no file locks" in err and f"delete it by hand (rm -r {staging}) and run again" in err
    assert snapshot(staging) == before and not out.exists()
    assert main(to_hf(ckpt, tmp_path / "hf2")) == 0  # an export still works there
    assert (tmp_path / "hf2" / "config.json").is_file() and not (tmp_path / ".tmp-hf2").exists()


def test_to_hf_removes_only_its_own_unfinished_export_beside_out(ckpt, tmp_path, monkeypatch, caplog, capsys):
    """A failed verification keeps the export in .tmp-<out> for inspection; the next run removes it, saying so."""
    from megatron_lite.checkpoint import hf

    out, staging = tmp_path / "hf", tmp_path / ".tmp-hf"
    with monkeypatch.context() as m:  # k and v heads swapped: verification fails
        m.setattr(hf.QKV, "to_hf", lambda t, m: [t.split(hf._qkv_rows(m))[i] for i in (0, 2, 1)])
        err = run_error(["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(out)], capsys)
    assert f"left in {staging} for inspection (the next to-hf run to {out} removes it)" in err
    marker = json.loads((staging / to_hf_module.STAGING_MARKER).read_text())
    assert (marker["pid"], marker["out"]) == (os.getpid(), str(out)) and not out.exists()
    assert main(["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(out), "--no-verify"]) == 0
    assert (
        f"removing {staging}, an unfinished export left by an earlier to-hf run (pid {os.getpid()} on " in caplog.text
    )
    assert not staging.exists() and not (out / to_hf_module.STAGING_MARKER).exists()
    assert all(to_hf_module._EXPORT_FILE.fullmatch(p.name) for p in out.iterdir())  # the names it may remove


@pytest.mark.parametrize("kind", ["not ours", "a file", "ours with a user file"])
def test_to_hf_refuses_a_staging_path_it_cannot_tell_is_a_dead_export_of_its_own(ckpt, tmp_path, kind, capsys):
    out, staging = tmp_path / "hf", tmp_path / ".tmp-hf"
    run = {"format": "megatron-lite/to-hf-staging-v1", "pid": os.getpid(), "host": socket.gethostname()}
    if kind == "a file":
        staging.write_text("notes\n")
    else:
        staging.mkdir()
        (staging / "config.json").write_text("{}\n")
    if kind.startswith("ours"):
        (staging / to_hf_module.STAGING_MARKER).write_text(json.dumps(run))
    if kind == "ours with a user file":
        (staging / "notes.txt").write_text("my notes\n")
    before = snapshot(staging)
    err = run_error(["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(out), "--no-verify"], capsys)
    expected = {
        "not ours": f"{staging} is in the way: to-hf writes the export for --out {out} there first, and it is not "
        f"an unfinished export of ours (no {to_hf_module.STAGING_MARKER} in it), so it was left untouched; move or "
        "delete it, or choose another --out",
        "ours with a user file": f"{staging}, an unfinished export an earlier to-hf left, now also holds notes.txt, "
        "which to-hf does not write, so it was left untouched",
    }
    assert expected.get(kind, expected["not ours"]) in err, err
    assert snapshot(staging) == before and not out.exists()
