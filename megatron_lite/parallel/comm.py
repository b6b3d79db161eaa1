"""Raw collectives along a tensor dimension, sync or async, with no autograd.

Everything in ``parallel/`` that moves tensors between ranks goes through here, so these choices are
made once:

- ``all_gather_single`` / ``reduce_scatter_single`` (torch >= 2.13) versus the older
  ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` (torch 2.11 on the GPU machine; deprecated
  with a FutureWarning on 2.13). Both pairs take the same arguments.
- Out-of-place functions (``start_all_reduce`` ...) for autograd, whose tensors may be shared;
  in-place ones (``start_all_reduce_`` ...) on flat buffers for the data-parallel grad buckets.
- ``group=None`` means "no process group: this process alone" (a single-process run never calls
  ``init_process_group``). Every collective on a size-1 group returns its input without
  communicating, so model code never asks ``dist.is_initialized()``. Passing ``None`` while a
  multi-rank process group exists is an error, because torch would read it as "the whole world".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None

_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: Group) -> int:
    """Number of ranks in ``group`` (1 for ``None``, the single-process group)."""
    if group is None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                f"group=None means 'no process group', but a process group of {dist.get_world_size()} "
                "ranks is initialised: pass the mesh's group (e.g. mesh.tp_group)"
            )
        return 1
    return dist.get_world_size(group)


def group_rank(group: Group) -> int:
    """This process's rank inside ``group`` (0 for ``None``)."""
    return 0 if group_size(group) == 1 else dist.get_rank(group)


@dataclass
class Pending:
    """A launched collective. ``wait()`` blocks until it is done and returns the result tensor.

    ``work`` is None when nothing was launched (size-1 group); ``finish`` turns the raw output
    buffer into the result (e.g. moves the gathered rank axis into place).
    """

    work: dist.Work | None
    finish: Callable[[], torch.Tensor]

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.finish()


def start_all_reduce(x: torch.Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Pending:
    """Launch an out-of-place all-reduce of ``x``.

    Out of place because autograd may hand the same gradient tensor to several consumers (a
    residual branch and its skip), so reducing it in place would corrupt the others.
    """
    if group_size(group) == 1:
        return Pending(None, lambda: x)
    out = x.clone(memory_format=torch.contiguous_format)
    return Pending(dist.all_reduce(out, op=op, group=group, async_op=True), lambda: out)


def start_all_gather(x: torch.Tensor, dim: int, group: Group) -> Pending:
    """Launch an all-gather that concatenates every rank's ``x`` along ``dim`` in rank order.

    Shapes: x (..., s, ...) on each of n ranks -> (..., n*s, ...).
    """
    n = group_size(group)
    if n == 1:
        return Pending(None, lambda: x)
    dim = dim % x.dim()
    out = torch.empty((n, *x.shape), dtype=x.dtype, device=x.device)  # rank axis first: one flat buffer
    work = _all_gather_flat(out.view(-1), x.contiguous().view(-1), group=group, async_op=True)

    def finish() -> torch.Tensor:
        # (n, ..., s, ...) -> (..., n, s, ...) -> (..., n*s, ...): rank-major, i.e. torch.cat order
        shape = list(x.shape)
        shape[dim] *= n
        return out.movedim(0, dim).reshape(shape)

    return Pending(work, finish)


def start_reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> Pending:
    """Launch a sum reduce-scatter along ``dim``: rank r gets chunk r of the sum over ranks.

    Shapes: x (..., n*s, ...) on each of n ranks -> (..., s, ...).
    """
    n = group_size(group)
    if n == 1:
        return Pending(None, lambda: x)
    dim = dim % x.dim()
    if x.shape[dim] % n:
        raise ValueError(f"reduce-scatter: dim {dim} has size {x.shape[dim]}, not divisible by {n} ranks")
    chunk = x.shape[dim] // n
    # (..., n*s, ...) -> (n, ..., s, ...) contiguous, so rank r's chunk is the r-th flat slice
    staged = x.unflatten(dim, (n, chunk)).movedim(dim, 0).contiguous()
    out = torch.empty(staged.shape[1:], dtype=x.dtype, device=x.device)
    work = _reduce_scatter_flat(out.view(-1), staged.view(-1), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return Pending(work, lambda: out)


def all_reduce(x: torch.Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Blocking out-of-place all-reduce."""
    return start_all_reduce(x, group, op).wait()


def all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Blocking all-gather along ``dim`` (see :func:`start_all_gather`)."""
    return start_all_gather(x, dim, group).wait()


def reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Blocking sum reduce-scatter along ``dim`` (see :func:`start_reduce_scatter`)."""
    return start_reduce_scatter(x, dim, group).wait()


def split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (no communication).

    Shapes: (..., n*s, ...) -> (..., s, ...).
    """
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"split: dim {dim} has size {x.shape[dim]}, not divisible by {n} ranks")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


# ---- in place, on flat buffers that nothing else aliases (the data-parallel grad/param buckets) --
def start_all_reduce_(x: torch.Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Pending:
    """Launch an in-place all-reduce of ``x``; ``wait()`` returns ``x`` itself.

    In place, unlike :func:`start_all_reduce`: a data-parallel gradient bucket is owned by its
    buffer alone, and a copy of every bucket would double the gradient memory.
    """
    if group_size(group) == 1:
        return Pending(None, lambda: x)
    return Pending(dist.all_reduce(x, op=op, group=group, async_op=True), lambda: x)


def start_reduce_scatter_(x: torch.Tensor, group: Group) -> Pending:
    """Launch an in-place sum reduce-scatter of flat ``x`` (n*s,); ``wait()`` returns chunk r.

    Afterwards chunk r of ``x`` (this rank's, elements [r*s, (r+1)*s)) holds the sum over ranks of
    that chunk; the other chunks are unspecified. NCCL and gloo both accept the output aliasing
    the input's own chunk, so no second buffer is needed.
    """
    n = group_size(group)
    if n == 1:
        return Pending(None, lambda: x)
    if x.dim() != 1 or x.numel() % n:
        raise ValueError(f"reduce-scatter in place: need a flat tensor divisible by {n} ranks, got {tuple(x.shape)}")
    out = x.view(n, -1)[group_rank(group)]
    work = _reduce_scatter_flat(out, x, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return Pending(work, lambda: out)


def start_all_gather_(x: torch.Tensor, group: Group) -> Pending:
    """Launch an in-place all-gather of flat ``x`` (n*s,): every rank's chunk r (its own) is sent
    to all; ``wait()`` returns ``x`` with every chunk filled."""
    n = group_size(group)
    if n == 1:
        return Pending(None, lambda: x)
    if x.dim() != 1 or x.numel() % n:
        raise ValueError(f"all-gather in place: need a flat tensor divisible by {n} ranks, got {tuple(x.shape)}")
    work = _all_gather_flat(x, x.view(n, -1)[group_rank(group)], group=group, async_op=True)
    return Pending(work, lambda: x)
