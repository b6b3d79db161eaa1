"""Global coordinates: boxes of global tensors, and where each rank's local parameter sits in them.

A :data:`Box` is one ``(start, stop)`` per dimension of a global tensor (the single-device
model's tensor, vocabulary padding excluded). Everything a rank holds is described as boxes:

- a TP shard, through :func:`param_blocks`: a :class:`Block` is a run of the flattened LOCAL
  parameter, contiguous in local order, that is one box of the global tensor of the same shape.
  ColumnParallelLinear: one block per fused part (qkv: q, k, v rows), from the layer's own layout
  function, padding rows dropped; RowParallelLinear: its column range; VocabParallelEmbedding: its
  vocabulary rows up to the real vocabulary; anything else: the whole (replicated) tensor;
- a flat range of a block (a distributed-optimizer shard ends anywhere in a parameter), through
  :func:`flat_range_boxes`: at most ``2 * ndim - 1`` boxes, each contiguous in flat order.

``Block.writer`` marks the tensor-parallel rank that writes a block when several hold it: TP rank 0
for replicated tensors, the first replica for KV heads replicated over ``tp / kv_heads`` ranks;
never a pipeline stage's copy of a tied embedding (the first stage writes it).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from megatron_lite.parallel.grad_utils import TIED_COPY_ATTR
from megatron_lite.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    _part_layout,  # the layer's own row layout, so the checkpoint can never disagree with the layer
)

Box = tuple[tuple[int, int], ...]


def full_box(shape: tuple[int, ...] | torch.Size) -> Box:
    """The box covering a whole tensor of ``shape``."""
    return tuple((0, d) for d in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def box_numel(box: Box) -> int:
    return math.prod(box_shape(box))


def tiles(shape: tuple[int, ...] | list[int], boxes: list) -> bool:
    """Whether ``boxes`` (each inside ``shape``) hold every element of a tensor of ``shape`` exactly once.

    O(len(boxes) * 2**ndim) whatever the boxes' layout: a box's indicator is the sum, over its
    corners, of +1 or -1 (-1 per stop coordinate) times the indicator of the quadrant starting at
    that corner; the boxes tile the tensor iff these corner weights add up to those of the whole
    tensor's box. Boxes that overlap where others leave a hole (the element counts still agree)
    leave some corner's weights unequal.
    """
    weights: Counter[tuple[int, ...]] = Counter()
    for box, sign in [(full_box(tuple(shape)), -1)] + [(b, 1) for b in boxes]:
        for corner in itertools.product(*(((a, 1), (b, -1)) for a, b in box)):
            weights[tuple(c for c, _ in corner)] += sign * math.prod(s for _, s in corner)
    return not any(weights.values())


def intersect(a: Box, b: Box) -> Box | None:
    """The common box of ``a`` and ``b``, or None when they do not overlap."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return out if all(lo < hi for lo, hi in out) else None


def relative(inner: Box, outer: Box) -> tuple[slice, ...]:
    """Slices selecting ``inner`` inside a tensor shaped like ``outer`` (which contains it)."""
    return tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(inner, outer, strict=True))


def flat_range_boxes(shape: tuple[int, ...], lo: int, hi: int) -> list[Box]:
    """Elements ``[lo, hi)`` of a row-major tensor of ``shape``, as boxes in flat order.

    Each box is contiguous in the flattened tensor and its own row-major order is the flat order,
    so the i-th box holds the next ``box_numel`` elements of the range: a partial first row, the
    full rows, a partial last row (recursively for more dimensions).
    """
    if lo >= hi:
        return []
    if len(shape) <= 1:
        return [((lo, hi),)] if shape else [()]
    inner = math.prod(shape[1:])
    (r0, c0), (r1, c1) = divmod(lo, inner), divmod(hi, inner)
    rest = shape[1:]
    if r0 == r1:
        return [((r0, r0 + 1), *b) for b in flat_range_boxes(rest, c0, c1)]
    boxes: list[Box] = []
    if c0:
        boxes += [((r0, r0 + 1), *b) for b in flat_range_boxes(rest, c0, inner)]
        r0 += 1
    if r0 < r1:
        boxes.append(((r0, r1), *full_box(rest)))
    if c1:
        boxes += [((r1, r1 + 1), *b) for b in flat_range_boxes(rest, 0, c1)]
    return boxes


@dataclass(frozen=True)
class Block:
    """Elements ``[start, start + box_numel(box))`` of the flattened local parameter = ``box`` of
    the global tensor (same shape, same row-major order). ``writer``: this rank writes it."""

    start: int
    box: Box
    writer: bool


def _column_blocks(m: ColumnParallelLinear, p: nn.Parameter) -> list[Block]:
    inner, blocks, local_row = math.prod(p.shape[1:]), [], 0
    layout = _part_layout(m.part_sizes, m.part_shards, m.tp, m.rank)
    for (offset, chunk, index), shards in zip(layout, m.part_shards, strict=True):
        g0 = offset + index * chunk
        g1 = min(g0 + chunk, m.out_features)  # rows past out_features are vocabulary padding
        if g1 > g0:
            first_replica = m.rank % (m.tp // shards) == 0
            blocks.append(Block(local_row * inner, ((g0, g1), *full_box(p.shape[1:])), first_replica))
        local_row += chunk
    return blocks


def param_blocks(module: nn.Module, attr: str, p: nn.Parameter, tp_rank: int) -> tuple[tuple[int, ...], list[Block]]:
    """(global shape, blocks) of parameter ``attr`` of ``module`` on this rank (module docstring)."""
    if isinstance(module, ColumnParallelLinear):
        shape, blocks = (module.out_features, *p.shape[1:]), _column_blocks(module, p)
    elif isinstance(module, RowParallelLinear) and attr == "weight":
        n = p.shape[1]
        shape = (p.shape[0], module.in_features)
        blocks = [Block(0, ((0, p.shape[0]), (module.rank * n, (module.rank + 1) * n)), True)]
    elif isinstance(module, VocabParallelEmbedding):
        shape = (module.num_embeddings, p.shape[1])
        lo, hi = module.vocab_start, min(module.vocab_start + p.shape[0], module.num_embeddings)
        blocks = [Block(0, ((lo, hi), (0, p.shape[1])), True)] if hi > lo else []
    else:  # replicated over tp (norms, row-parallel biases, positions; everything at tp=1)
        shape, blocks = tuple(p.shape), [Block(0, full_box(p.shape), tp_rank == 0)]
    if getattr(p, TIED_COPY_ATTR, False):
        blocks = [Block(b.start, b.box, False) for b in blocks]
    return shape, blocks


def named_params(chunk: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Parameter name -> (owning module, attribute) in one model chunk. Pipeline chunks keep the
    model's names (``layers.5.attn.qkv.weight``), so these are global names."""
    out: dict[str, tuple[nn.Module, str]] = {}
    for prefix, module in chunk.named_modules():
        for attr, _ in module.named_parameters(recurse=False):
            out.setdefault(f"{prefix}.{attr}" if prefix else attr, (module, attr))
    return out
