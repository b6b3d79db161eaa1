"""Temporary files of a killed ``preprocess`` or ``tokenizer train`` are removed by the next run to
its prefix, and the folder of a killed corpus build by the next build; those of a run still writing
are not (``tempfiles.py``)."""

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
from megatron_lite.data import corpus, tempfiles
from megatron_lite.data import preprocess as pp
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.data.tempfiles import create_locked, create_temp, locked_if_abandoned, remove_abandoned
from megatron_lite.data.tokenizer import Tokenizer, train_tokenizer

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


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_runs_temporaries_are_removed_and_a_live_runs_are_kept(tok, tmp_path, caplog, workers):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": TEXT[i:]}) + "\n" for i in range(0, 400, 40)))
    out = tmp_path / "out" / "data"
    procs = []
    try:
        procs.append(_paused_writer(_PAUSED_WRITER, src, tok.path, out, workers))
        procs.append(_paused_writer(_PAUSED_WRITER, src, tok.path, out, workers))
        (killed, dead_bin), (live, live_bin) = procs
        killed.kill()  # SIGKILL, mid-write: nothing of it runs again
        assert killed.wait(timeout=60) == -signal.SIGKILL
        assert dead_bin.stat().st_size > 0  # left behind
        # what a run killed inside finalize() or write_atomic leaves: no process holds them
        stale = [out.parent / ".data.idx.tmp-0123abcd", out.parent / ".data.json.tmp-89abcdef"]
        others = [".data.bin.tmp-0123abcd.keep", ".data.bin.tmp-notours", ".other.bin.tmp-0123abcd", "data.txt"]
        for path in [*stale, *(out.parent / name for name in others)]:
            path.write_bytes(b"x")
        live_file = os.stat(live_bin)
        with caplog.at_level(logging.WARNING, logger=tempfiles.__name__):
            stats = pp.preprocess([src], tok, out, progress=False, workers=workers)
        removed = sorted(Path(r.args[0]) for r in caplog.records if r.getMessage().startswith("removed "))
        assert removed == sorted([dead_bin, *stale])
        assert "left by a run writing --output" in caplog.text and "did not finish" in caplog.text
        assert not any(p.exists() for p in removed)
        assert os.stat(live_bin).st_ino == live_file.st_ino  # the live run's own file, untouched
        assert all((out.parent / name).exists() for name in others)
        assert stats["documents"] == len(IndexedDataset(out)) == 10
        assert live.poll() is None
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.communicate(timeout=60)


def test_a_killed_tokenizer_trainings_temporaries_are_removed_and_a_live_ones_kept(tmp_path, caplog):
    src = tmp_path / "code.txt"
    src.write_text(TEXT)
    out = tmp_path / "tok" / "code"
    procs = []
    try:
        procs.append(_paused_writer(_PAUSED_TRAINER, src, out))
        procs.append(_paused_writer(_PAUSED_TRAINER, src, out))
        (killed, dead_model), (live, live_model) = procs
        killed.kill()  # SIGKILL, mid-write
        assert killed.wait(timeout=60) == -signal.SIGKILL
        assert dead_model.name.startswith(".code.model.tmp-") and dead_model.stat().st_size > 0
        stale = out.parent / ".code.json.tmp-89abcdef"  # a run killed writing PREFIX.json leaves this
        stale.write_bytes(b"{")
        others = [".code.model.tmp-0123abcd.keep", ".code.bin.tmp-0123abcd", ".other.model.tmp-0123abcd"]
        for name in others:
            (out.parent / name).write_bytes(b"x")
        live_file = os.stat(live_model)
        with caplog.at_level(logging.WARNING, logger=tempfiles.__name__):
            model = train_tokenizer([src], out, 300, progress=False)
        removed = sorted(Path(r.args[0]) for r in caplog.records if r.getMessage().startswith("removed "))
        assert removed == sorted([dead_model, stale]) and not any(p.exists() for p in removed)
        assert f"left by a run writing --output {out} that did not finish" in caplog.text
        assert os.stat(live_model).st_ino == live_file.st_ino  # the live run's own file, untouched
        assert all((out.parent / name).exists() for name in others)
        assert Tokenizer(model).decode(Tokenizer(model).encode(TEXT)) == TEXT
        assert live.poll() is None
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
