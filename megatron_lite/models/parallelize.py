"""Tensor and sequence parallelism, applied to the single-device ``Transformer`` from outside.

Sequence parallelism is ``apply_tp(..., sequence_parallel=True)``; activation recompute is
``models/recompute.py`` and pipeline stages are cut by ``parallel/pipeline/partition.build_stage_chunks``.

On one tensor-parallel model, in this order (each step needs the previous one; the trainer's own
order, with pipeline chunks, main-grad buffers and the distributed optimizer, is
``training/engine.py``'s)::

    init_distributed(timeout_s)                 # then ParallelMesh.build(dims), on every rank
    model = build_model(cfg, seed)              # meta -> CPU/GPU -> deterministic init (full model)
    apply_tp(model, mesh, sequence_parallel)    # slices every rank's shard; no collectives
    optimizer = AdamW(model.parameters(), ...)  # must see the sharded parameters
    per step:
        loss = model(ids, labels); loss.backward()                # each microbatch
        (data-parallel reduction finished, e.g. ddp.finish_grad_sync())
        allreduce_sequence_parallel_grads(model, mesh.tp_group)  # no-op without SP
        norm = clip_grad_norm_(model, clip, mesh.tp_group)       # not torch's: see its docstring
        optimizer.step()

What gets replaced (per-rank shapes in ``parallel/tensor_parallel.py``):

====================  ===========================================================================
embed                 VocabParallelEmbedding (vocab padded to a multiple of tp * vocab_pad_to)
pos_embed (gpt2)      replicated; under SP a hook keeps this rank's positions
layers.i.attn.qkv     ColumnParallelLinear by heads, parts [q; k; v]; KV heads split when
                      kv_heads % tp == 0, else replicated on tp/kv_heads neighbouring ranks with
                      their grads summed over the replicas
layers.i.attn.proj    RowParallelLinear
layers.i.mlp.*        gate_up (parts [gate; up]) / up: ColumnParallelLinear; down: RowParallelLinear
norms                 replicated; under SP they see T/tp tokens, so their grads are partial sums
final_norm            + a hook entering the head's TP region (all-reduce in backward; SP: gather T)
head                  vocab rows, padded like embed (tied: embed's shard is the head)
loss_fn               VocabParallelLoss (never gathers the logits)
====================  ===========================================================================

Parameter names stay the single-device names; :func:`full_state_dict` gathers the single-device
tensors back (checkpoints, Hugging Face export). tp=1 leaves the model untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError
from megatron_lite.models.transformer import Attention, Transformer
from megatron_lite.parallel import comm
from megatron_lite.parallel.comm import Group
from megatron_lite.parallel.grad_utils import CLIP_EPS, global_grad_norm
from megatron_lite.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron_lite.parallel.mesh import ParallelMesh
from megatron_lite.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLoss,
    padded_vocab_size,
)

_SHARDED = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


def _tp_problems(cfg: ModelConfig, tp: int, sequence_parallel: bool) -> list[str]:
    nh, nkv = cfg.heads, cfg.kv_heads or cfg.heads
    problems = []
    if nh % tp:
        problems.append(f"model.heads={nh} is not divisible by parallel.tp={tp} (each rank computes heads/tp heads)")
    if nkv % tp and tp % nkv:
        problems.append(
            f"model.kv_heads={nkv} and parallel.tp={tp}: KV heads are split when kv_heads % tp == 0 and "
            "replicated when tp % kv_heads == 0; neither holds"
        )
    if cfg.ffn_hidden % tp:
        up = -(-cfg.ffn_hidden // tp) * tp
        problems.append(
            f"model.ffn_hidden={cfg.ffn_hidden} is not divisible by parallel.tp={tp} (set model.ffn_hidden to a "
            f"multiple of {tp}, e.g. {up})"
        )
    if sequence_parallel and cfg.seq_len % tp:
        problems.append(
            f"parallel.sp=true shards the sequence over tp ranks: model.seq_len={cfg.seq_len} "
            f"is not divisible by parallel.tp={tp} (set model.seq_len to a multiple of {tp}, e.g. "
            f"{max(tp, cfg.seq_len // tp * tp)}, or parallel.sp=false)"
        )
    return problems


def validate_tp(cfg: ModelConfig, tp: int, sequence_parallel: bool) -> None:
    """Raise one :class:`UserError` naming every reason ``cfg`` cannot be split ``tp`` ways, and the
    tp values that would work. Pure: runs before any collective. The vocabulary takes no part (it is
    padded to fit any tp), so this runs before the tokenizer has filled ``model.vocab_size``."""
    if cfg.ffn_hidden is None:
        raise UserError("model.ffn_hidden must be resolved (fill_defaults) before the tensor-parallel split")
    problems = _tp_problems(cfg, tp, sequence_parallel)
    if problems:
        fits = tp_values(cfg, sequence_parallel)
        fix = f"; parallel.tp values that fit this model: {', '.join(map(str, fits))}" if fits else ""
        raise UserError("; ".join(problems) + fix)


def tp_values(cfg: ModelConfig, sequence_parallel: bool) -> list[int]:
    """Every ``parallel.tp`` that splits ``cfg`` (with ``parallel.sp`` as given), smallest first."""
    # sp=true needs tp > 1 (config validation): tp=1 is no fix while sp stays on
    return [t for t in range(1 + sequence_parallel, cfg.heads + 1) if not _tp_problems(cfg, t, sequence_parallel)]


def apply_tp(
    model: Transformer | nn.Module, mesh: ParallelMesh, sequence_parallel: bool = False, vocab_pad_to: int = 128
) -> Transformer:
    """Shard ``model`` in place over ``mesh.tp_group`` and return it.

    ``model`` must be initialised (its values are sliced, so rank r holds exactly its slice of the
    single-device parameters). The configuration is validated first, and nothing here communicates,
    so a bad layout fails on every rank before any collective. ``vocab_pad_to``: the vocabulary is
    padded to a multiple of tp * vocab_pad_to (128: Megatron's default, aligned GPU GEMMs).
    """
    cfg, tp, group, sp = model.cfg, mesh.tp_size, mesh.tp_group, sequence_parallel
    validate_tp(cfg, tp, sp)
    if tp == 1:
        return model
    if vocab_pad_to < 1:
        raise UserError(f"vocab_pad_to={vocab_pad_to} must be a positive integer")
    if any(isinstance(m, _SHARDED) for m in model.modules()):
        raise ValueError("apply_tp was already applied to this model")
    # A pipeline chunk (parallel/pipeline/partition.py) has the model's submodule names but only
    # its own parts: embed, pos_embed, final_norm, head and loss_fn may each be None.
    if model.embed is not None:
        model.embed = VocabParallelEmbedding.from_embedding(
            model.embed, group, sequence_parallel=sp, pad_to=vocab_pad_to
        )
    if sp and model.pos_embed is not None:
        # Every rank looks up all T positions (cheap, exact); this rank keeps its T/tp. The
        # scatter's backward all-gathers, so pos_embed's grad is complete on every rank.
        model.pos_embed.register_forward_hook(_keep_local_positions(group))
    for block in model.layers:
        _shard_attention(block.attn, group, sp)
        mlp = block.mlp
        if mlp.swiglu:
            mlp.gate_up = ColumnParallelLinear.from_linear(
                mlp.gate_up, group, sequence_parallel=sp, part_sizes=[cfg.ffn_hidden, cfg.ffn_hidden]
            )
        else:
            mlp.up = ColumnParallelLinear.from_linear(mlp.up, group, sequence_parallel=sp)
        mlp.down = RowParallelLinear.from_linear(mlp.down, group, sequence_parallel=sp)
    norms = [m for b in model.layers for m in (b.attn_norm, b.mlp_norm)] + [model.final_norm]
    if sp:
        for norm in [n for n in norms if n is not None]:
            for p in norm.parameters():
                p.sequence_parallel = True  # sees T/tp tokens: grad is a partial sum over TP ranks
    if model.final_norm is not None:
        # The model computes logits as F.linear(final_norm(h), weight), so the head's input mapping
        # runs as a hook on final_norm, for the tied and the untied head alike.
        model.final_norm.register_forward_hook(_enter_head_region(group, sp))
    if model.head is not None:
        padded = padded_vocab_size(cfg.vocab_size, tp, vocab_pad_to)
        model.head = ColumnParallelLinear.from_linear(model.head, group, padded_out_features=padded)
    if model.loss_fn is not None:
        model.loss_fn = VocabParallelLoss(group, cfg.vocab_size)
    return model


def _shard_attention(attn: Attention, group: Group, sp: bool) -> None:
    tp, nh, nkv, hd = comm.group_size(group), attn.n_heads, attn.n_kv_heads, attn.head_dim
    kv_shards = tp if nkv % tp == 0 else nkv  # else tp % nkv == 0: each KV head on tp/nkv ranks
    attn.qkv = ColumnParallelLinear.from_linear(
        attn.qkv,
        group,
        sequence_parallel=sp,
        part_sizes=[nh * hd, nkv * hd, nkv * hd],
        part_shards=[tp, kv_shards, kv_shards],
    )
    attn.proj = RowParallelLinear.from_linear(attn.proj, group, sequence_parallel=sp)
    # Rank r's query heads r*nh/tp ... all read the KV head(s) it holds (GQA groups are contiguous).
    attn.n_heads, attn.n_kv_heads = nh // tp, nkv // kv_shards


def _keep_local_positions(group: Group):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return scatter_to_sequence_parallel_region(out.unsqueeze(0), group)  # (T, H) -> (1, T/tp, H)

    return hook


def _enter_head_region(group: Group, sp: bool):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        # (B, T, H) replicated -> same, all-reduce in backward; SP: (B, T/tp, H) -> (B, T, H)
        return gather_from_sequence_parallel_region(out, group) if sp else copy_to_tp_region(out, group)

    return hook


def _grad(p: nn.Parameter) -> torch.Tensor | None:
    # The data-parallel buffers move each grad into ``param.main_grad`` and free ``param.grad``.
    main = getattr(p, "main_grad", None)
    return p.grad if main is None else main


def allreduce_sequence_parallel_grads(model: nn.Module, group: Group) -> None:
    """Sum, over the TP group, the grads of parameters marked ``sequence_parallel`` (norms, row-
    parallel biases): under SP each rank saw only T/tp tokens. One all-reduce.

    Call once per optimizer step, after the last microbatch's backward AND after the data-parallel
    reduction has finished (``finish_grad_sync``: its async collectives write the same buffers),
    before gradient clipping and the optimizer step (Megatron's finalize_model_grads). Both are
    sums, so the result does not depend on their order. Reads ``param.main_grad`` when the DP
    buffers provide one, else ``param.grad``. A no-op without SP or at tp=1.
    """
    if comm.group_size(group) == 1:  # before the walk over the parameters: it costs ~0.1 ms a step
        return
    marked = [p for p in model.parameters() if getattr(p, "sequence_parallel", False)]
    grads = [g for g in map(_grad, marked) if g is not None]
    if not grads:
        return
    summed = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]), group)
    for g, s in zip(grads, summed.split([g.numel() for g in grads])):
        g.copy_(s.view_as(g))


def grad_norm(model: nn.Module, group: Group) -> torch.Tensor:
    """L2 norm of all gradients of a TP-sharded model, equal on every TP rank and to the single-
    device model's norm: :func:`~megatron_lite.parallel.grad_utils.global_grad_norm` over this
    model's grads, each element counted once (its module docstring says how). Call after
    :func:`allreduce_sequence_parallel_grads`. Under pipeline parallelism the squares must also be
    summed over the pp group (not done here)."""
    segments = [(p, g.float().reshape(-1), 0) for p in model.parameters() if (g := _grad(p)) is not None]
    return global_grad_norm(segments, [group], comm.group_rank(group))


def clip_grad_norm_(model: nn.Module, max_norm: float, group: Group) -> torch.Tensor:
    """TP-aware ``torch.nn.utils.clip_grad_norm_``: scale every grad by min(1, max_norm / (norm +
    1e-6)) with the norm of :func:`grad_norm`, so every TP rank applies the same factor (a per-rank
    norm would give each rank its own factor and the replicated parameters would drift apart).
    Returns the norm before clipping. For one model over TP only; the trainer clips through its
    optimizer (:func:`~megatron_lite.parallel.grad_utils.clip_grad_norm_`: dp, tp and pp)."""
    norm = grad_norm(model, group)
    coef = (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    for g in map(_grad, model.parameters()):
        if g is not None:
            g.mul_(coef)
    return norm


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-device state dict (names, shapes, values; vocab padding stripped) of a model
    sharded by :func:`apply_tp`. A collective: every TP rank must call it."""
    # `_extra_state`: module state that is not a tensor of the model (Transformer Engine's FP8 scaling)
    state = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    for name, module in model.named_modules():
        if isinstance(module, _SHARDED):
            state[f"{name}.weight"] = module.full_weight()
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and module.bias is not None:
            state[f"{name}.bias"] = module.full_bias()
    return state
