"""This rank's model and optimizer state as boxes of global tensors, out and back in (resharding).

Both optimizers are seen as SEGMENTS: a run ``[lo, hi)`` of one flattened local parameter with its
fp32 values per state kind (``model``: the master weights, ``exp_avg``, ``exp_avg_sq``).
:class:`~megatron_lite.parallel.optimizer.DistributedAdamW` has one segment per (parameter, dp
shard) overlap, read from its ``state_dict()``; ``ReplicatedAdamW`` one per parameter (its fp32
master: the parameter itself in fp32 runs). A segment crosses the parameter's TP blocks
(``boxes.param_blocks``) and each overlap becomes boxes in global coordinates
(``boxes.flat_range_boxes``).

Saving (:func:`collect_pieces`) keeps the boxes this rank writes: the TP writer of each block, and
for the replicated optimizer only data-parallel rank 0. Loading (:func:`restore`) walks the NEW
layout's segments the same way and reads each box from whatever boxes the checkpoint has, so
any (tp, pp, vp, dp, distributed or not) loads into any other. The model parameters are then
refreshed from the loaded masters by the optimizer itself (``load_state_dict``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from megatron_lite.checkpoint.boxes import (
    Block,
    Box,
    box_numel,
    box_shape,
    flat_range_boxes,
    named_params,
    param_blocks,
)
from megatron_lite.checkpoint.format import METADATA
from megatron_lite.config import Config, ModelConfig
from megatron_lite.errors import UserError
from megatron_lite.launcher.fail_fast import fail_fast_setup
from megatron_lite.models.transformer import state_shapes
from megatron_lite.parallel.data_parallel import DataParallelGrads
from megatron_lite.parallel.optimizer import DistributedAdamW, ReplicatedAdamW

_MASTER = {"model": "master", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}  # kind -> DistributedAdamW key


@dataclass
class Piece:
    """One box of a global tensor that this rank writes; ``tensor`` is shaped like the box."""

    name: str
    shape: tuple[int, ...]
    box: Box
    tensor: torch.Tensor


@dataclass
class _Segment:
    name: str
    module: nn.Module
    attr: str
    param: nn.Parameter
    lo: int
    hi: int
    values: dict[str, torch.Tensor]  # kind -> (hi - lo,) fp32


class BoxReader(Protocol):
    """What :func:`restore` needs of a checkpoint (``reader.CheckpointReader``)."""

    def shapes(self, kind: str) -> dict[str, tuple[int, ...]]: ...

    def read_box(self, name: str, box: Box) -> torch.Tensor: ...


def _segment_boxes(seg: _Segment, blocks: list[Block]) -> Iterator[tuple[Box, slice, bool]]:
    """(global box, slice of the segment's values, writer) for every overlap of ``seg`` and a block."""
    for b in blocks:
        a, z = max(seg.lo, b.start), min(seg.hi, b.start + box_numel(b.box))
        offset = a - seg.lo
        for rel in flat_range_boxes(box_shape(b.box), a - b.start, z - b.start):
            n = box_numel(rel)
            glob = tuple((o + r0, o + r1) for (o, _), (r0, r1) in zip(b.box, rel, strict=True))
            yield glob, slice(offset, offset + n), b.writer
            offset += n


def _modules(ddp: DataParallelGrads) -> list[dict[str, tuple[nn.Module, str]]]:
    return [named_params(chunk) for chunk in ddp.chunks]


def _distributed_segments(ddp: DataParallelGrads, state: dict, flat: dict[str, torch.Tensor]) -> list[_Segment]:
    """Segments of a DistributedAdamW ``state_dict()`` whose values are views of ``flat`` (kind ->
    flat shard tensor)."""
    modules, by_name = _modules(ddp), [{n: p for p, n in b.names.items()} for b in ddp.buffers]
    segments = []
    for s in state["segments"]:
        c, name, (lo, hi), (s0, s1) = s["chunk"], s["name"], s["param_range"], s["shard_range"]
        module, attr = modules[c][name]
        values = {kind: t[s0:s1] for kind, t in flat.items()}
        segments.append(_Segment(name, module, attr, by_name[c][name], lo, hi, values))
    return segments


def _replicated_segments(ddp: DataParallelGrads, optimizer: ReplicatedAdamW, fresh: bool) -> list[_Segment]:
    """One segment per parameter: its fp32 master and moments (zeros before the first step), or
    zero buffers to fill when ``fresh``."""
    modules, segments = _modules(ddp), []
    masters = dict(zip(map(id, optimizer.params), optimizer.masters, strict=True))
    for c, buffer in enumerate(ddp.buffers):
        for p in buffer.params:
            name, m = buffer.names[p], masters[id(p)]
            state = {} if fresh else optimizer.optimizer.state.get(m, {})
            values = {"model": torch.zeros_like(m).view(-1) if fresh else m.detach().view(-1)}
            for kind in ("exp_avg", "exp_avg_sq"):
                values[kind] = state[kind].view(-1) if kind in state else torch.zeros_like(m).view(-1)
            segments.append(_Segment(name, *modules[c][name], p, 0, p.numel(), values))
    return segments


def _replicated_step(optimizer: ReplicatedAdamW) -> int:
    states = list(optimizer.optimizer.state.values())
    return int(states[0]["step"]) if states else 0


def collect_pieces(
    ddp: DataParallelGrads, optimizer: DistributedAdamW | ReplicatedAdamW, tp_rank: int, dp_rank: int
) -> tuple[list[Piece], int]:
    """(the boxes this rank writes, the optimizer's step count). Tensors are views of live state:
    copy them before training continues."""
    if optimizer.sharded:
        state = optimizer.state_dict()
        segments = _distributed_segments(ddp, state, {k: state[v] for k, v in _MASTER.items()})
        step, dp_writes = state["step"], True
    else:
        segments, step, dp_writes = (
            _replicated_segments(ddp, optimizer, fresh=False),
            _replicated_step(optimizer),
            dp_rank == 0,
        )
    pieces = []
    for seg in segments:
        shape, blocks = param_blocks(seg.module, seg.attr, seg.param, tp_rank)
        for box, sl, writer in _segment_boxes(seg, blocks):
            if writer and dp_writes:
                for kind, values in seg.values.items():
                    pieces.append(Piece(f"{kind}/{seg.name}", shape, box, values[sl].view(box_shape(box))))
    return pieces, step


def shape_problems(model: ModelConfig, reader: BoxReader, kinds: tuple[str, ...]) -> str | None:
    """Every tensor the checkpoint lacks, has extra, or has in another shape than the single-device
    model of ``model`` (built on the meta device: no memory, no init), in one line; None when it fits.
    Global, so every rank of every pipeline stage reaches the same verdict."""
    expected = state_shapes(model)
    problems = []
    for kind in kinds:
        saved = reader.shapes(kind)
        for name in sorted(expected.keys() | saved.keys()):
            want, got = expected.get(name), saved.get(name)
            if want != got:
                have = list(got) if got else "missing"
                problems.append(f"{kind}/{name}: checkpoint {have}, model {list(want) if want else 'none'}")
    if not problems:
        return None
    return "; ".join(problems[:12]) + (f"; ... {len(problems) - 12} more" if len(problems) > 12 else "")


def check_shapes(model: ModelConfig, reader: BoxReader, kinds: tuple[str, ...]) -> None:
    """One UserError listing :func:`shape_problems`, if any."""
    if shown := shape_problems(model, reader, kinds):
        raise UserError(f"the checkpoint does not fit this model (changed model.* settings?): {shown}")


def check_saved_config(location: str, config: Config, stored: dict[str, tuple[int, ...]]) -> None:
    """The stored model tensors (``stored``: name -> shape) must be the ones the checkpoint's own model
    ``config`` builds: readers that build the model from it (``eval``, ``convert``) would otherwise
    fail deep in a load or a transform, with a traceback, on a hand-edited or damaged ``metadata.json``."""
    fix = f"{METADATA}'s config was edited or damaged; restore it, or use another checkpoint"
    if config.model.layers > len(stored):  # each layer holds several tensors; building 10**9 would exhaust memory
        raise UserError(
            f"checkpoint {location}: its model config says model.layers={config.model.layers}, more layers than "
            f"its {len(stored)} stored model tensors can hold; {fix}"
        )
    try:
        expected = state_shapes(config.model)
    except Exception as e:  # a model.* value no model can have (hidden not divisible by heads...)
        raise UserError(
            f"checkpoint {location}: its model config builds no model ({type(e).__name__}: {e}); {fix}"
        ) from None
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or extra:
        raise UserError(
            f"checkpoint {location}: its tensors are not those of its model config (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); {fix}"
        )
    name = next((n for n in expected if tuple(stored[n]) != expected[n]), None)
    if name is not None:
        raise UserError(
            f"checkpoint {location}: {name} is stored with shape {tuple(stored[name])}, but its model config "
            f"makes it {expected[name]}; {fix}"
        )


def check_saved_tokenizer(location: str, config: Config, pieces: int) -> None:
    """The checkpoint's ``tokenizer.model`` (of ``pieces`` pieces) must give no id past its model's embedding:
    ``eval`` and ``convert`` would otherwise stop with an IndexError on the first text they encode."""
    vocab = config.model.vocab_size
    if pieces > vocab:
        raise UserError(
            f"checkpoint {location}: its tokenizer.model has {pieces} pieces, more than its model.vocab_size={vocab}: "
            f"ids {vocab} and up have no embedding row, so it is not the tokenizer these weights were trained with; "
            "use a checkpoint saved with their own tokenizer (for an import: convert from-hf again, with the model's "
            "own tokenizer.model in its directory)"
        )


def _fill(segments: list[_Segment], reader: BoxReader, tp_rank: int) -> None:
    for seg in segments:
        _, blocks = param_blocks(seg.module, seg.attr, seg.param, tp_rank)
        for box, sl, _ in _segment_boxes(seg, blocks):
            for kind, values in seg.values.items():
                values[sl].view(box_shape(box)).copy_(reader.read_box(f"{kind}/{seg.name}", box))


@torch.no_grad()
def restore(
    ddp: DataParallelGrads,
    optimizer: DistributedAdamW | ReplicatedAdamW,
    model: ModelConfig,
    tp_rank: int,
    reader: BoxReader,
    step: int,
) -> None:
    """Load masters, moments and ``step`` for this rank's layout from ``reader``; the optimizer
    then refreshes the model parameters from the masters (an all-gather over dp when sharded).

    Every rank reads first (no collective) and all ranks agree on success before any of them
    enters the refresh, so one rank's bad read fails every rank at once instead of hanging them.
    """
    with fail_fast_setup("reading the checkpoint"):
        check_shapes(model, reader, tuple(_MASTER))
        if optimizer.sharded:
            state = optimizer.state_dict()
            flat = {kind: torch.zeros_like(state["master"]) for kind in _MASTER}
            _fill(_distributed_segments(ddp, state, flat), reader, tp_rank)
        else:
            segments = _replicated_segments(ddp, optimizer, fresh=True)
            _fill(segments, reader, tp_rank)
    if optimizer.sharded:
        state.update({v: flat[k] for k, v in _MASTER.items()}, step=step)
        optimizer.load_state_dict(state)
    else:
        _load_replicated(optimizer, {id(seg.param): seg.values for seg in segments}, step)


def _load_replicated(optimizer: ReplicatedAdamW, loaded: dict[int, dict[str, torch.Tensor]], step: int) -> None:
    """Masters (and fp32 parameters) and torch AdamW's state from ``loaded`` (param id -> values)."""
    masters = []
    for p, m in zip(optimizer.params, optimizer.masters, strict=True):
        m.copy_(loaded[id(p)]["model"].view_as(m))  # m is p itself for fp32 parameters
        if m is not p:
            masters.append(m)  # load_state_dict copies them into the low-precision parameters
    by_master = {id(m): loaded[id(p)] for p, m in zip(optimizer.params, optimizer.masters, strict=True)}
    torch_state = optimizer.optimizer.state_dict()
    order = [m for g in optimizer.optimizer.param_groups for m in g["params"]]  # torch's state indices
    torch_state["state"] = {
        i: {
            "step": torch.tensor(float(step)),  # torch keeps it as an fp32 CPU tensor
            "exp_avg": by_master[id(m)]["exp_avg"].view_as(m),
            "exp_avg_sq": by_master[id(m)]["exp_avg_sq"].view_as(m),
        }
        for i, m in enumerate(order)
        if step > 0  # torch creates the moments at the first step
    }
    optimizer.load_state_dict({"kind": "replicated_adamw", "optimizer": torch_state, "masters": masters})
