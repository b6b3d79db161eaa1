"""What produced a checkpoint: code version, datasets, tokenizer, and how much of each dataset it saw.

Dataset fingerprint: the sha256 of the ``.idx`` file (document sizes and offsets, ~12 bytes per
document, so hashing it is cheap next to the tokens) plus the size and modification time of the
``.bin`` file (hashing terabytes of tokens at every start would take minutes). A re-tokenized
dataset changes its ``.idx``; an edit that keeps every document length only shows in the ``.bin``
size or mtime. The tokenizer is hashed whole. Samples consumed per dataset follow from the blend
schedule (``data/gpt_dataset.py``), which depends only on the weights: global sample ``i`` comes
from dataset ``slot_dataset[i % q]``.

The run's working directory (``workdir``) is recorded too: relative paths in its config (``data.path``,
``data.cache_dir``...) are relative to it, and ``eval --held-out`` reads the run's data through them,
refusing data whose fingerprint is not the recorded one (:func:`recorded_datasets`). So is the
Python version (``python``): the embedded corpus is built from that interpreter's standard library.
"""

from __future__ import annotations

import os
import platform
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from megatron_lite.checkpoint.format import sha256_file
from megatron_lite.data.blend import blend_schedule
from megatron_lite.data.gpt_dataset import GPTDataset

GIT_TIMEOUT_S = 10.0  # a hung git (network filesystem) must not hold up training
CODE_DIR = Path(__file__).resolve().parent


def git_state(where: Path = CODE_DIR) -> dict[str, Any]:
    """``{"git_commit", "git_dirty"}`` of the checkout holding the code, None values outside git."""

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = git("rev-parse", "HEAD")
    if head is None or head.returncode:
        return {"git_commit": None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None or status.returncode else bool(status.stdout.strip())
    return {"git_commit": head.stdout.strip(), "git_dirty": dirty}


def dataset_fingerprint(prefix: str) -> dict[str, Any]:
    """The ``.idx`` sha256 and the ``.bin`` size and mtime of one dataset prefix."""
    stat = Path(prefix + ".bin").stat()
    return {"idx_sha256": sha256_file(Path(prefix + ".idx")), "bin_bytes": stat.st_size, "bin_mtime": stat.st_mtime}


@cache
def _schedule(weights: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    slot_dataset, _, quota = blend_schedule(list(weights))
    return slot_dataset, quota


def consumed_per_dataset(dataset: GPTDataset, consumed: int) -> list[int]:
    """Samples of each blended dataset among the first ``consumed`` global samples."""
    slot_dataset, quota = _schedule(tuple(dataset.weights))
    periods, rest = divmod(consumed, slot_dataset.size)
    head = np.bincount(slot_dataset[:rest], minlength=quota.size)
    return [int(periods * q + h) for q, h in zip(quota, head, strict=True)]


def recorded_datasets(lineage: Any) -> list[dict[str, Any]] | None:
    """The datasets a checkpoint's ``lineage`` records, or None: none recorded (an HF import) or a record
    no save writes (``lineage`` comes from a file: an edited one)."""
    datasets = lineage.get("datasets") if isinstance(lineage, dict) else None
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        return None
    return datasets


def recorded_workdir(lineage: Any) -> str | None:
    """The directory a checkpoint's run started in, as its ``lineage`` records it; None where it records
    none (a checkpoint written without it, an HF import) or a record no save writes (edited)."""
    workdir = lineage.get("workdir") if isinstance(lineage, dict) else None
    return workdir if isinstance(workdir, str) and workdir else None


def run_corpus_way(lineage: Any) -> str | None:
    """The way on for a resume on the embedded corpus that this Python builds from another standard
    library than the run's (so with another tokenizer): the run's own corpus as ``data.path`` and
    ``data.tokenizer``, as its ``lineage`` records them (relative paths against its workdir), with both
    Python versions. None where the lineage records no single dataset and tokenizer (an edited one)."""
    corpus = recorded_datasets(lineage)
    tok = lineage.get("tokenizer") if corpus else None
    if not corpus or len(corpus) != 1 or not isinstance(tok, dict):
        return None
    workdir = recorded_workdir(lineage) or ""
    run_data = " ".join(
        f"{k}={Path(workdir) / str(p)}"
        for k, p in (("data.path", corpus[0].get("prefix")), ("data.tokenizer", tok.get("path")))
    )
    return (
        f"the run's embedded corpus, while it is there: {run_data} (the embedded corpus and its tokenizer are built "
        f"from this Python's standard library, {platform.python_version()}; the run's Python: "
        f"{lineage.get('python') or 'unrecorded'})"
    )


def content(dataset: dict[str, Any]) -> tuple[Any, Any]:
    """What identifies a dataset's tokens in a fingerprint: the ``.idx`` sha256 and the ``.bin`` size."""
    return dataset.get("idx_sha256"), dataset.get("bin_bytes")


def data_changes(saved: dict[str, Any] | None, now: dict[str, Any], weights: list[float]) -> list[str]:
    """What differs between the data a checkpoint's lineage records (``saved``) and this run's
    (``now``: :attr:`Lineage.static`, with the blend's ``weights``): datasets by content (a moved
    dataset with the same ``.idx`` hash and ``.bin`` size is the same) and weights. Another tokenizer is
    no data change: a resume refuses it (``training/resume.py: check_tokenizer``). ``saved`` comes from
    a file: anything but the record a save writes is no record."""
    old, new = recorded_datasets(saved), now["datasets"]
    if old is None:
        return []  # nothing to compare
    changes = []
    if list(map(content, old)) != list(map(content, new)):
        if [d.get("prefix") for d in old] == [d["prefix"] for d in new]:
            changes += [
                f"{d['prefix']} changed since (.idx {'rebuilt' if o.get('idx_sha256') != d['idx_sha256'] else 'same'}"
                f", .bin {o.get('bin_bytes')} -> {d['bin_bytes']} bytes)"
                for o, d in zip(old, new)
                if content(o) != content(d)
            ]
        else:
            changes.append(
                f"data.path names other data ({', '.join(str(d.get('prefix')) for d in old)} -> "
                f"{', '.join(d['prefix'] for d in new)})"
            )
    elif [d.get("weight") for d in old] != list(weights):
        changes.append(f"data.weights {[d.get('weight') for d in old]} -> {list(weights)}")
    return changes


class Lineage:
    """Computed once per run (hashes), completed at each save with the data position."""

    def __init__(self, dataset: GPTDataset, tokenizer: Path) -> None:
        self.dataset = dataset
        self.static = {
            **git_state(),
            "python": platform.python_version(),
            "workdir": os.getcwd(),
            "datasets": [{"prefix": p, **dataset_fingerprint(p)} for p in dataset.prefixes],
            "tokenizer": {"path": str(tokenizer), "sha256": sha256_file(tokenizer)},
        }

    def at(self, consumed: int) -> dict[str, Any]:
        """The lineage record of a checkpoint taken after ``consumed`` training samples."""
        counts = consumed_per_dataset(self.dataset, consumed)
        datasets = [
            {**d, "weight": w, "consumed_samples": n}
            for d, w, n in zip(self.static["datasets"], self.dataset.weights, counts, strict=True)
        ]
        return {**self.static, "datasets": datasets, "consumed_samples": consumed}
