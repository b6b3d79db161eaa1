"""Pipeline bubble measured on this machine, against the simulator and the theory; activation memory.

Spawns ``--pp`` gloo ranks (CPU), builds a llama split by ``plan_for_model``, and for each schedule
(1f1b, interleaved with vp=2, zb-h1) runs one warm-up step and ``--steps`` measured steps with the
runtime's per-action timers (``record=True``). For each step:

- measured: a rank is busy while it computes (F, B, I, W) and idle otherwise (waiting in transfer
  batches, or before its first / after its last action) over the step's makespan (all ranks start
  together after a barrier; the makespan is the last rank's end). bubble = idle / (pp x makespan),
  and idle / busy, the "relative" measure of the theory.
- simulated: ``simulate`` on the same schedule fed with every action's duration as measured in
  that step, and, as "sim mean", with each rank's mean cost of F, B (or I and W); the latency of a
  transfer batch is the one-way time of an activation-sized ping-pong between ranks 0 and 1.
- theory: idle / busy = (p-1)/(v*m) (1F1B and interleaved, equal stages, free transfers), plus the
  slots a short last group of microbatches leaves idle when p does not divide m
  (``theory_bubble_ratio``).
- memory: the peak bytes autograd holds for activations (ActivationMeter) and the peak number of
  microbatch activations held, against the simulator's ``peak_held``.

Run (about 2 minutes on 2 cores)::

    python tools/bench/pipeline_bubble.py                  # pp 4, m 8, hidden 512, 8 layers
    python tools/bench/pipeline_bubble.py --microbatches 16 --json out.json

The last line printed is the JSON of all figures. Each rank uses one thread, and 4 ranks share 2
cores: a rank computes slower while 3 others compute than while it is alone. Replaying the measured
durations carries that into the simulation; one mean cost per action cannot (the printed max/min
duration of each action shows how much the same work varies).
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

from megatron_lite.parallel.mesh import shutdown_distributed
from megatron_lite.parallel.pipeline.actions import COMPUTE
from megatron_lite.parallel.pipeline.partition import build_stage_chunks, plan_for_model
from megatron_lite.parallel.pipeline.runtime import PipelineRuntime
from megatron_lite.parallel.pipeline.schedules import build_schedule
from megatron_lite.parallel.pipeline.simulate import Costs, simulate, theory_bubble_ratio

SCHEDULES = [("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)]


def _ping_pong(rank: int, shape: tuple[int, ...], rounds: int = 20) -> float:
    """One-way time of an activation-sized transfer between ranks 0 and 1: the simulator's
    per-batch latency (the others wait at the barrier)."""
    buf = torch.zeros(shape)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(rounds if rank < 2 else 0):
        for sender in (0, 1):
            (dist.isend if rank == sender else dist.irecv)(buf, 1 - rank).wait()
    elapsed = time.perf_counter() - t0
    dist.barrier()
    return elapsed / (2 * rounds)


def _run_schedule(rank: int, args: argparse.Namespace, name: str, vp: int) -> dict:
    """This rank's records of each measured step: compute spans, transfer-batch spans, memory."""
    cfg = llama_config(args)
    partition = plan_for_model(cfg, args.pp, vp)
    chunks = build_stage_chunks(cfg, partition, rank, seed=0)
    schedule = build_schedule(name, args.pp, vp, args.microbatches)
    runtime = PipelineRuntime(chunks, schedule, dist.group.WORLD, record=True, timeout_s=600)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, cfg.vocab_size, (args.micro_batch, cfg.seq_len + 1), generator=g) for _ in range(8)]
    micro = [(ids[i % 8][:, :-1], ids[i % 8][:, 1:]) for i in range(args.microbatches)]
    steps = []
    for step in range(args.steps + 1):
        dist.barrier()  # every rank starts the step together: a common time origin
        runtime.step(micro)
        for c in chunks:
            c.zero_grad(set_to_none=True)
        if step == 0:
            continue  # warm-up: allocator and first-touch costs
        compute = [  # (kind, microbatch, chunk, seconds)
            (r.actions[0].kind.value, r.actions[0].mb, r.actions[0].chunk, r.end - r.start)
            for r in runtime.records
            if r.actions[0].kind in COMPUTE
        ]
        meter = runtime.meter
        steps.append(
            {
                "end": runtime.records[-1].end,
                "compute": compute,
                "peak_bytes": meter.peak,
                "peak_count": meter.peak_count,
                "bytes_per_microbatch": statistics.mean(meter.sizes),
            }
        )
    return {"steps": steps, "layers": [list(c.spec.layers) for c in chunks]}


def _replayed(schedule, per_rank: list[dict], step: int, latency: float):
    """The simulator fed with every action's duration as measured in ``step``."""
    durations = [{(k, mb, c): d for k, mb, c, d in r["steps"][step]["compute"]} for r in per_rank]
    return simulate(schedule, lambda rank, a: durations[rank][(a.kind.value, a.mb, a.chunk)], p2p=latency)


def _analyse(per_rank: list[dict], args: argparse.Namespace, name: str, vp: int, latency: float) -> dict:
    pp, m, steps = args.pp, args.microbatches, range(args.steps)
    schedule = build_schedule(name, pp, vp, m)
    makespans = [max(r["steps"][s]["end"] for r in per_rank) for s in steps]
    busy = [[sum(x[3] for x in r["steps"][s]["compute"]) for r in per_rank] for s in steps]
    idle = [sum(ms - b for b in bs) for ms, bs in zip(makespans, busy)]
    exact = [_replayed(schedule, per_rank, s, latency) for s in steps]
    costs, spread = [], {}
    for r in per_rank:
        by_op = {op: [x[3] for s in r["steps"] for x in s["compute"] if x[0] == op] for op in "FBIW"}
        mean = {op: statistics.mean(v) if v else 0.0 for op, v in by_op.items()}
        costs.append((mean["F"], mean["B"] or mean["I"], mean["W"]))
        for op, v in by_op.items():
            if v:  # the same action's duration varies with how many ranks compute at once
                spread[op] = max(spread.get(op, 0.0), max(v) / min(v))
    mean_sim = simulate(schedule, [Costs(f, i, w, latency) for f, i, w in costs])
    last = [r["steps"][-1] for r in per_rank]
    return {
        "schedule": name,
        "vp": vp,
        "measured_bubble": statistics.mean(i / (pp * ms) for i, ms in zip(idle, makespans)),
        "simulated_bubble": statistics.mean(e.bubble_fraction for e in exact),
        "simulated_bubble_mean_costs": mean_sim.bubble_fraction,
        "measured_ratio": statistics.mean(i / sum(bs) for i, bs in zip(idle, busy)),
        "simulated_ratio": statistics.mean(e.bubble_ratio for e in exact),
        "simulated_ratio_mean_costs": mean_sim.bubble_ratio,
        "theory_ratio": theory_bubble_ratio(pp, vp, m),
        "step_s": statistics.mean(makespans),
        "simulated_step_s": statistics.mean(e.makespan for e in exact),
        "costs_s": {"F": [c[0] for c in costs], "B_or_I": [c[1] for c in costs], "W": [c[2] for c in costs]},
        "cost_max_over_min": spread,
        "p2p_latency_s": latency,
        "layers": [r["layers"] for r in per_rank],
        "peak_activation_mb": [s["peak_bytes"] / 2**20 for s in last],
        "peak_held_measured": [s["peak_count"] for s in last],
        "peak_held_simulated": mean_sim.peak_held,
        "activation_mb_per_microbatch": [s["bytes_per_microbatch"] / 2**20 for s in last],
    }


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)  # pp ranks share the cores; more threads only thrash
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    latency = _ping_pong(rank, (args.micro_batch, args.seq, args.hidden))
    out = []
    for name, vp in SCHEDULES:
        mine = _run_schedule(rank, args, name, vp)
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            out.append(_analyse(gathered, args, name, vp, latency))
    if rank == 0:
        results.put(out)
        results.close()
        results.join_thread()
    shutdown_distributed()


def _report(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"pp={args.pp} microbatches={args.microbatches} hidden={args.hidden} layers={args.layers} (CPU, gloo)")
    print("bubble = idle / (pp x step time); sim: each action's measured duration replayed; sim mean: mean costs")
    head = f"{'schedule':<15}{'bubble meas':>11}{'sim':>7}{'meas/sim':>9}{'sim mean':>9}"
    print(head + f"{'idle/busy meas':>15}{'sim':>7}{'theory':>7}{'step s':>7}   peak held meas/sim (MB)")
    for r in rows:
        name = r["schedule"] + (f" v{r['vp']}" if r["vp"] > 1 else "")
        held = ", ".join(
            f"{a}/{b} ({mb:.0f})"
            for a, b, mb in zip(r["peak_held_measured"], r["peak_held_simulated"], r["peak_activation_mb"])
        )
        print(
            f"{name:<15}{r['measured_bubble']:>11.1%}{r['simulated_bubble']:>7.1%}"
            f"{r['measured_bubble'] / r['simulated_bubble']:>9.2f}{r['simulated_bubble_mean_costs']:>9.1%}"
            f"{r['measured_ratio']:>15.1%}{r['simulated_ratio']:>7.1%}{r['theory_ratio']:>7.1%}"
            f"{r['step_s']:>7.2f}   {held}"
        )
    for r in rows:
        costs = " ".join(f"{k}=[{', '.join(f'{x * 1e3:.0f}' for x in v)}]ms" for k, v in r["costs_s"].items())
        spread = ", ".join(f"{k} {v:.1f}x" for k, v in r["cost_max_over_min"].items())
        print(f"  {r['schedule']}: per-rank mean costs {costs}; transfer {r['p2p_latency_s'] * 1e3:.2f} ms")
        print(f"  {' ' * len(r['schedule'])}  slowest / fastest run of the same action on a rank: {spread}")
    print(json.dumps({"args": vars(args), "results": rows}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="measured steps per schedule (after one warm-up)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Queue()
    procs = mp.start_processes(_worker, args=(args.pp, port, args, results), nprocs=args.pp, join=False)
    while not procs.join():  # raises if a rank failed
        pass
    rows = results.get(timeout=5)
    _report(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
