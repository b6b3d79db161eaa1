"""One run per output prefix: ``preprocess`` and ``tokenizer train`` hold ``--output`` locked for their whole run.

Two runs to one prefix would each pass the startup check that nothing is there yet, then install
their files one by one (``PREFIX.bin``, ``PREFIX.idx``, ``PREFIX.json``; ``PREFIX.model``,
``PREFIX.json``): the later one replaces the other's without ``--overwrite``, and interleaved, one
run's ``.bin`` is paired with the other's ``.idx`` or record. So a run takes an exclusive ``flock``
on ``.NAME.lock`` beside its outputs (``data/.my.lock`` for ``--output data/my``; a tokenizer
prefix ``tok/my.model`` locks ``tok/.my.lock``) before it checks them, writes its host and pid into
it, and holds it until its last file is installed (:func:`hold_output`). ``preprocess`` and
``tokenizer train`` to one prefix share the lock, as they share ``PREFIX.json``. A second run
finds it taken and is refused at once, naming the prefix, the holder and the fix; it touches
nothing of the first run's.

The kernel drops the lock however its holder ends (a SIGKILL, the out-of-memory killer; on NFS, when
the dead client's lease runs out), so the next run proceeds; the file a killed holder leaves is
opened in place (``tempfiles.take_lock``) and taken over. A run that ends deletes it while still
holding it, and removes the folders it made for its outputs if they stay empty (a run that failed).
A filesystem without locks gets one warning that nothing keeps a second run out, and
the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from megatron_lite.data.tempfiles import LockHeldError, take_lock
from megatron_lite.errors import UserError

log = logging.getLogger(__name__)


def lock_path(prefix: str | Path) -> Path:
    """The lock file of the output prefix ``prefix`` (without its files' extensions): ``DIR/.NAME.lock``."""
    prefix = Path(prefix)
    return prefix.with_name(f".{prefix.name}.lock")


def _take(path: Path, output: str) -> tuple[int, bool | None]:
    """:func:`~megatron_lite.data.tempfiles.take_lock` on ``path``, its refusals as :class:`UserError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return take_lock(path)
    except LockHeldError as e:
        raise UserError(
            f"--output {output} is being written by another run ({e.holder}; lock file {path}): "
            "two runs to one prefix replace each other's files; wait for that run to end, or choose another "
            "--output prefix"
        ) from None
    except OSError as e:  # a link or a directory there, a full disk, a quota
        raise UserError(
            f"--output {output}: its lock file {path} cannot be used: {e.strerror or e}; remove it or free space "
            "there, or choose another --output prefix"
        ) from None


@contextlib.contextmanager
def hold_output(prefix: str | Path, output: str | Path) -> Iterator[None]:
    """Hold the output prefix ``prefix`` (its files' path without their extensions) locked for the
    ``with`` block; ``output`` is the ``--output`` given, for the messages. :class:`UserError`, before
    anything is read or written there, when another run holds it."""
    path = lock_path(prefix)
    created = _missing_dirs(path.parent)
    fd, taken = _take(path, str(output))
    if taken is None:
        log.warning(
            "--output %s is on a filesystem without file locks (flock): nothing keeps a second run to the same "
            "prefix out, and two such runs replace each other's files; run one at a time (or mount the filesystem "
            "with locks, e.g. Lustre's -o flock)",
            output,
        )
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # held: no other run uses this file (without locks, nothing can tell)
        os.close(fd)
        for folder in created:  # a failed run leaves no empty folders behind; one holding files stays
            with contextlib.suppress(OSError):
                folder.rmdir()


def _missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing
