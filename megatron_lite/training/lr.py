"""Learning-rate schedules: linear warmup to ``lr`` (warmup step i at ``lr * (i + 1) / warmup``), then
``optim.decay_style``, each as Megatron-LM (and torchtitan) computes it:

- ``cosine`` (the default) and ``linear``: from ``lr`` towards ``min_lr`` over ``optim.decay_steps``
  steps, ``min_lr`` reached at the step after the decay's last;
- ``constant``: ``lr``;
- ``inverse-square-root``: ``lr * sqrt(warmup) / sqrt(s)`` at the run's step s (from 1), never below
  ``min_lr`` (continuous with the warmup, whose last step s = warmup is at ``lr``); warmup 0 counts as
  1, as in Megatron, so step s is at ``lr / sqrt(s)``;
- ``wsd`` (warmup-stable-decay): ``lr`` until the last ``optim.wsd_decay_steps`` of the decay steps,
  which go to ``min_lr`` along ``optim.wsd_decay_shape`` (``1-sqrt`` is MiniCPM's, torchtitan's ``sqrt``).

:func:`check_schedule` refuses the combinations of these keys that no schedule reads or runs (each
key's own values are checked with the others, in ``config_validate.py``).
"""

from __future__ import annotations

import math

from megatron_lite.config_sections import OptimConfig
from megatron_lite.errors import UserError

DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root", "wsd")
WSD_DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
WSD_KEYS = ("wsd_decay_steps", "wsd_decay_shape")  # read by decay_style=wsd only
WSD_DEFAULT_SHAPE = "linear"  # torchtitan's default; fill_defaults resolves an empty optim.wsd_decay_shape to it


def lr_at(step: int, o: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based); constant after a decay that ends."""
    if o.warmup > 0 and step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    if o.decay_style == "constant":
        return o.lr
    if o.decay_style == "inverse-square-root":
        return max(o.min_lr, o.lr * math.sqrt(max(o.warmup, 1)) / math.sqrt(step + 1))
    decayed = step - o.warmup  # decay steps before this one
    if o.decay_style == "wsd":
        stable = o.decay_steps - o.wsd_decay_steps
        if decayed < stable:
            return o.lr
        return _decayed(o, o.wsd_decay_shape, min((decayed - stable) / o.wsd_decay_steps, 1.0))
    return _decayed(o, o.decay_style, min(decayed / max(o.decay_steps, 1), 1.0))


def _decayed(o: OptimConfig, shape: str, progress: float) -> float:
    """The learning rate ``progress`` (0 to 1) of the way from ``lr`` to ``min_lr`` along ``shape``: the
    fraction of ``lr - min_lr`` left is ``(1 + cos(pi p)) / 2``, ``1 - p`` or ``1 - sqrt(p)``, exactly 0 at
    p = 1."""
    if shape == "cosine":
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))
    if shape == "linear":
        return o.min_lr + (o.lr - o.min_lr) * (1.0 - progress)
    if shape == "1-sqrt":
        return o.min_lr + (o.lr - o.min_lr) * (1.0 - math.sqrt(progress))
    raise ValueError(f"no decay shape {shape!r} (optim.wsd_decay_shape is resolved by fill_defaults)")


def decay_end(o: OptimConfig) -> int | None:
    """The run's step (from 1) that is the decay's last, after which every step trains at ``min_lr``;
    None for a schedule with no end (``constant``, ``inverse-square-root``)."""
    if o.decay_style in ("constant", "inverse-square-root"):
        return None
    return o.warmup + o.decay_steps


def check_schedule(o: OptimConfig) -> None:
    """Refuse a wsd key given to another decay style (it would be silently unused), a wsd schedule
    without its decay length, and a wsd decay longer than the decay steps it ends (``decay_steps``
    filled: train.steps - warmup by default)."""
    if o.decay_style != "wsd":
        given = [k for k in WSD_KEYS if getattr(o, k) is not None]
        if given:
            named = " and ".join(f"optim.{k}={getattr(o, k)}" for k in given)
            keys = " and ".join(f"optim.{k}" for k in given)
            are, them = ("is", "it") if len(given) == 1 else ("are", "them")
            raise UserError(
                f"{named} {are} read only by optim.decay_style=wsd, not by optim.decay_style={o.decay_style}, "
                f"which would ignore {them}: set optim.decay_style=wsd, or leave {keys} empty (=null)"
            )
        return
    if o.wsd_decay_steps is None:
        raise UserError(
            f"optim.decay_style=wsd needs optim.wsd_decay_steps, the last steps of the {o.decay_steps} decay steps "
            "(optim.decay_steps) that decay to optim.min_lr after the stable ones at optim.lr; e.g. "
            f"optim.wsd_decay_steps={max(o.decay_steps // 5, 1)} (a fifth of them)"
        )
    if o.wsd_decay_steps > o.decay_steps:
        raise UserError(
            f"optim.wsd_decay_steps={o.wsd_decay_steps} is more than optim.decay_steps={o.decay_steps}, the decay "
            "steps after warmup (train.steps - optim.warmup unless set) whose last ones it decays: set "
            f"optim.wsd_decay_steps to at most {o.decay_steps}, or raise train.steps (or optim.decay_steps)"
        )
