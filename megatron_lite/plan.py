"""``megatron-lite plan``: check a parallel layout for N ranks and estimate it, launching nothing.

:func:`check_layout` runs every check training runs before its first collective: the config
(``config.validate``, which also checks the batch arithmetic), the mesh (``ParallelDims.resolve``),
the tensor-parallel split (``parallelize.validate_tp``), the pipeline partition and the schedule
(built and validated as data). :func:`make_plan` adds per-rank memory and the simulated pipeline.
The model is never built: parameters are counted from the layout documented in
``models/transformer.py``, so a 70B layout for 512 GPUs is checked in about a second on a laptop.

Memory per rank, in bytes (``P`` = bytes of the parameter dtype: 2 for bf16/fp16, and for ``auto``,
planned as a GPU's bf16; 4 for fp32), for the ``n`` parameters a rank holds::

    parameters  P * n
    gradients   4 * n                      fp32 main grads (``parallel/data_parallel.py``)
    optimizer   (12 if P == 2 else 8) * n  fp32 master + Adam m, v (the replicated optimizer's masters
                                           are the params themselves in fp32);
                12 * n / dp with the distributed optimizer (``optim.distributed``), whose fp32
                master shard is always its own copy, fp32 parameters included
    activations the schedule's peak, see below

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", sec. 4), whose GPT layer stores ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit. We count the same
way for this code's layer, with flash attention (the ``5*a*s^2*b`` score/softmax term is recomputed
in backward, never stored) and no dropout (its 2 mask bytes per element of ``h`` go). Per token,
in elements (each ``P`` bytes), a layer keeps::

    4h              inputs of attn_norm, qkv, mlp_norm, mlp      (split over tp only under sp)
    (a + 2g')d      q, k, v for attention                        (g' = KV heads on this rank)
    a*d             attention output = proj input
    3F (swiglu) | 2F (gelu): the MLP's activation inputs and down-projection input
    + 4*a bytes     attention's fp32 log-sum-exp

all divided by tp except where noted. For GPT-2 (F = 4h, a*d = h) that is ``32*s*b*h`` bytes:
Korthikanti's 34 minus the two dropout masks. ``train.recompute=full`` keeps only each layer's
input, ``h`` elements; ``selective`` (``models/recompute.py``) its input and the outputs of its GEMMs
and attention (:func:`layer_selective_elements`); while one layer is recomputed, full adds its whole
activations, selective the part it did not keep. The last virtual stage also keeps its
final norm's input and output (``2h``) and the loss's fp32 softmax (``4*V/tp`` bytes per token).
A rank's peak is found by walking its schedule: each forward of a chunk adds that chunk's
activations for one microbatch (``s * micro_batch_size`` tokens), each backward (zero-bubble: each
W) frees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_lite.amounts import byte_size, counted
from megatron_lite.config import (
    Config,
    ModelConfig,
    accumulation_steps,
    check_vocab_covers,
    config_warnings,
    fill_defaults,
    validate,
)
from megatron_lite.errors import UserError
from megatron_lite.models.parallelize import validate_tp
from megatron_lite.parallel.mesh import ParallelDims
from megatron_lite.parallel.pipeline.partition import ChunkSpec, Partition, partition_layers, plan_for_model
from megatron_lite.parallel.pipeline.schedules import Op, Schedule, build_schedule
from megatron_lite.parallel.pipeline.simulate import Simulation, render, simulate
from megatron_lite.training.fp8 import config_problem as fp8_config_problem

VOCAB_PAD_TO = 128  # apply_tp's default: vocabulary padded to a multiple of tp * 128


@dataclass(frozen=True)
class Layout:
    """A checked layout: mesh sizes, microbatches per step, the layer split and the schedule."""

    dims: ParallelDims
    microbatches: int
    partition: Partition
    schedule: Schedule


@dataclass(frozen=True)
class StageMemory:
    """Bytes on each rank of one pipeline stage (every tp and dp rank of a stage holds the same)."""

    stage: int
    parameters: int
    """Parameters held by one rank (its tp shard of its chunks)."""
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


@dataclass(frozen=True)
class Plan:
    """A checked layout with its memory estimate and simulated pipeline."""

    cfg: Config
    layout: Layout
    simulation: Simulation
    model_parameters: int
    stages: tuple[StageMemory, ...]
    gpu_memory: int | None = None
    """Bytes of one GPU (``plan --gpu-memory``): a peak above it is a warning."""

    @property
    def memory_bytes_per_rank(self) -> int:
        """The most any rank needs (the largest stage)."""
        return max(s.total for s in self.stages)

    @property
    def warnings(self) -> list[str]:
        """The startup warnings of the config, and a peak past ``gpu_memory``."""
        over = self.gpu_memory and over_memory(self.memory_bytes_per_rank, self.gpu_memory, "--gpu-memory is")
        return [*config_warnings(self.cfg), *([over] if over else [])]

    def to_json(self) -> dict:
        """The machine-readable summary (``megatron-lite plan --json``)."""
        d = self.layout.dims
        return {
            "world_size": d.world_size,
            "tp": d.tp,
            "pp": d.pp,
            "vp": d.vp,
            "dp": d.dp,
            "sp": self.cfg.parallel.sp,
            "schedule": self.layout.schedule.name,
            "microbatches": self.layout.microbatches,
            "model_parameters": self.model_parameters,
            "bubble_fraction": self.simulation.bubble_fraction,
            "memory_bytes_per_rank": self.memory_bytes_per_rank,
            "memory_by_stage": [{**s.__dict__, "total": s.total} for s in self.stages],
            "warnings": self.warnings,
        }


def check_layout(cfg: Config, world_size: int, need_vocab: bool = True) -> Layout | None:
    """Every pre-launch check of ``cfg`` (defaults already filled) on ``world_size`` ranks; raises
    :class:`UserError` naming the problem. Pure: the trainer calls it before any process group.

    ``need_vocab=False`` (``model.vocab_size`` not known before the data is open) runs every check
    but the tensor-parallel split of the vocabulary and returns None instead of the layout.
    """
    if world_size < 1:
        raise UserError(f"the world size must be a positive number of ranks, got {world_size}")
    validate(cfg, world_size, need_vocab)
    p = cfg.parallel
    dims = ParallelDims.resolve(world_size, tp=p.tp, pp=p.pp, dp=p.dp, vp=p.vp)
    validate_tp(cfg.model, dims.tp, p.sp)
    if cfg.model.vocab_size is None:  # the chunks' sizes need the vocabulary (head cost): only the count
        partition_layers(cfg.model.layers, dims.pp, dims.vp)
    else:
        partition = plan_for_model(cfg.model, dims.pp, dims.vp)
    # With one stage the trainer runs each microbatch's forward and backward back to back: 1F1B.
    name = p.schedule if dims.pp > 1 else "1f1b"
    schedule = build_schedule(name, dims.pp, dims.vp, accumulation_steps(cfg))
    if cfg.train.dtype == "fp8" and (why := fp8_config_problem(cfg)):  # the device part: at train time
        raise UserError(f"train.dtype=fp8: {why}")
    if schedule.split_backward and cfg.train.recompute == "selective":
        raise UserError(
            f"parallel.schedule={name} splits each backward in two passes over a block's graph, which "
            "selective recomputation (train.recompute=selective) allows only once; use "
            "train.recompute=full or another schedule"
        )
    return None if cfg.model.vocab_size is None else Layout(dims, schedule.microbatches, partition, schedule)


def _vocab_size(cfg: Config) -> int:
    """The vocabulary training would use: model.vocab_size, refused below its tokenizer's as the
    trainer refuses it, else the tokenizer's (not building one)."""
    m, d = cfg.model, cfg.data
    if m.vocab_size is not None and (d.tokenizer and not Path(d.tokenizer).exists() or d.path and not d.tokenizer):
        return m.vocab_size  # no tokenizer here (a cluster's, planned on a laptop), or none given: validate's
    if d.tokenizer:
        from megatron_lite.data.tokenizer import Tokenizer

        tokens = Tokenizer(d.tokenizer).vocab_size
    else:
        tokens = d.vocab_size  # the embedded corpus's tokenizer (data.path without data.tokenizer: refused)
    if m.vocab_size is None:
        return tokens
    check_vocab_covers(m.vocab_size, tokens)
    return m.vocab_size


def over_memory(need: int, have: int, where: str) -> str | None:
    """The warning for a rank whose estimated peak ``need`` exceeds the ``have`` bytes ``where`` names
    (a GPU, a share of RAM, ``--gpu-memory``), with the fixes; None where it fits."""
    if need <= have:
        return None
    return (
        f"`megatron-lite plan` estimates {byte_size(need, binary=True)} per rank at peak, and {where} "
        f"{byte_size(have, binary=True)}: expect an out-of-memory failure; lower train.micro_batch_size or "
        "model.seq_len, set train.recompute, or spread the model over more ranks (parallel.tp / pp, optim.distributed)"
    )


def make_plan(cfg: Config, world_size: int, gpu_memory: int | None = None) -> Plan:
    """Check ``cfg`` for ``world_size`` ranks (:func:`check_layout`) and estimate it; ``gpu_memory``:
    the bytes of one GPU, a peak above them a warning."""
    fill_defaults(cfg, vocab_size=_vocab_size(cfg))
    layout = check_layout(cfg, world_size)
    stages = tuple(_stage_memory(cfg, layout, stage) for stage in range(layout.dims.pp))
    total = sum(_chunk_parameters(cfg.model, c, tp=1) for c in layout.partition.chunks)
    if cfg.model.tie_embeddings and layout.dims.pp > 1:
        total -= _embedding_parameters(cfg.model, tp=1)  # the last stage's copy of the tied head
    return Plan(cfg, layout, simulate(layout.schedule), total, stages, gpu_memory)


def _param_bytes(cfg: Config) -> int:
    return 4 if cfg.train.dtype == "fp32" else 2


def _padded_vocab(m: ModelConfig, tp: int) -> int:
    multiple = tp * VOCAB_PAD_TO if tp > 1 else 1
    return -(-m.vocab_size // multiple) * multiple


def _embedding_parameters(m: ModelConfig, tp: int) -> int:
    return _padded_vocab(m, tp) // tp * m.hidden


def _kv_heads_per_rank(m: ModelConfig, tp: int) -> int:
    # KV heads are split when kv_heads % tp == 0, else each rank holds one (replicated) head.
    return m.kv_heads // tp if m.kv_heads % tp == 0 else 1


def _layer_parameters(m: ModelConfig, tp: int) -> int:
    """One block's parameters on one tp rank (layout: ``models/transformer.py``)."""
    h, d, gpt2 = m.hidden, m.hidden // m.heads, m.arch == "gpt2"
    qkv_rows = (m.heads // tp + 2 * _kv_heads_per_rank(m, tp)) * d
    norms = 2 * (2 * h if m.norm == "layernorm" else h)
    attn = qkv_rows * h + h * m.heads * d // tp + (qkv_rows + h if gpt2 else 0)
    mats = 3 if m.activation == "swiglu" else 2
    mlp = mats * h * m.ffn_hidden // tp + (m.ffn_hidden // tp + h if gpt2 else 0)
    return norms + attn + mlp


def _chunk_parameters(m: ModelConfig, chunk: ChunkSpec, tp: int) -> int:
    n = len(chunk.layers) * _layer_parameters(m, tp)
    if chunk.first:
        n += _embedding_parameters(m, tp) + (m.seq_len * m.hidden if m.arch == "gpt2" else 0)
    if chunk.last:
        n += (2 if m.norm == "layernorm" else 1) * m.hidden
        if not (m.tie_embeddings and chunk.first):  # a tied head on another stage is its own copy
            n += _embedding_parameters(m, tp)
    return n


def layer_activation_elements(m: ModelConfig, tp: int, sp: bool) -> float:
    """Elements one layer keeps per token for backward, without recomputation (module docstring)."""
    d = m.hidden // m.heads
    sharded = (m.heads // tp + 2 * _kv_heads_per_rank(m, tp)) * d + m.heads * d // tp
    sharded += (3 if m.activation == "swiglu" else 2) * m.ffn_hidden // tp
    return 4 * m.hidden / (tp if sp else 1) + sharded


def layer_selective_elements(m: ModelConfig, tp: int, sp: bool) -> float:
    """Elements one layer keeps per token under selective recomputation (``models/recompute.py``):
    its input, and the outputs of its GEMMs and attention (the row-parallel GEMMs' before the
    reduction, so not split by sequence parallelism)."""
    d = m.hidden // m.heads
    kept = m.hidden / (tp if sp else 1) + 2 * m.hidden  # block input; proj and down GEMM outputs
    kept += (m.heads // tp + 2 * _kv_heads_per_rank(m, tp)) * d + m.heads * d // tp  # qkv, attention out
    return kept + (2 if m.activation == "swiglu" else 1) * m.ffn_hidden // tp  # gate_up | up


def _chunk_activation_bytes(cfg: Config, chunk: ChunkSpec, tp: int) -> float:
    """Bytes one microbatch leaves on a rank between a chunk's forward and its backward."""
    m, t, sp = cfg.model, cfg.train, cfg.parallel.sp
    tokens, P = m.seq_len * t.micro_batch_size, _param_bytes(cfg)
    seq_split = tp if sp else 1
    if t.recompute == "none":
        per_token = P * layer_activation_elements(m, tp, sp) + 4 * m.heads // tp
    elif t.recompute == "selective":
        per_token = P * layer_selective_elements(m, tp, sp) + 4 * m.heads // tp
    else:
        per_token = P * m.hidden / seq_split  # only each block's input
    per_token *= len(chunk.layers)
    if chunk.last:
        per_token += P * 2 * m.hidden / seq_split + 4 * _padded_vocab(m, tp) // tp
    return per_token * tokens


def _peak_activation_bytes(cfg: Config, layout: Layout, stage: int) -> float:
    """Walk ``stage``'s actions: forwards add their chunk's bytes, backwards (or W) free them."""
    tp, schedule = layout.dims.tp, layout.schedule
    per_chunk = {c.chunk: _chunk_activation_bytes(cfg, c, tp) for c in layout.partition.for_stage(stage)}
    freeing = Op.W if schedule.split_backward else Op.B
    held = peak = 0.0
    for action in schedule.actions[stage]:
        if action.kind is Op.F:
            held += per_chunk[action.chunk]
            peak = max(peak, held)
        elif action.kind is freeing:
            held -= per_chunk[action.chunk]
    if cfg.train.recompute != "none":  # one block rematerialised at a time during backward
        m, sp = cfg.model, cfg.parallel.sp
        tokens = m.seq_len * cfg.train.micro_batch_size
        transient = layer_activation_elements(m, tp, sp)  # full: the whole block's activations
        if cfg.train.recompute == "selective":  # only what the kept GEMM/attention outputs lack
            transient = max(0.0, transient - layer_selective_elements(m, tp, sp))
        peak += _param_bytes(cfg) * transient * tokens
    return peak


def _stage_memory(cfg: Config, layout: Layout, stage: int) -> StageMemory:
    dims, P = layout.dims, _param_bytes(cfg)
    n = sum(_chunk_parameters(cfg.model, c, dims.tp) for c in layout.partition.for_stage(stage))
    # DistributedAdamW: master shard + m + v, fp32 params too; ReplicatedAdamW: fp32 params are the masters
    optimizer = -(-12 * n // dims.dp) if cfg.optim.distributed else (12 if P == 2 else 8) * n
    activations = round(_peak_activation_bytes(cfg, layout, stage))
    return StageMemory(stage, n, P * n, 4 * n, optimizer, activations)


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def format_plan(plan: Plan, width: int = 100) -> str:
    """The human-readable report: layout, batch, partition, memory per stage, bubble, timeline."""
    cfg, lay = plan.cfg, plan.layout
    d, t, m = lay.dims, cfg.train, cfg.model
    tokens = t.global_batch_size * m.seq_len
    counts = ",".join(map(str, lay.partition.layer_counts))
    dtype = "bf16 (auto, planned for GPUs)" if t.dtype == "auto" else t.dtype
    lines = [
        f"layout: world {d.world_size} = pp {d.pp} x dp {d.dp} x tp {d.tp} (vp {d.vp}); "
        f"sp {str(cfg.parallel.sp).lower()}; schedule {lay.schedule.name}",
        f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x microbatches {lay.microbatches} "
        f"x dp {d.dp} ({counted(tokens, 'token')} per step)",
        f"model: {plan.model_parameters:,} parameters ({m.arch}, {counted(m.layers, 'layer')}, hidden {m.hidden}, "
        f"heads {m.heads}/{m.kv_heads} kv, ffn {m.ffn_hidden}, vocab {m.vocab_size}, seq {m.seq_len})",
        f"pipeline: layers per virtual stage (model order) {counts}",
        f"memory per rank, by pipeline stage ({dtype}; recompute {t.recompute}; distributed optimizer "
        f"{str(cfg.optim.distributed).lower()}):",
        "stage   parameters        params         grads     optimizer   activations         total",
    ]
    for s in plan.stages:
        lines.append(
            f"{s.stage:5d} {s.parameters:12,} {_gib(s.param_bytes)} {_gib(s.grad_bytes)} "
            f"{_gib(s.optimizer_bytes)} {_gib(s.activation_bytes)} {_gib(s.total)}"
        )
    lines.append(f"peak per rank: {byte_size(plan.memory_bytes_per_rank, binary=True)}")
    sim = plan.simulation
    lines.append(f"pipeline bubble: {sim.bubble_fraction:.2%} of time (simulated, backward = 2 x forward)")
    lines.append(render(sim, width))
    lines += [f"warning: {why}" for why in plan.warnings]
    return "\n".join(lines)
