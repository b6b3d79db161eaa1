"""The model as this rank holds it, with its gradients, optimizer and loss scaler.

One object for every layout; built in the documented order (each step needs the previous):

    build_model (meta -> device -> per-name init)     the full single-device model
    pp > 1: only this rank's pipeline chunks          (built by name: the same values as the whole)
    model_state, when given                           a checkpoint's single-device weights, loaded
    chunk.recompute = train.recompute                 how each block runs (models/recompute.py)
    apply_tp(each chunk, mesh, sp)                    this rank's tensor-parallel shard (no comm)
    block.compile() (train.compile)                   per block, after TP and recompute
    Precision.cast_model                              bf16/fp16 parameters, when asked
    fp8.enable (train.dtype=fp8)                      block projections as TE te.Linear, fp8_autocast
    PipelineRuntime (pp > 1)                          runs the schedule; the tied-embedding group
    DataParallelGrads(chunks, dp_group)               fp32 main grads in buckets, reduced in backward
    build_dp_optimizer(ddp, ...)                      ZeRO-1 (optim.distributed) or replicated AdamW

One step (:meth:`Engine.step`): zero the main grads -> forward/backward each microbatch, the last
one launching the bucket reductions as its gradients become ready -> wait for them -> sum
sequence-parallel norm grads over TP -> unscale (fp16) -> one global grad norm over dp, tp and pp
(replicated parameters counted once), read back together with the loss (the step's one host sync)
-> clip -> AdamW, or skip on every rank when the norm is not finite. Under pipeline parallelism
the schedule (``parallel.schedule``) runs the microbatches instead of the plain loop, and each
chunk's buckets launch right before that chunk's last backward.
The single-process run is the same code with every group of size one.
"""

from __future__ import annotations

import logging
import math

import torch

from megatron_lite.checkpoint.shards import BoxReader, Piece, collect_pieces, restore
from megatron_lite.config import Config
from megatron_lite.errors import UserError
from megatron_lite.models.parallelize import allreduce_sequence_parallel_grads, apply_tp
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel import comm
from megatron_lite.parallel.data_parallel import DataParallelGrads
from megatron_lite.parallel.grad_utils import clip_grads_, optimizer_grad_norm
from megatron_lite.parallel.mesh import ParallelMesh, group_ranks
from megatron_lite.parallel.optimizer import build_dp_optimizer
from megatron_lite.parallel.pipeline import PipelineRuntime, build_stage_chunks, tied_embedding_groups
from megatron_lite.parallel.precision import Precision
from megatron_lite.plan import Layout
from megatron_lite.training import fp8

log = logging.getLogger(__name__)


class Engine:
    """Model chunks, main grads, optimizer and loss scaler of one rank; see the module docstring."""

    def __init__(
        self,
        cfg: Config,
        mesh: ParallelMesh,
        layout: Layout,
        device: torch.device,
        dtype: torch.dtype,
        model_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """``model_state``: single-device weights to start from (a checkpoint); loaded before
        sharding, so any saved model loads into any layout, and before the optimizer copies its
        fp32 masters from the parameters."""
        self.cfg, self.mesh, self.layout, self.device = cfg, mesh, layout, device
        self.chunks = self._build_chunks(model_state)
        self.model = self.chunks[0]  # pp=1: the whole (tensor-parallel) model
        self.precision = Precision(dtype)
        for chunk in self.chunks:
            self.precision.cast_model(chunk)
        if cfg.train.dtype == "fp8":  # after the cast, before the main grads and optimizer see the params
            fp8.enable(self.chunks, dtype, mesh.dp_group)
        self.scaler = self.precision.make_scaler()
        self.runtime = self._build_runtime() if mesh.pp_size > 1 else None
        bucket = round(cfg.parallel.bucket_mb * 2**20) if cfg.parallel.bucket_mb else None
        tied = self.runtime.tied if self.runtime is not None else None
        self.ddp = DataParallelGrads(
            self.chunks,
            mesh.dp_group,
            bucket_bytes=bucket,
            overlap=cfg.parallel.overlap_grad_reduce,
            reduce_scatter=cfg.optim.distributed,
            tied=[(tied, self.runtime.embed_group)] if tied is not None else [],
        )
        self.optimizer = build_dp_optimizer(self.ddp, cfg.optim, overlap_param_gather=cfg.parallel.overlap_param_gather)

    def _build_chunks(self, model_state: dict[str, torch.Tensor] | None) -> list[torch.nn.Module]:
        cfg, mesh = self.cfg, self.mesh
        if mesh.pp_size == 1:
            chunks = [build_model(cfg.model, cfg.train.seed, self.device)]
        else:
            chunks = build_stage_chunks(cfg.model, self.layout.partition, mesh.pp_rank, cfg.train.seed, self.device)
        for chunk in chunks:
            if model_state is not None:
                _load_single_device_state(chunk, model_state, whole=mesh.pp_size == 1)
            chunk.recompute = cfg.train.recompute
            apply_tp(chunk, mesh, sequence_parallel=cfg.parallel.sp)
            if cfg.train.compile:
                # per block, after TP and recompute (torchtitan's order); in place, so parameter
                # names keep no `_orig_mod.` prefix and checkpoints are the same with or without
                for block in chunk.layers:
                    block.compile()
        return chunks

    def _build_runtime(self) -> PipelineRuntime:
        cfg, mesh = self.cfg, self.mesh
        embed_group = None
        if cfg.model.tie_embeddings:  # a collective: every rank creates every pipeline's {first, last} group
            dims = mesh.dims
            pipelines = sorted({tuple(group_ranks(r, dims, "pp")) for r in range(dims.world_size)})
            mine = pipelines.index(tuple(group_ranks(mesh.rank, dims, "pp")))
            embed_group = tied_embedding_groups(pipelines)[mine]
        tp, hidden = mesh.tp_size, cfg.model.hidden
        # activations between stages: (B, T, H), or (B, T/tp, H) under sequence parallelism
        shape = (lambda s: (s[0], s[1] // tp, hidden)) if cfg.parallel.sp else None
        runtime = PipelineRuntime(
            self.chunks,
            self.layout.schedule,
            mesh.pp_group,
            embed_group=embed_group,
            timeout_s=cfg.parallel.timeout_s,
            activation_shape=shape,
            scale_loss=self.scaler.scale_loss if self.scaler else None,
            before_last_backward=lambda c: self.ddp.buffers[c].set_last_microbatch(True),
            sync_tied_grads=False,  # the main-grad buffers sum it (DataParallelGrads' tied)
        )
        if runtime.tied is not None and not any(c.is_first for c in self.chunks):
            # the head's copy on the last stage's rank; the first stage's rank owns the embedding
            # (interleaved: its chunks also include later stages). Counted once in the global grad
            # norm and saved once in checkpoints, by the owner.
            runtime.tied.pipeline_tied_copy = True
        return runtime

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(*_inputs_and_labels(batch.to(self.device, non_blocking=True)))

    def forward_backward(self, micro: list[torch.Tensor]) -> torch.Tensor:
        """Accumulate the gradient of the mean loss over ``micro``; returns that mean on every rank
        of this pipeline (only the last stage computes it: the sum over the pp group adds zeros).
        A microbatch's loss is the mean over its targets, and the step's the mean of those over the
        global batch's microbatches (the dp reduction averages the ranks' means), Megatron's choice:
        the same in every layout, since which samples form a microbatch does not depend on it
        (``PretrainingLoader``), and the mean over tokens while no target is ignored."""
        if self.runtime is not None:
            self.ddp.set_last_microbatch(False)  # each chunk's last backward flips it (runtime)
            loss = self.runtime.step([_inputs_and_labels(b) for b in micro])
            self.ddp.finish_grad_sync()
            local = loss.float() if loss is not None else torch.zeros((), device=self.device)
            return comm.all_reduce(local, self.mesh.pp_group)  # only the last stage has it
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            with self.ddp.sync(last=i == len(micro) - 1):
                loss = self._loss(batch).float() / len(micro)
                (self.scaler.scale_loss(loss) if self.scaler else loss).backward()
            total += loss.detach()
        self.ddp.finish_grad_sync()
        return total

    def step(self, micro: list[torch.Tensor], lr: float) -> dict[str, float | bool]:
        """One optimizer step on this rank's microbatches; loss is the mean over the global batch.

        The host reads the device once per step (Megatron's one found-inf/grad-norm read): the
        global grad norm and the loss come back together, after the backward and before the
        optimizer step, which the norm's finiteness decides."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ddp.zero_grad()
        loss = self._dp_mean(self.forward_backward(micro))
        for chunk in self.chunks:
            allreduce_sequence_parallel_grads(chunk, self.mesh.tp_group)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = optimizer_grad_norm(self.optimizer, tp_group=self.mesh.tp_group, pp_group=self.mesh.pp_group)
        norm_value, loss_value = torch.stack((norm, loss)).tolist()  # the step's one host sync
        finite = math.isfinite(norm_value)
        if self.scaler:
            self.scaler.update(found_inf=not finite)
        if finite:
            clip_grads_(self.optimizer, self.cfg.optim.clip_grad, norm)
            self.optimizer.step()
        return {"loss": loss_value, "grad_norm": norm_value, "skipped": not finite}

    def global_mean(self, local: torch.Tensor) -> float:
        """The data-parallel mean of a per-rank loss (tp ranks already agree)."""
        return self._dp_mean(local).item()

    def _dp_mean(self, local: torch.Tensor) -> torch.Tensor:
        """:meth:`global_mean` as an fp32 scalar on the device (no host sync)."""
        total = comm.all_reduce(local.detach().float(), self.mesh.dp_group)  # out of place: ``local`` stays
        dp = comm.group_size(self.mesh.dp_group)
        return total / dp if dp > 1 else total

    @torch.no_grad()
    def eval_loss(self, micro: list[torch.Tensor]) -> float:
        """Mean loss over ``micro`` (and over dp ranks) without touching gradients."""
        self.optimizer.finish_param_sync()
        if self.runtime is not None:  # pipelined forwards; the last stage's mean, summed over the pp group
            losses = self.runtime.evaluate([_inputs_and_labels(b) for b in micro])
            local = torch.zeros((), device=self.device) if losses is None else _mean_loss(losses)
            return self.global_mean(comm.all_reduce(local, self.mesh.pp_group))
        return self.global_mean(_mean_loss([self._loss(b) for b in micro]))

    def sharded_state(self) -> tuple[list[Piece], int]:
        """(this rank's boxes of the global model and optimizer state, AdamW's step count) for a
        checkpoint: views of live tensors, so copy them before training continues. Each box is
        written by one rank only (``checkpoint/shards.py``); nothing is gathered. The weights are
        the fp32 masters, so parameter all-gathers still in flight do not matter."""
        return collect_pieces(self.ddp, self.optimizer, self.mesh.tp_rank, self.mesh.dp_rank)

    def load_sharded_state(self, reader: BoxReader, step: int) -> None:
        """Load masters, Adam moments (``step`` steps taken) and parameters from a checkpoint saved
        in any layout, reading only this rank's boxes. Collective over dp (parameter refresh)."""
        restore(self.ddp, self.optimizer, self.cfg.model, self.mesh.tp_rank, reader, step)


def _mean_loss(losses: list[torch.Tensor]) -> torch.Tensor:
    """The fp32 mean of microbatch losses: one arithmetic for every layout."""
    return torch.stack([loss.float() for loss in losses]).mean()


def _inputs_and_labels(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, T + 1) window of tokens -> input ids (B, T) and next-token labels (B, T)."""
    return batch[:, :-1], batch[:, 1:]


def _load_single_device_state(chunk: torch.nn.Module, state: dict[str, torch.Tensor], whole: bool) -> None:
    """Load the single-device tensors this (unsharded) model or chunk holds; every one must be there,
    and for the whole model (``whole``) nothing else may be. Otherwise one UserError listing what
    the checkpoint lacks, what it has besides, and what it has in another shape."""
    own = chunk.state_dict()
    groups = {
        "missing": [k for k in own if k not in state],
        "unexpected": [k for k in state if k not in own] if whole else [],
        "shape mismatches": [
            f"{k} (checkpoint {list(state[k].shape)}, model {list(v.shape)})"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ],
    }
    problems = [
        f"{label}: {', '.join(names[:8])}" + (f", ... {len(names) - 8} more" if len(names) > 8 else "")
        for label, names in groups.items()
        if names
    ]
    if problems:
        raise UserError(f"the checkpoint does not fit this model (changed model.* settings?): {'; '.join(problems)}")
    chunk.load_state_dict({k: state[k] for k in own})
