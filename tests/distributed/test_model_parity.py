"""The whole model under TP (and SP) trains to the one-process losses, and bad layouts fail early.

Each case: the same tiny model (same init seed), the same 20 batches, AdamW with gradient clipping
(TP: ``clip_grad_norm_`` of parallelize, whose norm must equal torch's single-device norm at every
step); every rank also runs
the one-process model itself (no communication needed to get the reference). Per-step losses must
match within rtol 1e-5 (fp32; TP only reassociates sums, ~1e-7 relative per op, and 20 AdamW steps
keep that below 1e-5). The gathered full state dict after training must match the reference
parameters within PARAM_ATOL: Adam divides by sqrt(v), so tiny grads carry the 1e-7 noise into
updates of 1e-6 to 1e-5 (max over the cases: 9.6e-6 with the loss's own fused autograd Function,
1.34e-5 since the loss runs on the kernels' partials, whose gradient rounds exp(x - m) exp(m - M)
rather than exp(x - M); losses stayed within 3.1e-7 relative either way).
The key bias (gpt2) is left out of that comparison: its true gradient is exactly zero (adding a
constant to every key shifts each query's scores uniformly, and softmax ignores that), so AdamW
turns ~1e-9 rounding noise into lr-sized steps of arbitrary sign in both runs (seen: 3e-5 apart).
The layer tests check that bias's gradient directly.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError
from megatron_lite.models.parallelize import (
    allreduce_sequence_parallel_grads,
    apply_tp,
    clip_grad_norm_,
    full_state_dict,
    validate_tp,
)
from megatron_lite.models.transformer import Transformer
from megatron_lite.parallel.mesh import ParallelDims, ParallelMesh

STEPS, BATCH, SEQ, VOCAB = 20, 2, 16, 101  # VOCAB 101 is padded at every tp > 1
LOSS_RTOL = 1e-5  # also for the per-step gradient norms
CLIP = 0.5
PARAM_ATOL = 2e-5  # measured max 1.34e-5 (module docstring)


def _cfg(arch: str, heads: int, kv_heads: int, tied: bool) -> ModelConfig:
    llama = arch == "llama"
    return ModelConfig(
        arch=arch,
        layers=2,
        hidden=32,
        heads=heads,
        kv_heads=kv_heads,
        ffn_hidden=64 if llama else 128,
        vocab_size=VOCAB,
        seq_len=SEQ,
        norm="rmsnorm" if llama else "layernorm",
        activation="swiglu" if llama else "gelu",
        tie_embeddings=tied,
        rope_theta=10000.0,
        norm_eps=1e-5,
        init_std=0.02,
    )


def _cases(tp: int) -> dict[str, ModelConfig]:
    """llama with KV heads split, llama with KV heads replicated (tied head), gpt2 (tied, biases)."""
    return {
        "llama-kv-split": _cfg("llama", 2 * tp, tp, tied=False),
        "llama-kv-replicated": _cfg("llama", 2 * tp, tp // 2, tied=True),
        "gpt2": _cfg("gpt2", 4, 4, tied=True),
    }


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[0, :3] = -100  # ignored tokens must leave the mean
        out.append((ids[:, :-1], labels))
    return out


def _train(model: Transformer, batches, group=None, sharded: bool = False) -> tuple[list[float], list[float]]:
    """AdamW with global-norm clipping at CLIP (low enough to clip most steps); losses and norms."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses, norms = [], []
    for ids, labels in batches:
        loss = model(ids, labels)
        loss.backward()
        if sharded:
            allreduce_sequence_parallel_grads(model, group)
            norm = clip_grad_norm_(model, CLIP, group)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        norms.append(norm.item())
    return losses, norms


def _check_case(name: str, cfg: ModelConfig, mesh: ParallelMesh, sp: bool, pad_to: int, recompute="none") -> None:
    torch.manual_seed(0)
    reference = Transformer(cfg)
    reference.init_weights(seed=1234)
    sharded = apply_tp(copy.deepcopy(reference), mesh, sequence_parallel=sp, vocab_pad_to=pad_to)
    # recomputed blocks re-run their collectives inside backward, in the same order on every rank
    reference.recompute = sharded.recompute = recompute
    batches = _batches()
    ref_losses, ref_norms = _train(reference, batches)
    tp_losses, tp_norms = _train(sharded, batches, mesh.tp_group, sharded=True)
    assert sum(n > CLIP for n in ref_norms) >= STEPS // 2, "clipping must be exercised"
    for what, got, want in (("loss", tp_losses, ref_losses), ("grad norm", tp_norms, ref_norms)):
        assert_close(
            torch.tensor(got),
            torch.tensor(want),
            rtol=LOSS_RTOL,
            atol=0.0,
            msg=lambda m, w=what: f"{name} sp={sp} {w}: {m}",
        )
    full = full_state_dict(sharded)
    ref_state = reference.state_dict()
    assert full.keys() == ref_state.keys()
    for key, value in ref_state.items():
        got = full[key]
        if key.endswith("attn.qkv.bias"):
            q, k = cfg.hidden, cfg.kv_heads * cfg.hidden // cfg.heads
            got, value = torch.cat([got[:q], got[q + k :]]), torch.cat([value[:q], value[q + k :]])
        assert_close(got, value, rtol=0.0, atol=PARAM_ATOL, msg=lambda m, key=key: f"{name} sp={sp} {key}: {m}")
    if sp:  # the SP grad all-reduce kept replicated norms identical on every rank
        w = sharded.final_norm.weight.detach()
        gathered = [torch.empty_like(w) for _ in range(mesh.tp_size)]
        dist.all_gather(gathered, w, group=mesh.tp_group)
        assert all(torch.equal(g, w) for g in gathered)


def check_model_parity(rank: int, world: int) -> None:
    mesh = ParallelMesh.build(ParallelDims.resolve(world, tp=world))
    for name, cfg in _cases(world).items():
        for sp in (False, True):
            _check_case(name, cfg, mesh, sp, pad_to=128 if sp else 1)
    for mode in ("full", "selective"):
        _check_case(f"llama-kv-replicated recompute {mode}", _cases(world)["llama-kv-replicated"], mesh, True, 1, mode)


def test_model_parity_tp2(world2):
    world2.run(check_model_parity, timeout=120)


def test_model_parity_tp4(world4):
    world4.run(check_model_parity, timeout=120)


@pytest.mark.parametrize(
    "change, tp, sp, message",
    [
        (
            {"heads": 6, "kv_heads": 6},
            4,
            False,
            r"model.heads=6 is not divisible by parallel.tp=4.*fit this model: 1, 2",
        ),
        ({"heads": 8, "kv_heads": 6}, 4, False, r"model.kv_heads=6 and parallel.tp=4: .*neither holds"),
        (
            {"ffn_hidden": 66},
            4,
            False,
            r"model.ffn_hidden=66 is not divisible by parallel.tp=4 \(set model.ffn_hidden to a multiple of 4, "
            r"e.g. 68\)",
        ),
        ({"seq_len": 18}, 4, True, r"model.seq_len=18 is not divisible by parallel.tp=4.*fit this model: 2$"),
        # no tp > 1 divides an odd seq_len: the fix is the length (sp=true with tp=1 is refused)
        (
            {"seq_len": 33},
            2,
            True,
            r"model.seq_len=33 is not divisible by parallel.tp=2 \(set model.seq_len to a "
            r"multiple of 2, e.g. 32, or parallel.sp=false\)$",
        ),
    ],
)
def test_bad_tp_layouts_are_named(change, tp, sp, message):
    cfg = dataclasses.replace(_cfg("llama", 8, 4, tied=False), **change)
    with pytest.raises(UserError, match=message):
        validate_tp(cfg, tp, sp)


def _bad_layouts_fail_before_any_collective(rank: int, world: int) -> list[str]:
    """Only rank 0 tries the bad layouts: had any of them issued a collective before raising, it
    would block (rank 1 never joins) and the harness would time out."""
    mesh = ParallelMesh.build(ParallelDims(tp=2))  # both ranks: building a mesh is a collective
    errors = []
    if rank == 0:
        for attempt in (
            lambda: ParallelMesh.build(ParallelDims(tp=2, pp=2)),
            lambda: apply_tp(Transformer(_cfg("llama", 3, 3, tied=False)), mesh, sequence_parallel=True),
        ):
            try:
                attempt()
            except UserError as e:
                errors.append(str(e))
    dist.barrier()
    return errors


def test_bad_layouts_fail_before_any_collective(world2):
    errors = world2.run(_bad_layouts_fail_before_any_collective, timeout=20)[0]
    assert "parallel.tp=2 x parallel.pp=2 x parallel.dp=1 = 4 does not equal world size 2" in errors[0]
    assert "model.heads=3 is not divisible by parallel.tp=2" in errors[1]
