"""Collectives as autograd functions: the f/g conjugate pairs of Megatron-LM (Shoeybi et al. 2019).

Each mapping is a tiny ``torch.autograd.Function`` with a public wrapper. The group is a required
argument (no global parallel state); on a size-1 group (tp=1, or ``None`` in a single process)
every wrapper returns its input unchanged and adds no autograd node.

Tensor-parallel region (the hidden/feature dim, always the LAST dim):

=====================================  =====================  =====================
wrapper                                forward                backward
=====================================  =====================  =====================
copy_to_tp_region          (f)         identity               all-reduce
reduce_from_tp_region      (g)         all-reduce             identity
scatter_to_tp_region                   split last dim         all-gather last dim
gather_from_tp_region                  all-gather last dim    split last dim
=====================================  =====================  =====================

Sequence-parallel region (Korthikanti et al. 2022). Activations are (B, T, ...) and the sequence
dim is :data:`SEQ_DIM` = 1; ranks hold contiguous chunks of T/tp tokens in rank order:

============================================  ======================  ======================
wrapper                                       forward                 backward
============================================  ======================  ======================
scatter_to_sequence_parallel_region           split T                 all-gather T
gather_from_sequence_parallel_region   (f')   all-gather T            reduce-scatter T
reduce_scatter_to_sequence_parallel_region    reduce-scatter T        all-gather T
                                       (g')
============================================  ======================  ======================
"""

from __future__ import annotations

import torch

from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import Group

SEQ_DIM = 1
"""The sequence dim of (B, T, H) activations, the one sequence parallelism shards."""


class _CopyToTP(torch.autograd.Function):
    """forward: identity; backward: all-reduce (sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)  # a view, so autograd records this node

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return comm.all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """forward: all-reduce (sum); backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        return comm.all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    """forward: keep this rank's chunk of the last dim; backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return comm.split(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return comm.all_gather(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    """forward: all-gather the last dim; backward: keep this rank's chunk of the last dim."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return comm.all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return comm.split(grad, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    """forward: keep this rank's chunk of T; backward: all-gather T."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return comm.split(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return comm.all_gather(grad, SEQ_DIM, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    """forward: all-gather T; backward: reduce-scatter T (each rank's grad is a partial sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return comm.all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return comm.reduce_scatter(grad, SEQ_DIM, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    """forward: reduce-scatter T; backward: all-gather T."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return comm.reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return comm.all_gather(grad, SEQ_DIM, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a TP region with a replicated input (Megatron's ``f``).

    forward: identity; backward: all-reduce, because each rank's grad is a partial sum over the
    output features it owns. Shapes: (..., H) -> (..., H).
    """
    return x if comm.group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a TP region by summing partial outputs (Megatron's ``g``).

    forward: all-reduce; backward: identity. Shapes: (..., H) partial -> (..., H) full.
    """
    return x if comm.group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: split the last dim, keep this rank's chunk; backward: all-gather the last dim.

    Shapes: (..., H) -> (..., H/tp).
    """
    return x if comm.group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: all-gather the last dim in rank order; backward: split the last dim.

    Shapes: (..., H/tp) -> (..., H).
    """
    return x if comm.group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """forward: split T, keep this rank's chunk; backward: all-gather T.

    For an input every rank computed in full (e.g. position embeddings). Shapes: (B, T, ...) ->
    (B, T/tp, ...).
    """
    return x if comm.group_size(group) == 1 else _ScatterToSP.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a TP region from a sequence-sharded input (the SP form of ``f``).

    forward: all-gather T; backward: reduce-scatter T, because the consumer is column-parallel and
    each rank's grad is a partial sum. Shapes: (B, T/tp, ...) -> (B, T, ...).
    """
    return x if comm.group_size(group) == 1 else _GatherFromSP.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a TP region into a sequence-sharded output (the SP form of ``g``).

    forward: reduce-scatter T (sum of partial outputs, this rank's chunk); backward: all-gather T.
    Shapes: (B, T, ...) partial -> (B, T/tp, ...) full.
    """
    return x if comm.group_size(group) == 1 else _ReduceScatterToSP.apply(x, group)
