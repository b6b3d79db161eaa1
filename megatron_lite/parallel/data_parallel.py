"""Data-parallel gradients: fp32 main-grad buffers in buckets, reduced while backward runs.

Layout. Each model chunk (a pipeline rank holds one, or ``vp`` under interleaving) gets one
:class:`GradBuffer`: a flat fp32 tensor holding every trainable parameter's gradient, in REVERSE
registration order, because backward produces the last layers' grads first. The buffer is cut
into buckets of whole parameters of about ``bucket_numel`` elements; each bucket is padded to a
multiple of ``dp * ALIGN`` so it splits into dp equal shards (a reduce-scatter needs equal
chunks) and rank r owns shard r of every bucket (the distributed optimizer updates exactly that).
``param.main_grad`` is the parameter's (shape-of-param) fp32 view into the buffer.

Hooks. ``register_post_accumulate_grad_hook`` on each parameter adds ``param.grad`` (any dtype)
into ``param.main_grad`` and frees ``param.grad``, so at most one parameter's low-precision grad
is alive at a time. On the LAST microbatch of a step (the caller says which: :meth:`sync` or
:meth:`set_last_microbatch`; the default is "last", so a loop without accumulation needs
nothing), with ``overlap=True``, a bucket whose parameters have all reported launches its async
collective at once, so the communication runs under the rest of backward. Buckets launch in
bucket order (a ready bucket waits for its predecessors): every rank then issues the same
sequence of collectives whatever order autograd fires the hooks in. Nothing is reduced during
the other microbatches. With ``overlap=False`` every bucket is reduced in
:meth:`finish_grad_sync`.

Reduction. ``reduce_scatter=True`` (distributed optimizer): an in-place reduce-scatter per bucket;
afterwards only this rank's shard of each bucket holds the reduced gradient. Otherwise an
in-place all-reduce; every element is reduced. Always in fp32 (the buffer's dtype), whatever the
parameters' dtype. Averaging over dp is a PRE-scale by 1/dp of the bucket right before its launch
(gloo has no PREMUL_SUM, so it is one extra multiply; for dp a power of two it is exact, so pre-
and post-scaling give bitwise the same result).

One step of the trainer without pipeline parallelism::

    ddp.zero_grad()
    for i, batch in enumerate(micro):
        with ddp.sync(last=i == len(micro) - 1):
            (model(batch) / len(micro)).backward()
    ddp.finish_grad_sync()  # waits every outstanding reduction; main grads are now averaged

Under pipeline parallelism: ``ddp.zero_grad(); ddp.set_last_microbatch(False)``, the runtime's
``before_last_backward(c)`` calls ``ddp.buffers[c].set_last_microbatch(True)`` right before chunk
c's last backward (its last W under a split backward), so that chunk's buckets launch while the
other chunks still compute, then ``ddp.finish_grad_sync()`` after the schedule.

A weight held by ranks of another group too (a tied embedding: the first and the last pipeline
stage each hold a copy) is given as ``tied``: it gets a bucket of its own, so its shards cover the
same elements on every holder, is reduced over dp like any bucket, and :meth:`finish_grad_sync`
then sums the reduced values over that group (Megatron's order). A sum of the two copies' values
is the same bits on both holders, so the copies, stepped alike, stay bitwise equal; summed before
the dp reduction, each holder would reduce its own buffer layout, in its own order of additions.

``on_event(name, chunk, bucket)``, optional, is called at ``grad_ready`` (a hook ran),
``grad_launch`` and ``grad_wait_begin`` / ``grad_wait_end``: a tracing hook (timelines, the
overlap benchmark) that costs nothing when unset.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import Group
from megatron_lite.parallel.weak_hook import weak_hook

ALIGN = 16  # each rank's shard of a bucket starts on a 64-byte (16 fp32) boundary, good for NCCL
DEFAULT_BUCKET_NUMEL = 40_000_000  # Megatron's default: big enough to amortise a collective's latency
EventHook = Callable[[str, int, int], None]


@dataclass
class Bucket:
    """A run of whole parameters reduced by one collective.

    ``start``/``end``: the bucket's element range in its chunk's buffer, ``end - start`` a multiple
    of dp * ALIGN (the tail past the last parameter is zero padding). ``params`` in buffer order.
    """

    index: int
    start: int
    end: int
    params: list[nn.Parameter]
    ready: set[int] = field(default_factory=set)  # id()s of params whose last-microbatch grad arrived
    pending: comm.Pending | None = None
    launched: bool = False

    @property
    def numel(self) -> int:
        return self.end - self.start

    def shard_range(self, rank: int, dp: int) -> tuple[int, int]:
        """Buffer range [lo, hi) of rank ``rank``'s shard: numel/dp elements."""
        size = self.numel // dp
        return self.start + rank * size, self.start + (rank + 1) * size


def plan_buckets(
    numels: Sequence[int], bucket_numel: int, dp: int, alone: Collection[int] = ()
) -> list[tuple[int, int, list[int]]]:
    """Group parameters (given in buffer order by element count) into buckets.

    Returns per bucket (start, padded end, indices of its parameters). A bucket closes once it
    holds at least ``bucket_numel`` elements, so a parameter is never split across buckets. The
    parameters in ``alone`` (indices) each get a bucket of their own.
    """
    align = dp * ALIGN
    groups, members, size = [], [], 0
    for i, n in enumerate(numels):
        if i in alone and members:  # close the open bucket: i starts its own
            groups.append((members, size))
            members, size = [], 0
        members.append(i)
        size += n
        if size >= bucket_numel or i in alone or i == len(numels) - 1:
            groups.append((members, size))
            members, size = [], 0
    buckets, start = [], 0
    for members, size in groups:
        padded = -(-size // align) * align
        buckets.append((start, start + padded, members))
        start += padded
    return buckets


class GradBuffer:
    """The fp32 main grads of one model chunk, their buckets and hooks (see the module docstring).

    ``params`` are the chunk's trainable parameters in buffer order; ``names[p]`` their names in
    ``module.named_parameters()``; ``offsets[p]`` their (start, end) range in ``data``.
    """

    def __init__(
        self,
        module: nn.Module,
        dp_group: Group,
        bucket_numel: int,
        *,
        chunk: int = 0,
        overlap: bool = True,
        reduce_scatter: bool = False,
        on_event: EventHook | None = None,
        tied: Sequence[tuple[nn.Parameter, Group]] = (),
    ) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]  # tied weights once
        if not named:
            raise ValueError(f"model chunk {chunk} has no trainable parameters")
        self.dp_group, self.dp, self.dp_rank = dp_group, comm.group_size(dp_group), comm.group_rank(dp_group)
        self.chunk, self.overlap, self.reduce_scatter, self.on_event = chunk, overlap, reduce_scatter, on_event
        self.params = [p for _, p in reversed(named)]
        self.names = {p: n for n, p in named}
        alone = {i for i, p in enumerate(self.params) if any(p is t for t, _ in tied)}
        plan = plan_buckets([p.numel() for p in self.params], bucket_numel, self.dp, alone)
        device = self.params[0].device
        self.data = torch.zeros(plan[-1][1], dtype=torch.float32, device=device)  # (total padded numel,)
        self.buckets: list[Bucket] = []
        self.offsets: dict[nn.Parameter, tuple[int, int]] = {}
        self.bucket_of: dict[nn.Parameter, Bucket] = {}
        for index, (start, end, members) in enumerate(plan):
            bucket = Bucket(index, start, end, [self.params[i] for i in members])
            offset = start
            for p in bucket.params:
                self.offsets[p] = (offset, offset + p.numel())
                self.bucket_of[p] = bucket
                p.main_grad = self.data[offset : offset + p.numel()].view(p.shape)
                p.register_post_accumulate_grad_hook(weak_hook(self._on_grad))
                offset += p.numel()
            self.buckets.append(bucket)
        self.last_microbatch = True
        self._tied = [(self.bucket_of[p], group) for p, group in tied]  # see the module docstring
        self._next_launch = 0  # the first bucket not launched yet
        self._synced = False  # finish_grad_sync() ran since zero_grad()

    def _emit(self, name: str, bucket: int) -> None:
        if self.on_event is not None:
            self.on_event(name, self.chunk, bucket)

    def _on_grad(self, param: nn.Parameter) -> None:
        bucket = self.bucket_of[param]
        if bucket.launched:
            raise RuntimeError(
                f"gradient of {self.names[param]} arrived after its bucket's reduction started: call "
                "ddp.zero_grad() at the start of each step, and run the backward of every microbatch but "
                "the last inside `with ddp.sync(last=False)`"
            )
        param.main_grad.add_(param.grad)  # accumulates in fp32 whatever the grad's dtype
        param.grad = None
        self._emit("grad_ready", bucket.index)
        if self.last_microbatch and self.overlap:
            bucket.ready.add(id(param))
            self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if len(bucket.ready) < len(bucket.params):
                return
            self._launch(bucket)
            self._next_launch += 1

    def _launch(self, bucket: Bucket) -> None:
        grad = self.data[bucket.start : bucket.end]
        if self.dp > 1:
            grad.mul_(1.0 / self.dp)  # average: pre-scale in fp32 (see the module docstring)
        start = comm.start_reduce_scatter_ if self.reduce_scatter else comm.start_all_reduce_
        bucket.pending, bucket.launched = start(grad, self.dp_group), True
        self._emit("grad_launch", bucket.index)

    def set_last_microbatch(self, last: bool) -> None:
        """Whether the next backward is the step's last one for this chunk (launch reductions)."""
        self.last_microbatch = last

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        """Run the enclosed backward as the last microbatch (``last=True``) or not; restores after."""
        before, self.last_microbatch = self.last_microbatch, last
        try:
            yield
        finally:
            self.last_microbatch = before

    def finish_grad_sync(self) -> None:
        """Launch the buckets not launched yet (overlap off, parameters that got no grad), in bucket
        order, wait for all, then sum each ``tied`` weight's reduced grad over its group (here, after
        the schedule: a collective with another pipeline stage during backward could deadlock it).
        Afterwards main grads hold the dp average (reduce-scatter: in this rank's shard of each
        bucket only)."""
        for bucket in self.buckets[self._next_launch :]:
            self._launch(bucket)
        self._next_launch = len(self.buckets)
        self._wait_all()
        if not self._synced:  # finish_grad_sync() twice is harmless: the tied sum runs once
            for bucket, group in self._tied:
                lo, hi = (
                    bucket.shard_range(self.dp_rank, self.dp) if self.reduce_scatter else (bucket.start, bucket.end)
                )
                comm.start_all_reduce_(self.data[lo:hi], group).wait()
        self._synced = True

    def _wait_all(self) -> None:
        for bucket in self.buckets:
            if bucket.pending is None:  # already finished: finish_grad_sync() twice is harmless
                continue
            self._emit("grad_wait_begin", bucket.index)
            bucket.pending.wait()
            self._emit("grad_wait_end", bucket.index)
            bucket.pending = None

    def zero_grad(self) -> None:
        """Zero the main grads and forget which buckets were launched (start of a step)."""
        if any(b.pending is not None for b in self.buckets):
            raise RuntimeError("zero_grad() while reductions are in flight: call finish_grad_sync() first")
        self.data.zero_()
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.launched = False
        self._next_launch, self._synced = 0, False


class DataParallelGrads:
    """One :class:`GradBuffer` per model chunk, driven together.

    Args:
        chunks: the model, or this pipeline rank's model chunks in schedule order (each its own
            buffer, so a chunk's buckets can launch when that chunk's backward is done).
        dp_group: the data-parallel process group (``None`` in a single process).
        bucket_numel / bucket_bytes: bucket size in fp32 elements or in bytes (at most one; the
            default is 40M elements, or 1M x dp when larger, as Megatron).
        overlap: launch each bucket's reduction during the last backward as soon as it is ready.
        reduce_scatter: reduce-scatter instead of all-reduce (the distributed optimizer).
        on_event: optional tracing hook ``(name, chunk, bucket)`` (module docstring).
        tied: (parameter, group) pairs: a weight whose copies on the ranks of ``group`` (a tied
            embedding's first and last pipeline stage) sum their grads (module docstring).
    """

    def __init__(
        self,
        chunks: nn.Module | Sequence[nn.Module],
        dp_group: Group,
        *,
        bucket_numel: int | None = None,
        bucket_bytes: int | None = None,
        overlap: bool = True,
        reduce_scatter: bool = False,
        on_event: EventHook | None = None,
        tied: Sequence[tuple[nn.Parameter, Group]] = (),
    ) -> None:
        if bucket_numel is not None and bucket_bytes is not None:
            raise ValueError("give bucket_numel or bucket_bytes, not both")
        if bucket_bytes is not None:
            bucket_numel = max(1, bucket_bytes // 4)  # main grads are fp32
        if bucket_numel is None:
            bucket_numel = max(DEFAULT_BUCKET_NUMEL, 1_000_000 * comm.group_size(dp_group))
        self.chunks = [chunks] if isinstance(chunks, nn.Module) else list(chunks)
        ids = [id(p) for m in self.chunks for p in m.parameters() if p.requires_grad]
        if len(ids) != len(set(ids)):  # each would get its own main_grad and hook: two buffers, one grad
            raise ValueError("a parameter belongs to two model chunks; give each chunk its own copy")
        if any(id(p) not in ids for p, _ in tied):
            raise ValueError("tied: a parameter is not a trainable parameter of these chunks")
        self.dp_group, self.reduce_scatter = dp_group, reduce_scatter
        self.buffers = [
            GradBuffer(
                m,
                dp_group,
                bucket_numel,
                chunk=c,
                overlap=overlap,
                reduce_scatter=reduce_scatter,
                on_event=on_event,
                tied=[(p, g) for p, g in tied if any(p is q for q in m.parameters())],
            )
            for c, m in enumerate(self.chunks)
        ]

    @property
    def dp(self) -> int:
        return self.buffers[0].dp

    def parameters(self) -> Iterator[nn.Parameter]:
        """Every trainable parameter, chunk by chunk, in buffer order."""
        for buffer in self.buffers:
            yield from buffer.params

    def set_last_microbatch(self, last: bool) -> None:
        """:meth:`GradBuffer.set_last_microbatch` on every chunk."""
        for buffer in self.buffers:
            buffer.set_last_microbatch(last)

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        """:meth:`GradBuffer.sync` on every chunk."""
        with contextlib.ExitStack() as stack:
            for buffer in self.buffers:
                stack.enter_context(buffer.sync(last))
            yield

    def finish_grad_sync(self) -> None:
        """Launch what is left and wait for every chunk's reductions (after the last backward)."""
        for buffer in self.buffers:
            buffer.finish_grad_sync()

    def zero_grad(self) -> None:
        """Zero every chunk's main grads (start of a step)."""
        for buffer in self.buffers:
            buffer.zero_grad()
