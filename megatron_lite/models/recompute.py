"""Activation recomputation of transformer blocks (``train.recompute``): ``full`` or ``selective``.

``full`` keeps only each block's input and re-runs the whole block forward during backward (one
extra forward: ~33% more compute). ``selective`` is torchtitan's op-level selective activation
checkpointing: the outputs of the expensive ops (the GEMMs and torch's SDPA attention; the Triton
attention of ``kernels.backend=triton`` is re-run like the elementwise ops) are kept, and
backward re-runs only the cheap elementwise work between them (norms, RoPE, activation functions,
residual adds), whose outputs are the activations it saves. Both give the gradients of no
recomputation: bitwise on CPU (tested), where every re-run op is deterministic. Collectives inside
a block (tensor/sequence parallelism) re-run with it, in the same order on every rank.

Memory per token and layer (``plan.py`` counts the same): ``none`` keeps every op's saved
inputs; ``full`` keeps ``h``; ``selective`` keeps the block input, the q/k/v projection, the
attention output and log-sum-exp, the two projection outputs back to ``h`` and the MLP's first
projection (``gate_up`` or ``up``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

_aten = torch.ops.aten
_SDPA_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
# Ops whose outputs selective recomputation keeps (the others are recomputed in backward).
SAVED_OPS = frozenset(
    [_aten.mm.default, _aten.addmm.default, _aten.bmm.default]
    + [getattr(_aten, name).default for name in _SDPA_OPS if hasattr(_aten, name)]
)


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def run_block(block: Callable[..., torch.Tensor], mode: str, *inputs) -> torch.Tensor:
    """``block(*inputs)`` under recomputation ``mode`` (one of :data:`MODES`); without grad, plain."""
    if mode == "none" or not torch.is_grad_enabled():
        return block(*inputs)
    if mode == "full":
        return checkpoint(block, *inputs, use_reentrant=False)
    if mode == "selective":
        context = functools.partial(create_selective_checkpoint_contexts, _policy)
        return checkpoint(block, *inputs, use_reentrant=False, context_fn=context)
    raise ValueError(f"recompute mode {mode!r} is not one of {MODES}")
