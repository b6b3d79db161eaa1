"""Shared by the e2e tests: the one error line of a refused command (train, convert...) and of a refused
rank, a run's log.dir, a command run on a pseudo-terminal, a one-step run on relative data paths."""

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import termios
from pathlib import Path


def one_error_line(capsys) -> str:
    """stderr of a refused command: one ``error:`` line, no traceback."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def job_log_error(rank: int, world: int, message: str) -> str:
    """A regex of the ``error:`` line that rank ``rank`` of ``world`` prints in a job log: prefixed as
    every log line of a launch of several ranks is (date, rank, level, logger), then the message."""
    prefix = rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \[rank {rank}/{world}\] ERROR megatron_lite\.cli: "
    return prefix + re.escape(f"error: {message}")


def args_dir(args: list[str]) -> str:
    """The run directory the last ``log.dir=`` override names."""
    return next(a.split("=", 1)[1] for a in reversed(args) if a.startswith("log.dir="))


def on_a_terminal(cmd: list[str]) -> tuple[int, str]:
    """(exit status, output) of ``cmd`` run with stdout and stderr on a pseudo-terminal, as in a shell."""
    main_fd, term = pty.openpty()
    fcntl.ioctl(term, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 x 120: tqdm sizes its bar to it
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=term, stderr=term)
    os.close(term)
    chunks = []
    while True:  # read as it comes: a full terminal buffer would block the process
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main_fd)
    return proc.wait(timeout=60), b"".join(chunks).decode()


def run_in_a_project(tiny_args: list[str], prefix: str, tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """(project, step dir) of a one-step run started in ``tmp_path/project`` on a copy of the dataset
    ``prefix`` given by a relative ``data.path`` (``data/c``): its lineage records that directory."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, project / "data" / f"c{ext}")
    monkeypatch.chdir(project)
    from megatron_lite.cli import main

    own = [a for a in tiny_args if not a.startswith("data.path=")]
    assert main(["train", *own, "data.path=data/c", "train.steps=1"]) == 0
    return project, Path(args_dir(own)) / "checkpoints" / "step_00000001"
