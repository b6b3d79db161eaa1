"""How much data-parallel communication the overlap hides, and what each rank holds in memory.

Spawns ``--dp`` gloo ranks on this machine (CPU), trains a ~21M-parameter llama for a few steps
with the distributed optimizer (reduce-scatter + all-gather) and with plain DP (all-reduce), each
with overlap off and on, and reports per step:

- exposed comm: time a rank spent BLOCKED waiting for DP collectives (grad waits in
  ``finish_grad_sync``, param waits in ``step()`` or the next forward's pre-hooks), from the
  ``on_event`` trace. With overlap off nothing runs under compute, so that figure is the full
  communication time; hidden = 1 - exposed(on) / exposed(off). Per step the smallest wait over
  ranks is taken (the rank that arrives last waits for the communication alone); the mean over
  ranks, which adds the ranks' skew, is shown next to it.
- step time (its slowest rank), and rank 0's memory for params, main grads and optimizer state
  (fp32 masters + Adam moments), from the tensors.

Run (about 2 minutes on 2 cores)::

    python tools/bench/dp_overlap.py            # defaults: dp 2, hidden 512, 4 layers, vocab 8192
    python tools/bench/dp_overlap.py --json out.json

Each rank uses one thread: the ranks share the CPU with gloo's communication threads, so the
overlap here is bounded by CPU contention, unlike a GPU where copies run on their own engines.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_common import llama_config

from megatron_lite.config import ModelConfig, OptimConfig
from megatron_lite.models.transformer import build_model, count_parameters
from megatron_lite.parallel.data_parallel import DataParallelGrads
from megatron_lite.parallel.grad_utils import clip_grad_norm_
from megatron_lite.parallel.mesh import ParallelDims, ParallelMesh, shutdown_distributed
from megatron_lite.parallel.optimizer import build_dp_optimizer

MODES = [("distributed", True, False), ("distributed", True, True), ("plain", False, False), ("plain", False, True)]


class WaitClock:
    """``on_event`` tracer: total seconds between each ``*_wait_begin`` and its ``*_wait_end``."""

    def __init__(self) -> None:
        self.total, self._open = 0.0, {}

    def __call__(self, name: str, chunk: int, bucket: int) -> None:
        kind, _, phase = name.rpartition("_")
        if phase == "begin":
            self._open[(kind, chunk, bucket)] = time.perf_counter()
        elif phase == "end":
            self.total += time.perf_counter() - self._open.pop((kind, chunk, bucket))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Run:
    """One configuration (optimizer kind x overlap) of the same model, kept alive across rounds."""

    def __init__(self, args, cfg: ModelConfig, mesh: ParallelMesh, distributed: bool, overlap: bool) -> None:
        self.args, self.cfg, self.mesh, self.clock = args, cfg, mesh, WaitClock()
        self.model = build_model(cfg, seed=1)
        self.ddp = DataParallelGrads(
            self.model,
            mesh.dp_group,
            bucket_bytes=round(args.bucket_mb * 2**20),
            overlap=overlap,
            reduce_scatter=distributed,
            on_event=self.clock,
        )
        self.opt = build_dp_optimizer(self.ddp, OptimConfig(lr=1e-4), overlap_param_gather=overlap, on_event=self.clock)
        self.gen = torch.Generator().manual_seed(dist.get_rank())
        params = self.opt.gather.data if distributed else self.model.parameters()
        self.memory = {
            "params_mb": _nbytes(params) / 2**20,
            "grads_mb": _nbytes(b.data for b in self.ddp.buffers) / 2**20,
            "optimizer_mb": 0.0,  # measured after the first step, when AdamW has created its moments
        }

    def steps(self, n: int, barrier) -> list[tuple[float, float]]:
        """(exposed comm s, step s) of each of ``n`` steps after one unmeasured step: a step's param
        waits happen in the NEXT forward, and the first step of a round has none pending."""
        out = []
        for step in range(n + 1):
            shape = (self.args.micro_batch, self.cfg.seq_len + 1)
            micro = [torch.randint(0, self.cfg.vocab_size, shape, generator=self.gen) for _ in range(self.args.micro)]
            # Start the step together, so waits measure communication, not skew. On its own group: a
            # gloo barrier waits for all work queued on its group, i.e. would absorb the param gathers.
            dist.barrier(group=barrier)
            self.clock.total, start = 0.0, time.perf_counter()
            self.ddp.zero_grad()
            for i, batch in enumerate(micro):
                with self.ddp.sync(last=i == len(micro) - 1):
                    (self.model(batch[:, :-1], batch[:, 1:]) / len(micro)).backward()
            self.ddp.finish_grad_sync()
            clip_grad_norm_(self.opt, 1.0, tp_group=self.mesh.tp_group, pp_group=self.mesh.pp_group)
            self.opt.step()
            if step:
                out.append((self.clock.total, time.perf_counter() - start))
        self.opt.finish_param_sync()  # not measured: the next round starts clean
        self.memory["optimizer_mb"] = sum(self.opt.memory_bytes().values()) / 2**20
        return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)  # the ranks share the cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    mesh, barrier = ParallelMesh.build(ParallelDims(dp=world)), dist.new_group(backend="gloo")
    cfg = llama_config(args)
    runs = [Run(args, cfg, mesh, distributed, overlap) for _, distributed, overlap in MODES]
    per_step: list[list] = [[] for _ in MODES]
    for _ in range(args.rounds):  # modes interleaved, so drift in machine speed hits them alike
        for run, samples in zip(runs, per_step):
            mine = run.steps(args.steps, barrier)
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
            # The rank that arrives last at a collective waits only for the communication, the others
            # also for it: per step the smallest wait over ranks is the exposed communication. The
            # step lasts as long as its slowest rank.
            for ranks in zip(*everyone):
                waits = [w for w, _ in ranks]
                samples.append((min(waits), sum(waits) / len(waits), max(t for _, t in ranks)))
    rows = []
    for (name, _, overlap), run, samples in zip(MODES, runs, per_step):
        exposed, exposed_mean, step_s = zip(*samples)
        rows.append(
            {
                "optimizer": name,
                "overlap": overlap,
                "exposed_s": statistics.median(exposed),
                "exposed_rank_mean_s": statistics.median(exposed_mean),
                "step_s": statistics.median(step_s),
                **run.memory,
            }
        )
    if rank == 0:
        results.put({"params": count_parameters(build_model(cfg, seed=1)), "rows": rows})
    del mesh, barrier, runs  # they hold the groups, whose gloo threads must end before exit
    shutdown_distributed()


def _report(result: dict, args: argparse.Namespace) -> None:
    print(
        f"dp={args.dp} gloo CPU, {result['params'] / 1e6:.1f}M params, micro {args.micro} x {args.micro_batch} "
        f"x {args.seq} tokens, buckets {args.bucket_mb} MB; medians of {args.rounds} x {args.steps} steps"
    )
    print(
        f"{'optimizer':<12}{'overlap':<9}{'exposed comm s':>15}{'(rank mean)':>12}{'step s':>9}"
        f"{'params MB':>11}{'grads MB':>10}{'optim MB':>10}"
    )
    for r in result["rows"]:
        print(
            f"{r['optimizer']:<12}{r['overlap']!s:<9}{r['exposed_s']:>15.3f}{r['exposed_rank_mean_s']:>12.3f}"
            f"{r['step_s']:>9.3f}"
            f"{r['params_mb']:>11.1f}{r['grads_mb']:>10.1f}{r['optimizer_mb']:>10.1f}"
        )
    for name in ("distributed", "plain"):
        off, on = (
            next(r for r in result["rows"] if r["optimizer"] == name and r["overlap"] == o) for o in (False, True)
        )
        print(
            f"{name}: overlap hides {1 - on['exposed_s'] / off['exposed_s']:.0%} of the exposed DP communication "
            f"({off['exposed_s']:.3f} s -> {on['exposed_s']:.3f} s a step)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--micro", type=int, default=2, help="microbatches per step (gradient accumulation)")
    p.add_argument("--bucket-mb", type=float, default=16.0)
    p.add_argument("--rounds", type=int, default=3, help="passes over the four configurations")
    p.add_argument("--steps", type=int, default=2, help="measured steps per configuration and round")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = mp.start_processes(_worker, args=(args.dp, port, args, results), nprocs=args.dp, join=False)
    while not procs.join():  # raises if a rank failed
        pass
    result = results.get(timeout=5)
    _report(result, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **result}, f, indent=2)


if __name__ == "__main__":
    main()
