"""Memory and build time of the per-epoch sample index: the compact one against the int64 twin.

    python tools/bench/dataset_index.py [--docs 4000000] [--mean-tokens 1000] [--seq 1024] [--epochs 3]

A synthetic split (``--docs`` documents of 1 to ``2 * --mean-tokens - 1`` tokens, uniform; no files,
the reader returns zeros) is read as a training loader reads it: the first sample of each of
``--epochs`` epochs in turn, which builds that epoch's index. For each build: its seconds, the
highest memory the index held during it (``tracemalloc``: numpy's arrays are traced) and what it
holds after, both counted from before the first epoch. The baseline is ``data/index_reference.py``
(four int64 arrays per epoch) behind the two-epoch cache that ``gpt_dataset`` had, which built an
epoch before evicting the oldest. The script fails unless both serve the same samples. The last
line is JSON: baseline / compact ratios of the highest peak, of what is held at the end, and of
the total build time.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from collections import OrderedDict

import numpy as np

from megatron_lite.data.gpt_dataset import _PackedSplit, split_documents
from megatron_lite.data.index_reference import reference_epoch, reference_sample

MiB = 1 << 20


class FakeData:
    """What the index reads of an ``IndexedDataset``: int64 ``sizes`` and ``get`` (zeros here)."""

    def __init__(self, docs: int, mean_tokens: int) -> None:
        self.sizes = np.random.default_rng(0).integers(1, 2 * mean_tokens, docs, dtype=np.int64)

    def get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        return np.zeros(int(self.sizes[doc]) - offset if length is None else length, dtype=np.int64)


class Baseline:
    """The former ``_PackedSplit`` index: ``reference_epoch`` with two epochs cached, built then evicted."""

    def __init__(self, split: _PackedSplit) -> None:
        self.split, self.cache = split, OrderedDict()
        self.docs = split.docs.astype(np.int64)  # split_documents returned int64

    def sample(self, k: int) -> np.ndarray:
        s = self.split
        epoch, j = divmod(k, s.samples_per_epoch)
        if epoch not in self.cache:
            self.cache[epoch] = reference_epoch(s.data.sizes, self.docs, s.seq_len, s.samples_per_epoch, s._seed, epoch)
            if len(self.cache) > 2:
                self.cache.popitem(last=False)
        return reference_sample(s.data, s.seq_len, self.cache[epoch], j)


def stream(reader, samples: int, epochs: int) -> list[dict]:
    """Read the first sample of each epoch; per epoch: seconds, peak and held MiB of the index."""
    rows = []
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for e in range(epochs):
        tracemalloc.reset_peak()
        start = time.perf_counter()
        reader.sample(e * samples)
        seconds = time.perf_counter() - start
        held, peak = tracemalloc.get_traced_memory()
        rows.append({"epoch": e, "s": seconds, "peak_mib": (peak - base) / MiB, "held_mib": (held - base) / MiB})
    tracemalloc.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4_000_000)
    parser.add_argument("--mean-tokens", type=int, default=1000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    data = FakeData(args.docs, args.mean_tokens)
    split = _PackedSplit(data, split_documents(data.sizes, "train", 0.01), args.seq, 1234, "train")
    S = split.samples_per_epoch
    print(f"{data.sizes.size:,} documents, {split.num_tokens:,} train tokens, seq_len {args.seq}: {S:,} samples/epoch")
    results = {}
    for name, reader in (("baseline", Baseline(split)), ("compact", split)):
        results[name] = stream(reader, S, args.epochs)
        for r in results[name]:
            mem = f"peak {r['peak_mib']:8.1f} MiB  held {r['held_mib']:8.1f} MiB"
            print(f"{name:9s} epoch {r['epoch']}: {r['s']:6.2f} s  {mem}")
    base, new = Baseline(split), split
    for k in [0, 1, S - 1, S, 2 * S + S // 2, (args.epochs - 1) * S + 7]:
        assert np.array_equal(base.sample(k), new.sample(k)), f"sample {k} differs"
    b, c = results["baseline"], results["compact"]
    ratios = {
        "peak_ratio": round(max(r["peak_mib"] for r in b) / max(r["peak_mib"] for r in c), 2),
        "held_ratio": round(b[-1]["held_mib"] / c[-1]["held_mib"], 2),
        "build_time_ratio": round(sum(r["s"] for r in b) / sum(r["s"] for r in c), 2),
    }
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
