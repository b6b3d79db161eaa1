"""Learning-rate schedule: linear warmup to ``lr`` (warmup step i at ``lr * (i + 1) / warmup``), then
cosine decay towards ``min_lr``, reached at the step after the decay's last (``optim.decay_steps``)."""

from __future__ import annotations

import math

from megatron_lite.config import OptimConfig


def lr_at(step: int, o: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based); constant ``min_lr`` after the decay."""
    if o.warmup > 0 and step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    progress = min((step - o.warmup) / max(o.decay_steps, 1), 1.0)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))
