"""The host side of one optimizer step (``Engine.step``). On a GPU a read back (``.item()``,
``.tolist()``, ``bool(t)``) waits for every kernel queued before it, and a small step is
launch-bound, so it pays per kernel launch and per Python walk. The step reads the device once, the
norm and the loss together (Megatron's one found-inf/grad-norm read); the grad norm takes a few ops
per bucket, low-precision parameters get their masters in one multi-tensor copy, and without tensor
parallelism nothing walks the module tree. The loss and norm stay torch's, and a step whose
gradient is not finite is still skipped."""

import contextlib
import math
import sys

import pytest
import torch
from dispatch_count import CountOps
from tiny_config import tiny_cfg

from megatron_lite import plan
from megatron_lite.config import Config
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel.data_parallel import DataParallelGrads
from megatron_lite.parallel.grad_utils import optimizer_grad_norm
from megatron_lite.parallel.mesh import ParallelDims, ParallelMesh
from megatron_lite.parallel.optimizer import build_dp_optimizer
from megatron_lite.parallel.precision import Precision
from megatron_lite.training.engine import Engine

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def engine_of(cfg: Config) -> Engine:
    mesh, layout = ParallelMesh.build(ParallelDims()), plan.check_layout(cfg, 1)
    return Engine(cfg, mesh, layout, torch.device("cpu"), torch.float32)


@contextlib.contextmanager
def count_reads(monkeypatch):
    """Counts the tensor-to-host reads made by code outside torch (torch's CPU AdamW reads its own
    step counters with ``.item()``; its fused CUDA kernel, the one used on GPUs, does not)."""
    calls: list[str] = []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def read(self, *args, _real=real, _name=name, **kwargs):
            if not sys._getframe(1).f_globals.get("__name__", "").startswith("torch"):
                calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    yield calls
    monkeypatch.undo()


def batches(n: int) -> list[torch.Tensor]:
    return [torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(s)) for s in range(n)]


@pytest.mark.parametrize("distributed", [False, True])
def test_a_step_reads_the_device_once(monkeypatch, distributed):
    engine = engine_of(tiny_cfg("optim", distributed=distributed))
    first, second = batches(2)
    engine.step([first], lr=1e-3)  # the first step plans the parameter gathers (once per run)
    with count_reads(monkeypatch) as reads:
        engine.step([second], lr=1e-3)
    assert reads == ["tolist"]


def test_a_step_returns_torchs_loss_and_norm_and_skips_a_non_finite_one(monkeypatch):
    cfg = tiny_cfg("optim", clip_grad=0.5)
    engine, ref = engine_of(cfg), build_model(cfg.model, cfg.train.seed, "cpu")
    (batch,) = batches(1)
    loss = ref(batch[:, :-1], batch[:, 1:])
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    out = engine.step([batch], lr=1e-3)
    assert out["loss"] == loss.item() and not out["skipped"]
    assert out["grad_norm"] == pytest.approx(norm.item(), rel=1e-6)  # the norm sums in another order
    assert out["grad_norm"] > 0.5  # clipped: the norm returned is the one before clipping
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    with torch.no_grad():
        engine.model.final_norm.weight[0] = math.nan  # every gradient NaN from here
    with count_reads(monkeypatch) as reads:
        out = engine.step([batch], lr=1e-3)
    assert out["skipped"] and math.isnan(out["grad_norm"]) and math.isnan(out["loss"])
    assert reads == ["tolist"]
    after = engine.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != "final_norm.weight")


def test_low_precision_parameters_get_their_masters_in_one_multi_tensor_copy():
    cfg = tiny_cfg("optim")
    model = Precision.from_name("bf16").cast_model(build_model(cfg.model, cfg.train.seed, "cpu"))
    opt = build_dp_optimizer(DataParallelGrads(model, None), cfg.optim)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.main_grad.copy_(torch.randn(p.shape, generator=gen))
    with CountOps() as counted:
        opt.step()
    # one launch for every parameter, not one per parameter (a launch-bound GPU step pays per launch)
    assert counted.ops["aten._foreach_copy_.default"] == 1 and counted.ops["aten.copy_.default"] == 0
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(opt.params, opt.masters, strict=True))
    assert not any(torch.equal(p.float(), m) for p, m in zip(opt.params, opt.masters))  # the masters keep fp32 bits


def test_a_step_without_tensor_parallelism_walks_no_module_tree(monkeypatch):
    engine = engine_of(tiny_cfg("optim"))
    first, second = batches(2)
    engine.step([first], lr=1e-3)
    walks = []
    real = torch.nn.Module.named_modules

    def named_modules(self, *args, **kwargs):
        walks.append(type(self).__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", named_modules)
    engine.step([second], lr=1e-3)
    assert walks == []  # the sequence-parallel grad sum has nothing to do at tp=1


def test_the_grad_norm_takes_a_few_ops_per_bucket_not_per_parameter():
    cfg = tiny_cfg("optim")
    model = build_model(cfg.model, cfg.train.seed, "cpu")
    ddp = DataParallelGrads(model, None, bucket_numel=20_000)
    opt = build_dp_optimizer(ddp, cfg.optim)
    gen = torch.Generator().manual_seed(0)
    for p in opt.params:
        p.main_grad.copy_(torch.randn(p.shape, generator=gen))
    with CountOps() as counted:
        norm = optimizer_grad_norm(opt, tp_group=None, pp_group=None)
    buckets = len(ddp.buffers[0].buckets)
    assert 1 < buckets < len(opt.params) / 2
    assert counted.ops["aten.linalg_vector_norm.default"] <= 2 * buckets  # a bucket's rows, and its tail
    want = torch.cat([p.main_grad.double().flatten() for p in opt.params]).norm().item()
    assert norm.item() == pytest.approx(want, rel=1e-6)
