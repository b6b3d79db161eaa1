"""Preprocessing throughput: ``preprocess(workers=1)`` against ``workers=N``, on the same corpus.

    python tools/bench/preprocess.py [--workers 1 2] [--repeats 3] [--max-mb 0] [--tokenizer MODEL]

The corpus is the Python standard library's own ``.py`` files (``data/corpus.py``: every machine has
it), each file one document, ~30 MB; ``--max-mb`` keeps the first files up to that many megabytes.
Without ``--tokenizer`` a 8192-token BPE tokenizer is first trained on 8 MB of it, as the embedded
corpus's is. Each round runs every worker count once, in turn (interleaved, so a machine that gets
busier part-way penalises them alike); the figure is the median wall time of the whole call (pool
start-up included) over ``--repeats`` rounds. Every run's ``.bin``/``.idx`` must be byte-identical
to the first, or the script fails. The last line is JSON: tokens/s per worker count and each
count's speed-up over the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from megatron_lite.data.corpus import default_corpus_files
from megatron_lite.data.preprocess import preprocess
from megatron_lite.data.tokenizer import train_tokenizer


def corpus(max_mb: float) -> list[Path]:
    files = default_corpus_files()
    if max_mb <= 0:
        return files
    kept, size = [], 0
    for path in files:
        if size >= max_mb * 1e6:
            break
        kept.append(path)
        size += path.stat().st_size
    return kept


def run(files: list[Path], tokenizer: Path, out: Path, workers: int) -> tuple[float, int, bytes]:
    """(seconds, tokens, the .bin and .idx bytes) of one preprocess call."""
    start = time.perf_counter()
    stats = preprocess(files, tokenizer, out, progress=False, overwrite=True, workers=workers)
    seconds = time.perf_counter() - start
    return seconds, int(stats["tokens"]), Path(f"{out}.bin").read_bytes() + Path(f"{out}.idx").read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-mb", type=float, default=0, help="corpus size cap in MB (0: all of it)")
    parser.add_argument("--tokenizer", type=Path, help="a .model (default: train one on the corpus)")
    args = parser.parse_args()
    files = corpus(args.max_mb)
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        tok = args.tokenizer or train_tokenizer(files, Path(tmp) / "tok", 8192, 8_000_000, progress=False)
        print(f"corpus: {len(files)} stdlib files, {megabytes:.1f} MB; tokenizer {tok}; {os.cpu_count()} CPUs")
        times: dict[int, list[float]] = {w: [] for w in args.workers}
        reference, tokens = None, 0
        for _ in range(args.repeats):
            for workers in args.workers:
                seconds, tokens, data = run(files, tok, Path(tmp) / f"w{workers}", workers)
                reference = reference or data
                if data != reference:
                    raise SystemExit(f"workers={workers} wrote other bytes than workers={args.workers[0]}")
                times[workers].append(seconds)
    speed = {w: tokens / statistics.median(t) for w, t in times.items()}
    base = speed[args.workers[0]]
    print(f"{tokens:,} tokens; outputs byte-identical across worker counts")
    print("| workers | median s | tokens/s | vs first |\n|---|---|---|---|")
    for w in args.workers:
        print(f"| {w} | {statistics.median(times[w]):.2f} | {speed[w]:,.0f} | {speed[w] / base:.2f}x |")
    result = {f"workers_{w}_tokens_per_s": round(speed[w]) for w in args.workers}
    result.update({f"ratio_{w}_vs_{args.workers[0]}": round(speed[w] / base, 3) for w in args.workers[1:]})
    print(json.dumps(result))


if __name__ == "__main__":  # the workers are spawned: they import this file and must not run it
    main()
