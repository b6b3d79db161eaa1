"""JSON read from a file or from outside the process: one parser whose every failure is a ValueError.

``json.loads`` raises RecursionError, not ValueError, for lists or objects nested past Python's stack
(``"[" * 100_000``, a crafted or damaged file); :func:`loads` raises ValueError then too, so a reader's
``except ValueError`` (``json.JSONDecodeError`` is one) covers every file that is not JSON."""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes) -> Any:
    """``json.loads(text)``; ValueError ``nested too deeply`` where that raises RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
