"""Progress bars, drawn on a terminal only.

tqdm redraws its line with carriage returns. A file (SLURM's job log, ``2> run.log``) keeps every
redraw, so the bar becomes one line of many kilobytes, and a closed bar writes its last state twice.
Where stderr is not a terminal the bars are off: a training run's log says the same in one line per
logged step (``training/metrics.py: step_lines``), on a terminal too, above the bar.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def progress_bar(show: bool, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (``kwargs``: tqdm's), drawn where ``show`` and stderr is a terminal;
    elsewhere a disabled one, whose updates do nothing."""
    return tqdm(file=sys.stderr, disable=not (show and sys.stderr.isatty()), **kwargs)


def duration(seconds: float) -> str:
    """``seconds`` as a log line writes a duration: ``42.0 s``, ``12m05s``, ``3h04m``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds) // 60
    if minutes < 60:
        return f"{minutes}m{int(seconds) % 60:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


@contextlib.contextmanager
def above_progress_bar() -> Iterator[None]:
    """Print log lines above the progress bar (tqdm's redirect) where the process logs to the console
    (the CLI's ``basicConfig``); a program that set up no console logging keeps its own handlers."""
    console = any(
        isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
        for h in logging.root.handlers
    )
    with logging_redirect_tqdm() if console else contextlib.nullcontext():
        yield
