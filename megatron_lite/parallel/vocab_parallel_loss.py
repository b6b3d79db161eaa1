"""The loss over vocab-sharded logits, and gathering them back, for tensor parallelism.

The output head (a ``ColumnParallelLinear`` or the tied ``VocabParallelEmbedding`` weight, see
``tensor_parallel.py``) leaves each tp rank with its columns of the logits, (B, T, Vp/tp): rank r
owns vocabulary ids [r*Vp/tp, (r+1)*Vp/tp), and columns at or past the true vocabulary size are
padding. :func:`vocab_parallel_cross_entropy` (with :class:`VocabParallelLoss`, its ``loss_fn``
module) computes the mean loss without gathering them; :func:`gather_vocab_logits` gathers them
for evaluation and generation. All three are re-exported by ``tensor_parallel.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite import kernels
from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import Group
from megatron_lite.parallel.mappings import gather_from_tp_region, reduce_from_tp_region


def _shard_partials(
    logits: torch.Tensor, target: torch.Tensor, start: int, n_real: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, s, x_t) of this rank's real columns by the kernels' vocab-parallel form; a shard that is
    all padding has m = -inf and s = x_t = 0 (s still depends on the logits, so their grad is 0)."""
    if n_real > 0:  # the slice keeps rows strided: the Triton kernel reads it in place
        return kernels.cross_entropy_partials(logits[:, :n_real], target, start, ignore_index)
    s = logits[:, :0].float().sum(-1)
    return torch.full_like(s, float("-inf")), s, torch.zeros_like(s)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: Group,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean next-token loss over non-ignored targets, never materialising full logits on one rank.

    logits: (..., Vp/tp) this rank's vocab columns (rank r owns [r*Vp/tp, (r+1)*Vp/tp)); target:
    (...) global ids, ``ignore_index`` marks tokens left out of the mean. Columns at or past
    ``vocab_size`` (default: no padding) are padding and excluded. Math in fp32; the grad comes back
    in the logits' dtype. When every target is ignored the loss is NaN (0 / 0) with zero gradients,
    as ``F.cross_entropy`` and ``kernels.cross_entropy`` give.

    Per rank, ``kernels.cross_entropy_partials`` (Triton on CUDA, its torch twin elsewhere: the
    dispatcher picks) gives each row's local max ``m``, ``s = sum exp(x - m)`` and target logit
    ``x_t``; two all-reduces combine them (the recipe in ``kernels/reference.py``): MAX of ``m``,
    then one SUM of [s * exp(m - M), x_t] whose backward is the identity, since every rank holds the
    same loss. Autograd then gives each shard ``(softmax - onehot) * grad / n_valid``.
    """
    n_local = logits.shape[-1]
    vocab_size = n_local * comm.group_size(group) if vocab_size is None else vocab_size
    start = comm.group_rank(group) * n_local
    x, t = logits.reshape(-1, n_local), target.reshape(-1)
    m, s, x_t = _shard_partials(x, t, start, min(max(vocab_size - start, 0), n_local), ignore_index)
    big_m = comm.all_reduce(m, group, dist.ReduceOp.MAX)  # m is detached: the loss does not depend on it
    sums = reduce_from_tp_region(torch.stack([s * torch.exp(m - big_m), x_t]), group)  # one collective
    valid = t != ignore_index
    per_row = big_m + torch.log(sums[0]) - sums[1]
    # where(): ignored rows get an exact 0 gradient, so all-ignored is a NaN loss with zero grads
    return torch.where(valid, per_row, 0.0).sum() / valid.sum()


class VocabParallelLoss(nn.Module):
    """Drop-in for the model's ``loss_fn``: forward(logits (B, T, Vp/tp), labels (B, T)) -> mean loss."""

    def __init__(self, group: Group, vocab_size: int, ignore_index: int = -100) -> None:
        super().__init__()
        self.group, self.vocab_size, self.ignore_index = group, vocab_size, ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, self.group, self.vocab_size, self.ignore_index)


def gather_vocab_logits(logits: torch.Tensor, group: Group, vocab_size: int) -> torch.Tensor:
    """Full logits (..., V) from vocab shards (..., Vp/tp), padding stripped: for evaluation and
    generation only, since it materialises the whole vocabulary on every rank."""
    return gather_from_tp_region(logits, group)[..., :vocab_size]
