"""The global gradient norm over dp, tp and pp, clipping, and the step-or-skip decision.

Every gradient element of the model must be counted exactly once in the global L2 norm:

- DP: with the distributed optimizer each rank holds the reduced grads of its shard only, so it
  sums the squares of its shard and the sums are added over the dp group. With plain DP every
  rank holds the same full reduced grads: nothing is summed over dp.
- TP: a parameter sharded by TP carries ``param.tensor_model_parallel = True`` (set by
  ``parallel/tensor_parallel.py``); its shards are summed over the tp group, except rows that
  its ``param.tp_unique_rows`` mask (GQA KV heads replicated over tp ranks) leaves to another
  rank. A parameter NOT sharded (norm scales, a row-parallel bias) is replicated on every tp
  rank: only tp rank 0 counts it.
- PP: stages hold disjoint layers, summed over the pp group; the copy of a tied embedding on a
  later stage carries ``param.pipeline_tied_copy = True`` (set by ``training/engine.py`` on the
  rank without the first stage) and is not counted (its twin on the first stage is).

Not-counted grads still take part as ``0 * (their sum of squares)``: zero when finite, NaN when
not, so an inf/NaN in ANY gradient on ANY rank makes the all-reduced norm non-finite, and every
rank, reading the same all-reduced value, skips the step together. The caller counts the skips.

Per step, after ``ddp.finish_grad_sync()`` (and ``scaler.unscale_(opt)`` under fp16)::

    norm, finite = clip_grad_norm_(opt, cfg.optim.clip_grad, tp_group=mesh.tp_group, pp_group=mesh.pp_group)
    if finite:
        opt.step()

``training/engine.py`` runs the same two parts, :func:`optimizer_grad_norm` and :func:`clip_grads_`,
around one host read of the norm and the step's loss together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import Group

if TYPE_CHECKING:  # annotations only
    from megatron_lite.parallel.optimizer import DistributedAdamW, ReplicatedAdamW

TP_SHARDED_ATTR = "tensor_model_parallel"
TP_UNIQUE_ROWS_ATTR = "tp_unique_rows"
TIED_COPY_ATTR = "pipeline_tied_copy"
CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_, so clipped runs match the one-process trainer
Segment = tuple[nn.Parameter, torch.Tensor, int]  # (parameter, 1-D fp32 grad elements, their offset)


def counted_runs(param: nn.Parameter, tp_rank: int, offset: int, numel: int) -> list[tuple[int, int, bool]]:
    """Which of the elements [offset, offset + numel) of flattened ``param`` this rank counts in the
    global norm (module docstring), as (start, end, counted) runs that tile [0, numel), relative to
    ``offset``. A row mask (GQA) stays on the CPU, where tensor_parallel.py sets it, and the gradient
    is cut by slicing: a boolean mask on the gradient's device would copy it to the device, and
    indexing with it would wait for the device (the result's size depends on the data), each step."""
    if getattr(param, TIED_COPY_ATTR, False):
        return [(0, numel, False)]
    if not getattr(param, TP_SHARDED_ATTR, False):
        return [(0, numel, tp_rank == 0)]
    rows = getattr(param, TP_UNIQUE_ROWS_ATTR, None)  # GQA: KV rows replicated on several tp ranks
    if rows is None:
        return [(0, numel, True)]
    width = param.numel() // param.shape[0]
    starts = [0, *(torch.nonzero(rows[1:] != rows[:-1]).flatten() + 1).tolist(), len(rows)]  # runs of equal rows
    runs = []
    for lo, hi, counted in zip(starts, starts[1:], rows[starts[:-1]].tolist()):
        a, z = max(lo * width, offset), min(hi * width, offset + numel)
        if a < z:
            runs.append((a - offset, z - offset, counted))
    return runs


SUM_ROWS = 1024


def sum_of_squares(grad: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a 1-D fp32 gradient, accurate to ~1e-7 relative whatever its length.

    One ``vector_norm`` over a long vector accumulates sequentially per SIMD lane on CPU: on an
    embedding gradient (524k values from 1e-10 to 0.45) it was 8e-5 low, which moved the reported
    norm and the clipping factor. Norms of rows of ``SUM_ROWS`` values, then a (pairwise) sum of
    their squares, keep every accumulation short; the row norms are 1/1024 of the gradient.
    """
    head = grad.numel() - grad.numel() % SUM_ROWS
    total = torch.linalg.vector_norm(grad[:head].reshape(-1, SUM_ROWS), dim=1, dtype=torch.float32).square().sum()
    if head < grad.numel():
        total = total + torch.linalg.vector_norm(grad[head:], dtype=torch.float32).square()
    return total


def _joined(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` (1-D) with each run of neighbours in memory joined into one view. The parameters
    of a bucket lie back to back in the main-grad buffer, so the norm costs a few ops per bucket
    instead of per parameter (on a GPU each op is a kernel launch, and small steps are launch-bound)."""
    joined: list[torch.Tensor] = []
    for g in grads:
        if joined and _follows(joined[-1], g):
            last = joined[-1]
            joined[-1] = last.as_strided((last.numel() + g.numel(),), (1,), last.storage_offset())
        else:
            joined.append(g)
    return joined


def _follows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether 1-D ``b`` starts in memory right where 1-D ``a`` ends, both unit-stride, of one storage."""
    return (
        a.dtype == b.dtype
        and a.device == b.device
        and a.stride() == b.stride() == (1,)
        and b.storage_offset() == a.storage_offset() + a.numel()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )


def global_grad_norm(
    segments: Sequence[Segment], groups: Sequence[Group], tp_rank: int, device: torch.device | None = None
) -> torch.Tensor:
    """L2 norm of all gradients in the world, as an fp32 scalar identical on every rank.

    ``segments``: the optimizer's ``grad_segments()``: (parameter, 1-D fp32 grad elements this rank
    holds, offset of the first in the flattened parameter); ``groups``: the groups whose ranks hold
    disjoint parts of the model's gradient (the sums of squares are added over each in turn);
    ``device``: where the sum is reduced when this rank holds no gradient element (an empty ZeRO
    shard), the device the collectives need (NCCL refuses CPU tensors).
    """
    counted, others = [], []
    for param, grad, offset in segments:
        for lo, hi, counts in counted_runs(param, tp_rank, offset, grad.numel()):
            (counted if counts else others).append(grad[lo:hi])  # views: joined again where neighbours
    total = torch.zeros((), dtype=torch.float32, device=segments[0][1].device if segments else device)
    if counted:  # per-run sums first: no temporary the size of a gradient
        total += torch.stack([sum_of_squares(g) for g in _joined(counted)]).sum()
    if others:
        total += 0.0 * torch.stack([sum_of_squares(g) for g in _joined(others)]).sum()
    for group in groups:
        total = comm.all_reduce(total, group)
    return total.sqrt()


def optimizer_grad_norm(
    optimizer: DistributedAdamW | ReplicatedAdamW, *, tp_group: Group, pp_group: Group
) -> torch.Tensor:
    """Global grad norm of ``optimizer``'s grads, an fp32 scalar on its device, identical on every
    rank; nothing is read back to the host.

    ``optimizer``: a ``DistributedAdamW`` or ``ReplicatedAdamW`` (``optimizer.py``); its dp group
    joins the sum only when it is sharded.
    """
    groups = ([optimizer.dp_group] if optimizer.sharded else []) + [tp_group, pp_group]
    return global_grad_norm(optimizer.grad_segments(), groups, comm.group_rank(tp_group), optimizer.device)


def clip_grads_(optimizer: DistributedAdamW | ReplicatedAdamW, max_norm: float, norm: torch.Tensor) -> None:
    """Scale ``optimizer``'s grads to ``max_norm`` when ``norm`` (finite, from
    :func:`optimizer_grad_norm`) is larger; ``max_norm`` 0: never."""
    if max_norm > 0:
        # the same ops as torch.nn.utils.clip_grad_norm_: the factor is applied even when it is 1
        optimizer.scale_grads(torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0))


def clip_grad_norm_(
    optimizer: DistributedAdamW | ReplicatedAdamW, max_norm: float, *, tp_group: Group, pp_group: Group
) -> tuple[torch.Tensor, bool]:
    """:func:`optimizer_grad_norm`, then :func:`clip_grads_` when the norm is finite.

    Returns (norm before clipping, finite). A non-finite norm leaves the grads untouched: the
    caller must skip ``optimizer.step()``, which every rank then does, since all read the same
    all-reduced norm. Reading ``finite`` is one host sync; ``training/engine.py`` calls the two
    parts itself, so that the norm and the loss come back in one read.
    """
    norm = optimizer_grad_norm(optimizer, tp_group=tp_group, pp_group=pp_group)
    finite = bool(torch.isfinite(norm))
    if finite:
        clip_grads_(optimizer, max_norm, norm)
    return norm, finite
