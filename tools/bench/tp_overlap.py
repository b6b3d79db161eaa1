"""Exposed TP backward communication of ColumnParallelLinear, async overlap on vs off (gloo, CPU).

    python tools/bench/tp_overlap.py                      # tp=2, 8192 tokens, 1024 -> 2048
    python tools/bench/tp_overlap.py --tokens 4096 --iters 3

Spawns ``--tp`` gloo processes on 127.0.0.1 (one thread each). Per mode (plain TP: input-grad
all-reduce; SP: input re-gather + input-grad reduce-scatter) and overlap setting it times the
layer's backward and the time spent blocked in ``Pending.wait()`` during it: the EXPOSED
communication. With overlap off each collective is waited on right after its launch, so its
exposed time is its TOTAL; hidden = 1 - exposed(on) / exposed(off). The same collectives run alone
(outside backward) are shown for reference. Medians over ``--iters``; rank 0 prints a table, then
one JSON line. CPU figures only show that the overlap works: the GPU ratio depends on NCCL and GEMM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megatron_lite.parallel import comm
from megatron_lite.parallel.mappings import SEQ_DIM
from megatron_lite.parallel.mesh import shutdown_distributed
from megatron_lite.parallel.tensor_parallel import ColumnParallelLinear


class _WaitTimer:
    """Adds up the time spent inside ``comm.Pending.wait`` while active (the bench's only hook)."""

    def __init__(self) -> None:
        self.seconds, self.active = 0.0, False
        original = comm.Pending.wait

        def timed_wait(pending: comm.Pending) -> torch.Tensor:
            t0 = time.perf_counter()
            out = original(pending)
            if self.active:
                self.seconds += time.perf_counter() - t0
            return out

        comm.Pending.wait = timed_wait


def _median_ms(samples: list[float]) -> float:
    return round(1e3 * statistics.median(samples), 2)


def _comm_alone(x: torch.Tensor, grad_x: torch.Tensor, sp: bool, group, iters: int) -> float:
    """The backward's collectives alone, each waited on right after its launch: how long backward
    would block with no overlap (launch costs, e.g. the out-of-place copy, excluded as in backward)."""
    pendings = (
        [lambda: comm.start_all_gather(x, SEQ_DIM, group), lambda: comm.start_reduce_scatter(grad_x, SEQ_DIM, group)]
        if sp
        else [lambda: comm.start_all_reduce(grad_x, group)]
    )
    times = []
    for _ in range(iters + 1):
        dist.barrier(group)
        blocked = 0.0
        for start in pendings:
            pending = start()
            t0 = time.perf_counter()
            pending.wait()
            blocked += time.perf_counter() - t0
        times.append(blocked)
    return _median_ms(times[1:])


def _measure(args: argparse.Namespace, timer: _WaitTimer, sp: bool, overlap: bool) -> tuple[dict, list]:
    group, tp = dist.group.WORLD, dist.get_world_size()
    torch.manual_seed(0)
    full = nn.Linear(args.hidden, args.out, bias=False)
    layer = ColumnParallelLinear.from_linear(full, group, sequence_parallel=sp, overlap_grad_comm=overlap)
    tokens = args.tokens // tp if sp else args.tokens
    x = torch.randn(1, tokens, args.hidden, requires_grad=True)
    grad_y = torch.randn(1, args.tokens, args.out // tp)
    backward, exposed = [], []
    for _ in range(args.iters + 1):  # the first iteration warms up allocator and gloo buffers
        y = layer(x)
        dist.barrier(group)
        timer.seconds, timer.active = 0.0, True
        t0 = time.perf_counter()
        y.backward(grad_y)
        backward.append(time.perf_counter() - t0)
        timer.active = False
        exposed.append(timer.seconds)
        x.grad = layer.weight.grad = None
    row = {"mode": "sp" if sp else "tp", "overlap": overlap, "backward_ms": _median_ms(backward[1:])}
    return row | {"exposed_comm_ms": _median_ms(exposed[1:])}, [x.detach(), torch.randn(1, args.tokens, args.hidden)]


def _mode_rows(args: argparse.Namespace, timer: _WaitTimer, sp: bool) -> list[dict]:
    """Overlap off, then on, then the collectives alone. hidden % compares the exposed time with
    overlap on against overlap off (the same collectives inside the same backward, under the same
    load: the shared machine makes standalone timings drift by 2x between runs)."""
    (off, tensors), (on, _) = (_measure(args, timer, sp, overlap) for overlap in (False, True))
    alone = _comm_alone(*tensors, sp, dist.group.WORLD, 2 * args.iters)
    off |= {"comm_alone_ms": alone, "hidden_pct": None}
    on |= {"comm_alone_ms": alone, "hidden_pct": round(100 * (1 - on["exposed_comm_ms"] / off["exposed_comm_ms"]), 1)}
    return [off, on]


def _rank_main(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.tp, timeout=timedelta(seconds=120)
    )
    timer = _WaitTimer()
    rows = _mode_rows(args, timer, sp=False) + _mode_rows(args, timer, sp=True)
    if rank == 0:
        print(f"tp={args.tp} gloo CPU, tokens={args.tokens}, Linear({args.hidden} -> {args.out}), fp32")
        print(
            f"{'mode':<6}{'overlap':<9}{'backward ms':>13}{'exposed comm ms':>17}{'comm alone ms':>15}{'hidden %':>10}"
        )
        for r in rows:
            print(
                f"{r['mode']:<6}{('on' if r['overlap'] else 'off'):<9}{r['backward_ms']:>13}"
                f"{r['exposed_comm_ms']:>17}{r['comm_alone_ms']:>15}{r['hidden_pct'] or '-':>10}"
            )
        print(json.dumps({"bench": "tp_overlap", "tp": args.tp, **vars(args), "results": rows}))
    shutdown_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8192, help="B*T of the full sequence")
    parser.add_argument("--hidden", type=int, default=1024, help="input features")
    parser.add_argument("--out", type=int, default=2048, help="output features (split over tp)")
    parser.add_argument("--iters", type=int, default=7)
    args = parser.parse_args()
    port = int(os.environ.get("MASTER_PORT", "29511"))
    mp.spawn(_rank_main, args=(args, port), nprocs=args.tp, join=True)


if __name__ == "__main__":
    main()
