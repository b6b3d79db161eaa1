"""Gradient buffers, buckets and hooks, and both optimizers, in one process (dp=1, no process group).

With one rank every collective is a no-op, so these pin the pure logic: bucket layout, hook
accumulation, misuse errors, and that the sharded and replicated optimizers reproduce the
trainer's AdamW + clip_grad_norm_ (rtol 1e-6: only the norm's summation order differs).
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from megatron_lite.config import ModelConfig, OptimConfig
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel import grad_utils
from megatron_lite.parallel import optimizer as optimizer_module
from megatron_lite.parallel.data_parallel import ALIGN, DataParallelGrads, plan_buckets
from megatron_lite.parallel.grad_utils import clip_grad_norm_
from megatron_lite.parallel.optimizer import DistributedAdamW, ReplicatedAdamW, build_dp_optimizer

CFG = ModelConfig(
    arch="llama",
    layers=2,
    hidden=32,
    heads=4,
    kv_heads=2,
    ffn_hidden=64,
    vocab_size=64,
    seq_len=16,
    norm="rmsnorm",
    activation="swiglu",
    tie_embeddings=False,
    norm_eps=1e-5,
)
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95)
CLIP = 0.05


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, CFG.vocab_size, (2, CFG.seq_len + 1), generator=g) for _ in range(n)]


def test_plan_buckets_keeps_params_whole_and_pads_to_dp_shards():
    plan = plan_buckets([10, 20, 5, 40, 3], bucket_numel=25, dp=2)
    assert [members for _, _, members in plan] == [[0, 1], [2, 3], [4]]
    assert [(start, end) for start, end, _ in plan] == [(0, 32), (32, 96), (96, 128)]
    assert all(end % (2 * ALIGN) == 0 for _, end, _ in plan)
    # a tied weight (index 1) gets a bucket of its own, closing the one before it
    alone = plan_buckets([10, 20, 5, 40, 3], bucket_numel=25, dp=2, alone={1})
    assert [members for _, _, members in alone] == [[0], [1], [2, 3], [4]]
    # a bucket closes on reaching bucket_numel exactly
    assert [members for _, _, members in plan_buckets([10, 15, 5], bucket_numel=25, dp=1)] == [[0, 1], [2]]


def test_buffer_is_reverse_registration_order_with_main_grad_views():
    model = build_model(CFG, 0)
    ddp = DataParallelGrads(model, None, bucket_numel=3000)
    buffer = ddp.buffers[0]
    names = [n for n, _ in model.named_parameters()]
    assert [buffer.names[p] for p in buffer.params] == names[::-1]  # head first: its grad is ready first
    assert len(buffer.buckets) > 2
    for p in buffer.params:
        lo, hi = buffer.offsets[p]
        assert p.main_grad.shape == p.shape and p.main_grad.dtype == torch.float32
        assert p.main_grad.data_ptr() == buffer.data[lo:hi].data_ptr()
    # bucket_bytes counts the fp32 main grads: 4 bytes an element
    in_bytes = DataParallelGrads(build_model(CFG, 0), None, bucket_bytes=4 * 3000).buffers[0].buckets
    assert [(b.start, b.end) for b in in_bytes] == [(b.start, b.end) for b in buffer.buckets]


def test_hooks_accumulate_microbatches_and_free_param_grads():
    model, twin = build_model(CFG, 0), build_model(CFG, 0)
    ddp = DataParallelGrads(model, None, bucket_numel=3000)
    ddp.zero_grad()
    micro = _batches(2)
    for i, batch in enumerate(micro):
        with ddp.sync(last=i == 1):
            model(batch[:, :-1], batch[:, 1:]).backward()
        twin(batch[:, :-1], batch[:, 1:]).backward()
    ddp.finish_grad_sync()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.grad is None
        assert torch.equal(p.main_grad, q.grad)


def test_misuse_fails_loudly():
    model = build_model(CFG, 0)
    ddp = DataParallelGrads(model, None, bucket_numel=3000)
    batch = _batches(1)[0]
    model(batch[:, :-1], batch[:, 1:]).backward()  # default: "last microbatch", buckets launch
    with pytest.raises(RuntimeError, match="finish_grad_sync"):
        ddp.zero_grad()
    with pytest.raises(RuntimeError, match=r"sync\(last=False\)"):
        model(batch[:, :-1], batch[:, 1:]).backward()  # a second microbatch without sync(last=False)
    with pytest.raises(ValueError, match="not both"):
        DataParallelGrads(model, None, bucket_numel=10, bucket_bytes=40)
    with pytest.raises(ValueError, match=r"^tied: a parameter is not a trainable parameter of these chunks$"):
        DataParallelGrads(model, None, tied=[(torch.nn.Parameter(torch.zeros(2)), None)])
    with pytest.raises(ValueError, match=r"^model chunk 0 has no trainable parameters$"):
        DataParallelGrads(torch.nn.Linear(2, 2).requires_grad_(False), None)
    with pytest.raises(ValueError, match="reduce_scatter=True"):
        DistributedAdamW(ddp, lr=1.0, betas=(0.9, 0.9), eps=1e-8, weight_decay=0.0)


def _reference(steps: int) -> list[float]:
    model = build_model(CFG, 0)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": OPTIM.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=OPTIM.lr, betas=(OPTIM.beta1, OPTIM.beta2), eps=OPTIM.eps, foreach=True)
    losses = []
    for batch in _batches(steps):
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("distributed", [False, True])
def test_single_rank_optimizers_match_the_trainer(distributed):
    model = build_model(CFG, 0)
    ddp = DataParallelGrads(model, None, bucket_numel=3000, reduce_scatter=distributed)
    opt = build_dp_optimizer(ddp, OPTIM)
    assert isinstance(opt, DistributedAdamW if distributed else ReplicatedAdamW)
    losses = []
    for batch in _batches(4):
        ddp.zero_grad()
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        ddp.finish_grad_sync()
        norm, finite = clip_grad_norm_(opt, CLIP, tp_group=None, pp_group=None)
        assert finite and norm > CLIP
        opt.step()
        losses.append(loss.item())
    assert_close(torch.tensor(losses), torch.tensor(_reference(4)), rtol=1e-6, atol=0.0)


def _early_buckets_after_two_steps(resume: bool) -> list[tuple[int, int]]:
    model = build_model(CFG, 0)
    ddp = DataParallelGrads(model, None, bucket_numel=3000, reduce_scatter=True)
    opt = build_dp_optimizer(ddp, OPTIM, overlap_param_gather=True)
    if resume:  # as a checkpoint restore does, before any forward
        opt.load_state_dict(opt.state_dict())
    for batch in _batches(2):
        ddp.zero_grad()
        model(batch[:, :-1], batch[:, 1:]).backward()
        ddp.finish_grad_sync()
        opt.step()
    return sorted(opt.gather.early)


def test_a_resumed_run_waits_each_bucket_where_its_forward_needs_it():
    """Only the untied head's bucket (read outside its module's forward) is waited at the start of
    the forward; the others in their modules' pre-hooks, overlapping the forward, after a resume too."""
    fresh = _early_buckets_after_two_steps(resume=False)
    assert fresh == [(0, 0)]  # bucket 0 holds the head: registered last, first in the buffer
    assert _early_buckets_after_two_steps(resume=True) == fresh


def test_the_early_bucket_vote_is_reduced_on_the_buffers_device(monkeypatch):
    """Every collective of a step runs on the device of the buffers (NCCL refuses CPU tensors); a
    model on the meta device stands for a GPU here, and the vote's all-reduce checks the device."""
    model = build_model(CFG, 0, device="meta")
    ddp = DataParallelGrads(model, None, bucket_numel=3000, reduce_scatter=True)
    opt = build_dp_optimizer(ddp, OPTIM, overlap_param_gather=True)

    def nccl_like_all_reduce(x, group, op=None):
        if x.device != ddp.buffers[0].data.device:
            raise RuntimeError(f"No backend type associated with device type {x.device.type}")
        return torch.ones(x.shape)  # every bucket voted early by some rank

    monkeypatch.setattr(optimizer_module.comm, "all_reduce", nccl_like_all_reduce)
    order = opt.gather.launch_order()
    assert sorted(order) == list(range(len(opt.gather.shards)))
    assert opt.gather.early == {shard[:2] for shard in opt.gather.shards}


def test_a_rank_holding_no_gradient_element_reduces_its_norm_on_the_gradients_device(monkeypatch):
    """A ZeRO shard can be empty (tiny buckets, many dp ranks): that rank's zero sum of squares still
    joins the all-reduce, on the device of the gradients (NCCL refuses CPU tensors; meta stands in)."""
    for reduce_scatter in (True, False):
        model = build_model(CFG, 0, device="meta")
        ddp = DataParallelGrads(model, None, bucket_numel=3000, reduce_scatter=reduce_scatter)
        assert build_dp_optimizer(ddp, OPTIM).device == torch.device("meta")

    def nccl_like_all_reduce(x, group, op=None):
        if x.device != torch.device("meta"):
            raise RuntimeError(f"No backend type associated with device type {x.device.type}")
        return x

    monkeypatch.setattr(grad_utils.comm, "all_reduce", nccl_like_all_reduce)
    assert grad_utils.global_grad_norm([], [None], 0, torch.device("meta")).device == torch.device("meta")


def test_each_chunk_launches_after_its_own_last_backward():
    """Two chunks as on one pipeline rank: marking chunk 1 (run last, so its backward runs first) as
    on its last microbatch launches its buckets while chunk 0's backward is still to come."""
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    log = []
    ddp = DataParallelGrads([first, second], None, bucket_numel=16, on_event=lambda *e: log.append(e))
    ddp.zero_grad()
    ddp.set_last_microbatch(False)
    x = torch.randn(4, 8)
    second(first(x)).sum().backward()  # microbatch 0: nothing launches
    assert not [e for e in log if e[0] == "grad_launch"]
    ddp.buffers[1].set_last_microbatch(True)  # as the runtime does before chunk 1's last backward
    log.clear()
    second(first(x)).sum().backward()
    launched = [e for e in log if e[0] == "grad_launch"]
    assert {chunk for _, chunk, _ in launched} == {1}
    assert log.index(launched[0]) < max(i for i, e in enumerate(log) if e[:2] == ("grad_ready", 0))
    ddp.finish_grad_sync()  # chunk 0 reduces here
    with pytest.raises(ValueError, match="two model chunks"):
        DataParallelGrads([first, nn.Sequential(first)], None)


def test_a_dropped_buffer_is_freed_while_its_parameters_live_on():
    # Parameter hooks live in C++. While C++ also holds the parameter (an autograd graph, a pending
    # collective) the collector cannot see into it, so a hook bound to the buffer would make
    # parameter -> hook -> buffer -> parameter a cycle never freed, and with it the process group
    # the buffer holds, whose gloo threads can then abort the process at exit.
    model = build_model(CFG, 0)
    ddp = DataParallelGrads(model, None, bucket_numel=3000)
    buffer = weakref.ref(ddp.buffers[0])
    graph = sum(p.sum() for p in model.parameters())  # holds every parameter in C++
    del ddp
    gc.collect()
    assert buffer() is None
    graph.backward()  # the hooks of a freed buffer do nothing
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("distributed", [False, True])
def test_fused_adamw_path_matches_and_resumes_exactly(distributed, monkeypatch):
    # CUDA takes torch's fused AdamW kernel; torch has it on CPU too, so the path (kernel choice,
    # the step tensor's placement on load) is exercised here. The fused kernel computes the same
    # update in another order: 1e-5 relative over four steps (vs the foreach reference).
    monkeypatch.setattr(optimizer_module, "_fused", lambda params: bool(params))

    def run(first: int, last: int, state: dict | None = None) -> tuple[list[float], dict]:
        model = build_model(CFG, 0)
        ddp = DataParallelGrads(model, None, bucket_numel=3000, reduce_scatter=distributed)
        opt = build_dp_optimizer(ddp, OPTIM)
        assert all(o.defaults["fused"] for o in getattr(opt, "optimizers", [getattr(opt, "optimizer", None)]))
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        losses = []
        for batch in _batches(4)[first:last]:
            ddp.zero_grad()
            loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            ddp.finish_grad_sync()
            clip_grad_norm_(opt, CLIP, tp_group=None, pp_group=None)
            opt.step()
            losses.append(loss.item())
        return losses, {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}

    straight, _ = run(0, 4)
    assert_close(torch.tensor(straight), torch.tensor(_reference(4)), rtol=1e-5, atol=0.0)
    before, saved = run(0, 2)
    after, _ = run(2, 4, saved)
    assert before + after == straight  # exact: the same kernel on the same state
