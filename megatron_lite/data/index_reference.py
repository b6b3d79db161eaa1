"""The plain sample index: every array int64 and fully materialised.

The twin of ``data/sample_index.py`` (as ``kernels/reference.py`` is of the Triton ops): tests check
that the compact index serves exactly these samples, and ``tools/bench/dataset_index.py`` measures
its memory and build time as the baseline. Not used in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_lite.data.indexed import IndexedDataset


def reference_epoch(
    sizes: np.ndarray, docs: np.ndarray, seq_len: int, samples: int, seed: Sequence[int], epoch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(order, starts, window_pos, shuffle)`` of one epoch, each int64 (see ``sample_index``)."""
    rng = np.random.default_rng([*seed, epoch])
    order = docs[rng.permutation(docs.size)]
    starts = np.zeros(order.size + 1, dtype=np.int64)
    np.cumsum(sizes[order], out=starts[1:])
    window_starts = np.arange(samples, dtype=np.int64) * seq_len
    window_pos = np.searchsorted(starts, window_starts, side="right") - 1
    return order, starts, window_pos, rng.permutation(samples)


def reference_sample(data: IndexedDataset, seq_len: int, index: tuple[np.ndarray, ...], j: int) -> np.ndarray:
    """The epoch's ``j``-th sample (``seq_len + 1`` int64 tokens) from a ``reference_epoch`` index."""
    order, starts, window_pos, shuffle = index
    window = int(shuffle[j])
    pos = int(window_pos[window])
    offset = window * seq_len - int(starts[pos])
    out = np.empty(seq_len + 1, dtype=np.int64)
    filled = 0
    while filled < out.size:
        doc = int(order[pos])
        take = min(int(data.sizes[doc]) - offset, out.size - filled)
        out[filled : filled + take] = data.get(doc, offset, take)
        filled += take
        pos += 1
        offset = 0
    return out
