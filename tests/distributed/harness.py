"""Spawn gloo worlds on 127.0.0.1 for tests, and fail loudly instead of hanging.

A world costs 5-13 s to start on a 2-core machine (each rank imports torch), so a :class:`World`
stays up and runs many jobs: ``world.run(fn, *args)`` calls ``fn(rank, world_size, *args)`` on every
rank and returns the per-rank results. The first rank that raises makes ``run`` kill every rank and
raise :class:`WorldError` with that rank's traceback; a job that outlives ``timeout`` does the same,
so a rank stuck in a collective whose peer died never hangs the suite. A killed world is restarted
by the next ``run``. :func:`run_world` is the one-shot form.

``fn`` must be a module-level function (it is found in the child by module name, or by file path
when pytest imported the test module under another name).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

START_TIMEOUT_S = 90.0  # 8 ranks take ~13 s on an idle 2-core machine; leave room for a busy one
PG_TIMEOUT_S = 60.0  # collectives error out after this even if the parent never kills the rank


class WorldError(RuntimeError):
    """A rank raised, died, or the job ran past its timeout."""


def _resolve(spec: tuple[str, str, str]) -> Callable[..., Any]:
    module_name, qualname, path = spec
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker(rank: int, world_size: int, jobs: mp.Queue, results: mp.Queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # n ranks share 2 cores; more threads only thrash
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    timeout = timedelta(seconds=PG_TIMEOUT_S)
    try:
        # Rank 0 binds port 0 and reports the port it got: no race for a "free" port.
        if rank == 0:
            store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
            results.put((rank, "port", True, store.port))
        port = store.port if rank == 0 else jobs.get()
        if rank != 0:
            store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        results.put((rank, "ready", True, None))
    except BaseException:
        results.put((rank, "ready", False, traceback.format_exc()))
        return
    while (job := jobs.get()) is not None:
        job_id, spec, args = job
        try:
            results.put((rank, job_id, True, _resolve(spec)(rank, world_size, *args)))
        except BaseException:
            results.put((rank, job_id, False, traceback.format_exc()))
    # Every result was collected before the parent sent None; skipping the interpreter's teardown
    # of torch and gloo saves ~1 s a rank.
    os._exit(0)


class World:
    """``n`` spawned gloo ranks that run jobs until :meth:`close` (see the module docstring)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._procs: list[mp.process.BaseProcess] = []
        self._jobs: list[mp.Queue] = []
        self._results: mp.Queue | None = None
        self._next_job = 0

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(self.n)]
        for rank in range(self.n):
            p = ctx.Process(target=_worker, args=(rank, self.n, self._jobs[rank], self._results), daemon=True)
            p.start()
            self._procs.append(p)
        deadline = time.monotonic() + START_TIMEOUT_S
        port = self._collect("port", deadline, ranks=[0])[0]
        for q in self._jobs[1:]:
            q.put(port)
        self._collect("ready", deadline, ranks=range(self.n))

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> list[Any]:
        """Run ``fn(rank, n, *args)`` on every rank; the results in rank order."""
        if not self.alive:
            self.close()
            self.start()
        self._next_job += 1
        spec = (fn.__module__, fn.__qualname__, inspect.getfile(fn))
        for q in self._jobs:
            q.put((self._next_job, spec, args))
        return self._collect(self._next_job, time.monotonic() + timeout, ranks=range(self.n))

    def _collect(self, tag: Any, deadline: float, ranks: Any) -> list[Any]:
        pending, out, dead_seen = set(ranks), {}, 0
        while pending:
            try:
                rank, got_tag, ok, value = self._results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r in pending if not self._procs[r].is_alive()]
                dead_seen = dead_seen + 1 if dead else 0
                if dead_seen > 5:  # a rank's last message may still be in the pipe when it exits
                    self._fail(f"rank(s) {dead} died (exit codes {[self._procs[r].exitcode for r in dead]})")
                if time.monotonic() > deadline:
                    self._fail(f"timed out: rank(s) {sorted(pending)} did not finish {_describe(tag)}")
                continue
            if not ok:  # whatever it was doing: a failed start-up reports as "ready"
                self._fail(f"rank {rank} raised:\n{value}")
            assert got_tag == tag, f"rank {rank} answered {got_tag!r} while the harness waited for {tag!r}"
            pending.discard(rank)
            out[rank] = value
        return [out[r] for r in sorted(out)]

    def _fail(self, message: str) -> None:
        self.close(kill=True)  # the other ranks may be blocked in a collective with the failed one
        raise WorldError(message)

    def close(self, kill: bool = False) -> None:
        """Stop every rank: politely (finish the job loop) unless ``kill``, else by SIGKILL."""
        for q, p in zip(self._jobs, self._procs):
            if p.is_alive() and not kill:
                q.put(None)
        for p in self._procs:
            if not kill:
                p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
            p.join()
        self._procs, self._jobs, self._results = [], [], None


def _describe(tag: Any) -> str:
    return "start-up" if tag in ("port", "ready") else f"job {tag}"


def run_world(n: int, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> list[Any]:
    """Start ``n`` gloo ranks, run ``fn(rank, n, *args)`` on each, stop them; results in rank order."""
    world = World(n)
    try:
        world.start()
        return world.run(fn, *args, timeout=timeout)
    finally:
        world.close()
