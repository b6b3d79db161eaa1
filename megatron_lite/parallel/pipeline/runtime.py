"""Execute a pipeline schedule on this rank: compute actions, batched P2P, tied embeddings.

Use, on every rank (``mesh`` from ``parallel/mesh.py``; the trainer's, with main-grad buffers and
the distributed optimizer, is ``training/engine.py``)::

    partition = plan_for_model(cfg.model, pp, vp)                      # same on every rank
    chunks = build_stage_chunks(cfg.model, partition, mesh.pp_rank, seed)
    schedule = build_schedule(cfg.parallel.schedule, pp, vp, accumulation_steps(cfg))
    embed = tied_embedding_groups(all_pipelines)[index of this rank's pipeline]   # collective
    runtime = PipelineRuntime(chunks, schedule, mesh.pp_group, embed_group=embed)
    optimizer = AdamW(p for c in chunks for p in c.parameters())
    per step:
        loss = runtime.step([(b[:, :-1], b[:, 1:]) for b in microbatches])  # None off the last stage
        (DP reduction, SP grad all-reduce, clipping, optimizer.step(), zero_grad)
    evaluation:
        losses = runtime.evaluate(microbatches)  # per-microbatch losses on the last stage, else None

TP: every chunk keeps the model's submodule names, so TP applies to chunks as to the model. Two
orders: ``apply_tp(build_model(...), mesh)`` then ``PipelineChunk(model, spec)`` for this rank's
specs (tested; materialises the whole model once), or ``apply_tp`` on each chunk from
``build_stage_chunks`` (only this rank's layers; needs ``apply_tp`` to skip the parts a chunk
lacks: ``embed``, ``final_norm``, ``head``, ``loss_fn`` may be None). Clipping: the global
gradient norm sums squares over the pp group too, counting a tied embedding once (first stage).

Loss scaling: the last stage backpropagates ``loss_mb / m`` for each microbatch, so the summed
gradients equal the one-process mean over the m microbatches (the trainer's accumulation).

Memory: a chunk's output is only referenced by the send buffer; once the send completes it is
dropped, and backward starts from the output's autograd edge (``GradientEdge``), never from the
tensor, so its storage is freed as soon as it has left (Megatron's ``deallocate_output_tensor``
without the ``.data`` swap). A microbatch's graph lives until its B (or W for split backward).

Tied embeddings: the last stage's chunk holds its own ``embed`` for the head. At construction the
first stage's weight is broadcast over ``embed_group`` (ranks of the first and last stage), and
after each step the two gradients are summed over that group, so both copies see the full
gradient and, stepped by the same optimizer, stay identical. With data parallelism the trainer
leaves that sum to ``DataParallelGrads`` (``tied``), which makes it after the dp reduction: then
both copies get the same bits, whatever order each stage's reduction adds in.

Hangs: every transfer batch and the embedding all-reduce wait at most ``timeout_s``; past that a
:class:`PipelineTimeoutError` names the rank, stage, action and microbatch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.autograd.graph import GradientEdge, get_gradient_edge

from megatron_lite.parallel.comm import group_rank, group_size
from megatron_lite.parallel.pipeline.actions import COMPUTE, Action, Op, Schedule, batch_end
from megatron_lite.parallel.pipeline.backward import WeightGrad, backward_input
from megatron_lite.parallel.pipeline.partition import PipelineChunk, check_coverage
from megatron_lite.parallel.pipeline.schedules import build_forward_schedule

Microbatch = tuple[torch.Tensor, torch.Tensor]  # (input_ids (B, T), labels (B, T))


class PipelineTimeoutError(RuntimeError):
    """A transfer or collective of the pipeline failed or did not complete in time."""


def tied_embedding_groups(pipelines: Sequence[Sequence[int]]) -> list[dist.ProcessGroup | None]:
    """One {first stage, last stage} group per pipeline (lists of global ranks in stage order).

    A collective: every rank of the world calls it with the same ``pipelines``. Entry i is the
    group of pipeline i on its first and last ranks, None elsewhere and when pp=1.
    """
    groups = []
    for ranks in pipelines:
        group = dist.new_group([ranks[0], ranks[-1]]) if len(ranks) > 1 else None
        groups.append(group if dist.get_rank() in (ranks[0], ranks[-1]) else None)
    return groups


@dataclass
class _Stash:
    """What a microbatch keeps on this chunk between its forward and its backward."""

    x: torch.Tensor  # the chunk's input leaf (received activation, or the embedding's detached output)
    root: GradientEdge  # where backward starts: the output's edge, or the scaled loss's
    embedded: torch.Tensor | None = None  # first chunk: embedding output, backpropagated from x.grad
    dx: torch.Tensor | None = None  # split backward, first chunk: I's input gradient, for W's embedding
    weight_grad: WeightGrad | None = None  # split backward: the pending W


@dataclass
class Record:
    """One timed step of this rank (``record=True``): a compute action or a transfer batch."""

    actions: tuple[Action, ...]
    start: float
    end: float


@dataclass
class _StepState:
    microbatches: Sequence[Microbatch]
    forward_only: bool = False  # :meth:`PipelineRuntime.evaluate`: no graph, nothing stashed
    stash: dict[tuple[int, int], _Stash] = field(default_factory=dict)
    inbox: dict[tuple[Op, int, int], torch.Tensor] = field(default_factory=dict)
    outbox: dict[tuple[Op, int, int], torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    losses: dict[int, torch.Tensor] = field(default_factory=dict)  # forward only: each microbatch's loss


class ActivationMeter:
    """Bytes autograd saves for each (microbatch, chunk) forward, parameters excluded, from the
    forward until :meth:`release` (B, or W for split backward). ``peak``: the most bytes held at
    once; ``peak_count``: the most (microbatch, chunk) activations held at once (the simulator's
    ``peak_held``); ``sizes``: the bytes of each forward.

    Counting uses saved-tensor hooks that return each tensor unchanged, so nothing is copied.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self._param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[tuple[int, int], int] = {}
        self.sizes: list[int] = []
        self.held = self.peak = self.peak_count = 0

    @contextlib.contextmanager
    def forward(self, key: tuple[int, int]):
        seen: set[int] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._param_storages and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                self.live[key] = self.live.get(key, 0) + storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.sizes.append(self.live.setdefault(key, 0))
        self.held += self.live[key]
        self.peak = max(self.peak, self.held)
        self.peak_count = max(self.peak_count, len(self.live))

    def release(self, key: tuple[int, int]) -> None:
        self.held -= self.live.pop(key, 0)


class PipelineRuntime:
    """Runs ``schedule.actions[pp rank]`` over this rank's ``chunks`` (local chunk order).

    ``pp_group``: the pipeline group (None for pp=1). ``embed_group``: {first, last} stage group,
    required on those two ranks when embeddings are tied and pp > 1. ``activation_shape``: maps an
    input-ids shape to the activation shape sent between stages (default ``(*ids.shape, hidden)``).
    ``scale_loss``: applied to the loss before backward (e.g. ``GradScaler.scale``). ``record``:
    keep per-action timings (``records``) and count saved activation bytes (``meter``) in every
    step (cheap; for benchmarks and tests). Activations travel in the chunks' parameter dtype.
    ``before_last_backward(c)``: called right before local chunk c's last
    gradient-producing action of the step (its last B, or W under split backward), so data-parallel
    buckets of that chunk can launch their reductions while the other chunks still run.
    ``sync_tied_grads``: sum the tied embedding's ``.grad`` over ``embed_group`` after each step;
    turn it off when data-parallel main-grad buffers own the gradient (they sum it themselves:
    ``DataParallelGrads(..., tied=...)``).
    """

    def __init__(
        self,
        chunks: Sequence[PipelineChunk],
        schedule: Schedule,
        pp_group: dist.ProcessGroup | None,
        *,
        embed_group: dist.ProcessGroup | None = None,
        timeout_s: float = 300.0,
        activation_shape: Callable[[torch.Size], Sequence[int]] | None = None,
        scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
        record: bool = False,
        before_last_backward: Callable[[int], None] | None = None,
        sync_tied_grads: bool = True,
    ) -> None:
        self.chunks, self.schedule, self.group = list(chunks), schedule, pp_group
        self.rank = group_rank(pp_group)
        if group_size(pp_group) != schedule.pp or len(self.chunks) != schedule.vp:
            raise ValueError(
                f"schedule is for pp={schedule.pp}, vp={schedule.vp}; this rank has a pipeline group "
                f"of {group_size(pp_group)} and {len(self.chunks)} chunks"
            )
        self.actions = schedule.actions[self.rank]
        self.timeout = timeout_s
        hidden = self.chunks[0].cfg.hidden
        self.activation_shape = activation_shape or (lambda shape: (*shape, hidden))
        first_param = next(p for c in self.chunks for p in c.parameters() if p.is_floating_point())
        self.dtype, self.device = first_param.dtype, first_param.device  # of the activations sent
        self.scale_loss = scale_loss or (lambda loss: loss)
        self.record = record
        self.records: list[Record] = []
        self.before_last_backward, self.sync_tied_grads = before_last_backward, sync_tied_grads
        grads = [i for i, a in enumerate(self.actions) if a.kind in (Op.B, Op.W)]
        self._last_grad_action = {self.actions[i].chunk: i for i in grads}  # later actions overwrite
        self.meter: ActivationMeter | None = None
        self._check_chunks()
        self.tied = self._tied_weight()
        self.embed_group = embed_group
        if self.tied is not None:
            if embed_group is None:
                raise ValueError(f"pipeline rank {self.rank} holds a tied embedding copy: pass embed_group")
            self._bounded(
                dist.broadcast(self.tied.data, self._first_rank(), embed_group, async_op=True),
                "broadcast tied embedding",
            )

    # ---- set-up checks -------------------------------------------------------------------------
    def _check_chunks(self) -> None:
        """Every local chunk sits at its schedule position, and over the whole pipeline every
        layer is built exactly once (one collective at construction)."""
        for c, chunk in enumerate(self.chunks):
            if chunk.spec.vstage != self.schedule.vstage(self.rank, c):
                raise ValueError(
                    f"pipeline rank {self.rank}: local chunk {c} is virtual stage {chunk.spec.vstage}, "
                    f"the schedule expects {self.schedule.vstage(self.rank, c)}"
                )
        mine = [(chunk.spec.vstage, list(chunk.spec.layers)) for chunk in self.chunks]
        everyone = [mine]
        if self.schedule.pp > 1:
            everyone = [None] * self.schedule.pp
            dist.all_gather_object(everyone, mine, group=self.group)
        pieces = sorted(piece for rank_pieces in everyone for piece in rank_pieces)
        if [v for v, _ in pieces] != list(range(self.schedule.pp * self.schedule.vp)):
            raise ValueError(f"virtual stages over the pipeline are {[v for v, _ in pieces]}, not 0..pp*vp-1")
        check_coverage([layers for _, layers in pieces], self.chunks[0].cfg.layers)

    def _tied_weight(self) -> torch.Tensor | None:
        """This rank's copy of a tied embedding that another stage also holds, if any."""
        holders = [c for c in self.chunks if c.embed is not None and c.cfg.tie_embeddings]
        return holders[0].embed.weight if holders and self.schedule.pp > 1 else None

    def _first_rank(self) -> int:
        return dist.get_global_rank(self.group, 0)

    # ---- one step ------------------------------------------------------------------------------
    def step(self, microbatches: Sequence[Microbatch]) -> torch.Tensor | None:
        """Forward and backward of every microbatch; the mean loss on the last stage, else None.

        Gradients are accumulated into ``.grad`` of the chunks' parameters (zero them between steps).
        """
        if len(microbatches) != self.schedule.microbatches:
            raise ValueError(f"schedule is for {self.schedule.microbatches} microbatches, got {len(microbatches)}")
        st = _StepState(microbatches)
        if self.record:
            self.meter = ActivationMeter([p for c in self.chunks for p in c.parameters()])
        self._run(self.actions, st)
        self._sync_tied_grad()
        return st.loss

    @torch.no_grad()
    def evaluate(self, microbatches: Sequence[Microbatch]) -> list[torch.Tensor] | None:
        """Forward only, pipelined (``schedules.build_forward_schedule``; any number of microbatches):
        each microbatch's loss, in order, on the rank holding the last stage, else None. Keeps no
        graph and touches no gradient."""
        m = len(microbatches)
        st = _StepState(microbatches, forward_only=True)
        self._run(build_forward_schedule(self.schedule.pp, self.schedule.vp, m).actions[self.rank], st)
        return [st.losses[mb] for mb in range(m)] if any(c.is_last for c in self.chunks) else None

    def _run(self, actions: tuple[Action, ...], st: _StepState) -> None:
        """Execute ``actions``: each compute action alone, each run of transfers as one batch."""
        self.records = []
        t0, i = time.perf_counter(), 0
        while i < len(actions):
            start = time.perf_counter()
            if actions[i].kind in COMPUTE:
                j = i + 1
                chunk = actions[i].chunk
                if self.before_last_backward and not st.forward_only and self._last_grad_action.get(chunk) == i:
                    self.before_last_backward(chunk)
                self._compute(st, actions[i])
            else:
                j = batch_end(actions, i)
                self._transfer(st, actions[i:j])
            if self.record:
                self.records.append(Record(actions[i:j], start - t0, time.perf_counter() - t0))
            i = j

    def _compute(self, st: _StepState, a: Action) -> None:
        forward = self._forward_only if st.forward_only else self._forward
        run = {Op.F: forward, Op.B: self._backward, Op.I: self._backward_input, Op.W: self._backward_weight}
        run[a.kind](st, a)

    def _forward_only(self, st: _StepState, a: Action) -> None:
        """F of :meth:`evaluate`: the chunk's output is sent on, or on the last chunk its loss kept."""
        chunk = self.chunks[a.chunk]
        ids, labels = st.microbatches[a.mb]
        x = ids.to(self.device) if chunk.is_first else st.inbox.pop((Op.RECV_F, a.mb, a.chunk))
        if chunk.is_last:
            st.losses[a.mb] = chunk(x, labels.to(self.device))
        else:
            st.outbox[(Op.SEND_F, a.mb, a.chunk)] = chunk(x)

    def _forward(self, st: _StepState, a: Action) -> None:
        chunk = self.chunks[a.chunk]
        ids, labels = st.microbatches[a.mb]
        embedded = None
        meter = self.meter.forward((a.mb, a.chunk)) if self.meter else contextlib.nullcontext()
        with meter:
            if chunk.is_first:
                # Cut after the embedding so the chunk's input is a leaf like every other stage's:
                # split backward then treats the embedding's gradient as part of W.
                embedded = chunk.embed_tokens(ids.to(self.device))
                x = embedded.detach().requires_grad_()
            else:
                x = st.inbox.pop((Op.RECV_F, a.mb, a.chunk)).requires_grad_()
            out = chunk(x, labels.to(self.device)) if chunk.is_last else chunk(x)
        if chunk.is_last:
            loss = out / self.schedule.microbatches
            st.loss = loss.detach() if st.loss is None else st.loss + loss.detach()
            out = self.scale_loss(loss)
        else:
            st.outbox[(Op.SEND_F, a.mb, a.chunk)] = out.detach()
        st.stash[(a.mb, a.chunk)] = _Stash(x, get_gradient_edge(out), embedded)

    def _output_grad(self, st: _StepState, a: Action) -> torch.Tensor:
        if self.chunks[a.chunk].is_last:
            return torch.ones((), dtype=self.dtype, device=self.device)  # d(scaled loss)/d itself
        return st.inbox.pop((Op.RECV_B, a.mb, a.chunk))

    def _backward(self, st: _StepState, a: Action) -> None:
        stash = st.stash.pop((a.mb, a.chunk))
        torch.autograd.backward(stash.root, self._output_grad(st, a))
        if stash.embedded is not None:
            stash.embedded.backward(stash.x.grad)  # embedding gradients; the first chunk sends nothing
        else:
            st.outbox[(Op.SEND_B, a.mb, a.chunk)] = stash.x.grad
        self._release(a)

    def _backward_input(self, st: _StepState, a: Action) -> None:
        stash = st.stash[(a.mb, a.chunk)]
        params = [p for p in self.chunks[a.chunk].parameters() if p.requires_grad]
        dx, stash.weight_grad = backward_input(stash.root, self._output_grad(st, a), stash.x, params)
        if stash.embedded is not None:
            stash.dx = dx  # kept for W's embedding gradient; elsewhere only the send holds it
        else:
            st.outbox[(Op.SEND_B, a.mb, a.chunk)] = dx

    def _backward_weight(self, st: _StepState, a: Action) -> None:
        stash = st.stash.pop((a.mb, a.chunk))
        stash.weight_grad.run()
        if stash.embedded is not None:
            stash.embedded.backward(stash.dx)
        self._release(a)

    # ---- transfers -----------------------------------------------------------------------------
    def _transfer(self, st: _StepState, batch: Sequence[Action]) -> None:
        """Post the batch as one ``batch_isend_irecv`` and wait for all of it (see schedules.py)."""
        ops = []
        for a in batch:
            peer = dist.get_global_rank(self.group, a.peer)
            if a.kind in (Op.SEND_F, Op.SEND_B):
                ops.append(dist.P2POp(dist.isend, st.outbox.pop((a.kind, a.mb, a.chunk)), peer, self.group))
            else:
                shape = self.activation_shape(st.microbatches[a.mb][0].shape)
                buf = torch.empty(shape, dtype=self.dtype, device=self.device)
                st.inbox[(a.kind, a.mb, a.chunk)] = buf
                ops.append(dist.P2POp(dist.irecv, buf, peer, self.group))
        works = dist.batch_isend_irecv(ops)
        deadline = time.monotonic() + self.timeout
        for a, work in zip(batch, works):
            self._bounded(
                work,
                f"{a.kind.value} of microbatch {a.mb} (virtual stage "
                f"{self.schedule.vstage(self.rank, a.chunk)}) with pipeline rank {a.peer}",
                deadline,
            )
        # the sent tensors (chunk outputs, input grads) are unreferenced now: their storage is freed

    def _bounded(self, work: dist.Work, what: str, deadline: float | None = None) -> None:
        remaining = (deadline or time.monotonic() + self.timeout) - time.monotonic()
        try:
            work.wait(timeout=timedelta(seconds=max(remaining, 0.001)))
        except RuntimeError as e:
            stages = [self.schedule.vstage(self.rank, c) for c in range(self.schedule.vp)]
            raise PipelineTimeoutError(
                f"pipeline rank {self.rank} (global rank {dist.get_rank()}, virtual stages {stages}): "
                f"{what} failed or did not complete within {self.timeout:g} s: {e}"
            ) from e

    def _sync_tied_grad(self) -> None:
        if self.tied is None or not self.sync_tied_grads:
            return
        if self.tied.grad is None:
            self.tied.grad = torch.zeros_like(self.tied)
        self._bounded(
            dist.all_reduce(self.tied.grad, group=self.embed_group, async_op=True),
            "all-reduce of the tied embedding gradient",
        )

    def _release(self, a: Action) -> None:
        if self.meter is not None:
            self.meter.release((a.mb, a.chunk))
