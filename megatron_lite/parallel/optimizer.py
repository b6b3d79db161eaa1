"""AdamW over :class:`DataParallelGrads`: the distributed optimizer (ZeRO-1) and the replicated one.

:class:`DistributedAdamW` (``optim.distributed=true``; grads reduce-scattered). Rank r owns shard r
of every bucket (see ``data_parallel.py``): the fp32 master weights of that range and their Adam
moments, i.e. 1/dp of the optimizer state. Its flat shard is the concatenation of its bucket
shards, chunk by chunk, bucket by bucket (padding included, so each bucket shard is one copy). The
update itself is ``torch.optim.AdamW`` (one per bucket shard) run on 1-D views of the master shard,
one view per (parameter, shard) overlap ("segment"), with weight decay on segments of parameters
with ndim >= 2 (norm scales and biases are not decayed): every AdamW operation is per element, so a
parameter split across ranks gets bitwise the update it would get unsplit, and the math is torch's
own in every torch version. Each bucket's updated shard is then cast to the parameter dtype and
all-gathered, in place, into a flat parameter buffer of which every model parameter is a view
(:class:`ParamGather` in ``param_gather.py``; ``param.data`` is re-pointed at construction: build
the optimizer after the model is on its device and dtype). With ``overlap_param_gather`` each
bucket's all-gather is launched async as soon as that bucket is updated (behind the other buckets'
updates) and waited for in the forward pre-hook of the first module whose own parameters live in
it, so it also overlaps the next forward. A parameter the model uses outside its own module's
forward (the untied head: ``F.linear(h, self.head.weight)``) would be read before its wait; such
parameters are found in the forwards before the first step (their module's pre-hook never fired),
and their buckets are launched first and waited when the chunk's forward starts: correct always,
overlapped for every other bucket.

:class:`ReplicatedAdamW` (plain DP; grads all-reduced): ``torch.optim.AdamW`` on full fp32
parameters: the parameters themselves when fp32, else fp32 master copies written back after the
step.

Both offer the interface ``training/engine.py``, ``grad_utils`` and ``checkpoint/shards.py`` use:
``param_groups`` (the engine sets ``group["lr"]`` each step), ``step()``, ``scale_grads(factor)``,
``grad_segments()``, ``device``, ``sharded``, ``dp_group``, ``finish_param_sync()``,
``memory_bytes()``, ``state_dict()``, ``load_state_dict()``.
``on_event(name, chunk, bucket)`` traces ``param_launch``, ``param_wait_begin``, ``param_wait_end``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_lite.config import OptimConfig
from megatron_lite.parallel import comm
from megatron_lite.parallel.data_parallel import DataParallelGrads, EventHook
from megatron_lite.parallel.param_gather import ParamGather

FP32 = torch.float32
KERNEL_KEYS = ("fused", "foreach")  # torch param-group keys that choose the AdamW kernel, not the update


def _adamw(decay: list[torch.Tensor], no_decay: list[torch.Tensor], lr: float, betas, eps, weight_decay):
    """torch's AdamW with decay on matrices only. On CUDA the fused kernel (the whole update of a
    group in a few launches, as apex's FusedAdam); elsewhere foreach (one op per group), bitwise
    the same as the one-process reference."""
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if _fused(decay + no_decay):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def _fused(params: list[torch.Tensor]) -> bool:
    return bool(params) and all(p.device.type == "cuda" for p in params)


@dataclass(frozen=True)
class Segment:
    """The part of one parameter inside this rank's shard of one bucket.

    ``param_range``: elements of the flattened parameter; ``buffer_range``: the same elements in
    the chunk's grad/param buffers; ``shard_range``: in this rank's flat shard tensors.
    """

    chunk: int
    bucket: int
    name: str
    param: nn.Parameter
    param_range: tuple[int, int]
    buffer_range: tuple[int, int]
    shard_range: tuple[int, int]


class DistributedAdamW:
    """ZeRO-1 AdamW (see the module docstring). ``ddp`` must reduce-scatter."""

    sharded = True

    def __init__(
        self,
        ddp: DataParallelGrads,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        overlap_param_gather: bool = True,
        on_event: EventHook | None = None,
    ) -> None:
        if not ddp.reduce_scatter:
            raise ValueError("DistributedAdamW needs DataParallelGrads(..., reduce_scatter=True)")
        self.ddp, self.dp_group, self.overlap_param_gather = ddp, ddp.dp_group, overlap_param_gather
        self.gather = ParamGather(ddp, overlap_param_gather, on_event)
        self.master = torch.zeros(self.gather.shard_numel, dtype=FP32, device=ddp.buffers[0].data.device)
        self.segments, self._views, self.optimizers = [], [], []
        for i, (c, _, lo, hi) in enumerate(self.gather.shards):
            shard_lo = self.gather.shard_offsets[i]
            self.master[shard_lo : shard_lo + hi - lo].copy_(self.gather.data[c][lo:hi])
            segments = self._bucket_segments(i)
            views = [self.master[s.shard_range[0] : s.shard_range[1]] for s in segments]
            for s, view in zip(segments, views):
                view.grad = ddp.buffers[c].data[s.buffer_range[0] : s.buffer_range[1]]
            decay = [v for s, v in zip(segments, views) if s.param.ndim >= 2]
            no_decay = [v for s, v in zip(segments, views) if s.param.ndim < 2]
            # one AdamW per bucket shard, so a bucket's all-gather starts as soon as it is updated
            self.optimizers.append(_adamw(decay, no_decay, lr, betas, eps, weight_decay))
            self.segments += segments
            self._views += views
        self.num_steps = 0

    def _bucket_segments(self, i: int) -> list[Segment]:
        """Each (parameter, bucket shard ``i``) overlap, in shard order."""
        (c, b, lo, hi), shard_lo = self.gather.shards[i], self.gather.shard_offsets[i]
        buffer, segments = self.ddp.buffers[c], []
        for p in buffer.buckets[b].params:
            p_lo, p_hi = buffer.offsets[p]
            a, z = max(lo, p_lo), min(hi, p_hi)
            if a < z:
                s_lo = shard_lo + a - lo
                segments.append(Segment(c, b, buffer.names[p], p, (a - p_lo, z - p_lo), (a, z), (s_lo, s_lo + z - a)))
        return segments

    @property
    def param_groups(self) -> list[dict]:
        """Every bucket's (decay, no decay) torch param groups: set ``group["lr"]`` on all each step."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's shard, bucket by bucket, each all-gathered once updated (with
        overlap: async, behind the other buckets' updates and the next forward)."""
        self.gather.finish()  # a bucket no forward waited for (unused parameters)
        order = self.gather.launch_order()
        for i in order:
            self.optimizers[i].step()
            if self.overlap_param_gather:
                self.gather.launch(i, self.master)
        self.num_steps += 1
        if not self.overlap_param_gather:
            self.gather.refresh(self.master)

    def finish_param_sync(self) -> None:
        """Wait for every parameter all-gather still in flight (before a checkpoint, or an eval
        that does not run the model's forward)."""
        self.gather.finish()

    def scale_grads(self, factor: torch.Tensor | float) -> None:
        """Multiply the gradients this rank's step uses (its shard) by ``factor`` (clip, unscale)."""
        if self._views:
            torch._foreach_mul_([v.grad for v in self._views], factor)

    @property
    def device(self) -> torch.device:
        """The device of the gradients and of their collectives (also when this rank's shard is empty)."""
        return self.master.device

    def grad_segments(self) -> list[tuple[nn.Parameter, torch.Tensor, int]]:
        """(parameter, its reduced fp32 grad elements in this rank's shard, offset of the first in
        the flattened parameter), for the global norm."""
        return [(s.param, v.grad, s.param_range[0]) for s, v in zip(self.segments, self._views)]

    def memory_bytes(self) -> dict[str, int]:
        """Optimizer state held by this rank, measured from the tensors (master incl. padding)."""
        return _state_bytes(self.optimizers, [self.master])

    def _layout(self) -> list[dict]:
        return [
            {
                "chunk": s.chunk,
                "bucket": s.bucket,
                "name": s.name,
                "shape": list(s.param.shape),
                "param_range": list(s.param_range),
                "shard_range": list(s.shard_range),
            }
            for s in self.segments
        ]

    def state_dict(self) -> dict:
        """This rank's shard: ``master``, ``exp_avg``, ``exp_avg_sq``, each a flat fp32 (shard
        numel,) tensor in one layout (bucket padding zero; ``master`` is the live tensor, as torch
        returns its state), ``step``, the hyper-parameters, and ``segments``: per (parameter, shard)
        overlap its name, shape, element range of the flattened parameter and range in the shard,
        which is what resharding to another dp size needs."""
        exp_avg, exp_avg_sq = torch.zeros_like(self.master), torch.zeros_like(self.master)
        states = {id(v): st for opt in self.optimizers for v, st in opt.state.items()}
        for s, view in zip(self.segments, self._views):
            state = states.get(id(view))
            if state:
                exp_avg[s.shard_range[0] : s.shard_range[1]] = state["exp_avg"]
                exp_avg_sq[s.shard_range[0] : s.shard_range[1]] = state["exp_avg_sq"]
        return {
            "kind": "distributed_adamw",
            "dp_rank": comm.group_rank(self.dp_group),
            "dp_size": self.ddp.dp,
            "step": self.num_steps,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizers[0].param_groups],
            "master": self.master,
            "exp_avg": exp_avg,
            "exp_avg_sq": exp_avg_sq,
            "segments": self._layout(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a shard saved with this exact layout, then refresh the model parameters from the
        loaded master weights (an all-gather: call on every dp rank)."""
        if state.get("kind") != "distributed_adamw" or state["segments"] != self._layout():
            raise ValueError(
                "optimizer shard was saved with another layout (dp size, bucket size, dtype or model): "
                "reshard it to this layout before loading"
            )
        self.master.copy_(state["master"])
        self.num_steps = state["step"]
        for opt in self.optimizers:
            for group, saved in zip(opt.param_groups, state["param_groups"]):
                # hyper-parameters only: the kernel is each bucket's own (an empty shard runs foreach)
                group.update({k: v for k, v in saved.items() if k not in KERNEL_KEYS})
            opt.state.clear()
        if self.num_steps > 0:  # torch creates the moments at the first step
            owner = {id(v): opt for opt in self.optimizers for g in opt.param_groups for v in g["params"]}
            for s, view in zip(self.segments, self._views):
                lo, hi = s.shard_range
                owner[id(view)].state[view] = {
                    # torch keeps it as an fp32 tensor: on the CPU, or with the fused kernel on the parameter's device
                    "step": torch.tensor(float(self.num_steps), device=view.device if _fused([view]) else "cpu"),
                    "exp_avg": state["exp_avg"][lo:hi].clone(),
                    "exp_avg_sq": state["exp_avg_sq"][lo:hi].clone(),
                }
        self.gather.refresh(self.master)


class ReplicatedAdamW:
    """Plain data parallelism: every rank steps all parameters on all-reduced grads (module docstring)."""

    sharded = False

    def __init__(
        self, ddp: DataParallelGrads, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
    ) -> None:
        if ddp.reduce_scatter:
            raise ValueError("ReplicatedAdamW needs all-reduced grads: DataParallelGrads(..., reduce_scatter=False)")
        self.ddp, self.dp_group = ddp, ddp.dp_group
        self.params = list(ddp.parameters())
        # fp32 master weights: the parameter itself when it is fp32, else an fp32 copy
        self.masters = [p if p.dtype == FP32 else p.detach().to(FP32) for p in self.params]
        self._copies = [(p, m) for p, m in zip(self.params, self.masters) if m is not p]  # written back each step
        self._low, self._high = [p for p, _ in self._copies], [m for _, m in self._copies]
        decay = [m for p, m in zip(self.params, self.masters) if p.ndim >= 2]
        no_decay = [m for p, m in zip(self.params, self.masters) if p.ndim < 2]
        self.optimizer = _adamw(decay, no_decay, lr, betas, eps, weight_decay)

    @property
    def param_groups(self) -> list[dict]:
        """torch's param groups (decay, no decay): set ``group["lr"]`` here each step."""
        return self.optimizer.param_groups

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the all-reduced main grads; copies fp32 masters back into low-precision params."""
        for p, m in zip(self.params, self.masters):
            m.grad = p.main_grad  # a view: no copy. Cleared after, so backward never accumulates into it
        self.optimizer.step()
        for m in self.masters:
            m.grad = None
        if self._copies:  # one multi-tensor copy (cast), not a kernel launch per parameter
            torch._foreach_copy_(self._low, self._high)

    def finish_param_sync(self) -> None:
        """Nothing is in flight: :meth:`step` updates the parameters in place (shared interface)."""

    def scale_grads(self, factor: torch.Tensor | float) -> None:
        """Multiply every main grad by ``factor`` (clip, unscale)."""
        torch._foreach_mul_([p.main_grad for p in self.params], factor)

    @property
    def device(self) -> torch.device:
        """The device of the gradients and of their collectives."""
        return self.params[0].main_grad.device

    def grad_segments(self) -> list[tuple[nn.Parameter, torch.Tensor, int]]:
        """(parameter, its full all-reduced fp32 grad, flat, 0), for the global norm."""
        return [(p, p.main_grad.view(-1), 0) for p in self.params]

    def memory_bytes(self) -> dict[str, int]:
        """Optimizer state held by this rank, from the tensors (an fp32 parameter is its own master)."""
        return _state_bytes([self.optimizer], self.masters)

    def state_dict(self) -> dict:
        """torch's AdamW state, plus the fp32 masters when the parameters are not fp32."""
        return {"kind": "replicated_adamw", "optimizer": self.optimizer.state_dict(), "masters": list(self._high)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`; low-precision parameters are refreshed from the masters."""
        if state.get("kind") != "replicated_adamw":
            raise ValueError(f"not a replicated AdamW state: kind={state.get('kind')!r}")
        self.optimizer.load_state_dict(state["optimizer"])
        for (p, m), saved in zip(self._copies, state["masters"], strict=True):
            m.copy_(saved)
            p.copy_(m)


def _state_bytes(optimizers: list[torch.optim.Optimizer], masters: list[torch.Tensor]) -> dict[str, int]:
    out = {"master": sum(m.numel() * m.element_size() for m in masters), "exp_avg": 0, "exp_avg_sq": 0}
    for state in (st for opt in optimizers for st in opt.state.values()):
        for key in ("exp_avg", "exp_avg_sq"):
            out[key] += state[key].numel() * state[key].element_size()
    return out


def build_dp_optimizer(
    ddp: DataParallelGrads,
    cfg: OptimConfig,
    *,
    overlap_param_gather: bool = True,
    on_event: EventHook | None = None,
) -> DistributedAdamW | ReplicatedAdamW:
    """The optimizer ``ddp`` was built for: :class:`DistributedAdamW` when it reduce-scatters
    (``optim.distributed``), else :class:`ReplicatedAdamW`; hyper-parameters from ``cfg``."""
    hyper = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if ddp.reduce_scatter:
        return DistributedAdamW(ddp, overlap_param_gather=overlap_param_gather, on_event=on_event, **hyper)
    return ReplicatedAdamW(ddp, **hyper)
