"""The distributed optimizer: 1/dp of the state, sharded checkpoints (each bucket keeping its AdamW
kernel), bf16/fp16 with fp32 masters, and fp16 overflow skipped by every rank together.

The models and the step come from ``test_data_parallel`` (one trainer step, as the lead's trainer
runs it).
"""

from __future__ import annotations

import pytest
import torch
from test_data_parallel import OPTIM, build_dp, mesh, micro_batches, model_config, train_step
from torch import nn

from megatron_lite.models.transformer import build_model
from megatron_lite.parallel import optimizer as optimizer_module
from megatron_lite.parallel.data_parallel import DataParallelGrads
from megatron_lite.parallel.grad_utils import clip_grad_norm_
from megatron_lite.parallel.optimizer import DistributedAdamW, build_dp_optimizer
from megatron_lite.parallel.precision import Precision

PADDING_TOLERANCE = 0.01  # bucket padding: < dp * 16 elements per bucket, < 0.1% of a shard here


def _state_bytes_from_tensors(opt) -> int:
    """master + exp_avg + exp_avg_sq, summed over the actual tensors (independent of memory_bytes())."""
    masters = [opt.master] if isinstance(opt, DistributedAdamW) else opt.masters
    optimizers = opt.optimizers if isinstance(opt, DistributedAdamW) else [opt.optimizer]
    moments = [t for o in optimizers for s in o.state.values() for t in (s["exp_avg"], s["exp_avg_sq"])]
    return sum(t.numel() * t.element_size() for t in masters + moments)


def _memory(rank: int, world: int) -> dict:
    # ~0.42M parameters in 4 buckets; the odd widths (biases of 132, 396) make buckets need padding
    cfg = model_config("gpt2", hidden=132, ffn=396, vocab=509)
    out = {}
    for distributed in (False, True):
        model, ddp, opt = build_dp(world, cfg, distributed=distributed, overlap=True, bucket_numel=100_000)
        train_step(model, ddp, opt, micro_batches(0, world, rank), step=0)
        opt.finish_param_sync()
        assert sum(opt.memory_bytes().values()) == _state_bytes_from_tensors(opt)
        out[distributed] = _state_bytes_from_tensors(opt)
        out["numel"] = sum(p.numel() for p in model.parameters())
    return out


@pytest.mark.parametrize("dp", [2, 4])
def test_state_is_one_dp_th(request, dp):
    results = request.getfixturevalue(f"world{dp}").run(_memory)
    for got in results:
        assert got[False] == 3 * 4 * got["numel"]  # unsharded: fp32 master (the param), exp_avg, exp_avg_sq
        assert abs(got[True] - got[False] / dp) <= PADDING_TOLERANCE * got[False] / dp
    assert sum(got[True] for got in results) >= results[0][False]  # shards cover everything


def _resume(rank: int, world: int) -> dict:
    """Train 4 steps straight, or 2 steps + state_dict + a fresh model/optimizer + load + 2 steps."""
    cfg = model_config("gpt2")

    def run(model, ddp, opt, steps):
        return [train_step(model, ddp, opt, micro_batches(s, world, rank), step=s)[0] for s in steps]

    model, ddp, opt = build_dp(world, cfg, distributed=True, overlap=True)
    straight = run(model, ddp, opt, range(4))
    model, ddp, opt = build_dp(world, cfg, distributed=True, overlap=True)
    run(model, ddp, opt, range(2))
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state_dict().items()}
    model, ddp, opt = build_dp(world, cfg, distributed=True, overlap=True)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # so the resumed losses prove the weights came back from the master shards
    opt.load_state_dict(saved)
    resumed = run(model, ddp, opt, range(2, 4))
    _, _, other = build_dp(world, cfg, distributed=True, overlap=True, bucket_numel=1000)
    with pytest.raises(ValueError, match="another layout"):
        other.load_state_dict(saved)
    return {
        "straight": straight[2:],
        "resumed": resumed,
        "segments": saved["segments"],
        "numel": saved["master"].numel(),
    }


def test_sharded_state_dict_resumes_bitwise(world2):
    results = world2.run(_resume)
    for got in results:
        assert got["resumed"] == got["straight"]
    # the two shards' segments tile every parameter exactly once
    covered: dict[str, int] = {}
    for got in results:
        for seg in got["segments"]:
            lo, hi = seg["param_range"]
            covered[seg["name"]] = covered.get(seg["name"], 0) + hi - lo
    numels = {name: p.numel() for name, p in build_model(model_config("gpt2"), 0).named_parameters()}
    assert covered == numels


def _resume_with_an_empty_first_shard(rank: int, world: int) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """ZeRO-1 on the fused AdamW path (CUDA's; torch has it on CPU too) where dp rank 1 holds no
    element of bucket 0: ``nn.Linear(512, 3)``'s bias (registered last, so first in the buffer) is a
    bucket of its own, 3 elements padded to 2 x 16, so rank 1's shard of it is all padding and that
    bucket's optimizer (foreach: no parameter to fuse) is the only one not fused. 4 steps straight,
    or 2 + state_dict + a fresh model/optimizer + load + 2: the final weights, and whether every
    bucket optimizer kept its kernel through the load."""
    saved_fused = optimizer_module._fused
    optimizer_module._fused = lambda params: bool(params)  # in this rank's process only; restored below
    try:

        def build() -> tuple[nn.Linear, DataParallelGrads, DistributedAdamW]:
            model = nn.Linear(512, 3)
            with torch.no_grad():
                model.weight.copy_(torch.randn(3, 512, generator=torch.Generator().manual_seed(0)))
                model.bias.zero_()
            ddp = DataParallelGrads(model, mesh(world).dp_group, bucket_numel=1, reduce_scatter=True)
            return model, ddp, build_dp_optimizer(ddp, OPTIM)

        def run(model: nn.Linear, ddp: DataParallelGrads, opt: DistributedAdamW, steps: range) -> None:
            for step in steps:
                x = torch.randn(4, 512, generator=torch.Generator().manual_seed(10 * step + rank))
                ddp.zero_grad()
                model(x).square().mean().backward()
                ddp.finish_grad_sync()
                clip_grad_norm_(opt, 1.0, tp_group=mesh(world).tp_group, pp_group=mesh(world).pp_group)
                opt.step()
            opt.finish_param_sync()

        model, ddp, opt = build()
        run(model, ddp, opt, range(4))
        straight = [p.detach().clone() for p in model.parameters()]
        model, ddp, opt = build()
        run(model, ddp, opt, range(2))
        saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state_dict().items()}
        model, ddp, opt = build()
        kernels = [(g["fused"], g["foreach"]) for o in opt.optimizers for g in o.param_groups]
        opt.load_state_dict(saved)
        kept = kernels == [(g["fused"], g["foreach"]) for o in opt.optimizers for g in o.param_groups]
        run(model, ddp, opt, range(2, 4))
        return straight, [p.detach().clone() for p in model.parameters()], kept
    finally:
        optimizer_module._fused = saved_fused


def test_a_resume_keeps_each_bucket_optimizers_kernel(world2):
    """A resume in the saving layout is bitwise the straight run, also on a rank where one bucket's
    optimizer runs another kernel than the others (the loaded hyper-parameters carry no kernel)."""
    for rank, (straight, resumed, kept) in enumerate(world2.run(_resume_with_an_empty_first_shard)):
        assert kept, f"rank {rank}: loading the state changed a bucket optimizer's kernel"
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed)), f"rank {rank}: the resume differs"


def _mixed_precision(rank: int, world: int, dtype: str, distributed: bool) -> dict:
    precision = Precision.from_name(dtype)
    model = precision.cast_model(build_model(model_config("llama"), 3))
    ddp = DataParallelGrads(model, mesh(world).dp_group, bucket_numel=3000, reduce_scatter=distributed)
    opt = build_dp_optimizer(ddp, OPTIM)
    scaler = precision.make_scaler()
    masters = [opt.master] if distributed else opt.masters
    assert all(m.dtype == torch.float32 for m in masters) and all(
        p.dtype == precision.param_dtype for p in model.parameters()
    )
    assert all(p.main_grad.dtype == torch.float32 for p in model.parameters())
    micro = micro_batches(0, world, rank)  # the same batch every step: the loss must fall
    losses = [train_step(model, ddp, opt, micro, step=3, clip=1.0, scaler=scaler)[0] for _ in range(6)]
    return {"losses": losses, "scale": scaler.scale if scaler else None}


@pytest.mark.parametrize("distributed", [False, True])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_trains(world2, dtype, distributed):
    for got in world2.run(_mixed_precision, dtype, distributed):
        losses = torch.tensor(got["losses"])
        assert torch.isfinite(losses).all()
        assert losses[-1] < losses[0] - 0.5  # ~4.2 -> ~2.6 at lr 1e-2
        assert (got["scale"] is not None) == (dtype == "fp16")


def _fp16_overflow(rank: int, world: int, distributed: bool) -> dict:
    precision = Precision.from_name("fp16")
    model = precision.cast_model(build_model(model_config("llama"), 3))
    ddp = DataParallelGrads(model, mesh(world).dp_group, bucket_numel=3000, reduce_scatter=distributed)
    opt = build_dp_optimizer(ddp, OPTIM)
    scaler = precision.make_scaler()
    finite, scales, unchanged = [], [], []
    for step in range(4):
        before = [p.detach().clone() for p in model.parameters()]
        loss_factor = float("inf") if step == 1 and rank == 1 else 1.0  # an overflow on ONE rank only
        micro = micro_batches(step, world, rank)
        finite.append(train_step(model, ddp, opt, micro, step=step, scaler=scaler, loss_factor=loss_factor)[2])
        opt.finish_param_sync()
        scales.append(scaler.scale)
        unchanged.append(all(torch.equal(b, p) for b, p in zip(before, model.parameters())))
    return {"finite": finite, "scales": scales, "unchanged": unchanged}


@pytest.mark.parametrize("distributed", [False, True])
def test_fp16_overflow_on_one_rank_skips_everywhere(world2, distributed):
    results = world2.run(_fp16_overflow, distributed)
    for got in results:
        assert got["finite"] == [True, False, True, True]
        assert got["unchanged"] == [False, True, False, False]
        assert got["scales"] == [2.0**16, 2.0**15, 2.0**15, 2.0**15]
    assert results[0] == results[1]
