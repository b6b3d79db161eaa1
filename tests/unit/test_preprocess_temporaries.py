"""Temporary files of a killed ``preprocess`` or ``tokenizer train`` are removed by the next run to
its prefix, and the folder of a killed corpus build by the next build; those of a run still writing
are not (``tempfiles.py``). A run still writing holds its prefix locked: a second run to it is
refused, touching nothing (``output_lock.py``)."""

import errno
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import megatron_lite
from megatron_lite.cli import main
from megatron_lite.data import corpus, output_lock, tempfiles
from megatron_lite.data import preprocess as pp
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.data.tempfiles import create_locked, create_temp, locked_if_abandoned, remove_abandoned
from megatron_lite.data.tokenizer import Tokenizer, train_tokenizer
from megatron_lite.errors import UserError

pytestmark = pytest.mark.usefixtures("enough_cpus")
ROOT = Path(megatron_lite.__file__).parents[1]
TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 20

# A preprocess that stops inside its first write of ids (the .bin temporary open, locked, partly
# written) and prints that temporary's path: a run caught mid-write, to be killed or left running.
_PAUSED_WRITER = """
import sys, time
from megatron_lite.data import indexed, preprocess_pool
from megatron_lite.data.preprocess import preprocess

add_tokens = indexed.IndexedDatasetBuilder.add_tokens

def paused(self, ids):
    add_tokens(self, ids)
    self._file.flush()
    print(self._tmp_bin, flush=True)
    time.sleep(3600)

indexed.IndexedDatasetBuilder.add_tokens = paused
preprocess_pool.usable_cpus = lambda: 2
preprocess([sys.argv[1]], sys.argv[2], sys.argv[3], progress=False, workers=int(sys.argv[4]))
"""

# A tokenizer training that stops inside its write of PREFIX.model (the temporary open, locked, partly
# written) and prints that temporary's path.
_PAUSED_TRAINER = """
import sys, time
from megatron_lite.data import indexed
from megatron_lite.data.tokenizer import train_tokenizer

create_temp = indexed.create_temp

def paused(path):
    tmp, f = create_temp(path)
    f.write(b"half a model")
    f.flush()
    print(tmp, flush=True)
    time.sleep(3600)

indexed.create_temp = paused
train_tokenizer([sys.argv[1]], sys.argv[2], 300, progress=False)
"""

# A corpus build that stops once its tokenizer is trained, before tokenizing, and prints its build folder.
_PAUSED_BUILD = """
import sys, time
from pathlib import Path
from megatron_lite.data import corpus

def paused(inputs, tokenizer, out_prefix, progress=True):
    print(Path(out_prefix).parent, flush=True)
    time.sleep(3600)

corpus.preprocess = paused
corpus.prepare_default_corpus(sys.argv[1], 300, progress=False, files=sys.argv[2:])
"""


def _paused_writer(script: str, *args: object) -> tuple[subprocess.Popen, Path]:
    """A child running ``script`` with ``args``, once it has printed the temporary it holds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-c", script, *map(str, args)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the first ids are on disk, or the child failed (the limit bounds a hang, it times nothing)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline().strip() if ready else ""
    if not line:
        proc.kill()
        raise AssertionError(f"the paused writer did not start writing:\n{proc.communicate()[1]}")
    return proc, Path(line)


def _files(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Each file in ``folder``: its inode, size and modification time (what a writer would change)."""
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def _refused(run, out: Path, holder: subprocess.Popen, capsys) -> None:
    """``run()`` (a run to ``out``, or the CLI's exit status of one) is refused at once for the live
    ``holder``, touching nothing in ``out``'s folder; the error names the prefix, the holder and the fix."""
    before = _files(out.parent)
    status = run()
    message = capsys.readouterr().err
    assert status == 2 and message.startswith(f"error: --output {out} is being written by another run")
    assert f"pid {holder.pid}" in message and f"lock file {out.parent / ('.' + out.name + '.lock')}" in message
    assert "wait for that run to end, or choose another --output prefix" in message
    assert _files(out.parent) == before and holder.poll() is None


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_preprocess_to_a_prefix_is_refused_while_the_first_lives(tok, tmp_path, caplog, capsys, workers):
    """A killed run's lock is gone and its temporaries are removed; a live run's prefix is refused."""
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": TEXT[i:]}) + "\n" for i in range(0, 400, 40)))
    out = tmp_path / "out" / "data"
    argv = ["preprocess", "--input", str(src), "--tokenizer", str(tok.path), "--output", str(out), "--quiet"]
    procs = []
    try:
        procs.append(_paused_writer(_PAUSED_WRITER, src, tok.path, out, workers))
        (killed, dead_bin) = procs[0]
        killed.kill()  # SIGKILL, mid-write: nothing of it runs again
        assert killed.wait(timeout=60) == -signal.SIGKILL
        assert dead_bin.stat().st_size > 0 and (out.parent / ".data.lock").is_file()  # left behind
        procs.append(_paused_writer(_PAUSED_WRITER, src, tok.path, out, workers))  # proceeds: the lock died
        live, live_bin = procs[1]
        assert not dead_bin.exists()  # removed by the run that took the killed one's prefix
        _refused(lambda: main([*argv, "--workers", str(workers)]), out, live, capsys)
        _refused(lambda: _user_error(train_tokenizer, [src], out, 300, progress=False), out, live, capsys)
        live.kill()
        assert live.wait(timeout=60) == -signal.SIGKILL
        # what a run killed inside finalize() or write_atomic leaves: no process holds them
        stale = [out.parent / ".data.idx.tmp-0123abcd", out.parent / ".data.json.tmp-89abcdef"]
        others = [".data.bin.tmp-0123abcd.keep", ".data.bin.tmp-notours", ".other.bin.tmp-0123abcd", "data.txt"]
        for path in [*stale, *(out.parent / name for name in others)]:
            path.write_bytes(b"x")
        held, f = create_temp(Path(f"{out}.bin"))  # a writer still writing (its own open file, locked)
        with f, caplog.at_level(logging.WARNING, logger=tempfiles.__name__):
            stats = pp.preprocess([src], tok, out, progress=False, workers=workers)
        removed = sorted(Path(r.args[0]) for r in caplog.records if r.getMessage().startswith("removed "))
        assert removed == sorted([live_bin, *stale])
        assert "left by a run writing --output" in caplog.text and "did not finish" in caplog.text
        assert not any(p.exists() for p in removed) and held.exists()
        assert all((out.parent / name).exists() for name in others)
        assert stats["documents"] == len(IndexedDataset(out)) == 10
        assert not (out.parent / ".data.lock").exists()  # a run that ends deletes it
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.communicate(timeout=60)


def test_a_refused_rerun_still_removes_what_a_killed_run_left(tok, tmp_path, caplog):
    """A rerun refused for want of --overwrite removes the temporaries a killed run to the same prefix
    left (a ``.bin`` may be gigabytes), and nothing else: the dataset and tokenizer built are kept."""
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": TEXT[i:]}) + "\n" for i in range(0, 400, 40)))
    out = tmp_path / "out" / "data"
    pp.preprocess([src], tok, out, progress=False)
    model = train_tokenizer([src], tmp_path / "out" / "tok", 300, progress=False)
    built = _files(out.parent)
    stale = [out.parent / ".data.bin.tmp-0123abcd", out.parent / ".tok.model.tmp-89abcdef"]
    for path in stale:
        path.write_bytes(b"x" * 100)
    with caplog.at_level(logging.WARNING, logger=tempfiles.__name__):
        with pytest.raises(UserError, match=r"would replace .*pass --overwrite"):
            pp.preprocess([src], tok, out, progress=False)
        with pytest.raises(UserError, match=r"would replace .*pass --overwrite"):
            train_tokenizer([src], model, 300, progress=False)
    removed = [Path(r.args[0]) for r in caplog.records if r.getMessage().startswith("removed ")]
    assert removed == stale and not any(p.exists() for p in stale)
    assert _files(out.parent) == built and len(IndexedDataset(out)) == 10


def _user_error(fn, *args, **kwargs) -> int:
    """``fn(*args, **kwargs)``, its :class:`UserError` printed as the CLI prints it: 2 when it raised one."""
    try:
        fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def test_a_second_tokenizer_training_to_a_prefix_is_refused_while_the_first_lives(tok, tmp_path, caplog, capsys):
    src = tmp_path / "code.txt"
    src.write_text(TEXT)
    out = tmp_path / "tok" / "code"
    argv = ["tokenizer", "train", "--input", str(src), "--output", str(out), "--vocab-size", "300", "--quiet"]
    procs = []
    try:
        procs.append(_paused_writer(_PAUSED_TRAINER, src, out))
        killed, dead_model = procs[0]
        killed.kill()  # SIGKILL, mid-write
        assert killed.wait(timeout=60) == -signal.SIGKILL
        assert dead_model.name.startswith(".code.model.tmp-") and dead_model.stat().st_size > 0
        procs.append(_paused_writer(_PAUSED_TRAINER, src, f"{out}.model"))  # the same prefix, the lock died
        live, live_model = procs[1]
        assert not dead_model.exists()  # removed by the run that took the killed one's prefix
        _refused(lambda: main(argv), out, live, capsys)
        _refused(lambda: _user_error(pp.preprocess, [src], tok, out, progress=False), out, live, capsys)
        live.kill()
        assert live.wait(timeout=60) == -signal.SIGKILL
        stale = out.parent / ".code.json.tmp-89abcdef"  # a run killed writing PREFIX.json leaves this
        stale.write_bytes(b"{")
        others = [".code.model.tmp-0123abcd.keep", ".code.bin.tmp-0123abcd", ".other.model.tmp-0123abcd"]
        for name in others:
            (out.parent / name).write_bytes(b"x")
        held, f = create_temp(Path(f"{out}.model"))  # a writer still writing (its own open file, locked)
        with f, caplog.at_level(logging.WARNING, logger=tempfiles.__name__):
            model = train_tokenizer([src], out, 300, progress=False)
        removed = sorted(Path(r.args[0]) for r in caplog.records if r.getMessage().startswith("removed "))
        assert removed == sorted([live_model, stale]) and not any(p.exists() for p in removed)
        assert f"left by a run writing --output {out} that did not finish" in caplog.text and held.exists()
        assert all((out.parent / name).exists() for name in others)
        assert Tokenizer(model).decode(Tokenizer(model).encode(TEXT)) == TEXT
        assert not (out.parent / ".code.lock").exists()
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.communicate(timeout=60)


def test_a_killed_corpus_builds_folder_is_removed_and_a_live_ones_kept(tmp_path, caplog):
    (tmp_path / "src").mkdir()
    files = [tmp_path / "src" / "a.py", tmp_path / "src" / "b.py"]
    files[0].write_text(TEXT)
    files[1].write_text(TEXT.replace("x", "y"))
    cache = tmp_path / "cache"
    procs = []
    try:
        procs.append(_paused_writer(_PAUSED_BUILD, cache, *files))
        procs.append(_paused_writer(_PAUSED_BUILD, cache, *files))
        (killed, dead_dir), (live, live_dir) = procs
        killed.kill()  # SIGKILL, mid-build
        assert killed.wait(timeout=60) == -signal.SIGKILL
        assert (dead_dir / "tokenizer.model").is_file()
        unmarked = cache / re.sub(r"\d+-[0-9a-f]{8}$", "1-0123abcd", dead_dir.name)  # no marker: not provably ours
        unmarked.mkdir()
        live_model = os.stat(live_dir / "tokenizer.model")
        with caplog.at_level(logging.WARNING, logger=corpus.__name__):
            prefix, _ = corpus.prepare_default_corpus(cache, 300, progress=False, files=files)
        assert f"removing {dead_dir}, the folder of a corpus build that did not finish" in caplog.text
        assert not dead_dir.exists() and unmarked.is_dir() and str(live_dir) not in caplog.text
        assert os.stat(live_dir / "tokenizer.model").st_ino == live_model.st_ino  # the live build's, untouched
        assert len(IndexedDataset(prefix)) == 2 and live.poll() is None
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.communicate(timeout=60)


def test_a_temporary_is_removable_only_once_its_writer_has_closed_it(tmp_path):
    path = tmp_path / "x.bin"
    tmp, f = create_temp(path)
    assert tmp.name.startswith(".x.bin.tmp-")
    assert remove_abandoned(path) == [] and tmp.exists()
    f.close()  # as when its process dies
    assert remove_abandoned(path) == [tmp] and not tmp.exists()
    assert remove_abandoned(tmp_path / "missing" / "x.bin") == []


def test_a_locked_marker_is_abandoned_only_once_its_holder_has_closed_it(tmp_path, monkeypatch):
    marker = tmp_path / ".marker"
    held = create_locked(marker, b"who\n")
    assert marker.read_bytes() == b"who\n" and [p.name for p in tmp_path.iterdir()] == [".marker"]
    with locked_if_abandoned(marker) as abandoned:
        assert abandoned is False
    held.close()  # as when its process dies
    with locked_if_abandoned(marker) as abandoned:
        assert abandoned is True
    os.mkfifo(tmp_path / "fifo")
    for path in (tmp_path / "fifo", tmp_path / "missing", tmp_path):
        with pytest.raises(OSError), locked_if_abandoned(path):
            pass
    monkeypatch.setattr(tempfiles, "lock", lambda fd, wait: None)
    with locked_if_abandoned(marker) as abandoned:
        assert abandoned is None


def test_a_writer_whose_new_temporary_a_cleaner_took_starts_again(tmp_path, monkeypatch):
    """A cleaner may lock and delete a temporary between its writer's open and lock."""
    path = tmp_path / "x.bin"
    lock, raced = tempfiles.lock, []

    def late(fd: int, wait: bool):
        if wait and not raced:  # the writer's first lock: a cleaner gets there first
            raced.append(remove_abandoned(path))
        return lock(fd, wait)

    monkeypatch.setattr(tempfiles, "lock", late)
    tmp, f = create_temp(path)
    with f:
        assert len(raced[0]) == 1 and raced[0][0] != tmp  # the first name was taken as abandoned
        assert tmp.exists() and remove_abandoned(path) == []


def test_without_file_locks_nothing_is_removed(tmp_path, monkeypatch):
    """On a filesystem without locks no temporary can be shown abandoned: all are kept."""

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(tempfiles.fcntl, "flock", no_locks)
    path = tmp_path / "x.bin"
    tmp, f = create_temp(path)  # the writer still writes
    f.close()
    assert remove_abandoned(path) == [] and tmp.exists()


def test_without_file_locks_a_run_warns_once_and_goes_on(tok, tmp_path, monkeypatch, caplog):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(tempfiles.fcntl, "flock", no_locks)
    src = tmp_path / "code.txt"
    src.write_text(TEXT)
    with caplog.at_level(logging.WARNING, logger=output_lock.__name__):
        pp.preprocess([src], tok, tmp_path / "data", progress=False)
        train_tokenizer([src], tmp_path / "tok", 300, progress=False)
    warned = [r.getMessage() for r in caplog.records if r.name == output_lock.__name__]
    assert [w.split(" is on ")[0] for w in warned] == [f"--output {tmp_path / 'data'}", f"--output {tmp_path / 'tok'}"]
    assert all("without file locks (flock): nothing keeps a second run" in w for w in warned)
    assert len(IndexedDataset(tmp_path / "data")) == 1 and (tmp_path / "tok.model").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "code.txt",
        "data.bin",
        "data.idx",
        "data.json",
        "tok.json",
        "tok.model",
    ]


def test_an_unusable_lock_file_is_an_error_naming_it(tok, tmp_path):
    src = tmp_path / "code.txt"
    src.write_text(TEXT)
    (tmp_path / ".data.lock").mkdir()  # not a file: no lock can be taken on it
    with pytest.raises(UserError, match=r"--output .*data: its lock file .*\.data\.lock cannot be used: .*; remove it"):
        pp.preprocess([src], tok, tmp_path / "data", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.lock", "code.txt"]
