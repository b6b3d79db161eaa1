"""Split backward (zero-bubble I then W) equals one full backward, for every kind of chunk.

Exact: I and W run the same autograd nodes on the same tensors as a full backward, only in two
calls, so input and weight gradients match bitwise.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from megatron_lite.config import fill_defaults, load_config
from megatron_lite.parallel.pipeline.backward import backward_input
from megatron_lite.parallel.pipeline.partition import build_chunk, partition_layers


def _cfg(*overrides: str):
    cfg = load_config(None, ["model.layers=3", "model.hidden=32", "model.heads=4", "model.seq_len=8", *overrides])
    return fill_defaults(cfg, vocab_size=61).model


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("gpt2", True)])
@pytest.mark.parametrize("vstage", [0, 1, 2])
def test_split_backward_equals_full_backward(arch, tied, vstage):
    cfg = _cfg(f"model.arch={arch}", f"model.tie_embeddings={tied}")
    spec = partition_layers(3, 3).chunks[vstage]
    full, split = build_chunk(cfg, spec, seed=1), build_chunk(cfg, spec, seed=1)
    g = torch.Generator().manual_seed(vstage)
    ids, labels = torch.randint(0, 61, (2, 8), generator=g), torch.randint(0, 61, (2, 8), generator=g)
    hidden = torch.randn(2, 8, 32, generator=g)

    def chunk_input(chunk):
        # the runtime cuts the first chunk after its embedding, so every chunk's input is a leaf
        embedded = chunk.embed_tokens(ids) if spec.first else None
        return embedded, (hidden if embedded is None else embedded).detach().requires_grad_()

    # reference: one plain backward through the whole chunk, embedding included
    x_full = full.embed_tokens(ids) if spec.first else hidden.clone().requires_grad_()
    x_full.retain_grad()
    out = full(x_full, labels) if spec.last else full(x_full)
    grad = torch.ones(()) if spec.last else torch.randn(out.shape, generator=g)
    out.backward(grad)

    embedded, x = chunk_input(split)
    edge = get_gradient_edge(split(x, labels) if spec.last else split(x))  # the output itself is dropped
    dx, weight_grad = backward_input(edge, grad, x, list(split.parameters()))
    assert torch.equal(dx, x_full.grad)
    assert all(p.grad is None for p in split.parameters()), "I must leave the weight gradients to W"
    weight_grad.run()
    if embedded is not None:
        embedded.backward(dx)
    for (name, p_full), p in zip(full.named_parameters(), split.parameters()):
        assert torch.equal(p.grad, p_full.grad), name


class _BothGrads(torch.autograd.Function):
    """y = x @ w.T computing both gradients in one backward, like the tensor-parallel linears."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        return gy @ w, gy.t() @ x


def test_custom_functions_and_shared_weights_stay_exact():
    torch.manual_seed(0)
    lin, w = nn.Linear(6, 6), nn.Parameter(torch.randn(6, 6))
    x0 = torch.randn(4, 6)

    def run(x):
        h = torch.tanh(_BothGrads.apply(x, w))
        return (lin(h) * lin(x)).sum()  # lin's weight on two paths: two intermediates, one group

    x_ref = x0.clone().requires_grad_()
    run(x_ref).backward()
    expected = [p.grad.clone() for p in (w, lin.weight, lin.bias)]
    for p in (w, lin.weight, lin.bias):
        p.grad = None
    x = x0.clone().requires_grad_()
    dx, weight_grad = backward_input(run(x), torch.ones(()), x, [w, lin.weight, lin.bias])
    weight_grad.run()
    torch.testing.assert_close(dx, x_ref.grad, rtol=0, atol=0)
    # exact: lin's two contributions are added once in either run, and a + b == b + a in floating point
    for p, e in zip((w, lin.weight, lin.bias), expected):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)


def test_an_output_that_ignores_its_input_cannot_be_split():
    w = nn.Parameter(torch.ones(3))
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="does not depend on its input"):
        backward_input((w * 2).sum() + 0 * x.detach().sum(), torch.ones(()), x, [w])


def test_split_backward_with_activation_recompute():
    cfg = _cfg()
    spec = partition_layers(3, 3).chunks[1]
    full, split = build_chunk(cfg, spec, seed=1), build_chunk(cfg, spec, seed=1)
    # blocks run under torch.utils.checkpoint: I recomputes, W reuses the graph (selective
    # recomputation allows one backward per region: plan.check_layout refuses it with zb-h1)
    split.recompute = "full"
    hidden, grad = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    x_full = hidden.clone().requires_grad_()
    full(x_full).backward(grad)
    x = hidden.clone().requires_grad_()
    dx, weight_grad = backward_input(get_gradient_edge(split(x)), grad, x, list(split.parameters()))
    weight_grad.run()
    assert torch.equal(dx, x_full.grad)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(split.parameters(), full.parameters()))
