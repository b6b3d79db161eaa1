"""Tensor-parallel layers, built FROM a plain ``nn.Linear`` / ``nn.Embedding`` by slicing its weight.

So the parameters of rank r are exactly rank r's slice of the single-device model's parameters, and
``full_weight()`` gathers them back into the single-device layout (checkpoints, HF export).

Per-rank shapes, tp ranks, sequence parallelism (SP) off / on, activations (B, T, ...):

=======================  ==============  ===========================  ===========================
layer                    weight          input                        output
=======================  ==============  ===========================  ===========================
ColumnParallelLinear     (out/tp, in)    (B, T, in) / (B, T/tp, in)   (B, T, out/tp)
  gather_output=True                                                  (B, T, out)
RowParallelLinear        (out, in/tp)    (B, T, in/tp)                (B, T, out) / (B, T/tp, out)
VocabParallelEmbedding   (Vp/tp, H)      (B, T) token ids             (B, T, H) / (B, T/tp, H)
vocab_parallel_ce        -               logits (B, T, Vp/tp)         scalar mean loss
=======================  ==============  ===========================  ===========================

``Vp`` is the vocabulary padded to a multiple of ``tp * pad_to`` (:func:`padded_vocab_size`); the
padded rows are zero and never take part in the loss. The loss (``vocab_parallel_ce``:
:func:`vocab_parallel_cross_entropy`, :class:`VocabParallelLoss`) and :func:`gather_vocab_logits`
live in ``vocab_parallel_loss.py`` and are re-exported here.

Parameter attributes (Megatron's names), read by the gradient norm and the SP grad reduction:
``param.tensor_model_parallel = True`` on every sharded parameter (one absent is replicated on all
TP ranks, and only TP rank 0 counts it in the norm); ``param.sequence_parallel = True`` where the
gradient is only a partial sum under SP; ``param.tp_unique_rows``, a bool mask over rows, on a
sharded parameter that also holds replicated row blocks (GQA KV heads): the rows this rank counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import Group
from megatron_lite.parallel.mappings import (
    SEQ_DIM,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
)
from megatron_lite.parallel.vocab_parallel_loss import (  # noqa: F401  re-exported
    VocabParallelLoss,
    gather_vocab_logits,
    vocab_parallel_cross_entropy,
)
from megatron_lite.parallel.weak_hook import weak_hook


def padded_vocab_size(vocab_size: int, tp: int, pad_to: int = 1) -> int:
    """``vocab_size`` rounded up to a multiple of ``tp * pad_to`` (128 keeps GPU GEMMs aligned)."""
    multiple = tp * pad_to
    return -(-vocab_size // multiple) * multiple


class _ColumnParallelMatmul(torch.autograd.Function):
    """``y = x_full @ W_r^T + b_r`` with the input-grad collective overlapping the weight-grad GEMM.

    forward: SP off: x is replicated, no communication. SP on: all-gather x along T.
    backward: grad_input = grad_y @ W_r is a partial sum over ranks; its all-reduce (SP: reduce-
    scatter along T) is launched async, then grad_W = grad_y^T @ x_full runs while it is in flight
    (Megatron's LinearWithGradAccumulationAndAsyncCommunication). Under SP the saved input is the
    local shard and x_full is re-gathered async, overlapping the grad_input GEMM.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group: Group, sequence_parallel: bool, overlap: bool):
        x_full = comm.all_gather(x, SEQ_DIM, group) if sequence_parallel else x
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.sequence_parallel, ctx.overlap = group, sequence_parallel, overlap
        ctx.has_bias = bias is not None
        return F.linear(x_full, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        group, sp, overlap = ctx.group, ctx.sequence_parallel, ctx.overlap
        gathering = comm.start_all_gather(x, SEQ_DIM, group) if sp else None
        x_full = x if gathering is None else (None if overlap else gathering.wait())
        grad_x = grad_y.matmul(weight) if ctx.needs_input_grad[0] else None  # (B, T, in): partial sum
        if x_full is None:
            x_full = gathering.wait()  # the re-gather overlapped the grad_x GEMM
        reducing = None
        if grad_x is not None:
            reducing = comm.start_reduce_scatter(grad_x, SEQ_DIM, group) if sp else comm.start_all_reduce(grad_x, group)
            if not overlap:
                grad_x, reducing = reducing.wait(), None
        grad_y2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_w = grad_y2.t().matmul(x_full.reshape(-1, x_full.shape[-1]))  # overlaps the grad_x collective
        grad_b = grad_y2.sum(0) if ctx.has_bias else None
        if reducing is not None:
            grad_x = reducing.wait()
        return grad_x, grad_w, grad_b, None, None, None


def _part_layout(part_sizes: Sequence[int], part_shards: Sequence[int], tp: int, rank: int):
    """Per part: (full offset, chunk rows, shard index held by ``rank``)."""
    layout, offset = [], 0
    for size, shards in zip(part_sizes, part_shards):
        if tp % shards or size % shards:
            raise ValueError(f"part of {size} rows in {shards} shards does not fit tp={tp}")
        chunk = size // shards
        layout.append((offset, chunk, rank // (tp // shards)))
        offset += size
    return layout


class ColumnParallelLinear(nn.Module):
    """Linear layer split along its OUTPUT features (weight rows): rank r computes columns r of y.

    Fused weights: ``part_sizes`` lists the row blocks of the full weight (qkv: [nh*hd, nkv*hd,
    nkv*hd]; gate_up: [F, F]); each block is cut separately so rank r holds [q_r; k_r; v_r].
    ``part_shards`` (default tp for each) cuts a block into fewer shards: block shard i then lives on
    the tp/shards neighbouring ranks i*tp/shards, ... (GQA with fewer KV heads than tp ranks), and
    a gradient hook sums its weight/bias grads over those replicas, so they stay identical and equal
    the single-device gradient. ``padded_out_features`` appends zero rows first (vocab padding).
    ``overlap_grad_comm=False`` waits for each backward collective right after launching it (for
    measuring the overlap; results are identical).

    Per-rank shapes: weight (sum of local blocks, in) = (out/tp, in) without replication; input
    (B, T, in), or (B, T/tp, in) under SP (all-gathered inside); output (B, T, out/tp), or
    (B, T, out) with ``gather_output`` (columns in the full layout, padding stripped).
    """

    def __init__(
        self,
        linear: nn.Linear,
        group: Group,
        *,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        part_sizes: Sequence[int] | None = None,
        part_shards: Sequence[int] | None = None,
        padded_out_features: int | None = None,
        overlap_grad_comm: bool = True,
    ) -> None:
        super().__init__()
        self.group, self.tp, self.rank = group, comm.group_size(group), comm.group_rank(group)
        weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
        self.out_features, self.in_features = weight.shape
        if padded_out_features is not None and padded_out_features != self.out_features:
            if part_sizes is not None:
                raise ValueError("padded_out_features cannot be combined with part_sizes")
            extra = padded_out_features - self.out_features
            weight = torch.cat([weight, weight.new_zeros(extra, self.in_features)])
            bias = None if bias is None else torch.cat([bias, bias.new_zeros(extra)])
        self.part_sizes = list(part_sizes) if part_sizes is not None else [weight.shape[0]]
        self.part_shards = list(part_shards) if part_shards is not None else [self.tp] * len(self.part_sizes)
        if sum(self.part_sizes) != weight.shape[0] or len(self.part_shards) != len(self.part_sizes):
            raise ValueError(f"part_sizes {part_sizes} / part_shards {part_shards} do not cover {weight.shape[0]} rows")
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.overlap_grad_comm = overlap_grad_comm
        layout = _part_layout(self.part_sizes, self.part_shards, self.tp, self.rank)
        rows = torch.cat([torch.arange(o + i * c, o + (i + 1) * c) for o, c, i in layout])
        self.weight = nn.Parameter(weight[rows].clone())
        self.bias = None if bias is None else nn.Parameter(bias[rows].clone())
        self._perm = self._full_layout_perm(layout)
        self._replicated = self._replicated_blocks(layout)
        unique = torch.ones(len(rows), dtype=torch.bool)
        for lo, hi, shards, mine in self._replicated:
            unique[lo:hi] = self.rank == mine * (self.tp // shards)  # the first replica counts
        for p in (self.weight, self.bias):
            if p is not None:
                p.tensor_model_parallel = True
                if self._replicated:
                    p.register_hook(weak_hook(self._sum_over_replicas))
                    p.tp_unique_rows = unique

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Group, **options) -> ColumnParallelLinear:
        """This rank's shard of ``linear`` (the constructor, named for what it does). Options:
        ``gather_output``, ``sequence_parallel``, ``part_sizes``, ``part_shards``,
        ``padded_out_features``, ``overlap_grad_comm`` (see the class docstring)."""
        return cls(linear, group, **options)

    def _full_layout_perm(self, layout) -> torch.Tensor | None:
        """Indices into the rank-major gathered rows that give the full layout (first replica of
        each shard, padding dropped); None when the gathered order already is the full layout."""
        local = sum(c for _, c, _ in layout)
        starts = [sum(c for _, c, _ in layout[:p]) for p in range(len(layout))]
        idx = []
        for (_, chunk, _), start, shards in zip(layout, starts, self.part_shards):
            for shard in range(shards):
                src = shard * (self.tp // shards) * local + start
                idx.append(torch.arange(src, src + chunk))
        perm = torch.cat(idx)[: self.out_features]
        return None if torch.equal(perm, torch.arange(self.tp * local)) else perm

    def _replicated_blocks(self, layout) -> list[tuple[int, int, int, int]]:
        """(local start, local end, shards, my shard) of each block held by several ranks."""
        blocks, start = [], 0
        for (_, chunk, mine), shards in zip(layout, self.part_shards):
            if shards < self.tp:
                blocks.append((start, start + chunk, shards, mine))
            start += chunk
        return blocks

    def _sum_over_replicas(self, grad: torch.Tensor) -> torch.Tensor:
        # Every replica computed a partial grad (from its own query heads). One all-reduce over the
        # TP group of a buffer with one slot per shard, each rank writing its own slot, sums
        # exactly the replicas of each shard, with no extra process groups.
        slots = []
        for lo, hi, shards, mine in self._replicated:
            slot = grad.new_zeros((shards, hi - lo, *grad.shape[1:]))
            slot[mine] = grad[lo:hi]
            slots.append(slot)
        summed = comm.all_reduce(torch.cat([s.flatten() for s in slots]), self.group)
        out, offset = grad.clone(), 0
        for (lo, hi, _, mine), slot in zip(self._replicated, slots):
            out[lo:hi] = summed[offset : offset + slot.numel()].view_as(slot)[mine]
            offset += slot.numel()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ColumnParallelMatmul.apply(
            x, self.weight, self.bias, self.group, self.sequence_parallel, self.overlap_grad_comm
        )
        if not self.gather_output:
            return y
        y = gather_from_tp_region(y, self.group)
        return y if self._perm is None else y.index_select(-1, self._perm.to(y.device))

    def _to_full(self, local: torch.Tensor) -> torch.Tensor:
        full = comm.all_gather(local.detach(), 0, self.group)
        return full if self._perm is None else full.index_select(0, self._perm.to(full.device))

    def full_weight(self) -> torch.Tensor:
        """The single-device weight (out, in), gathered from every rank (a collective)."""
        return self._to_full(self.weight)

    def full_bias(self) -> torch.Tensor | None:
        """The single-device bias (out,), gathered from every rank (a collective)."""
        return None if self.bias is None else self._to_full(self.bias)


class RowParallelLinear(nn.Module):
    """Linear layer split along its INPUT features (weight columns); partial outputs are summed.

    forward: y_r = x_r @ W_r^T, then all-reduce (SP: reduce-scatter along T), then + bias. The bias
    is replicated and added once, after the sum; under SP its grad is a partial sum over the local
    tokens, so it is marked ``sequence_parallel``.

    Per-rank shapes: weight (out, in/tp); bias (out,); input (B, T, in/tp) (with
    ``input_is_parallel=False``: (B, T, in), split inside); output (B, T, out), or (B, T/tp, out)
    under SP.
    """

    def __init__(
        self, linear: nn.Linear, group: Group, *, input_is_parallel: bool = True, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        self.group, self.tp, self.rank = group, comm.group_size(group), comm.group_rank(group)
        self.out_features, self.in_features = linear.weight.shape
        if self.in_features % self.tp:
            raise ValueError(f"RowParallelLinear: in_features={self.in_features} is not divisible by tp={self.tp}")
        if sequence_parallel and not input_is_parallel:  # a (B, T/tp, in) input would be cut twice
            raise ValueError(
                "RowParallelLinear: sequence_parallel=True needs input_is_parallel=True (under sequence "
                "parallelism the input is sequence-sharded, not the full features to split)"
            )
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.weight = nn.Parameter(comm.split(linear.weight.detach(), 1, group).clone())
        self.weight.tensor_model_parallel = True
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        if self.bias is not None and sequence_parallel:
            self.bias.sequence_parallel = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Group, **options) -> RowParallelLinear:
        """This rank's shard of ``linear`` (the constructor, named for what it does). Options:
        ``input_is_parallel`` (default True), ``sequence_parallel``."""
        return cls(linear, group, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.group)
        y = F.linear(x, self.weight)  # (B, T, out): this rank's partial sum
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = reduce_from_tp_region(y, self.group)
        return y if self.bias is None else y + self.bias

    def full_weight(self) -> torch.Tensor:
        """The single-device weight (out, in), gathered from every rank (a collective)."""
        return comm.all_gather(self.weight.detach(), 1, self.group)

    def full_bias(self) -> torch.Tensor | None:
        """The bias (replicated, so no communication)."""
        return None if self.bias is None else self.bias.detach()


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; rank r owns ids [r*Vp/tp, (r+1)*Vp/tp).

    forward: each rank looks up the ids it owns (zeros elsewhere), then all-reduce (SP: reduce-
    scatter along T). Exactly one rank contributes each token, so the sum adds zeros only and is
    exact. backward: identity (SP: all-gather), then the local rows' grads.

    Per-rank shapes: weight (Vp/tp, H), rows past ``num_embeddings`` are zero padding; input (B, T)
    ids; output (B, T, H), or (B, T/tp, H) under SP. The weight may also serve as the tied output
    head, whose logits are then (B, T, Vp/tp).
    """

    def __init__(
        self, embedding: nn.Embedding, group: Group, *, sequence_parallel: bool = False, pad_to: int = 1
    ) -> None:
        super().__init__()
        self.group, self.tp, self.rank = group, comm.group_size(group), comm.group_rank(group)
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.sequence_parallel = sequence_parallel
        weight = embedding.weight.detach()
        padded = padded_vocab_size(self.num_embeddings, self.tp, pad_to)
        if padded != self.num_embeddings:
            weight = torch.cat([weight, weight.new_zeros(padded - self.num_embeddings, self.embedding_dim)])
        self.weight = nn.Parameter(comm.split(weight, 0, group).clone())
        self.weight.tensor_model_parallel = True
        self.vocab_start = self.rank * self.weight.shape[0]

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group: Group, **options) -> VocabParallelEmbedding:
        """This rank's rows of ``embedding`` after padding the vocabulary (the constructor, named for
        what it does). Options: ``sequence_parallel``, ``pad_to`` (see :func:`padded_vocab_size`)."""
        return cls(embedding, group, **options)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local_ids = ids - self.vocab_start
        foreign = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        out = F.embedding(local_ids.masked_fill(foreign, 0), self.weight)
        out = out.masked_fill(foreign.unsqueeze(-1), 0.0)  # (B, T, H), zero where another rank owns the id
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.group)
        return reduce_from_tp_region(out, self.group)

    def full_weight(self) -> torch.Tensor:
        """The single-device table (V, H), padding stripped, gathered from every rank (a collective)."""
        return comm.all_gather(self.weight.detach(), 0, self.group)[: self.num_embeddings]
