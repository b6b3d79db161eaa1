"""`megatron-lite plan`: layouts checked without launching, parameters counted without building,
memory and bubble against their formulas."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tiny_config import tiny

from megatron_lite.cli import main
from megatron_lite.config import ModelConfig, fill_defaults, load_config
from megatron_lite.errors import UserError
from megatron_lite.models.transformer import build_model, count_parameters
from megatron_lite.parallel.pipeline.schedules import build_schedule
from megatron_lite.parallel.pipeline.simulate import simulate
from megatron_lite.plan import layer_activation_elements, make_plan

CONFIG_70B = str(Path(__file__).resolve().parents[2] / "configs" / "llama70b_512gpu.yaml")
TINY = tiny(4)


def _plan(overrides: list[str], world_size: int, config: str | None = None):
    return make_plan(load_config(config, overrides), world_size)


def test_70b_on_512_gpus_without_building_the_model(capsys, monkeypatch):
    def no_modules(self, *args, **kwargs):
        raise AssertionError("plan built a torch module: parameters must be counted from the layout")

    monkeypatch.setattr(torch.nn.Module, "__init__", no_modules)  # not even on the meta device
    assert main(["plan", "--config", CONFIG_70B, "--world-size", "512", "--json"]) == 0
    monkeypatch.undo()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    layout = {k: got[k] for k in ("tp", "pp", "vp", "dp", "microbatches")}
    assert layout == {"tp": 8, "pp": 8, "vp": 5, "dp": 8, "microbatches": 128}
    assert got["model_parameters"] == 70_553_706_496  # Llama 3 70B's published size
    ratio = 7 / (5 * 128)  # interleaved 1F1B idle/busy: (p-1)/(v*m)
    assert got["bubble_fraction"] == pytest.approx(ratio / (1 + ratio), rel=1e-9)
    # Stage 0 peaks (plan's docstring formulas, by hand): 10 layers (vp 5 chunks of 2) and the embedding
    # at tp 8; bf16 params (2 B), fp32 grads (4 B), ZeRO-1 master + Adam moments (12 B / dp 8); and
    # activations of Megatron's interleaved warmup, 2 (pp - 1) + (vp - 1) pp + 1 = 47 chunk-microbatches
    # of 2 layers x 4096 tokens, each token keeping (sp) 4h/tp + (a/tp + 2 g/tp) d + a d/tp + 3F/tp bf16
    # elements and a/tp fp32 log-sum-exps
    h, d, a, g, ffn, tp, dp = 8192, 128, 64, 8, 28672, 8, 8
    layer = 2 * h + (a // tp + 2 * g // tp) * d * h + h * a * d // tp + 3 * h * ffn // tp
    embedding = -(-128256 // (tp * 128)) * tp * 128 // tp * h  # vocabulary padded to a multiple of tp x 128
    n = 10 * layer + embedding
    per_token = 2 * (4 * h // tp + (a // tp + 2 * g // tp) * d + a * d // tp + 3 * ffn // tp) + 4 * a // tp
    in_flight = 2 * (8 - 1) + (5 - 1) * 8 + 1
    assert got["memory_by_stage"][0]["parameters"] == n
    assert got["memory_bytes_per_rank"] == 2 * n + 4 * n + -(-12 * n // dp) + in_flight * 2 * 4096 * per_token


def test_text_report_shows_layout_memory_and_timeline(capsys):
    layout = ["parallel.pp=2", "parallel.tp=2", "train.global_batch_size=32"]
    assert main(["plan", "--world-size", "4", *TINY, *layout]) == 0
    out = capsys.readouterr().out
    assert "world 4 = pp 2 x dp 1 x tp 2 (vp 1); sp false; schedule 1f1b" in out  # booleans as configs write them
    assert "; recompute none; distributed optimizer false):" in out, out
    assert "global 32 = micro 8 x microbatches 4 x dp 1" in out
    assert "pipeline bubble: 20.00% of time" in out  # 1F1B: (p-1)/(m+p-1) = 1/5
    assert "rank  0 |" in out and "rank  1 |" in out
    one = [*tiny(1)[:-1], "model.seq_len=1", "train.global_batch_size=1", "train.micro_batch_size=1"]
    assert main(["plan", "--world-size", "1", *one]) == 0
    out = capsys.readouterr().out
    assert "(1 token per step)" in out and "(llama, 1 layer, hidden 64," in out, out
    assert re.search(r"\npeak per rank: \d+\.\d MiB\n", out), out


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (["parallel.tp=2"], 3, r"parallel.tp=2 x parallel.pp=1 = 2 does not divide world size 3"),
        (["parallel.tp=3"], 6, "model.heads=4 is not divisible by parallel.tp=3"),
        (["parallel.pp=2", "parallel.vp=2"], 2, "set parallel.schedule=interleaved for parallel.vp=2"),
        (["parallel.pp=8"], 8, "cannot split model.layers=4 into parallel.pp x parallel.vp = 8 x 1"),
        (["parallel.dp=2"], 4, r"parallel.tp=1 x parallel.pp=1 x parallel.dp=2 = 2 does not equal world size 4"),
        ([], 0, r"^error: --world-size=0 is out of range: set the ranks \(GPUs\) the job will have, 1 or more$"),
    ],
)
def test_bad_layout_is_one_error_line(extra, world, message, capsys):
    args = ["plan", "--world-size", str(world), *TINY, "train.global_batch_size=48", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


@pytest.mark.parametrize(
    "arch, extra",
    [("llama", ["model.kv_heads=2"]), ("llama", ["model.tie_embeddings=true"]), ("gpt2", [])],
)
def test_parameter_count_matches_the_built_model(arch, extra):
    cfg = fill_defaults(load_config(None, [*TINY, f"model.arch={arch}", *extra]))
    built = count_parameters(build_model(cfg.model, seed=0))
    assert _plan([*TINY, f"model.arch={arch}", *extra], 1).model_parameters == built
    # split over pipeline stages, the stages hold every parameter once (plus a tied head's copy)
    plan = _plan([*TINY, f"model.arch={arch}", *extra, "parallel.pp=2"], 2)
    copy = cfg.model.hidden * cfg.model.vocab_size if cfg.model.tie_embeddings else 0
    assert sum(s.parameters for s in plan.stages) == built + copy


def test_activation_formula_reduces_to_korthikanti_for_gpt():
    """GPT shapes, flash attention, no dropout: Korthikanti et al.'s 34 (no TP), 10 + 24/t (TP) and
    34/t (TP + SP) bytes per token per hidden unit, each less the 2 dropout-mask bytes, in 2-byte elements."""
    m = fill_defaults(load_config(None, [*TINY, "model.arch=gpt2"])).model
    assert isinstance(m, ModelConfig)
    h = m.hidden
    assert 2 * layer_activation_elements(m, tp=1, sp=False) == 32 * h
    assert 2 * layer_activation_elements(m, tp=2, sp=False) == (8 + 24 / 2) * h
    assert 2 * layer_activation_elements(m, tp=2, sp=True) == 32 * h / 2


def test_distributed_optimizer_divides_optimizer_state_by_dp():
    base = [*TINY, "train.global_batch_size=32", "train.dtype=bf16"]
    plain = _plan(base, 4).stages[0]
    sharded = _plan([*base, "optim.distributed=true"], 4).stages[0]
    assert plain.optimizer_bytes == 12 * plain.parameters  # fp32 master + Adam m, v
    assert sharded.optimizer_bytes == plain.optimizer_bytes // 4
    assert sharded.param_bytes == 2 * sharded.parameters and sharded.grad_bytes == 4 * sharded.parameters


def test_activations_follow_the_schedule_peak():
    """1F1B holds pp - stage microbatches on a stage; GPipe holds all of them."""
    base = [*TINY, "parallel.pp=4", "train.micro_batch_size=1", "train.global_batch_size=8"]
    one_f = _plan(base, 4)
    gpipe = _plan([*base, "parallel.schedule=gpipe"], 4)
    peaks = simulate(build_schedule("1f1b", 4, 1, 8)).peak_held
    assert peaks == [4, 3, 2, 1]
    per_mb = one_f.stages[1].activation_bytes / peaks[1]  # stages 1 and 2 are equal middle stages
    # approx (rel 1e-6): per_mb is a float quotient; the plan's byte counts are exact products
    assert one_f.stages[2].activation_bytes == pytest.approx(per_mb * peaks[2])
    assert gpipe.stages[1].activation_bytes == pytest.approx(per_mb * 8)
    recompute = _plan([*base, "train.recompute=full"], 4)
    assert recompute.stages[1].activation_bytes < one_f.stages[1].activation_bytes
    # several layers per stage: selective keeps more than full (its GEMM outputs), less than none
    deep = [*base, "model.layers=16"]
    none_b, sel_b, full_b = (
        _plan([*deep, f"train.recompute={r}"], 4).stages[1].activation_bytes for r in ("none", "selective", "full")
    )
    assert full_b < sel_b < none_b


def test_selective_recompute_is_refused_with_a_split_backward_schedule():
    base = [*TINY, "parallel.pp=2", "train.micro_batch_size=1", "train.global_batch_size=4"]
    with pytest.raises(UserError, match=r"parallel.schedule=zb-h1 .* use train.recompute=full"):
        _plan([*base, "parallel.schedule=zb-h1", "train.recompute=selective"], 2)
    _plan([*base, "parallel.schedule=1f1b", "train.recompute=selective"], 2)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("distributed", [False, True])
def test_optimizer_bytes_match_the_built_optimizer(dtype, distributed):
    """The optimizer state the plan counts is what the optimizer allocates after a step: the
    distributed optimizer keeps its own fp32 master shard even over fp32 parameters (it was planned
    as 8 bytes per parameter there, a third short); the replicated one uses fp32 params as masters."""
    from megatron_lite.config import OptimConfig
    from megatron_lite.parallel.data_parallel import DataParallelGrads
    from megatron_lite.parallel.optimizer import build_dp_optimizer
    from megatron_lite.training.build import DTYPES

    extra = [f"train.dtype={dtype}", f"optim.distributed={str(distributed).lower()}"]
    plan = _plan([*TINY, *extra], 1)
    model = build_model(plan.cfg.model, seed=0).to(DTYPES[dtype])
    ddp = DataParallelGrads(model, None, reduce_scatter=distributed)
    opt = build_dp_optimizer(ddp, OptimConfig())
    for p in ddp.parameters():
        p.main_grad.fill_(1e-3)
    opt.step()
    state = opt.memory_bytes()
    own_masters = distributed or dtype != "fp32"  # else the fp32 params are the masters: no new bytes
    measured = state["exp_avg"] + state["exp_avg_sq"] + (state["master"] if own_masters else 0)
    assert plan.stages[0].parameters == sum(p.numel() for p in model.parameters())
    assert plan.stages[0].optimizer_bytes == measured
    assert plan.stages[0].grad_bytes == sum(b.data.numel() * 4 for b in ddp.buffers)


def test_plan_refuses_a_vocabulary_below_the_tokenizers_as_training_does(capsys):
    """plan accepted model.vocab_size=64 with the embedded corpus's 8192-piece tokenizer, which train refused."""
    assert main(["plan", "--world-size", "1", "model.vocab_size=64"]) == 2
    err = capsys.readouterr().err
    assert "model.vocab_size (64) is smaller than the tokenizer's vocabulary (8192); leave it empty" in err
    assert main(["plan", "--world-size", "1", "model.vocab_size=64", "data.vocab_size=300"]) == 2
    assert main(["plan", "--world-size", "1", "model.vocab_size=8192"]) == 0
    # a cluster's tokenizer, not on this machine: the layout is still planned, with the vocabulary given
    assert main(["plan", "--world-size", "1", "model.vocab_size=64", "data.tokenizer=/absent/tok.model"]) == 0


def test_gpu_memory_below_the_peak_is_a_warning_naming_the_fix(capsys):
    """plan never compared its peak with a GPU: a layout that cannot fit one passed without a word."""
    args = ["plan", "--world-size", "1", *TINY, "train.global_batch_size=8"]
    assert main([*args, "--json"]) == 0
    peak = json.loads(capsys.readouterr().out)["memory_bytes_per_rank"]
    assert main([*args, "--json", "--gpu-memory", str(peak)]) == 0  # exactly the peak: it fits
    assert json.loads(capsys.readouterr().out)["warnings"] == []
    assert main([*args, "--json", "--gpu-memory", str(peak - 1)]) == 0
    (why,) = json.loads(capsys.readouterr().out)["warnings"]
    assert "per rank at peak, and --gpu-memory is" in why and "lower train.micro_batch_size" in why, why
    assert main([*args, "--gpu-memory", str(peak - 1)]) == 0
    assert capsys.readouterr().out.endswith(f"\nwarning: {why}\n")
    assert main([*args, "--gpu-memory", "80G"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --gpu-memory '80G' is not a size: give a number of bytes, or one like 5GB, 500MB, 64KiB\n"
    # zero bytes (or a fraction of one) turned the comparison off: a GPU of no memory fits any peak
    for nothing in ("0", "0GiB", "0.5"):
        assert main([*args, "--json", "--gpu-memory", nothing]) == 2
        error = json.loads(capsys.readouterr().out)["error"]
        assert error == f"--gpu-memory {nothing!r} is no memory: give one GPU's, e.g. 80GiB", error
