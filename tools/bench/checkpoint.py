"""Checkpoint cost: how long a save blocks training (sync vs async), and save/load throughput.

    python tools/bench/checkpoint.py [--layers 8] [--hidden 768] [--vocab 32000] [--repeats 3] [--dir DIR]

One process, the real :class:`~megatron_lite.training.engine.Engine` after one AdamW step (so the
moments exist), fp32: a checkpoint holds 12 bytes per parameter (master weights and two moments).

- sync save: ``Checkpointer.save`` with ``async_save=False``; all of it blocks the training loop.
- async save: the blocking part is the copy to host memory (into buffers kept from the previous
  save, as in training; the first save also allocates them) plus starting the writer thread;
  ``commit`` is the time until the checkpoint is complete (``wait()``), during which training
  would run (here the process idles, so the write has the disk and the cores to itself).
- load: the collective verification (sha256 of every file) and the box-by-box read into a fresh
  engine (``Engine.load_sharded_state``), reported separately.

MB/s are decimal megabytes of checkpoint files per second. Each figure is the median of
``--repeats`` runs. The last line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megatron_lite import plan
from megatron_lite.checkpoint.reader import find_checkpoint
from megatron_lite.checkpoint.writer import Checkpointer
from megatron_lite.config import Config, fill_defaults
from megatron_lite.parallel.mesh import ParallelDims, ParallelMesh
from megatron_lite.training.engine import Engine


def build_engine(args: argparse.Namespace) -> Engine:
    cfg = Config()
    m = cfg.model
    m.layers, m.hidden, m.heads, m.seq_len = args.layers, args.hidden, args.hidden // 64, 64
    cfg.train.micro_batch_size = cfg.train.global_batch_size = 2
    fill_defaults(cfg, vocab_size=args.vocab)
    mesh, layout = ParallelMesh.build(ParallelDims()), plan.check_layout(cfg, 1)
    engine = Engine(cfg, mesh, layout, torch.device("cpu"), torch.float32)
    batch = torch.randint(0, args.vocab, (2, m.seq_len + 1), generator=torch.Generator().manual_seed(0))
    engine.step([batch], lr=1e-4)  # creates the Adam moments
    return engine


def save_once(engine: Engine, writer: Checkpointer, root: Path) -> tuple[float, float]:
    """(seconds the caller was blocked, seconds until the checkpoint was committed)."""
    shutil.rmtree(root, ignore_errors=True)
    meta = {"step": 1, "weights_only": False, "config": engine.cfg.to_dict(), "optimizer": {"step": 1}}
    meta.update(layout={"world_size": 1, "param_dtype": "float32"}, trainer=None, lineage=None)
    start = time.perf_counter()
    pieces, _ = engine.sharded_state()
    writer.save(1, pieces, {"rng/torch": torch.get_rng_state()}, (0, 0, 0), meta)
    blocked = time.perf_counter() - start
    writer.wait()
    return blocked, time.perf_counter() - start


def load_once(engine: Engine, root: Path) -> tuple[float, float]:
    """(seconds verifying, seconds reading into ``engine``)."""
    start = time.perf_counter()
    reader = find_checkpoint(root)
    verified = time.perf_counter()
    engine.load_sharded_state(reader, reader.meta["optimizer"]["step"])
    return verified - start, time.perf_counter() - verified


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    torch.manual_seed(0)
    engine, fresh = build_engine(args), build_engine(args)
    params = sum(p.numel() for c in engine.chunks for p in c.parameters())
    base = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    root = base / "ckpt"
    runs = {"sync": [], "async": [], "load": []}
    # one writer per mode for the whole run, as the trainer has (async reuses its host buffers)
    writers = {mode: Checkpointer(root, keep=1, async_save=mode == "async") for mode in ("sync", "async")}
    for _ in range(args.repeats):
        for mode, writer in writers.items():
            runs[mode].append(save_once(engine, writer, root))
        runs["load"].append(load_once(fresh, root))
    mb = sum(f.stat().st_size for f in (root / "step_00000001").iterdir()) / 1e6
    med = {k: [statistics.median(x) for x in zip(*v, strict=True)] for k, v in runs.items()}
    out = {
        "parameters": params,
        "checkpoint_mb": round(mb, 1),
        "sync_blocking_s": round(med["sync"][0], 3),
        "async_blocking_s": round(med["async"][0], 3),
        "async_commit_s": round(med["async"][1], 3),
        "save_mb_per_s": round(mb / med["sync"][1], 1),
        "verify_mb_per_s": round(mb / med["load"][0], 1),
        "load_mb_per_s": round(mb / med["load"][1], 1),
    }
    print(f"model: {params / 1e6:.1f}M parameters, checkpoint {mb:.0f} MB ({base})")
    print(f"save blocks training: sync {out['sync_blocking_s']:.3f} s, async {out['async_blocking_s']:.3f} s")
    print(f"async save committed after {out['async_commit_s']:.3f} s")
    print(f"throughput: save {out['save_mb_per_s']:.0f} MB/s, verify {out['verify_mb_per_s']:.0f} MB/s, ", end="")
    print(f"load {out['load_mb_per_s']:.0f} MB/s")
    print(json.dumps(out))
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
