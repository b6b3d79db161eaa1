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
opened in place (``tempfiles.open_locked``) and taken over. A run that ends deletes it while still
holding it. A filesystem without locks gets one warning that nothing keeps a second run out, and
the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from megatron_lite.data.tempfiles import describe_holder, holder_text, open_locked
from megatron_lite.errors import UserError

log = logging.getLogger(__name__)


def lock_path(prefix: str | Path) -> Path:
    """The lock file of the output prefix ``prefix`` (without its files' extensions): ``DIR/.NAME.lock``."""
    prefix = Path(prefix)
    return prefix.with_name(f".{prefix.name}.lock")


def _take(path: Path, output: str) -> tuple[int, bool | None]:
    """Open and try the lock at ``path``: ``(fd, taken)`` as ``open_locked`` gives them, ``taken``
    never False: :class:`UserError` when another run holds it, or it cannot be used."""
    unusable = f"--output {output}: its lock file {path} cannot be used"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, taken = open_locked(path)
    except OSError as e:
        raise UserError(f"{unusable}: {e.strerror or e}; remove it, or choose another --output prefix") from None
    if taken is False:
        try:
            text = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        raise UserError(
            f"--output {output} is being written by another run ({describe_holder(text)}; lock file {path}): "
            "two runs to one prefix replace each other's files; wait for that run to end, or choose another "
            "--output prefix"
        )
    if taken:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder_text(), 0)
        except OSError as e:  # a full disk, a quota
            os.close(fd)
            raise UserError(f"{unusable}: {e.strerror or e}; free space there, or choose another --output") from None
    return fd, taken


@contextlib.contextmanager
def hold_output(prefix: str | Path, output: str | Path) -> Iterator[None]:
    """Hold the output prefix ``prefix`` (its files' path without their extensions) locked for the
    ``with`` block; ``output`` is the ``--output`` given, for the messages. :class:`UserError`, before
    anything is read or written there, when another run holds it."""
    path = lock_path(prefix)
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
