"""The flat parameter buffers the distributed optimizer all-gathers its updated shards into.

:class:`ParamGather` is the gather half of :class:`~megatron_lite.parallel.optimizer.DistributedAdamW`
(ZeRO-1): every model parameter becomes a view of its chunk's flat buffer, and each bucket is
refreshed by one in-place all-gather, waited for by the caller or, with ``overlap_param_gather``, in
the forward pre-hook of the first module whose own parameters live in it. How the buckets are
ordered and why some are waited when their chunk's forward starts: ``optimizer.py``'s module docstring.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.parallel import comm
from megatron_lite.parallel.data_parallel import DataParallelGrads, EventHook


class ParamGather:
    """Flat parameter buffers, one per chunk, refreshed bucket by bucket by in-place all-gathers.

    ``data[c]``: chunk c's parameters in its grad buffer's layout, in their own dtype; every
    parameter is re-pointed to its slice. ``shards``: per bucket, in buffer order, (chunk, bucket,
    lo, hi) of this rank's shard in buffer coordinates; ``shard_offsets`` where each starts in the
    concatenated (shard_numel,) source passed to :meth:`launch`. With ``overlap`` each bucket is
    waited in forward pre-hooks (see ``optimizer.py``'s module docstring), else by the caller
    (:meth:`finish`).
    """

    def __init__(self, ddp: DataParallelGrads, overlap: bool, on_event: EventHook | None) -> None:
        self.ddp, self.overlap, self.on_event = ddp, overlap, on_event
        self.data = [self._flat_param_buffer(buffer) for buffer in ddp.buffers]
        self.shards = [(b.chunk, k.index, *k.shard_range(b.dp_rank, b.dp)) for b in ddp.buffers for k in b.buckets]
        sizes = [hi - lo for *_, lo, hi in self.shards]
        self.shard_offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.shard_numel = sum(sizes)
        self.pending: dict[tuple[int, int], comm.Pending] = {}
        self.order: list[int] | None = None  # launch order (indices into shards), fixed at the first launch
        self.early: set[tuple[int, int]] = set()  # buckets waited when their chunk's forward starts
        self._fired: set[int] = set()  # id()s of modules whose pre-hook ran before the first launch
        self._owners: dict[nn.Parameter, list[nn.Module]] = {}
        if overlap:
            self._register_hooks()

    @staticmethod
    def _flat_param_buffer(buffer) -> torch.Tensor:
        dtypes = {p.dtype for p in buffer.params}
        if len(dtypes) != 1:
            raise ValueError(f"model chunk {buffer.chunk} mixes parameter dtypes {sorted(map(str, dtypes))}")
        data = torch.zeros(buffer.data.numel(), dtype=dtypes.pop(), device=buffer.data.device)
        for p in buffer.params:
            lo, hi = buffer.offsets[p]
            data[lo:hi].copy_(p.detach().reshape(-1))
            p.data = data[lo:hi].view(p.shape)
        return data

    def _register_hooks(self) -> None:
        for buffer, chunk in zip(self.ddp.buffers, self.ddp.chunks):
            chunk.register_forward_pre_hook(functools.partial(self._chunk_pre_hook, buffer.chunk))
            for module in chunk.modules():
                own = [p for p in module.parameters(recurse=False) if p in buffer.bucket_of]
                for p in own:
                    self._owners.setdefault(p, []).append(module)
                keys = sorted({(buffer.chunk, buffer.bucket_of[p].index) for p in own})
                if keys:
                    module.register_forward_pre_hook(functools.partial(self._module_pre_hook, keys))

    def _chunk_pre_hook(self, chunk: int, module: nn.Module, args: tuple) -> None:
        self._wait(sorted(k for k in self.early if k[0] == chunk))

    def _module_pre_hook(self, keys: list[tuple[int, int]], module: nn.Module, args: tuple) -> None:
        if self.order is None:
            self._fired.add(id(module))
        self._wait(keys)

    def _plan_order(self) -> list[int]:
        """Buckets holding a parameter whose module never ran its forward go first (and are waited
        at the chunk's start), the rest in forward order: chunk by chunk, last bucket first. The
        early set is OR-ed over dp ranks, as every rank must launch the same sequence."""
        early = [False] * len(self.shards)
        if self.overlap:  # without overlap nothing is waited in a forward: no early buckets
            for i, (c, b, _, _) in enumerate(self.shards):
                params = self.ddp.buffers[c].buckets[b].params
                early[i] = any(all(id(m) not in self._fired for m in self._owners[p]) for p in params)
            # on the buffers' device: NCCL reduces GPU tensors only
            votes = torch.tensor(early, dtype=torch.float32, device=self.data[0].device)
            early = [bool(v) for v in comm.all_reduce(votes, self.ddp.dp_group, op=dist.ReduceOp.MAX).tolist()]
        self.early = {self.shards[i][:2] for i in range(len(self.shards)) if early[i]}
        return sorted(range(len(self.shards)), key=lambda i: (not early[i], self.shards[i][0], -self.shards[i][1]))

    def launch_order(self) -> list[int]:
        """Bucket shards (indices into ``shards``) in the order to update and gather them; fixed at
        the first call, i.e. the first step, after the forwards that revealed the early buckets."""
        if self.order is None:
            self.order = self._plan_order()
        return self.order

    @torch.no_grad()
    def launch(self, i: int, source: torch.Tensor) -> None:
        """Cast bucket shard ``i`` from ``source`` (shard_numel,) into the parameter buffer and
        launch its all-gather."""
        c, b, lo, hi = self.shards[i]
        data, bucket = self.data[c], self.ddp.buffers[c].buckets[b]
        data[lo:hi].copy_(source[self.shard_offsets[i] : self.shard_offsets[i] + hi - lo])
        self.pending[(c, b)] = comm.start_all_gather_(data[bucket.start : bucket.end], self.ddp.dp_group)
        self._emit("param_launch", c, b)

    def refresh(self, source: torch.Tensor) -> None:
        """Gather every bucket from ``source`` and wait (no overlap). Before the first step (a
        resume) the buckets go in shard order and the launch order stays unplanned: it needs the
        forwards of the first step to find the early buckets."""
        for i in self.order if self.order is not None else range(len(self.shards)):
            self.launch(i, source)
        self.finish()

    def finish(self) -> None:
        """Wait for every all-gather in flight."""
        self._wait(list(self.pending))

    def _wait(self, keys: Iterable[tuple[int, int]]) -> None:
        for key in keys:
            pending = self.pending.pop(key, None)
            if pending is not None:
                self._emit("param_wait_begin", *key)
                pending.wait()
                self._emit("param_wait_end", *key)

    def _emit(self, name: str, chunk: int, bucket: int) -> None:
        if self.on_event is not None:
            self.on_event(name, chunk, bucket)
