"""`megatron-lite launch slurm` submitting: sbatch missing, rejecting the script, or the job failing.
A stand-in ``sbatch`` on PATH plays SLURM's part."""

from __future__ import annotations

import os
from pathlib import Path

from tiny_config import tiny

from megatron_lite.cli import main

TINY = tiny(2)


def _launch(run: Path, capfd, *options: str) -> str:
    """stderr of a 1-node CPU ``launch slurm`` into ``run`` (sbatch's own lines included), which must
    fail with one error line, its last."""
    args = ["launch", "slurm", "--cpu", "--nodes", "1", "--procs-per-node", "1", *options, *TINY, f"log.dir={run}"]
    capfd.readouterr()
    assert main(args) == 2
    err = capfd.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
    return err


def _fake_sbatch(bin_dir: Path, monkeypatch, body: str) -> None:
    """An ``sbatch`` on PATH that runs ``body`` (a shell script)."""
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_no_sbatch_on_path_says_where_to_run(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    err = _launch(tmp_path / "run", capfd)
    assert "sbatch not found: run on a SLURM login node, or use --dry-run to print the script" in err


def test_a_script_sbatch_rejects_is_named_with_its_exit_status(tmp_path, monkeypatch, capfd):
    _fake_sbatch(tmp_path / "bin", monkeypatch, 'echo "sbatch: error: invalid partition specified" >&2; exit 1')
    err = _launch(tmp_path / "run", capfd)
    script = tmp_path / "run" / "slurm" / "train.sbatch"
    assert f"sbatch rejected {script} (exit 1); see its message above" in err
    assert "invalid partition specified" in err and script.is_file()


def test_a_failed_job_names_its_output_file(tmp_path, monkeypatch, capfd):
    """With --wait sbatch's exit status is the job's: a failed job names the log to read."""
    _fake_sbatch(tmp_path / "bin", monkeypatch, 'echo "4242;cluster"; case "$*" in *--wait*) exit 3;; esac')
    run = tmp_path / "run"
    assert main(["launch", "slurm", "--cpu", "--nodes", "1", "--procs-per-node", "1", *TINY, f"log.dir={run}"]) == 0
    assert "submitted job 4242" in capfd.readouterr().out  # without --wait: submitted is all sbatch says
    written = (run / "slurm" / "train.sbatch").read_text().splitlines()  # its own resubmit command on top
    assert written[:2] == ["#!/bin/bash", f"# written by `megatron-lite launch slurm`; resubmit it from {Path.cwd()}: "
                           f"sbatch {run / 'slurm' / 'train.sbatch'}"]  # fmt: skip
    err = _launch(run, capfd, "--wait")
    assert f"job 4242 failed (sbatch exit 3); its output: {run / 'slurm' / 'slurm-4242.out'}" in err


def test_a_log_dir_with_a_space_is_refused_naming_log_dir(tmp_path, capfd):
    """The job's output file lies under log.dir, and an #SBATCH line cuts a value at its first space."""
    run = tmp_path / "my runs"
    err = _launch(run, capfd, "--dry-run")
    assert f"sbatch --output='{run / 'slurm' / 'slurm-%j.out'}' holds a space, which sbatch cannot take" in err
    assert "give log.dir (the job's output file lies under it) a value without spaces" in err
