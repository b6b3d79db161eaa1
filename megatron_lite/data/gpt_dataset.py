"""GPT pretraining samples: packed token windows, weighted blends, and a resumable loader.

Megatron's idea, kept: a sample is a window of ``seq_len + 1`` tokens (inputs plus shifted labels)
cut from documents concatenated in a shuffled order, so no token is spent on padding. A small
per-epoch index makes that cheap (``data/sample_index.py``: numpy, int32 where exact):

- doc order: the split's documents in a per-epoch seeded order (Megatron's doc-idx), with the
  token offset where each starts in the concatenation;
- window starts: for window ``w`` of the epoch (tokens ``[w*L, w*L + L + 1)`` of the concatenation),
  the position of the document it starts in (Megatron's sample-idx), found by a ``searchsorted``
  of the offsets when the window is read rather than stored;
- shuffle: a per-epoch seeded permutation of the windows (shuffle-idx).

Windows overlap by one token (the last label of window w is the first input of window w+1), so an
epoch of ``T`` tokens yields ``(T - 1) // L`` samples and drops at most ``L`` tokens at its end.
Sample ``i`` of a dataset is window ``shuffle_e[i % S]`` of epoch ``e = i // S``: any ``i >= 0`` is
valid, and the index is computed lazily per epoch (the last one cached), or mapped from
``data.index_cache`` where one rank of the node wrote it (``data/index_cache.py``).

Several datasets are blended by a fixed interleaving that keeps every dataset within one sample of
``weight * n`` in every prefix of the stream (``data/blend.py``).

Differences from Megatron, on purpose: epochs do not share windows (each epoch is its own shuffle);
the held-out (valid) split is fixed by the files alone: its documents are drawn, and its samples
ordered, from a fixed seed mixed with the dataset's document sizes rather than the training seed, so
runs with different seeds evaluate on the same samples and their eval losses compare; and blending
uses Tijdeman's rule rather than Megatron's greedy, which can drift past one sample (see
``blend.blend_schedule``).
"""

from __future__ import annotations

import logging
import os
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import torch

from megatron_lite.data.blend import MAX_PERIOD, blend_schedule
from megatron_lite.data.index_cache import IndexCache, split_key
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.data.sample_index import EpochIndex, build_epoch, permutation
from megatron_lite.errors import UserError

log = logging.getLogger(__name__)
SPLITS = ("train", "valid")
_SPLIT_SEED = 0x5EED5


def _sizes_crc(sizes: np.ndarray) -> int:
    """CRC-32 of the document sizes as little-endian int64 (read in place: no copy when they are)."""
    return zlib.crc32(np.ascontiguousarray(sizes, dtype="<i8"))


def held_out_count(n: int, valid_fraction: float) -> int:
    """How many of ``n`` documents ``split_documents`` holds out: ``round(n * valid_fraction)``, but at
    least one when ``valid_fraction > 0`` and ``n >= 2``, and never all."""
    return 0 if valid_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * valid_fraction)))


def held_out_warnings(valid: GPTDataset, valid_fraction: float) -> list[str]:
    """A line for each dataset sampled by ``valid`` (its valid split) that holds out a document only
    because at least one is held out (``n * valid_fraction`` rounds to none), where that document is a
    larger share of the dataset's tokens than ``valid_fraction``: tokens the user did not expect to lose."""
    found = []
    for prefix, data, held, weight in zip(valid.prefixes, valid.datasets, valid.num_tokens, valid.weights, strict=True):
        n, share = int(data.sizes.size), held / max(data.num_tokens, 1)
        if weight > 0 and round(n * valid_fraction) == 0 < held_out_count(n, valid_fraction) and share > valid_fraction:
            found.append(
                f"dataset {prefix} has {n} documents, too few for data.valid_fraction={valid_fraction} to hold out "
                f"any, so one is held out for evaluation: {share:.1%} of its tokens are never trained on (split its "
                "text into more documents, e.g. JSONL lines, to hold out less)"
            )
    return found


def split_documents(sizes: np.ndarray, split: str, valid_fraction: float) -> np.ndarray:
    """Sorted document ids of ``split``: the last ``valid_fraction`` of a seeded permutation is valid.

    At least one document goes to valid when ``valid_fraction > 0`` and there are two or more, and
    train always keeps at least one. The permutation depends only on the document sizes.
    """
    n = int(sizes.size)
    n_valid = held_out_count(n, valid_fraction)
    perm = permutation(np.random.default_rng([_SPLIT_SEED, n, _sizes_crc(sizes)]), n)
    docs = perm[n - n_valid :] if split == "valid" else perm[: n - n_valid]
    return np.sort(docs)


class _PackedSplit:
    """One dataset's split, packed into ``seq_len + 1`` windows with a fresh shuffle per epoch.

    With a ``cache`` each epoch's index is mapped from its files (built and written by one rank of
    the node when absent: ``data/index_cache.py``), otherwise built in memory."""

    def __init__(
        self,
        data: IndexedDataset,
        docs: np.ndarray,
        seq_len: int,
        seed: int,
        split: str,
        cache: IndexCache | None = None,
    ) -> None:
        self.data, self.docs, self.seq_len = data, docs, seq_len
        self.num_tokens = int(data.sizes[docs].sum())
        self.samples_per_epoch = max(0, (self.num_tokens - 1) // seq_len)
        self._seed = [seed, SPLITS.index(split), _sizes_crc(data.sizes)]
        self._cache = cache
        if cache is not None:
            sizes, S = data.sizes, self.samples_per_epoch
            self._key = split_key(sizes.size, data.num_tokens, self._seed[2], split, docs, seq_len, S, self._seed)
        # One epoch only: a loader reads each dataset's samples in increasing order, so an epoch is
        # never needed again once the next is built; it is dropped first, so two never coexist.
        self._cached: tuple[int, EpochIndex] | None = None

    def _epoch(self, epoch: int) -> EpochIndex:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = None
            build = partial(build_epoch, self.data.sizes, self.docs, self.samples_per_epoch, self._seed, epoch)
            if self._cache is None:
                self._cached = (epoch, build())
            else:
                self._cached = (epoch, self._cache.epoch({**self._key, "epoch": epoch}, self.docs, build))
        return self._cached[1]

    def sample(self, k: int) -> np.ndarray:
        epoch, j = divmod(k, self.samples_per_epoch)
        ep = self._epoch(epoch)
        pos, offset = ep.locate(j, self.seq_len)
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        filled = 0
        while filled < out.size:
            doc = ep.doc(pos)
            take = min(int(self.data.sizes[doc]) - offset, out.size - filled)
            out[filled : filled + take] = self.data.get(doc, offset, take)
            filled += take
            pos += 1
            offset = 0
        return out


def _validate(prefixes: list, weights: list[float] | None, seq_len: int, seed: int, split: str, vf: float) -> None:
    if not isinstance(seq_len, int | np.integer) or seq_len <= 0:
        raise UserError(f"seq_len must be a positive integer, got {seq_len!r}")
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= vf < 1:
        raise UserError(f"valid_fraction must be in [0, 1), got {vf}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if not prefixes:
        raise UserError("GPTDataset needs at least one dataset prefix (data.path)")
    if weights is None:
        return
    fix = "give data.weights one share >= 0 per data.path entry, e.g. data.weights=[0.7,0.3], or leave it unset"
    if len(weights) != len(prefixes):
        raise UserError(f"{len(weights)} blend weights given for {len(prefixes)} datasets {prefixes}; {fix}")
    if any(not np.isfinite(w) or w < 0 for w in weights):
        raise UserError(f"blend weights (data.weights) must be finite and non-negative, got {list(weights)}; {fix}")
    if sum(weights) <= 0:
        raise UserError(
            f"blend weights (data.weights) must not all be zero, got {list(weights)}: no dataset would be "
            "sampled; give at least one dataset a positive weight"
        )
    if not np.isfinite(sum(weights)):  # each share would be w / inf = 0
        raise UserError(
            f"blend weights (data.weights) {list(weights)} add up to more than a float holds; only their "
            "ratios count, so scale them down, e.g. to shares that sum to 1"
        )


class NoHeldOutSamplesError(UserError):
    """A valid split in which no dataset of weight > 0 holds one sample: nothing to evaluate on."""


def _short_of_a_sample(prefix: str, source: _PackedSplit, split: str, valid_fraction: float) -> str | None:
    """Why ``source`` (``prefix``'s ``split``) serves no sample, and the fix; None when it serves one."""
    if source.num_tokens > source.seq_len:
        return None
    if split == "valid" and source.data.sizes.size == 1:
        return (
            f"dataset {prefix} holds a single document, so it has no held-out split (split the text into "
            "documents, e.g. JSONL lines)"
        )
    fix = (
        "use more data, a shorter seq_len or another valid_fraction"
        if split == "train"
        else "hold out more of it (a larger data.valid_fraction) or use a shorter model.seq_len"
    )
    return (
        f"dataset {prefix} has {source.num_tokens} tokens in {source.docs.size} documents of its {split!r} split "
        f"(valid_fraction={valid_fraction}), fewer than seq_len+1 = {source.seq_len + 1}; {fix}"
    )


def _same_files(a: IndexedDataset, b: IndexedDataset) -> bool:
    """Whether two prefixes name one dataset (the same ``.bin`` and ``.idx``, through any path or link)."""
    return os.path.samefile(a.bin_path, b.bin_path) and os.path.samefile(a.idx_path, b.idx_path)


class GPTDataset:
    """An endless, deterministic stream of ``seq_len + 1``-token samples from one or more datasets.

    ``weights=None`` weighs each dataset by its tokens in the split (as if they were one corpus); a
    dataset of weight 0 is never sampled, so it may hold fewer than ``seq_len + 1`` tokens.
    ``dataset[i]`` depends only on the files, ``seq_len``, ``split``, ``weights`` and, for the train
    split, ``seed`` (the valid split's order is fixed, so every seed evaluates on the same samples);
    ``index_cache`` (a directory, ``data.index_cache``) keeps the per-epoch indexes on disk for the
    ranks of a node to share and a restart to reuse, and never changes a sample.
    """

    def __init__(
        self,
        prefixes: list[str],
        weights: list[float] | None,
        seq_len: int,
        seed: int,
        split: str = "train",
        valid_fraction: float = 0.01,
        index_cache: str | Path | None = None,
    ) -> None:
        if isinstance(prefixes, str | Path):
            prefixes = [prefixes]
        prefixes = [str(p) for p in prefixes]
        _validate(prefixes, weights, seq_len, seed, split, valid_fraction)
        seq_len, seed = int(seq_len), int(seed)
        self.prefixes, self.seq_len, self.seed, self.split = prefixes, seq_len, seed, split
        self._sources: list[_PackedSplit] = []
        self.left_out: list[str] = []
        """Why each dataset of weight > 0 serves no sample of this (valid) split and is left out of its blend."""
        cache = IndexCache(index_cache) if index_cache else None
        order_seed = seed if split == "train" else _SPLIT_SEED  # held-out samples: the same for every seed
        raw = []
        for k, prefix in enumerate(prefixes):
            data = IndexedDataset(prefix)
            docs = split_documents(data.sizes, split, valid_fraction)
            for earlier, other in zip(prefixes, self._sources, strict=False):
                if _same_files(other.data, data):
                    raise UserError(
                        f"data.path lists the dataset {earlier} twice (also as {prefix}): both entries would "
                        "serve the same samples in the same order, so the run would see each sample twice "
                        "in a row; list it once and give it more weight in data.weights"
                    )
            self._sources.append(_PackedSplit(data, docs, seq_len, order_seed, split, cache))
            raw.append(self._sources[-1].num_tokens if weights is None else float(weights[k]))
            sampled = weights is None or weights[k] > 0  # weight 0: never sampled, so it needs no sample
            short = _short_of_a_sample(prefix, self._sources[-1], split, valid_fraction) if sampled else None
            if short and split == "train":
                raise UserError(short)
            if short:  # Megatron's way: each dataset's held-out split is built, and what exists is blended
                self.left_out.append(short)
                raw[-1] = 0.0
        if not any(raw):
            raise NoHeldOutSamplesError(f"no dataset of data.path serves a held-out sample: {'; '.join(self.left_out)}")
        self.weights = [w / sum(raw) for w in raw]
        self._slot_dataset, self._slot_local, self._quota = blend_schedule(self.weights)
        self._check_quotas(weights is None)

    def _check_quotas(self, by_tokens: bool) -> None:
        """A dataset whose share rounds to no sample per blend period would never be sampled."""
        zipped = zip(self.prefixes, self.weights, self._quota, strict=True)
        lost = [(p, w) for p, w, q in zipped if w > 0 and q == 0]
        if not lost:
            return
        (prefix, share), q = lost[0], self._slot_dataset.size
        why = f"share of the blend ({share:.3g}) rounds to no sample in each period of {q} samples"
        if by_tokens:
            log.warning("dataset %s is never sampled: its %s (its tokens' share; set data.weights)", prefix, why)
            return
        raise UserError(
            f"data.weights gives dataset {prefix} a weight > 0, but its {why} and it would never be sampled; "
            f"give it at least 1/{MAX_PERIOD} of the total weight, or weight 0 to leave it out on purpose"
        )

    @property
    def datasets(self) -> list[IndexedDataset]:
        """The blend's datasets, in ``prefixes`` order."""
        return [s.data for s in self._sources]

    @property
    def num_tokens(self) -> list[int]:
        """Tokens of each dataset's split."""
        return [s.num_tokens for s in self._sources]

    @property
    def samples_per_epoch(self) -> list[int]:
        """Samples in one epoch of each dataset's split."""
        return [s.samples_per_epoch for s in self._sources]

    @property
    def distinct_samples(self) -> int:
        """Samples ``[0, n)`` served before the first that repeats its dataset's split (the first of
        that dataset's second epoch): the sum of ``samples_per_epoch`` for one dataset, less in a blend,
        where the dataset that runs out first, for its share, sets it."""
        return self.first_repeat[0]

    @property
    def first_repeat(self) -> tuple[int, str]:
        """(:attr:`distinct_samples`, prefix of the dataset whose sample repeats first)."""
        q, firsts = self._slot_dataset.size, []
        for d, (samples, quota) in enumerate(zip(self.samples_per_epoch, self._quota.tolist(), strict=True)):
            if quota:
                period, local = divmod(samples, quota)
                slot = np.flatnonzero((self._slot_dataset == d) & (self._slot_local == local))[0]
                firsts.append((period * q + int(slot), self.prefixes[d]))
        return min(firsts)

    def locate(self, i: int) -> tuple[int, int]:
        """(dataset index, sample index within that dataset) of global sample ``i``."""
        period, slot = divmod(i, self._slot_dataset.size)
        d = int(self._slot_dataset[slot])
        return d, period * int(self._quota[d]) + int(self._slot_local[slot])

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample ``i`` (any ``i >= 0``): int64 array of ``seq_len + 1`` tokens."""
        i = int(i)
        if i < 0:
            raise IndexError(f"GPTDataset is endless and indexed from 0; got {i}")
        d, k = self.locate(i)
        return self._sources[d].sample(k)


class PretrainingLoader:
    """Hands each data-parallel rank its microbatches, step by step, from a ``GPTDataset``.

    Step ``s`` consumes samples ``[c, c + G)`` where ``c`` is ``consumed_samples`` (``s * G`` from a
    fresh start) and ``G = global_batch_size``; microbatch ``j`` of rank ``r`` holds samples
    ``c + j*mb*dp + r*mb + [0, mb)``. The union over ranks is therefore the same batch for every
    ``dp``, so changing the layout does not change what the model sees.
    """

    def __init__(
        self,
        dataset: GPTDataset,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
    ) -> None:
        mb, G, dp = micro_batch_size, global_batch_size, dp_size
        if mb <= 0 or G <= 0 or dp <= 0:
            raise UserError(f"micro_batch_size ({mb}), global_batch_size ({G}) and dp ({dp}) must be positive")
        if G % (mb * dp):
            raise UserError(
                f"global_batch_size {G} is not a multiple of micro_batch_size x dp = "
                f"{mb} x {dp} = {mb * dp}; "
                f"e.g. use global_batch_size {max(1, round(G / (mb * dp))) * mb * dp}"
            )
        if not 0 <= dp_rank < dp:
            raise UserError(f"dp_rank {dp_rank} is outside [0, {dp})")
        if consumed_samples < 0:
            raise UserError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.dataset = dataset
        self.micro_batch_size, self.global_batch_size = mb, G
        self.dp_rank, self.dp_size = dp_rank, dp
        self.consumed_samples = int(consumed_samples)

    @property
    def num_microbatches(self) -> int:
        """Microbatches per rank per step: ``G // (mb * dp)``."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def next_step(self) -> list[torch.Tensor]:
        """This rank's microbatches for the next optimizer step, each ``(mb, seq_len + 1)`` int64."""
        mb, stride = self.micro_batch_size, self.micro_batch_size * self.dp_size
        base = self.consumed_samples + self.dp_rank * mb
        batches = []
        for j in range(self.num_microbatches):
            first = base + j * stride
            rows = [self.dataset[first + t] for t in range(mb)]
            batches.append(torch.from_numpy(np.stack(rows)))  # (mb, seq_len + 1)
        self.consumed_samples += self.global_batch_size
        return batches

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved loader stopped."""
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise UserError(f"consumed_samples in a loader state must be >= 0, got {consumed}")
        self.consumed_samples = consumed
