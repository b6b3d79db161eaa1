"""``train.dtype=fp8``: the checks that refuse it (each with the fix), and the wiring that turns the
block projections into Transformer Engine layers run under ``fp8_autocast``.

Transformer Engine does not build on CPU machines, so the wiring tests stand a recording stand-in
in for its two entry points (``te.Linear``: an ``nn.Linear`` that also records whether it ran
inside ``te.fp8_autocast``). They prove what megatron-lite does around TE: which layers are
swapped, that names, weights and the loss are unchanged (the stand-in computes in full precision,
so equality is exact), that every block runs inside the autocast, and that main grads, optimizer
and checkpoints see the swapped parameters. FP8 numerics themselves need a GPU with TE.
"""

import contextlib
import sys
import types

import pytest
import torch
from tiny_config import tiny_cfg
from torch import nn

from megatron_lite import plan
from megatron_lite.config import load_config
from megatron_lite.errors import UserError
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel.mesh import ParallelDims, ParallelMesh
from megatron_lite.parallel.pipeline import build_stage_chunks
from megatron_lite.parallel.pipeline.partition import plan_for_model
from megatron_lite.training import fp8
from megatron_lite.training.engine import Engine


class FakeTE:
    """Stand-in for ``transformer_engine.pytorch`` and its recipe module; counts autocast entries."""

    def __init__(self) -> None:
        self.entered, self.active, self.calls_outside = 0, False, 0
        fake = self

        class Linear(nn.Linear):
            def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
                super().__init__(in_features, out_features, bias=bias, device=device, dtype=params_dtype)

            def forward(self, x):
                fake.calls_outside += not fake.active
                return super().forward(x)

        @contextlib.contextmanager
        def fp8_autocast(enabled, fp8_recipe, fp8_group):
            assert enabled and fp8_recipe.fp8_format == "HYBRID"
            fake.entered, fake.active = fake.entered + 1, True
            try:
                yield
            finally:
                fake.active = False

        self.Linear = Linear
        self.pytorch = types.SimpleNamespace(Linear=Linear, fp8_autocast=fp8_autocast)
        self.recipe = types.SimpleNamespace(
            DelayedScaling=lambda **kw: types.SimpleNamespace(**kw), Format=types.SimpleNamespace(HYBRID="HYBRID")
        )

    def install(self, monkeypatch) -> None:
        for name, module in {
            "transformer_engine": types.ModuleType("transformer_engine"),
            "transformer_engine.pytorch": self.pytorch,
            "transformer_engine.common": types.ModuleType("transformer_engine.common"),
            "transformer_engine.common.recipe": self.recipe,
        }.items():
            monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def te(monkeypatch) -> FakeTE:
    fake = FakeTE()
    fake.install(monkeypatch)
    return fake


def test_fp8_on_cpu_fails_before_anything_runs(tmp_path):
    cfg = load_config(None, ["train.dtype=fp8", "train.device=cpu", f"log.dir={tmp_path}"])
    from megatron_lite.training.trainer import Trainer

    with pytest.raises(UserError, match=r"train.dtype=fp8: it needs a CUDA GPU .* this run is on cpu; use bf16"):
        Trainer(cfg)
    assert not any(tmp_path.iterdir())  # nothing written


def test_fp8_checks_name_the_device_library_and_shape_problems(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert "compute capability 8.0; FP8 GEMMs need 8.9+" in fp8.device_problem(cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(fp8, "transformer_engine_problem", lambda: "not installed")
    assert fp8.device_problem(cuda).startswith("Transformer Engine is not installed: pip install")
    monkeypatch.setattr(fp8, "transformer_engine_problem", lambda: None)
    assert fp8.device_problem(cuda) is None
    cfg = tiny_cfg("train")
    cfg.parallel.tp = 2
    assert "parallel.tp=2" in fp8.config_problem(cfg)
    assert "train.recompute=full" in fp8.config_problem(tiny_cfg("train", recompute="full"))
    assert "train.compile=true" in fp8.config_problem(tiny_cfg("train", compile=True))
    cfg = tiny_cfg("train")
    cfg.model.ffn_hidden, cfg.model.seq_len = 100, 12
    why = fp8.config_problem(cfg)
    assert "model.ffn_hidden = 100" in why and "(micro_batch_size x seq_len) = 24" in why
    assert "model.hidden" not in why


def test_block_projections_become_te_layers_with_the_same_names_and_outputs(te):
    cfg = tiny_cfg("train")
    model = build_model(cfg.model, seed=3, device="cpu")
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    before = dict(model.named_parameters())
    ref = model(ids)
    fp8.enable([model], torch.float32, None)
    swapped = {n for n, m in model.named_modules() if isinstance(m, te.Linear)}
    projections = ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down")
    assert swapped == {f"layers.{i}.{p}" for i in range(2) for p in projections}
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model(ids), ref)
    assert te.entered == 1 and te.calls_outside == 0  # one autocast per forward, every block inside it


def test_pipeline_chunks_run_their_blocks_under_the_autocast(te):
    cfg = tiny_cfg("train")
    chunks = build_stage_chunks(cfg.model, plan_for_model(cfg.model, 2, 1), 0, seed=3)
    fp8.enable(chunks, torch.float32, None)
    chunks[0](torch.randint(0, 96, (2, 16)))
    assert te.entered == 1 and te.calls_outside == 0


def test_engine_trains_swapped_layers_like_the_plain_model(te):
    batches = [torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(s)) for s in range(3)]

    def run(dtype_key: str) -> tuple[list[float], set[str]]:
        cfg = tiny_cfg("train", dtype=dtype_key)
        mesh, layout = ParallelMesh.build(ParallelDims()), plan.check_layout(cfg, 1)
        engine = Engine(cfg, mesh, layout, torch.device("cpu"), torch.float32)
        losses = [engine.step([b], lr=1e-3)["loss"] for b in batches]
        pieces, _ = engine.sharded_state()
        return losses, {p.name for p in pieces}

    plain_losses, plain_names = run("fp32")
    fp8_losses, fp8_names = run("fp8")
    assert te.entered == 3 and te.calls_outside == 0
    assert fp8_losses == plain_losses  # the stand-in is exact: main grads and AdamW saw every swapped weight
    assert fp8_names == plain_names  # checkpoints hold the same tensors under the same names


def test_plan_refuses_what_fp8_training_would_refuse():
    cfg = tiny_cfg("train", dtype="fp8", recompute="full")
    with pytest.raises(UserError, match=r"train.dtype=fp8: train.recompute=full: FP8 recompute is not supported"):
        plan.check_layout(cfg, 1)
    plan.check_layout(tiny_cfg("train", dtype="fp8"), 1)  # the device is checked when training starts
