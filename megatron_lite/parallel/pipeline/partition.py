"""Split the model's layers into pipeline stages x virtual chunks, and build a rank's chunks.

Layout (Megatron's interleaving): the model is cut into ``pp * vp`` contiguous pieces called
virtual stages; virtual stage ``s`` lives on pipeline rank ``s % pp`` as its local chunk ``s // pp``.
With pp=2, vp=2 and 8 layers: rank 0 holds layers 0-1 (chunk 0) and 4-5 (chunk 1), rank 1 holds
2-3 and 6-7. Virtual stage 0 also holds the embedding, the last one the final norm, head and loss.

Balancing: each virtual stage costs the sum of its layers (1 each) plus the embedding cost (first)
or the head cost (last), all in layer-equivalents of forward FLOPs (:func:`layer_equivalents`).
:func:`partition_layers` picks the contiguous split that minimises the most expensive piece, then
the spread (sum of squares), so 10 equal layers over 4 pieces become 3,3,2,2 rather than 3,3,3,1.

Chunks are cut from the single-device :class:`Transformer` built on the meta device, so every
parameter keeps its GLOBAL name (a chunk with layers 4-5 exposes ``layers.4.attn.qkv.weight``) and
initialises exactly as in the whole model (``init_weights`` seeds each parameter by its name).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError
from megatron_lite.models.transformer import Block, Transformer


@dataclass(frozen=True)
class ChunkSpec:
    """One virtual stage: which rank holds it, as which local chunk, and which layers."""

    stage: int
    """Pipeline rank holding this chunk."""
    chunk: int
    """Local chunk index on that rank (0 .. vp-1)."""
    vstage: int
    """Position in the model: ``chunk * pp + stage``."""
    layers: range
    """Global indices of the transformer blocks in this chunk."""
    first: bool
    """Holds the embedding (and learned positions): its input is token ids."""
    last: bool
    """Holds the final norm, the head and the loss: its output is the loss."""


@dataclass(frozen=True)
class Partition:
    """The whole model's split: ``chunks`` in model (virtual stage) order."""

    pp: int
    vp: int
    num_layers: int
    chunks: tuple[ChunkSpec, ...]

    def for_stage(self, stage: int) -> list[ChunkSpec]:
        """The chunks pipeline rank ``stage`` builds, in local chunk order."""
        return [c for c in self.chunks if c.stage == stage]

    @property
    def layer_counts(self) -> list[int]:
        """Layers per virtual stage, in model order."""
        return [len(c.layers) for c in self.chunks]


def layer_equivalents(cfg: ModelConfig) -> tuple[float, float]:
    """(embedding cost, head cost) in units of one transformer block's forward FLOPs per token.

    A block does ``2 * params`` FLOPs in its matmuls plus ~``2 * T * H`` in causal attention
    (QK^T and AV, each halved by the mask). The head is a (H x V) matmul plus the softmax; the
    embedding is a lookup with no matmul (its cost is the ``H`` adds of positions, ~0 layers).
    E.g. llama, H=4096, V=32000, T=4096: the head weighs ~0.6 layers (the default 256-wide test
    model with its 8192-token vocabulary: ~2.4 layers).
    """
    h, hd = cfg.hidden, cfg.hidden // cfg.heads
    kv = cfg.kv_heads or cfg.heads
    ffn = cfg.ffn_hidden or 4 * h
    mlp_mats = 3 if (cfg.activation or "swiglu") == "swiglu" and cfg.arch == "llama" else 2
    block_params = h * (cfg.heads + 2 * kv) * hd + cfg.heads * hd * h + mlp_mats * h * ffn
    block = 2 * block_params + 2 * cfg.seq_len * h
    vocab = cfg.vocab_size or 1
    return h / block, (2 * h * vocab + 5 * vocab) / block


def check_coverage(layer_ids: Sequence[Sequence[int]], num_layers: int) -> None:
    """Raise unless every layer ``0 .. num_layers-1`` appears exactly once over all pieces."""
    seen: dict[int, int] = {}
    for piece, ids in enumerate(layer_ids):
        for i in ids:
            if i in seen:
                raise UserError(f"layer {i} is built twice: in pipeline pieces {seen[i]} and {piece}")
            seen[i] = piece
    missing = sorted(set(range(num_layers)) - set(seen))
    extra = sorted(set(seen) - set(range(num_layers)))
    if missing or extra:
        raise UserError(
            f"pipeline pieces must hold layers 0..{num_layers - 1} exactly once; "
            f"missing {missing}, out of range {extra}"
        )


def _balanced_counts(num_layers: int, pieces: int, embed_cost: float, head_cost: float) -> list[int]:
    """Contiguous split minimising (max piece cost, sum of squared piece costs); >= 1 layer each.

    Dynamic programme over (pieces used, layers used), searched only where a split can beat the
    even split's worst piece ``bound`` (:func:`_even_worst`): a piece costing more loses, so piece
    ``k`` ends within ``[L - (P-k) bound, k bound]`` and spans at most ``bound`` layers. That keeps
    the exact answer of the full O(P L^2) search (ties too: only losing candidates are skipped) in
    about O(P L) steps: 1000 layers over 64 pieces in milliseconds. Each piece's start is taken
    only from the ends the previous piece reached (a window of about P x (embed + head + 2) layers),
    so a very deep model costs no more than a shallow one: ``model.layers=2**31`` is planned at once.
    """
    inf = (float("inf"), float("inf"))
    bound = _even_worst(num_layers, pieces, embed_cost, head_cost)
    # the most layers a piece within the bound can hold (+1: no float rounding may cut a split out)
    span = int(bound - min(0.0, embed_cost, head_cost, embed_cost + head_cost)) + 1
    best = [dict[int, tuple[float, float]]() for _ in range(pieces + 1)]
    cut = [dict[int, int]() for _ in range(pieces + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, pieces + 1):
        extra = (embed_cost if k == 1 else 0.0) + (head_cost if k == pieces else 0.0)
        lo = max(k, num_layers - (pieces - k) * span)
        reached = sorted(best[k - 1])  # ascending, as the ties' order requires
        for n in range(lo, min(num_layers - (pieces - k), k * span) + 1):
            start = max(k - 1, n - span)
            for prev in reached[bisect.bisect_left(reached, start) : bisect.bisect_left(reached, n)]:
                cost = n - prev + extra
                if cost > bound:
                    continue
                worst, squares = best[k - 1][prev]
                cand = (max(worst, cost), squares + cost * cost)
                if cand < best[k].get(n, inf):
                    best[k][n], cut[k][n] = cand, prev
    counts, n = [], num_layers
    for k in range(pieces, 0, -1):
        counts.append(n - cut[k][n])
        n = cut[k][n]
    return counts[::-1]


def _even_worst(num_layers: int, pieces: int, embed_cost: float, head_cost: float) -> float:
    """The worst piece cost of the split with equal layer counts (the larger ones first): a split the
    search may always fall back on, so no optimal piece costs more."""
    q, r = divmod(num_layers, pieces)
    counts = [q + 1] * r + [q] * (pieces - r)
    extras = [(embed_cost if k == 0 else 0.0) + (head_cost if k == pieces - 1 else 0.0) for k in range(pieces)]
    return max(n + extra for n, extra in zip(counts, extras))  # the same float sums as the search


def partition_layers(
    num_layers: int,
    pp: int,
    vp: int = 1,
    layer_counts: Sequence[int] | None = None,
    embed_cost: float = 0.0,
    head_cost: float = 0.0,
) -> Partition:
    """Split ``num_layers`` blocks over ``pp`` ranks x ``vp`` chunks (see the module docstring).

    ``layer_counts``: explicit layers per virtual stage in model order (``pp * vp`` entries; for
    vp=1 simply per rank), e.g. ``[3, 4, 4, 3]``; otherwise balanced by cost. Every virtual stage
    gets at least one layer, so a split that cannot give each one is an error showing the numbers.
    """
    if pp < 1 or vp < 1:
        raise UserError(f"parallel.pp and parallel.vp must be positive: parallel.pp={pp}, parallel.vp={vp}")
    pieces = pp * vp
    if layer_counts is None:
        if num_layers < pieces:
            raise UserError(
                f"cannot split model.layers={num_layers} into parallel.pp x parallel.vp = {pp} x {vp} = {pieces} "
                f"pipeline chunks of at least one layer each; make parallel.pp x parallel.vp at most {num_layers}, "
                f"or raise model.layers to at least {pieces}"
            )
        counts = _balanced_counts(num_layers, pieces, embed_cost, head_cost)
    else:
        counts = list(layer_counts)
        if len(counts) != pieces or min(counts) < 1 or sum(counts) != num_layers:
            raise UserError(
                f"layer counts {counts} do not fit: need parallel.pp x parallel.vp = {pp} x {vp} = {pieces} entries, "
                f"each >= 1, summing to model.layers = {num_layers} (got {len(counts)} entries "
                f"summing to {sum(counts)})"
            )
    chunks, start = [], 0
    for s, n in enumerate(counts):
        chunks.append(ChunkSpec(s % pp, s // pp, s, range(start, start + n), s == 0, s == pieces - 1))
        start += n  # contiguous ranges from counts summing to num_layers: each layer once
    return Partition(pp, vp, num_layers, tuple(chunks))


def plan_for_model(cfg: ModelConfig, pp: int, vp: int = 1, layer_counts: Sequence[int] | None = None) -> Partition:
    """:func:`partition_layers` for ``cfg``, with its embedding and head costs."""
    embed_cost, head_cost = layer_equivalents(cfg)
    return partition_layers(cfg.layers, pp, vp, layer_counts, embed_cost, head_cost)


class LayerSlice(nn.Module):
    """A chunk's blocks, registered under their GLOBAL layer index (``layers.4.attn...``).

    Iterates in layer order like the model's ``nn.ModuleList``; indexing takes the global index.
    """

    def __init__(self, blocks: dict[int, Block]) -> None:
        super().__init__()
        for i, block in sorted(blocks.items()):
            self.add_module(str(i), block)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[str(index)]


class PipelineChunk(nn.Module):
    """One virtual stage of the model, with the model's own submodule names.

    ``forward(inputs, labels=None)``: token ids (B, T) on the first chunk, else hidden states
    (B, T, H); returns hidden states (B, T, H), or on the last chunk the mean loss when ``labels``
    are given (logits (B, T, V) without). The last chunk of a tied model holds its own copy of
    ``embed`` for the head; the runtime keeps both copies equal (see ``runtime.py``).
    """

    # The model's own code, not a copy: a chunk's maths is the model's by construction.
    rope = Transformer.rope
    embed_tokens = Transformer.embed_tokens
    run_layers = Transformer.run_layers
    layer_context = Transformer.layer_context
    output_logits = Transformer.output_logits
    init_weights = Transformer.init_weights

    def __init__(self, model: Transformer, spec: ChunkSpec) -> None:
        super().__init__()
        self.cfg, self.spec = model.cfg, spec
        self.is_first, self.is_last = spec.first, spec.last
        tied_head = spec.last and model.head is None
        self.embed = model.embed if spec.first or tied_head else None
        self.pos_embed = model.pos_embed if spec.first else None
        self.layers = LayerSlice({i: model.layers[i] for i in spec.layers})
        self.final_norm = model.final_norm if spec.last else None
        self.head = model.head if spec.last else None
        self.loss_fn = model.loss_fn if spec.last else None
        self.recompute = model.recompute
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if inputs.is_floating_point():
            h = inputs
        elif self.is_first:
            h = self.embed_tokens(inputs)
        else:
            raise ValueError(f"chunk {self.spec.vstage} takes hidden states, got {inputs.dtype} ids")
        h = self.run_layers(h)
        if not self.is_last:
            return h
        logits = self.output_logits(h)
        return logits if labels is None else self.loss_fn(logits, labels)


def build_chunk(cfg: ModelConfig, spec: ChunkSpec, seed: int, device: torch.device | str = "cpu") -> PipelineChunk:
    """Build one chunk on the meta device, materialise only its parameters, init them by name."""
    with torch.device("meta"):
        chunk = PipelineChunk(Transformer(cfg), spec)
    chunk.to_empty(device=device)
    chunk.init_weights(seed)
    return chunk


def build_stage_chunks(
    cfg: ModelConfig, partition: Partition, stage: int, seed: int, device: torch.device | str = "cpu"
) -> list[PipelineChunk]:
    """The chunks of pipeline rank ``stage``, in local chunk order (the runtime's ``chunks``)."""
    if cfg.layers != partition.num_layers:
        raise UserError(f"partition is for {partition.num_layers} layers but model.layers={cfg.layers}")
    return [build_chunk(cfg, spec, seed, device) for spec in partition.for_stage(stage)]
