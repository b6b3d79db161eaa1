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

from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import Group
from megatron_lite.parallel.mappings import gather_from_tp_region


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over vocab-sharded logits, without gathering them.

    forward (fp32): global max = all-reduce(MAX) of local maxima; then one all-reduce(SUM) of
    [target logit (from the one rank owning it), local sum of exp]. loss = log(sum exp) - target.
    backward: grad = (softmax - onehot) * grad_loss / n_valid on the local columns, no communication.
    """

    @staticmethod
    def forward(ctx, logits, target, group: Group, vocab_size: int, ignore_index: int):
        n_local = logits.shape[-1]
        start = comm.group_rank(group) * n_local
        x = logits.float()
        if start + n_local > vocab_size:  # padded columns: exp(-inf) = 0 keeps them out of the sum
            pad = torch.arange(start, start + n_local, device=x.device) >= vocab_size
            x = x.masked_fill(pad, float("-inf"))
        x = x - comm.all_reduce(x.max(-1).values, group, dist.ReduceOp.MAX).unsqueeze(-1)  # (N, Vl)
        valid = target != ignore_index
        mine = valid & (target >= start) & (target < start + n_local)
        local_t = (target - start).masked_fill(~mine, 0)
        target_logit = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = x.exp()
        sums = comm.all_reduce(torch.stack([target_logit, exp.sum(-1)]), group)  # one collective
        n_valid = valid.sum().clamp(min=1)
        loss = ((sums[1].log() - sums[0]) * valid).sum() / n_valid
        exp.div_(sums[1].unsqueeze(-1))  # now the softmax
        ctx.save_for_backward(exp, local_t, mine, valid, n_valid)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, mine, valid, n_valid = ctx.saved_tensors
        grad = softmax  # reused in place: nothing else holds it
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -mine.to(grad.dtype).unsqueeze(-1))
        grad.mul_((valid.to(grad.dtype) * grad_loss / n_valid).unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None, None


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
    in the logits' dtype. When every target is ignored the loss is 0 (torch gives NaN).
    """
    n_local = logits.shape[-1]
    vocab_size = n_local * comm.group_size(group) if vocab_size is None else vocab_size
    return _VocabParallelCrossEntropy.apply(
        logits.reshape(-1, n_local), target.reshape(-1), group, vocab_size, ignore_index
    )


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
