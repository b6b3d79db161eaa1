"""One epoch's sample index for a packed split, in the fewest bytes that serve the same samples.

The plain form of an epoch of ``S`` windows over ``D`` documents is four int64 arrays (doc order,
token starts, the position each window starts in, the shuffle): ``16 D + 16 S`` bytes per epoch and
rank (``data/index_reference.py``, its twin). This one holds ``12 D + 4 S`` bytes (``D, S < 2**31``;
int64 above), one epoch at a time, and:

- permutations are drawn by ``rng.shuffle`` of an ``arange`` in the smallest exact dtype, which
  makes the same draws as ``rng.permutation`` (int64) and so the same order;
- the window -> document map (Megatron's sample-idx) is one ``searchsorted`` per sample instead
  of an ``S``-long array: O(log D), microseconds against the sample's own read;
- token starts stay int64 (a split can hold more than 2**31 tokens) and are summed in chunks, so
  the build never holds a second ``D``-long temporary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_INT32_MAX = int(np.iinfo(np.int32).max)
_CHUNK = 1 << 20  # positions summed per step while building the token starts (12 MiB of temporaries)


def index_dtype(n: int) -> np.dtype:
    """The smallest signed dtype holding every value in ``[0, n]`` exactly: int32 or int64."""
    return np.dtype(np.int32) if n <= _INT32_MAX else np.dtype(np.int64)


def permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """``rng.permutation(n)`` (the same values and draws from ``rng``) in ``index_dtype(n)``."""
    perm = np.arange(n, dtype=index_dtype(n))
    rng.shuffle(perm)  # Fisher-Yates: its draws depend on n only, never on the dtype
    return perm


@dataclass(frozen=True)
class EpochIndex:
    """Where each sample of one epoch lies in the concatenation of its shuffled documents."""

    docs: np.ndarray  # (D,) the split's document ids, shared by every epoch
    perm: np.ndarray  # (D,) this epoch's doc order: position p holds document docs[perm[p]]
    starts: np.ndarray  # (D + 1,) int64 token offset of each position in the concatenation
    shuffle: np.ndarray  # (S,) window served as the epoch's j-th sample

    def doc(self, pos: int) -> int:
        """Document id at position ``pos`` of this epoch's order."""
        return int(self.docs[self.perm[pos]])

    def locate(self, j: int, seq_len: int) -> tuple[int, int]:
        """(position, token offset in that position's document) where sample ``j`` starts."""
        start = int(self.shuffle[j]) * seq_len
        # side="right" lands on the last position starting at or before the token: empty documents
        # (whose start equals the next one's) are skipped.
        pos = int(self.starts.searchsorted(start, side="right")) - 1  # the method: 1 us less than np.searchsorted
        return pos, start - int(self.starts[pos])

    @property
    def nbytes(self) -> int:
        """Bytes this epoch holds (``docs`` belongs to the split and is not counted)."""
        return self.perm.nbytes + self.starts.nbytes + self.shuffle.nbytes


def build_epoch(sizes: np.ndarray, docs: np.ndarray, samples: int, seed: Sequence[int], epoch: int) -> EpochIndex:
    """The index of ``epoch``: the same draws, in the same order, as ``index_reference.reference_epoch``."""
    rng = np.random.default_rng([*seed, epoch])
    perm = permutation(rng, docs.size)
    starts = np.zeros(perm.size + 1, dtype=np.int64)
    for lo in range(0, perm.size, _CHUNK):
        hi = min(lo + _CHUNK, perm.size)
        np.cumsum(sizes[docs[perm[lo:hi]]], dtype=np.int64, out=starts[lo + 1 : hi + 1])
        starts[lo + 1 : hi + 1] += starts[lo]  # integer sums: exact, whatever the chunking
    return EpochIndex(docs, perm, starts, permutation(rng, samples))
