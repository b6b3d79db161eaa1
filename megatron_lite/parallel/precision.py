"""Mixed precision: the parameter/compute dtype of a run, and fp16's dynamic loss scaler.

The three regimes (``train.dtype``, resolved to a torch dtype by ``training/build.resolve_dtype``):

=====  ================  ===========================  =======================  ============
dtype  params, compute   main grads and DP reduction  master weights, Adam     loss scaling
=====  ================  ===========================  =======================  ============
fp32   fp32              fp32                         the parameters           none
bf16   bf16              fp32                         fp32 copies (optimizer)  none (fp32's range)
fp16   fp16              fp32                         fp32 copies (optimizer)  dynamic
=====  ================  ===========================  =======================  ============

The parameters themselves are cast (no autocast): activations and their grads are then in the
low dtype, while ``DataParallelGrads`` accumulates and reduces fp32 main grads and the optimizer
keeps fp32 masters. Cast BEFORE building ``DataParallelGrads`` and the optimizer (the masters are
copied from the cast parameters, as Megatron's). Under fp16 one step reads::

    loss = scaler.scale_loss(model(x, y) / n_micro); loss.backward()   # per microbatch
    ddp.finish_grad_sync()
    scaler.unscale_(opt)                                                  # grads /= scale, fp32
    norm, finite = clip_grad_norm_(opt, clip, tp_group=..., pp_group=...)  # global inf check
    scaler.update(found_inf=not finite)
    if finite: opt.step()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only
    from megatron_lite.parallel.optimizer import DistributedAdamW, ReplicatedAdamW

NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The regime of a run (see the table in the module docstring)."""

    param_dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.param_dtype not in NAMES.values():
            raise ValueError(f"unsupported parameter dtype {self.param_dtype}; choose one of {sorted(NAMES)}")

    @classmethod
    def from_name(cls, name: str) -> Precision:
        """``fp32``, ``bf16`` or ``fp16`` (``train.dtype=auto`` is resolved by the trainer first)."""
        if name not in NAMES:
            raise ValueError(f"train.dtype={name!r}: choose one of {sorted(NAMES)}")
        return cls(NAMES[name])

    @property
    def loss_scaling(self) -> bool:
        """fp16 only: its 5 exponent bits underflow small gradients unless the loss is scaled."""
        return self.param_dtype == torch.float16

    def cast_model(self, model: nn.Module) -> nn.Module:
        """Cast floating-point parameters and buffers to ``param_dtype``, in place; returns ``model``."""
        return model.to(self.param_dtype)

    def make_scaler(self) -> DynamicLossScaler | None:
        """A :class:`DynamicLossScaler` with its defaults for fp16, else None."""
        return DynamicLossScaler() if self.loss_scaling else None


class DynamicLossScaler:
    """Loss scaling for fp16: multiply the loss by ``scale`` so small gradients stay representable,
    halve it on overflow (the step is skipped), double it after ``growth_interval`` clean steps.

    The overflow verdict passed to :meth:`update` must be the same on every rank: use the
    finiteness of the all-reduced global norm (``grad_utils.clip_grad_norm_``), never a local check.
    Defaults as ``torch.amp.GradScaler``; ``min_scale`` as Megatron's ``min_loss_scale``.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float = 1.0,
    ) -> None:
        if not (growth_factor > 1.0 and 0.0 < backoff_factor < 1.0 and growth_interval > 0):
            raise ValueError("need growth_factor > 1, 0 < backoff_factor < 1 and growth_interval > 0")
        self.scale, self.min_scale = float(init_scale), float(min_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.clean_steps = 0  # consecutive steps without overflow since the last change of scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` in fp32: an fp16 loss of ~10 times 2**16 would overflow fp16 (max 65504)."""
        return loss.float() * self.scale

    def unscale_(self, optimizer: DistributedAdamW | ReplicatedAdamW) -> None:
        """Divide the optimizer's fp32 grads by ``scale`` (exact for a power-of-two scale)."""
        optimizer.scale_grads(1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        """After each step: back off on overflow, grow after ``growth_interval`` clean steps."""
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])
