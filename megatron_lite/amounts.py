"""How a message words an amount: a duration (:func:`duration`), a size in bytes (:func:`byte_size`) and
a count of things (:func:`counted`), the same in every log line and CLI message that states one; and
how an option gives a size (:func:`parse_size`).

Standard library only (and ``errors``): the launch layer (``launcher/``, importable without torch or
tqdm) uses it.
"""

from __future__ import annotations

import re

from megatron_lite.errors import UserError


def duration(seconds: float) -> str:
    """``seconds`` as a log line writes a duration: ``42.0 s``, ``12m05s``, ``3h04m``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds) // 60
    if minutes < 60:
        return f"{minutes}m{int(seconds) % 60:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def byte_size(n: float, binary: bool = False) -> str:
    """``n`` bytes in the largest unit of which it holds at least one (after rounding), to one decimal:
    ``1 byte``, ``740 bytes``, ``12.3 KB``, ``4.0 MB``, ``1,536.0 GB``. Decimal units (1 KB = 1,000
    bytes) for files, as Hugging Face's ``--max-shard-size`` counts them; ``binary`` ones for memory
    (1 KiB = 1,024 bytes), as torch and ``megatron-lite plan`` report it."""
    base, units = (1024, ("KiB", "MiB", "GiB")) if binary else (1000, ("KB", "MB", "GB"))
    if round(n) < base:
        return counted(round(n), "byte")
    for unit in units:
        n /= base
        if round(n, 1) < base or unit == units[-1]:
            break
    return f"{n:,.1f} {unit}"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, in the plural unless ``n`` is 1: ``1 node``, ``0 nodes``, ``1,024 ranks``;
    ``plural`` where it is not ``noun`` + ``s`` (``counted(2, "directory", "directories")``)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def parse_size(text: str | int, option: str = "--max-shard-size") -> int:
    """Bytes of ``"5GB"``, ``"200MB"``, ``"64KiB"`` or a plain integer (HF's convention: GB = 1e9);
    ``option`` names the command-line option in the error for anything else."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise UserError(f"{option} {text!r} is not a size: give a number of bytes, or one like 5GB, 500MB, 64KiB")
    unit = (m.group(2) or "").upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "KB": 1, "KIB": 1, "MB": 2, "MIB": 2, "GB": 3, "GIB": 3}[unit]
    return int(float(m.group(1)) * base**power)
