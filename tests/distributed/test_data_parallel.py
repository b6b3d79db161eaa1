"""Data parallelism trains to the one-process losses, and its communication really overlaps.

Parity: dp in {2, 4} x {all-reduce + ReplicatedAdamW, reduce-scatter + DistributedAdamW} x {no
overlap, both overlaps}, for a llama (untied head) and a gpt2 (tied head, biases) model. Each rank
runs MICRO microbatches of its part of the global batch per step. The reference is what the
one-process trainer does (``training/build.py``'s AdamW, ``loss / n_micro`` accumulation over
the same microbatches, ``clip_grad_norm_``), computed in the pytest process. One more case shards
the optimizer over dp=2 across tp=2 ranks whose KV rows are replicated (:func:`_train_tp2`). The clip value is
far below the norms (asserted), so every step clips and the global norm decides the update.

Tolerance: LOSS_RTOL 1e-5 on losses and norms (fp32): dp only reassociates sums (the mean over
ranks, the norm over shards), ~1e-7 relative per op, and a few AdamW steps keep that below 1e-5.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from megatron_lite.config import ModelConfig, OptimConfig
from megatron_lite.models.parallelize import apply_tp
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel import comm
from megatron_lite.parallel.data_parallel import DataParallelGrads
from megatron_lite.parallel.grad_utils import TP_UNIQUE_ROWS_ATTR, clip_grad_norm_
from megatron_lite.parallel.mesh import ParallelDims, ParallelMesh
from megatron_lite.parallel.optimizer import build_dp_optimizer

SEED, STEPS, MICRO, GLOBAL_BATCH, SEQ, VOCAB = 7, 4, 2, 8, 16, 61  # VOCAB 61: buckets need padding
BUCKET_NUMEL = 3000  # ~7 buckets for these models: several launch during backward
CLIP = 0.05  # the norms here are ~1: every step clips
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
LOSS_RTOL = 1e-5  # see the module docstring


def model_config(arch: str, hidden: int = 32, ffn: int = 64, vocab: int = VOCAB) -> ModelConfig:
    llama = arch == "llama"
    return ModelConfig(
        arch=arch,
        layers=2,
        hidden=hidden,
        heads=4,
        kv_heads=2 if llama else 4,
        ffn_hidden=ffn,
        vocab_size=vocab,
        seq_len=SEQ,
        norm="rmsnorm" if llama else "layernorm",
        activation="swiglu" if llama else "gelu",
        tie_embeddings=not llama,
        norm_eps=1e-5,
    )


def batches(step: int) -> torch.Tensor:
    """The global batch of ``step``: (GLOBAL_BATCH, SEQ + 1) token ids, the same on every rank."""
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))


def micro_batches(step: int, dp: int, dp_rank: int) -> list[torch.Tensor]:
    """Rank ``dp_rank``'s MICRO microbatches: microbatches dp_rank*MICRO ... of the global batch."""
    return list(batches(step).chunk(dp * MICRO))[dp_rank * MICRO : (dp_rank + 1) * MICRO]


def lr_at(step: int) -> float:
    return OPTIM.lr * (step + 1) / STEPS  # changes every step: the trainer sets it through param_groups


@functools.cache
def mesh(world: int) -> ParallelMesh:
    """This rank's (pp=1, dp=world, tp=1) mesh, built once per spawned process."""
    return ParallelMesh.build(ParallelDims(dp=world))


def train_step(
    model, ddp, opt, micro, *, step: int, clip: float = CLIP, scaler=None, loss_factor: float = 1.0, on=None
):
    """One trainer step on DP: returns (dp-mean loss, global norm, finite). ``loss_factor`` lets a
    test inject an inf on one rank; ``on``: the mesh (default: dp only, :func:`mesh`)."""
    on = on or mesh(ddp.dp)
    for group in opt.param_groups:
        group["lr"] = lr_at(step)
    ddp.zero_grad()
    total = torch.zeros(())
    for i, batch in enumerate(micro):
        with ddp.sync(last=i == len(micro) - 1):
            loss = model(batch[:, :-1], batch[:, 1:]) / len(micro) * loss_factor
            (loss if scaler is None else scaler.scale_loss(loss)).backward()
        total += loss.detach().float()
    ddp.finish_grad_sync()
    if scaler is not None:
        scaler.unscale_(opt)
    norm, finite = clip_grad_norm_(opt, clip, tp_group=on.tp_group, pp_group=on.pp_group)
    if scaler is not None:
        scaler.update(found_inf=not finite)
    if finite:
        opt.step()
    return comm.all_reduce(total, ddp.dp_group).item() / ddp.dp, norm.item(), finite


def build_dp(world: int, cfg: ModelConfig, *, distributed: bool, overlap: bool, bucket_numel=BUCKET_NUMEL, **kw):
    """(model, ddp, optimizer) as the trainer will build them."""
    model = build_model(cfg, SEED)
    ddp = DataParallelGrads(
        model, mesh(world).dp_group, bucket_numel=bucket_numel, overlap=overlap, reduce_scatter=distributed, **kw
    )
    return model, ddp, build_dp_optimizer(ddp, OPTIM, overlap_param_gather=overlap, **kw)


def _train(rank: int, world: int, arch: str, distributed: bool, overlap: bool) -> list[tuple[float, float]]:
    model, ddp, opt = build_dp(world, model_config(arch), distributed=distributed, overlap=overlap)
    out = []
    for step in range(STEPS):
        loss, norm, finite = train_step(model, ddp, opt, micro_batches(step, world, rank), step=step)
        assert finite
        out.append((loss, norm))
    opt.finish_param_sync()
    return out


@functools.cache
def reference(arch: str, dp: int, kv_heads: int | None = None) -> list[tuple[float, float]]:
    """One process, the trainer's way: (loss, pre-clip norm) per step over all dp*MICRO microbatches."""
    cfg = model_config(arch)
    model = build_model(cfg if kv_heads is None else dataclasses.replace(cfg, kv_heads=kv_heads), SEED)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": OPTIM.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, betas=(OPTIM.beta1, OPTIM.beta2), eps=OPTIM.eps, foreach=True)
    out = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        micro, total = list(batches(step).chunk(dp * MICRO)), 0.0
        for batch in micro:
            loss = model(batch[:, :-1], batch[:, 1:]) / len(micro)
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((total, norm.item()))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("distributed", "overlap"), [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("dp", [2, 4])
def test_losses_match_one_process(request, dp, distributed, overlap, arch):
    world = request.getfixturevalue(f"world{dp}")
    ref = reference(arch, dp)
    assert all(norm > 5 * CLIP for _, norm in ref)  # clipping is active
    for got in world.run(_train, arch, distributed, overlap):
        assert_close(torch.tensor(got), torch.tensor(ref), rtol=LOSS_RTOL, atol=0.0)


def _train_tp2(rank: int, world: int) -> tuple[list[tuple[float, float]], bool]:
    """tp=2 x dp=2, ZeRO-1, both overlaps, one KV head (replicated on both tp ranks, so the norm
    counts its rows on tp rank 0 only: ``tp_unique_rows``). With buckets of >= 2000 elements (5 a
    rank) the dp shard boundary of layers.1's bucket falls in its (32, 32) local qkv weight, between
    the K rows (16-23) and the V rows (24-31): each rank's segment of that weight needs the row
    mask cut at the segment's offset (``grad_utils.counted_runs``). Returns the per-step
    (loss, norm) and whether a shard boundary cut a row-masked weight."""
    on = ParallelMesh.build(ParallelDims(tp=2, dp=world // 2))
    model = apply_tp(build_model(dataclasses.replace(model_config("llama"), kv_heads=1), SEED), on)
    ddp = DataParallelGrads(model, on.dp_group, bucket_numel=2000, reduce_scatter=True)
    opt = build_dp_optimizer(ddp, OPTIM)
    out = []
    for step in range(STEPS):
        loss, norm, finite = train_step(model, ddp, opt, micro_batches(step, on.dp_size, on.dp_rank), step=step, on=on)
        assert finite
        out.append((loss, norm))
    opt.finish_param_sync()
    masked = [s for s in opt.segments if getattr(s.param, TP_UNIQUE_ROWS_ATTR, None) is not None]
    return out, any(s.param_range != (0, s.param.numel()) for s in masked)


def test_tp2_dp2_sharded_optimizer_with_replicated_kv_rows_matches_one_process(world4):
    """Tolerance: LOSS_RTOL, as above (TP adds its reassociated partial sums, ~1e-7 relative)."""
    ref = reference("llama", 2, kv_heads=1)
    results = world4.run(_train_tp2)
    assert any(cut for _, cut in results), "no shard boundary cuts a row-masked parameter: the case is not exercised"
    for got, _ in results:
        assert_close(torch.tensor(got), torch.tensor(ref), rtol=LOSS_RTOL, atol=0.0)


def _event_log(rank: int, world: int, overlap: bool) -> list[tuple]:
    """Two steps of the distributed optimizer with everything logged in one ordered list."""
    log: list[tuple] = []
    model, ddp, opt = build_dp(
        world,
        model_config("llama"),
        distributed=True,
        overlap=overlap,
        on_event=lambda name, chunk, bucket: log.append((name, bucket)),
    )
    for i, block in enumerate(model.layers):
        block.register_forward_hook(lambda *_, i=i: log.append(("block_forward_done", i)))
    for step in range(2):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ddp.zero_grad()
        micro = micro_batches(step, world, rank)
        for i, batch in enumerate(micro):
            with ddp.sync(last=i == len(micro) - 1):
                log.append(("forward_begin", step, i))
                loss = model(batch[:, :-1], batch[:, 1:]) / len(micro)
                log.append(("forward_end", step, i))
                loss.backward()
                log.append(("backward_end", step, i))
        ddp.finish_grad_sync()
        log.append(("grad_sync_done", step))
        clip_grad_norm_(opt, CLIP, tp_group=mesh(world).tp_group, pp_group=mesh(world).pp_group)
        opt.step()
        log.append(("step_done", step))
    return log


def _first(log: list[tuple], event: tuple | str, start: int = 0) -> int:
    return next(i for i in range(start, len(log)) if log[i] == event or log[i][0] == event)


def test_overlap_is_real(world2):
    for log in world2.run(_event_log, True):
        last_bw_end = log.index(("backward_end", 0, MICRO - 1))
        last_fw_end = log.index(("forward_end", 0, MICRO - 1))
        # No reduction during the first microbatch; the first launch comes during the last backward,
        # with gradients of later buckets still arriving after it.
        first_launch = _first(log, "grad_launch")
        assert last_fw_end < first_launch < last_bw_end
        assert _first(log, "grad_ready", first_launch) < last_bw_end
        sync_done = log.index(("grad_sync_done", 0))
        assert all(i < last_bw_end for i, e in enumerate(log[:sync_done]) if e[0] == "grad_launch")
        # Step 0's all-gathers are launched by step(), and waited in module pre-hooks during step 1's
        # first forward, interleaved with it: a block finishes its forward between two waits.
        fw_begin, fw_end = log.index(("forward_begin", 1, 0)), log.index(("forward_end", 1, 0))
        waits = [i for i, e in enumerate(log[: fw_end + 1]) if e[0] == "param_wait_begin"]
        assert waits and fw_begin < waits[0] and waits[-1] < fw_end
        assert any(log[i][0] == "block_forward_done" for i in range(waits[0], waits[-1]))
        # The untied head is used as F.linear(h, self.head.weight), outside its module's forward: its
        # bucket (bucket 0: the head is registered last) is waited when the forward starts.
        assert log[waits[0]] == ("param_wait_begin", 0)
        assert _first(log, "param_launch") < log.index(("step_done", 0))


def test_without_overlap_everything_waits_outside_compute(world2):
    for log in world2.run(_event_log, False):
        last_bw_end = log.index(("backward_end", 0, MICRO - 1))
        assert _first(log, "grad_launch") > last_bw_end  # all reduced in finish_grad_sync()
        step_done = log.index(("step_done", 0))
        waits = [i for i, e in enumerate(log) if e[0] == "param_wait_end" and i < log.index(("forward_begin", 1, 0))]
        assert len(waits) == len([e for e in log[:step_done] if e[0] == "param_launch"])  # all inside step()


class _TiedStage(nn.Module):
    """A pipeline stage holding a tied weight; stage 1 also holds ``extra``, registered after it, so
    the two stages' buffers place ``tied`` at different offsets (as the real first and last stage)."""

    def __init__(self, stage: int) -> None:
        super().__init__()
        self.tied = nn.Parameter(torch.zeros(64))
        self.extra = nn.Parameter(torch.zeros(32)) if stage else None


def _tied_sum(rank: int, world: int) -> bool:
    m = ParallelMesh.build(ParallelDims(pp=2, dp=2))
    stage = _TiedStage(m.pp_rank)
    log = []
    ddp = DataParallelGrads(
        stage,
        m.dp_group,
        overlap=True,
        reduce_scatter=True,
        on_event=lambda *e: log.append(e),
        tied=[(stage.tied, m.pp_group)],
    )  # the pp group pairs the two copies here
    buffer = ddp.buffers[0]
    bucket = buffer.bucket_of[stage.tied]
    assert bucket.params == [stage.tied]  # a bucket of its own: the same shards on both stages
    weights = [torch.arange(64.0) * (r + 1) for r in range(world)]  # rank r's local grad of tied
    loss = (stage.tied * weights[rank]).sum() + (stage.extra.sum() if stage.extra is not None else 0)
    loss.backward()
    assert ("grad_launch", 0, bucket.index) in log  # reduced over dp during backward, like any bucket
    ddp.finish_grad_sync()
    ddp.finish_grad_sync()  # harmless: the sum over the stages runs once
    lo, hi = bucket.shard_range(buffer.dp_rank, buffer.dp)
    t_lo = buffer.offsets[stage.tied][0]
    expected = torch.stack(weights).sum(0) / 2  # summed over the two stages, averaged over dp
    return torch.equal(buffer.data[lo:hi], expected[lo - t_lo : hi - t_lo])


def test_tied_copies_with_different_layouts_sum_their_reduced_grads(world4):
    assert world4.run(_tied_sum) == [True] * 4
