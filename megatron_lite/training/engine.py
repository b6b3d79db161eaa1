"""The model as this rank holds it, with its gradients, optimizer and loss scaler.

One object for every layout; built in the documented order (each step needs the previous):

    build_model (meta -> device -> per-name init)     the full single-device model
    apply_tp(model, mesh, sp)                         this rank's tensor-parallel shard (no comm)
    pipeline chunks for this pp rank                  (pp > 1: the stages it runs)
    Precision.cast_model                              bf16/fp16 parameters, when asked
    DataParallelGrads(chunks, dp_group)               fp32 main grads in buckets, reduced in backward
    build_dp_optimizer(ddp, ...)                      ZeRO-1 (optim.distributed) or replicated AdamW

One step (:meth:`Engine.step`): zero the main grads -> forward/backward each microbatch, the last
one launching the bucket reductions as its gradients become ready -> wait for them -> sum
sequence-parallel norm grads over TP -> unscale (fp16) -> one global grad norm over dp, tp and pp
(replicated parameters counted once), clip -> AdamW, or skip on every rank when the norm is not
finite. The single-process run is the same code with every group of size one.
"""

from __future__ import annotations

import logging

import torch

from megatron_lite.config import Config
from megatron_lite.errors import UserError
from megatron_lite.models.parallelize import allreduce_sequence_parallel_grads, apply_tp, full_state_dict
from megatron_lite.models.transformer import Transformer, build_model
from megatron_lite.parallel import comm
from megatron_lite.parallel.data_parallel import DataParallelGrads
from megatron_lite.parallel.grad_utils import clip_grad_norm_
from megatron_lite.parallel.mesh import ParallelMesh
from megatron_lite.parallel.optimizer import build_dp_optimizer
from megatron_lite.parallel.precision import Precision

log = logging.getLogger(__name__)


class Engine:
    """Model, main grads, optimizer and loss scaler of one rank; see the module docstring."""

    def __init__(
        self,
        cfg: Config,
        mesh: ParallelMesh,
        device: torch.device,
        dtype: torch.dtype,
        model_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """``model_state``: single-device weights to start from (a checkpoint); loaded before
        sharding, so any saved model loads into any layout, and before the optimizer copies its
        fp32 masters from the parameters."""
        self.cfg, self.mesh, self.device = cfg, mesh, device
        model = build_model(cfg.model, cfg.train.seed, device)
        if model_state is not None:
            try:
                model.load_state_dict(model_state)
            except RuntimeError as e:
                raise UserError(f"the checkpoint does not fit this model (changed model.* settings?): {e}") from None
        model.recompute = cfg.train.recompute != "none"
        self.model: Transformer = apply_tp(model, mesh, sequence_parallel=cfg.parallel.sp)
        self.precision = Precision(dtype)
        self.precision.cast_model(self.model)
        bucket = cfg.parallel.bucket_mb * 2**20 if cfg.parallel.bucket_mb else None
        self.ddp = DataParallelGrads(
            self.model,
            mesh.dp_group,
            bucket_bytes=bucket,
            overlap=cfg.parallel.overlap_grad_reduce,
            reduce_scatter=cfg.optim.distributed,
        )
        self.optimizer = build_dp_optimizer(self.ddp, cfg.optim, overlap_param_gather=cfg.parallel.overlap_param_gather)
        self.scaler = self.precision.make_scaler()

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        return self.model(batch[:, :-1], batch[:, 1:])

    def forward_backward(self, micro: list[torch.Tensor]) -> torch.Tensor:
        """Accumulate the gradient of the mean loss over ``micro``; returns that mean (this rank)."""
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            with self.ddp.sync(last=i == len(micro) - 1):
                loss = self._loss(batch).float() / len(micro)
                (self.scaler.scale_loss(loss) if self.scaler else loss).backward()
            total += loss.detach()
        self.ddp.finish_grad_sync()
        return total

    def step(self, micro: list[torch.Tensor], lr: float) -> dict[str, float | bool]:
        """One optimizer step on this rank's microbatches; loss is the mean over the global batch."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ddp.zero_grad()
        loss = self.forward_backward(micro)
        allreduce_sequence_parallel_grads(self.model, self.mesh.tp_group)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm, finite = clip_grad_norm_(
            self.optimizer, self.cfg.optim.clip_grad, tp_group=self.mesh.tp_group, pp_group=self.mesh.pp_group
        )
        if self.scaler:
            self.scaler.update(found_inf=not finite)
        if finite:
            self.optimizer.step()
        return {"loss": self.global_mean(loss), "grad_norm": norm.item(), "skipped": not finite}

    def global_mean(self, local: torch.Tensor) -> float:
        """The data-parallel mean of a per-rank loss (tp ranks already agree)."""
        dp = comm.group_size(self.mesh.dp_group)
        return (comm.all_reduce(local.detach().float().clone(), self.mesh.dp_group) / dp).item()

    @torch.no_grad()
    def eval_loss(self, micro: list[torch.Tensor]) -> float:
        """Mean loss over ``micro`` (and over dp ranks) without touching gradients."""
        self.optimizer.finish_param_sync()
        self.model.eval()
        local = torch.stack([self._loss(b).float() for b in micro]).mean()
        self.model.train()
        return self.global_mean(local)

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The single-device state dict (tp shards gathered, vocab padding stripped): collective."""
        self.optimizer.finish_param_sync()
        return full_state_dict(self.model)
