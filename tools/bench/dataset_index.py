"""Memory and build time of the per-epoch sample index: the compact one against the int64 twin.

    python tools/bench/dataset_index.py [--docs 4000000] [--mean-tokens 1000] [--seq 1024] [--epochs 3]
        [--open] [--cache]

A synthetic split (``--docs`` documents of 1 to ``2 * --mean-tokens - 1`` tokens, uniform; no files,
the reader returns zeros) is read as a training loader reads it: the first sample of each of
``--epochs`` epochs in turn, which builds that epoch's index. For each build: its seconds, the
highest memory the index held during it (``tracemalloc``: numpy's arrays are traced) and what it
holds after, both counted from before the first epoch. The baseline is ``data/index_reference.py``
(four int64 arrays per epoch) behind the two-epoch cache that ``gpt_dataset`` had, which built an
epoch before evicting the oldest. The script fails unless both serve the same samples. The last
line is JSON: baseline / compact ratios of the highest peak, of what is held at the end, and of
the total build time; and compact / baseline samples read per second once an epoch is built.

With ``--open``, it first measures opening the same sizes as an ``IndexedDataset`` (an ``.idx``
written in a temporary folder, the ``.bin`` a sparse file of the right length): the mapped document
table against reading it whole into int64 arrays, as ``_read_index`` did, with the same checks.

With ``--cache``, it then reads the same epochs through ``data.index_cache`` (a temporary folder):
once building and writing each epoch (``cache-build``), then from a fresh split that maps the files
(``cache-open``: the files' checksums are read, nothing is built), as a restarted rank, or a rank of
the node that did not build, opens them. ``tracemalloc`` counts what a rank holds privately; the
mapped files are page cache, shared by the node's ranks, and are given apart as bytes per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import tracemalloc
from collections import OrderedDict

import numpy as np

from megatron_lite.data import indexed
from megatron_lite.data.gpt_dataset import _PackedSplit, split_documents
from megatron_lite.data.index_cache import IndexCache
from megatron_lite.data.index_reference import reference_epoch, reference_sample

MiB = 1 << 20


class FakeData:
    """What the index reads of an ``IndexedDataset``: int64 ``sizes`` and ``get`` (zeros here)."""

    def __init__(self, docs: int, mean_tokens: int) -> None:
        self.sizes = np.random.default_rng(0).integers(1, 2 * mean_tokens, docs, dtype=np.int64)
        self.num_tokens = int(self.sizes.sum())

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


def read_table_whole(idx_path: str, num_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """The former ``_read_index`` table: read, copied into int64 offsets and sizes, checked whole."""
    table = np.fromfile(idx_path, dtype="<i8", offset=indexed._HEADER.size)
    offsets, sizes = table[:num_docs].astype(np.int64), table[num_docs:].astype(np.int64)
    assert not (sizes < 0).any()
    ends = offsets + sizes
    assert offsets[0] == 0 and not np.flatnonzero(offsets[1:] != ends[:-1]).size
    return offsets, sizes


def traced(fn) -> tuple[float, float, float]:
    """(seconds, peak MiB, held MiB) of ``fn()``, by tracemalloc; what it returns is kept meanwhile."""
    tracemalloc.start()
    start = time.perf_counter()
    kept = fn()
    seconds = time.perf_counter() - start
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del kept
    return seconds, peak / MiB, held / MiB


def open_dataset(sizes: np.ndarray) -> dict:
    """Opening ``sizes`` as an ``IndexedDataset``: whole-read baseline against the mapped table."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "d")
        offsets = np.zeros_like(sizes)
        np.cumsum(sizes[:-1], out=offsets[1:])
        header = indexed._HEADER.pack(indexed.MAGIC, indexed.VERSION, 1, sizes.size, int(sizes.sum()))
        with open(prefix + ".idx", "wb") as f:
            f.write(header + offsets.astype("<i8").tobytes() + sizes.astype("<i8").tobytes())
        with open(prefix + ".bin", "wb") as f:
            f.truncate(int(sizes.sum()) * 2)  # uint16 tokens; sparse: never read here
        rows = {"baseline": traced(lambda: read_table_whole(prefix + ".idx", sizes.size))}
        rows["mapped"] = traced(lambda: indexed.IndexedDataset(prefix))
    for name, (seconds, peak, held) in rows.items():
        print(f"open .idx {name:8s}: {seconds:6.2f} s  peak {peak:8.1f} MiB  held {held:8.1f} MiB")
    return {"open_peak_ratio": round(rows["baseline"][1] / rows["mapped"][1], 2)}


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


def cached(split: _PackedSplit, epochs: int, compact: list[dict]) -> dict:
    """Read ``epochs`` epochs through an index cache: building it, then mapping it from a fresh split."""
    S = split.samples_per_epoch
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for name in ("cache-build", "cache-open"):
            reader = _PackedSplit(split.data, split.docs, split.seq_len, split._seed[0], "train", IndexCache(tmp))
            rows[name] = stream(reader, S, epochs)
            for r in rows[name]:
                mem = f"peak {r['peak_mib']:8.1f} MiB  held {r['held_mib']:8.1f} MiB"
                print(f"{name:11s} epoch {r['epoch']}: {r['s']:6.2f} s  {mem}")
            for k in [0, 1, S - 1, S + 3, (epochs - 1) * S + 7]:
                assert np.array_equal(reader.sample(k), split.sample(k)), f"{name}: sample {k} differs"
        reader.sample(0)  # mapped: what follows times the lookups alone
        start = time.perf_counter()
        for k in range(1, 20_001):
            reader.sample(k)
        reads = 20_000 / (time.perf_counter() - start)
        print(f"cache-open  reads {reads:,.0f} samples/s (the mapped index; lookup cost)")
        mapped = sum(f.stat().st_size for f in os.scandir(tmp) if f.name.endswith(".npy")) / epochs / MiB
    print(f"cache files: {mapped:.1f} MiB per epoch (page cache, shared by the node's ranks)")
    build, opened = rows["cache-build"], rows["cache-open"]
    return {
        "cache_open_vs_build_time": round(sum(r["s"] for r in opened) / sum(r["s"] for r in compact), 3),
        "cache_open_peak_mib": round(max(r["peak_mib"] for r in opened), 1),
        "cache_build_peak_mib": round(max(r["peak_mib"] for r in build), 1),
        "cache_mib_per_epoch": round(mapped, 1),
        "cache_reads_per_s": round(reads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4_000_000)
    parser.add_argument("--mean-tokens", type=int, default=1000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--open", action="store_true", help="also measure opening the sizes as a dataset")
    parser.add_argument("--cache", action="store_true", help="also read the epochs through data.index_cache")
    args = parser.parse_args()
    data = FakeData(args.docs, args.mean_tokens)
    opened = open_dataset(data.sizes) if args.open else {}
    split = _PackedSplit(data, split_documents(data.sizes, "train", 0.01), args.seq, 1234, "train")
    S = split.samples_per_epoch
    print(f"{data.sizes.size:,} documents, {split.num_tokens:,} train tokens, seq_len {args.seq}: {S:,} samples/epoch")
    results = {}
    for name, reader in (("baseline", Baseline(split)), ("compact", split)):
        results[name] = stream(reader, S, args.epochs)
        for r in results[name]:
            mem = f"peak {r['peak_mib']:8.1f} MiB  held {r['held_mib']:8.1f} MiB"
            print(f"{name:9s} epoch {r['epoch']}: {r['s']:6.2f} s  {mem}")
    reads = {}
    for name, reader in (("baseline", Baseline(split)), ("compact", split)):
        reader.sample(0)  # built: what follows times the lookups alone
        start = time.perf_counter()
        for k in range(1, 20_001):
            reader.sample(k)
        reads[name] = 20_000 / (time.perf_counter() - start)
        print(f"{name:9s} reads {reads[name]:,.0f} samples/s (the reader returns zeros: lookup cost)")
    base, new = Baseline(split), split
    for k in [0, 1, S - 1, S, 2 * S + S // 2, (args.epochs - 1) * S + 7]:
        assert np.array_equal(base.sample(k), new.sample(k)), f"sample {k} differs"
    b, c = results["baseline"], results["compact"]
    ratios = {
        "peak_ratio": round(max(r["peak_mib"] for r in b) / max(r["peak_mib"] for r in c), 2),
        "held_ratio": round(b[-1]["held_mib"] / c[-1]["held_mib"], 2),
        "build_time_ratio": round(sum(r["s"] for r in b) / sum(r["s"] for r in c), 2),
        "read_speed_ratio": round(reads["compact"] / reads["baseline"], 2),
        **opened,
        **(cached(split, args.epochs, c) if args.cache else {}),
    }
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
