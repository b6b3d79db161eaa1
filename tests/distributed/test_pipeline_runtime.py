"""Pipeline runtime on gloo: every schedule trains to the one-process losses; hangs become errors.

Each case builds a tiny model's chunks for its pipeline rank, runs a few AdamW steps through
:class:`PipelineRuntime`, and compares with the one-process model that every rank also trains (no
communication needed for the reference): per-step losses on the last stage, every gradient after
the first step, and the two copies of a tied embedding after the last. Before training, each case
also evaluates (forward only) one microbatch more than a step holds: each microbatch's loss is the
one process's, bitwise (same parameters, same kernels, no reduction), and no gradient appears.
Every tensor a rank sends (chunk output, input gradient) must be freed once its batch completes.
pp=4 uses the whole 4-rank world; the pp=2 cases run two at a time on the pipelines {0, 1} and
{2, 3} of the same world.

Tolerances: the pipeline runs the same kernels on the same shapes and accumulates microbatches in
the same order (each backward starts from loss / m, as one process's), so the values match
bitwise and are compared with torch.equal: every loss of an untied model, and every first-step
gradient but a tied embedding's. The tied embedding's gradient is summed in another
order (the first stage's lookup gradient and the last stage's head gradient, each summed over
microbatches, then added; one process adds both per microbatch): ~1e-7 of the largest terms,
which is 1e-5 relative on entries where terms cancel (seen: 2.5e-9 on an entry of 2.4e-4 in a
tensor whose largest entry is 1e-2). So that gradient must agree within RTOL = 1e-6
elementwise, plus RTOL x the tensor's largest magnitude absolutely; a tied model's losses after
the first step inherit it through AdamW's update: RTOL, no slack.
With TP=2 the row-parallel matmuls also split their sums over ranks; it stays within RTOL too.
Parameters are not compared elementwise: AdamW's m / sqrt(v) turns a 1e-7 gradient difference
on an entry whose gradient is ~0 (gpt2's key bias is exactly 0 in truth) into a much larger
relative step difference; the per-step losses are the check that training follows the same path.
"""

from __future__ import annotations

import time
import weakref
import zlib

import torch
import torch.distributed as dist
from torch.testing import assert_close

from megatron_lite.config import ModelConfig
from megatron_lite.models.parallelize import apply_tp, full_state_dict
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel.mesh import ParallelDims, ParallelMesh
from megatron_lite.parallel.pipeline.actions import Op
from megatron_lite.parallel.pipeline.partition import PipelineChunk, build_stage_chunks, partition_layers
from megatron_lite.parallel.pipeline.runtime import PipelineRuntime, PipelineTimeoutError, tied_embedding_groups
from megatron_lite.parallel.pipeline.schedules import build_schedule
from megatron_lite.parallel.pipeline.simulate import simulate

RTOL = 1e-6  # see the module docstring
LR, STEPS, SEED = 1e-3, 3, 7
BATCH, SEQ, VOCAB = 2, 8, 53


def _cfg(arch: str, layers: int, tied: bool) -> ModelConfig:
    llama = arch == "llama"
    return ModelConfig(
        arch=arch,
        layers=layers,
        hidden=16,
        heads=2,
        kv_heads=2 if llama else 2,
        ffn_hidden=32,
        vocab_size=VOCAB,
        seq_len=SEQ,
        norm="rmsnorm" if llama else "layernorm",
        activation="swiglu" if llama else "gelu",
        tie_embeddings=tied,
        rope_theta=10000.0,
        norm_eps=1e-5,
        init_std=0.02,
    )


def _data(m: int, seed: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(STEPS):
        ids = [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g) for _ in range(m)]
        steps.append([(t[:, :-1], t[:, 1:]) for t in ids])
    return steps


def _reference(cfg: ModelConfig, data) -> tuple[list[float], dict, list[float]]:
    """One process, the trainer's accumulation: sum over microbatches of loss / m; and, before
    training, each microbatch's loss of :func:`_evaluated`."""
    model = build_model(cfg, SEED)
    with torch.no_grad():
        evaluated = [model(ids, labels).item() for ids, labels in _evaluated(data)]
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, first_grads = [], {}
    for step, micro in enumerate(data):
        opt.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for ids, labels in micro:
            loss = model(ids, labels) / len(micro)
            loss.backward()
            total += loss.detach()
        losses.append(total.item())
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return losses, first_grads, evaluated


def _evaluated(data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The microbatches evaluated before training: one more than a step's (evaluation takes any number)."""
    return [*data[0], data[1][0]]


class _SentAndFreed(PipelineRuntime):
    """Counts the tensors sent (chunk outputs, input gradients) whose storage outlives their transfer
    batch: the runtime keeps none (its module docstring, "Memory"), so each is freed once it has left."""

    kept = sent = 0

    def _transfer(self, st, batch) -> None:
        sends = [st.outbox[(a.kind, a.mb, a.chunk)] for a in batch if a.kind in (Op.SEND_F, Op.SEND_B)]
        storages = [weakref.ref(t.untyped_storage()) for t in sends]
        del sends
        super()._transfer(st, batch)
        self.sent += len(storages)
        self.kept += sum(ref() is not None for ref in storages)


def _pipeline(cfg, data, schedule, pp_rank, pp_group, embed_group, vp) -> tuple[list[float], dict, dict, list]:
    partition = partition_layers(cfg.layers, schedule.pp, vp)
    chunks = build_stage_chunks(cfg, partition, pp_rank, SEED)
    runtime = _SentAndFreed(chunks, schedule, pp_group, embed_group=embed_group, timeout_s=30)
    params = {n: p for c in chunks for n, p in c.named_parameters()}
    evaluated = runtime.evaluate(_evaluated(data))
    assert all(p.grad is None for p in params.values()), "evaluation touched a gradient"
    opt = torch.optim.AdamW(params.values(), lr=LR)
    losses, first_grads = [], {}
    for step, micro in enumerate(data):
        opt.zero_grad(set_to_none=True)
        loss = runtime.step(micro)
        losses.append(None if loss is None else loss.item())
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in params.items()}
        opt.step()
    assert runtime.kept == 0 and runtime.sent > 0, (runtime.kept, runtime.sent)
    evaluated = None if evaluated is None else [loss.item() for loss in evaluated]
    return losses, first_grads, {n: p.detach() for n, p in params.items()}, evaluated


def _check_case(case: tuple, pp_rank: int, pp_group, embed_group) -> None:
    name, vp, m, arch, tied = case
    pp = dist.get_world_size(pp_group)
    cfg = _cfg(arch, layers=pp * vp + 1, tied=tied)  # +1: one uneven chunk
    data = _data(m, seed=zlib.crc32(repr(case).encode()))  # not hash(): salted per process
    schedule = build_schedule(name, pp, vp, m)
    losses, grads, params, evaluated = _pipeline(cfg, data, schedule, pp_rank, pp_group, embed_group, vp)
    ref_losses, ref_grads, ref_evaluated = _reference(cfg, data)
    where = f"{case} pp={pp} rank {pp_rank}"
    # forward only, before any step: the same parameters and kernels, so the same bits
    assert evaluated == (ref_evaluated if pp_rank == pp - 1 else None), (where, evaluated, ref_evaluated)
    if pp_rank == pp - 1:
        if tied:
            assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=0, msg=where)
        else:
            assert losses == ref_losses, (where, losses, ref_losses)  # bitwise (module docstring)
    else:
        assert losses == [None] * STEPS, where
    for n in grads:
        if tied and n == "embed.weight":
            scale = RTOL * ref_grads[n].abs().max().item()
            assert_close(grads[n], ref_grads[n], rtol=RTOL, atol=scale, msg=lambda s, n=n: f"{where} grad {n}: {s}")
        else:
            assert torch.equal(grads[n], ref_grads[n]), f"{where} grad {n}: {(grads[n] - ref_grads[n]).abs().max()}"
    if tied and pp_rank in (0, pp - 1):
        copies = [torch.empty_like(params["embed.weight"]) for _ in range(2)]
        dist.all_gather(copies, params["embed.weight"].contiguous(), group=embed_group)
        assert torch.equal(copies[0], copies[1]), f"{where}: tied embedding copies differ"


def _cases(pp: int) -> list[tuple]:
    """Every schedule x vp in {1, 2} x microbatches in {pp, 2pp, odd}; gpt2 cases are tied."""
    odd = pp + 1 if pp % 2 == 0 else pp + 2
    cases = []
    for i, (name, vp) in enumerate(
        [("gpipe", 1), ("gpipe", 2), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1), ("zb-h1", 2)]
    ):
        for j, m in enumerate((pp, 2 * pp, odd)):
            arch = "gpt2" if (i + j) % 2 else "llama"
            cases.append((name, vp, m, arch, arch == "gpt2"))
    cases.append(("1f1b", 1, pp, "llama", True))  # llama with a tied head
    return cases


def _run_pp4(rank: int, world: int) -> float:
    t0 = time.perf_counter()
    (embed_group,) = [g for g in tied_embedding_groups([list(range(world))]) if g is not None] or [None]
    for case in _cases(4):
        _check_case(case, rank, dist.group.WORLD, embed_group if rank in (0, 3) else None)
    return time.perf_counter() - t0


def _run_pp2_pairs(rank: int, world: int) -> float:
    t0 = time.perf_counter()
    pipelines = [[0, 1], [2, 3]]
    pp_groups = [dist.new_group(ranks) for ranks in pipelines]
    embed_groups = tied_embedding_groups(pipelines)
    mine = rank // 2
    cases = _cases(2)[mine::2]  # the two pipelines split the cases between them
    for case in cases:
        _check_case(case, rank % 2, pp_groups[mine], embed_groups[mine])
    return time.perf_counter() - t0


def test_pp4_every_schedule_matches_one_process(world4):
    world4.run(_run_pp4, timeout=240)


def test_pp2_every_schedule_matches_one_process(world4):
    world4.run(_run_pp2_pairs, timeout=240)


def _activation_accounting(rank: int, world: int) -> tuple[int, int, int]:
    """1F1B at pp=4: the measured peak of saved activation bytes equals the simulator's count."""
    cfg = _cfg("llama", layers=4, tied=False)
    schedule = build_schedule("1f1b", 4, 1, 8)
    chunks = build_stage_chunks(cfg, partition_layers(4, 4), rank, SEED)
    runtime = PipelineRuntime(chunks, schedule, dist.group.WORLD, record=True)
    runtime.step(_data(8, 0)[0])
    meter = runtime.meter
    assert len(set(meter.sizes)) == 1 and meter.held == 0, (meter.sizes, meter.held)
    return meter.peak, meter.sizes[0], simulate(schedule).peak_held[rank]


def test_peak_activation_bytes_follow_the_schedule(world4):
    for rank, (peak, per_microbatch, held) in enumerate(world4.run(_activation_accounting)):
        assert held == 4 - rank
        assert peak == held * per_microbatch, (rank, peak, per_microbatch, held)


def _silent_peer_times_out(rank: int, world: int) -> str:
    group = dist.new_group([0, 1])  # a fresh group: the dangling receive cannot reach later jobs
    cfg = _cfg("llama", layers=2, tied=False)
    chunks = build_stage_chunks(cfg, partition_layers(2, 2), rank, SEED)
    runtime = PipelineRuntime(chunks, build_schedule("1f1b", 2, 1, 2), group, timeout_s=1.0)
    if rank == 0:
        return "silent"  # never runs its step: rank 1 waits for an activation that never comes
    t0 = time.monotonic()
    try:
        runtime.step(_data(2, 0)[0])
    except PipelineTimeoutError as e:
        assert time.monotonic() - t0 < 5.0
        return str(e)
    raise AssertionError("no timeout")


def test_a_silent_peer_is_an_error_naming_rank_action_and_microbatch(world2):
    silent, message = world2.run(_silent_peer_times_out, timeout=60)
    assert silent == "silent"
    assert "pipeline rank 1" in message and "virtual stages [1]" in message, message
    assert "RECV_F of microbatch 0" in message and "with pipeline rank 0" in message, message
    assert "within 1 s" in message, message


def _full_grads(chunks: list[PipelineChunk]) -> dict[str, torch.Tensor]:
    """Single-device gradients of TP-sharded chunks: ``full_state_dict`` gathers whatever the
    parameters hold, so it gathers the gradients while they stand in for the values."""
    params = [p for c in chunks for p in c.parameters()]
    saved = [p.data for p in params]
    for p in params:
        p.data = p.grad
    try:
        return {n: t.clone() for c in chunks for n, t in full_state_dict(c).items()}
    finally:
        for p, d in zip(params, saved):
            p.data = d


def _run_tp2_pp2(rank: int, world: int) -> None:
    """pp=2 x tp=2: rank = pp_rank * 2 + tp_rank (mesh.py); pipelines {0, 2} and {1, 3}."""
    mesh = ParallelMesh.build(ParallelDims(tp=2, pp=2))
    pipelines = [[0, 2], [1, 3]]
    embed_group = tied_embedding_groups(pipelines)[mesh.tp_rank]
    for name, vp, m, arch, tied in [
        ("1f1b", 1, 4, "llama", False),
        ("zb-h1", 1, 3, "gpt2", True),
        ("interleaved", 2, 2, "llama", True),
    ]:
        cfg = _cfg(arch, layers=2 * vp + 1, tied=tied)
        data = _data(m, seed=m)
        # The DESIGN order: parallelize the model, then cut this pipeline rank's chunks from it.
        model = apply_tp(build_model(cfg, SEED), mesh)
        chunks = [PipelineChunk(model, spec) for spec in partition_layers(cfg.layers, 2, vp).for_stage(mesh.pp_rank)]
        del model
        runtime = PipelineRuntime(chunks, build_schedule(name, 2, vp, m), mesh.pp_group, embed_group=embed_group)
        opt = torch.optim.AdamW([p for c in chunks for p in c.parameters()], lr=LR)
        ref_losses, ref_grads, _ = _reference(cfg, data)
        where = f"tp=2 pp=2 {name} vp={vp} m={m} {arch} tied={tied} rank {rank}"
        for step, micro in enumerate(data):
            opt.zero_grad(set_to_none=True)
            loss = runtime.step(micro)
            if mesh.pp_rank == 1:
                assert_close(loss.item(), ref_losses[step], rtol=RTOL, atol=0, msg=where)
            if step == 0:
                for n, g in _full_grads(chunks).items():
                    scale = RTOL * ref_grads[n].abs().max().item()
                    assert_close(g, ref_grads[n], rtol=RTOL, atol=scale, msg=lambda s, n=n, w=where: f"{w} {n}: {s}")
            opt.step()


def test_tp2_inside_each_of_two_stages_matches_one_process(world4):
    world4.run(_run_tp2_pp2, timeout=120)
