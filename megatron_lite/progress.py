"""Progress bars, drawn on a terminal only, and progress lines for a job's log.

tqdm redraws its line with carriage returns. A file (SLURM's job log, ``2> run.log``) keeps every
redraw, so the bar becomes one line of many kilobytes, and a closed bar writes its last state twice.
Where stderr is not a terminal the bars are off: a training run's log says the same in one line per
logged step (``training/metrics.py: step_lines``), on a terminal too, above the bar; a long read of
input bytes (``preprocess``, ``tokenizer train``) logs one dated line every :data:`LOG_EVERY_S`
seconds instead (:class:`ProgressLines`, through :func:`byte_progress`), its amounts worded by
``amounts.py``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from megatron_lite.amounts import byte_size, duration

log = logging.getLogger(__name__)

# Seconds between two progress lines in a job's log: often enough to see a job is alive and how far
# it got, rare enough that a day-long preprocess writes about 3,000 lines.
LOG_EVERY_S = 30.0


def progress_bar(show: bool, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (``kwargs``: tqdm's), drawn where ``show`` and stderr is a terminal;
    elsewhere a disabled one, whose updates do nothing."""
    return tqdm(file=sys.stderr, disable=not (show and sys.stderr.isatty()), **kwargs)


class ProgressLines:
    """Progress over ``total`` bytes as dated log lines, one every :data:`LOG_EVERY_S` seconds, e.g.::

        tokenizing | 52,113 documents, 61,245,310 tokens | 245.1 MB of 1.0 GB read (24%) | 8.2 MB/s | ETA 1m35s

    ``counts`` says what the bytes held so far (documents, tokens). :meth:`update` is called for each
    document read: it adds and reads the clock; the line is built and logged once per interval. Used
    as tqdm's bar is (``update``, ``close``, a context manager), so readers take either."""

    def __init__(self, desc: str, total: int, counts: Callable[[], str] | None = None) -> None:
        self.desc, self.total, self.counts = desc, total, counts
        self.n = 0
        self.start = time.monotonic()
        self.next_at = self.start + LOG_EVERY_S

    def update(self, n: int = 1) -> None:
        self.n += n
        if (now := time.monotonic()) >= self.next_at:
            self.next_at = now + LOG_EVERY_S
            log.info("%s", self.line(now - self.start))

    def line(self, elapsed: float) -> str:
        """The progress line after ``elapsed`` seconds."""
        rate = self.n / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f"ETA {duration(max(self.total - self.n, 0) / rate)}" if rate > 0 else "ETA unknown"
        read = f"{byte_size(self.n)} of {byte_size(self.total)} read{share}"
        return " | ".join([self.desc, *([self.counts()] if self.counts else []), read, f"{byte_size(rate)}/s", eta])

    def close(self) -> None:
        """Nothing to flush: each line was logged whole."""

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def byte_progress(show: bool, total: int, desc: str, counts: Callable[[], str] | None = None) -> tqdm | ProgressLines:
    """Progress of reading ``total`` bytes, where ``show``: a bar on a terminal (:func:`progress_bar`),
    elsewhere (a job's log file) :class:`ProgressLines` with ``counts``."""
    if show and not sys.stderr.isatty():
        return ProgressLines(desc, total, counts)
    return progress_bar(show, total=total, unit="B", unit_scale=True, desc=desc)


class _WholeLines(tqdm):
    """tqdm whose :meth:`write` writes a line and its end in one call. tqdm writes them in two, and a
    line logged by a signal handler (``received SIGTERM: ...``, ``training/fault.py``), which runs
    between any two of the main thread's calls, landed between them: glued to the end of the line
    being written, with an empty line after it."""

    @classmethod
    def write(cls, s: str, file: Any = None, end: str = "\n", nolock: bool = False) -> None:
        super().write(s + end, file=file, end="", nolock=nolock)


@contextlib.contextmanager
def above_progress_bar() -> Iterator[None]:
    """Print log lines above the progress bar (tqdm's redirect) where the process logs to the console
    (the CLI's ``basicConfig``), each line whole; a program that set up no console logging keeps its
    own handlers."""
    console = any(
        isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
        for h in logging.root.handlers
    )
    with logging_redirect_tqdm(tqdm_class=_WholeLines) if console else contextlib.nullcontext():
        yield
