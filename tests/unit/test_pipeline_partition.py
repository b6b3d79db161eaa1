"""Layers -> pipeline stages x virtual chunks: balance, explicit splits, errors, and chunks that keep
the model's global parameter names, values and maths."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_lite.config import ModelConfig, fill_defaults, load_config
from megatron_lite.errors import UserError
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel.pipeline.partition import (
    build_chunk,
    build_stage_chunks,
    check_coverage,
    layer_equivalents,
    partition_layers,
    plan_for_model,
)


def _cfg(*overrides: str) -> ModelConfig:
    cfg = load_config(None, ["model.layers=6", "model.hidden=32", "model.heads=4", "model.seq_len=8", *overrides])
    return fill_defaults(cfg, vocab_size=61).model


def _piece_costs(counts, embed, head):
    return [n + (embed if i == 0 else 0) + (head if i == len(counts) - 1 else 0) for i, n in enumerate(counts)]


@pytest.mark.parametrize("layers, pieces", [(10, 4), (7, 7), (9, 2), (8, 3)])
@pytest.mark.parametrize("embed, head", [(0.0, 0.0), (0.0, 2.5), (1.0, 0.4), (3.0, 3.0)])
def test_balanced_split_is_optimal(layers, pieces, embed, head):
    counts = partition_layers(layers, pieces, embed_cost=embed, head_cost=head).layer_counts
    best = min(
        (max(_piece_costs(c, embed, head)), sum(x * x for x in _piece_costs(c, embed, head)))
        for c in itertools.product(range(1, layers + 1), repeat=pieces)
        if sum(c) == layers
    )
    costs = _piece_costs(counts, embed, head)
    # approx (rel 1e-6): the search adds the same float costs in another order than _piece_costs
    assert (max(costs), sum(x * x for x in costs)) == pytest.approx(best)


def _full_search(layers, pieces, embed, head):
    """Every (pieces used, layers used) state and every cut: the O(P L^2) programme the windowed
    search must agree with to the layer, ties included (so a layout never moves between versions)."""
    inf = (float("inf"), float("inf"))
    best = [[inf] * (layers + 1) for _ in range(pieces + 1)]
    cut = [[0] * (layers + 1) for _ in range(pieces + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, pieces + 1):
        extra = (embed if k == 1 else 0.0) + (head if k == pieces else 0.0)
        for n in range(k, layers - (pieces - k) + 1):
            for prev in range(k - 1, n):
                if best[k - 1][prev] != inf:
                    cost = n - prev + extra
                    cand = (max(best[k - 1][prev][0], cost), best[k - 1][prev][1] + cost * cost)
                    if cand < best[k][n]:
                        best[k][n], cut[k][n] = cand, prev
    counts, n = [], layers
    for k in range(pieces, 0, -1):
        counts.append(n - cut[k][n])
        n = cut[k][n]
    return counts[::-1]


@pytest.mark.parametrize("embed, head", [(0.0, 0.0), (0.05, 2.4), (1.0, 0.4), (3.0, 3.0), (7.3, 0.0), (0.0, 11.0)])
def test_windowed_search_gives_the_full_searchs_split(embed, head):
    for layers in range(1, 25):
        for pieces in range(1, layers + 1):
            got = partition_layers(layers, pieces, embed_cost=embed, head_cost=head).layer_counts
            assert got == _full_search(layers, pieces, embed, head), (layers, pieces)


def test_deep_models_split_at_once():
    """4096 layers over 256 pieces: the full search would take hours in Python; the windowed one,
    which visits only splits that can beat the even one, gives the even split here."""
    counts = partition_layers(4096, 64, vp=4).layer_counts
    assert counts == [16] * 256
    counts = partition_layers(4000, 64, embed_cost=0.1, head_cost=2.4).layer_counts
    # 4000 layers cannot all sit in pieces of at most 62 (64 x 62 < 4000), and 63 is reachable
    assert sum(counts) == 4000 and max(_piece_costs(counts, 0.1, 2.4)) == 63


def test_equal_layers_spread_evenly_and_the_head_takes_layers_away():
    assert sorted(partition_layers(10, 4).layer_counts) == [2, 2, 3, 3]
    counts = partition_layers(12, 4, head_cost=2.0).layer_counts
    assert counts[-1] == 2 and sum(counts) == 12


def test_interleaved_layout_and_explicit_counts():
    part = partition_layers(8, 2, vp=2, layer_counts=[1, 2, 3, 2])
    assert [(c.stage, c.chunk, c.vstage) for c in part.chunks] == [(0, 0, 0), (1, 0, 1), (0, 1, 2), (1, 1, 3)]
    assert [list(c.layers) for c in part.for_stage(0)] == [[0], [3, 4, 5]]
    assert [list(c.layers) for c in part.for_stage(1)] == [[1, 2], [6, 7]]
    assert [c.first for c in part.chunks] == [True, False, False, False]
    assert [c.last for c in part.chunks] == [False, False, False, True]


@pytest.mark.parametrize(
    "args, message",
    [
        ((3, 2, 2), r"cannot split model.layers=3 into parallel.pp x parallel.vp = 2 x 2 = 4 pipeline chunks"),
        (
            (8, 2, 1, [3, 4]),
            r"layer counts \[3, 4\] do not fit.*summing to model.layers = 8 \(got 2 entries summing to 7\)",
        ),
        ((8, 2, 2, [4, 4]), r"need parallel.pp x parallel.vp = 2 x 2 = 4 entries"),
        ((8, 2, 1, [8, 0]), r"each >= 1"),
        ((8, 0, 1), r"parallel.pp=0"),
    ],
)
def test_splits_that_cannot_work_are_errors_with_the_numbers(args, message):
    with pytest.raises(UserError, match=message):
        partition_layers(*args)


def test_coverage_check_names_duplicates_and_gaps():
    check_coverage([range(0, 2), range(2, 5)], 5)
    with pytest.raises(UserError, match="layer 1 is built twice: in pipeline pieces 0 and 1"):
        check_coverage([[0, 1], [1, 2]], 3)
    with pytest.raises(UserError, match=r"missing \[2\], out of range \[5\]"):
        check_coverage([[0, 1], [3, 4, 5]], 5)


def test_layer_equivalents():
    embed, head = layer_equivalents(_cfg("model.hidden=4096", "model.heads=32", "model.seq_len=4096"))
    assert embed < 0.001 and 0.0 < head < 0.002  # vocab 61: the head is tiny here
    # per token, a 4096-wide llama block (ffn 10944) does 2 x 202M FLOPs in matmuls + 2 x 4096 x 4096
    # in attention; the head 2 x 4096 x 32000 in its matmul + ~5 x 32000 in the softmax
    cfg = load_config(None, ["model.hidden=4096", "model.heads=32", "model.seq_len=4096"])
    _, big_head = layer_equivalents(fill_defaults(cfg, 32000).model)
    # rel 1e-6: the same FLOP counts, summed and divided in another order (float rounding only)
    assert big_head == pytest.approx(
        (2 * 4096 + 5) * 32000 / (2 * (4 * 4096**2 + 3 * 4096 * 10944) + 2 * 4096**2), rel=1e-6
    )
    assert plan_for_model(_cfg(), 2).layer_counts == [3, 3]


@pytest.mark.parametrize("tied", [False, True])
def test_chunks_keep_global_names_and_values(tied):
    cfg = _cfg(f"model.tie_embeddings={tied}")
    model = build_model(cfg, seed=3)
    full = dict(model.named_parameters())
    part = partition_layers(6, 2, vp=2, layer_counts=[1, 2, 1, 2])
    seen = {}
    for stage in range(2):
        for chunk in build_stage_chunks(cfg, part, stage, seed=3):
            for name, p in chunk.named_parameters():
                assert torch.equal(p, full[name]), name
                seen.setdefault(name, []).append(chunk.spec.vstage)
    assert seen.keys() == full.keys()
    assert "layers.4.attn.qkv.weight" in seen and seen["layers.4.attn.qkv.weight"] == [3]
    # every parameter on exactly one chunk, except a tied embedding: also on the last (for the head)
    assert seen["embed.weight"] == ([0, 3] if tied else [0])
    assert all(len(v) == 1 for k, v in seen.items() if k != "embed.weight")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunks_in_sequence_compute_the_model(arch):
    cfg = _cfg(f"model.arch={arch}")
    model = build_model(cfg, seed=5)
    ids, labels = torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (2, 8))
    chunks = [build_chunk(cfg, spec, seed=5) for spec in partition_layers(6, 3).chunks]
    h = ids
    for chunk in chunks[:-1]:
        h = chunk(h)
        assert h.shape == (2, 8, 32)
    assert torch.equal(chunks[-1](h, labels), model(ids, labels))
    assert torch.equal(chunks[-1](h), model(ids))
    assert [list(range(len(c.layers))) for c in chunks] == [[0, 1]] * 3
    assert chunks[1].layers[2] is list(chunks[1].layers)[0]  # indexed by global layer id
    with pytest.raises(ValueError, match="chunk 1 takes hidden states"):
        chunks[1](ids)


def test_stage_chunks_must_match_the_partition():
    with pytest.raises(UserError, match="partition is for 4 layers but model.layers=6"):
        build_stage_chunks(_cfg(), partition_layers(4, 2), 0, seed=0)


@pytest.mark.parametrize("pieces", [1, 2, 8])
def test_a_huge_layer_count_splits_at_once(pieces):
    """model.layers=2**31 hung `megatron-lite plan`: the search walked every layer of each piece's span,
    and the coverage check held a set of every layer index."""
    layers = 2**31
    counts = partition_layers(layers, pieces, embed_cost=0.1, head_cost=2.4).layer_counts
    q, r = divmod(layers, pieces)
    even = [q + 1] * r + [q] * (pieces - r)
    assert sum(counts) == layers and max(_piece_costs(counts, 0.1, 2.4)) <= max(_piece_costs(even, 0.1, 2.4))
