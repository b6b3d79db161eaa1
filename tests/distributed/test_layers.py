"""Every TP layer against its unsharded twin: outputs, every gradient and full_weight(), tp in {1, 2, 4}.

tp=1 runs in this process with ``group=None`` (no process group at all); tp=2 and 4 run on the
session's gloo worlds with the WORLD group. Every rank builds the same reference from the same
seed, so the expected values need no communication.

Tolerances: EXACT for pure data movement (weight slices, full_weight(), embedding lookups, the
gathered SP input). Everything computed by a GEMM or a collective sum uses RTOL/ATOL: a row-
parallel output or a column-parallel input grad sums over features split across ranks, and even a
column-parallel output may differ in the last bit because BLAS blocks a (B*T, out/tp) GEMM
differently from a (B*T, out) one (seen: 1.2e-7 absolute on the padded head). fp32
reassociation error is ~1e-7 relative.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_world
from torch import nn
from torch.testing import assert_close

from megatron_lite import kernels
from megatron_lite.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    padded_vocab_size,
    vocab_parallel_cross_entropy,
)

RTOL, ATOL = 1e-5, 1e-6  # reassociated fp32 sums (see the module docstring)
exact = functools.partial(assert_close, rtol=0.0, atol=0.0)
close = functools.partial(assert_close, rtol=RTOL, atol=ATOL)
B, T, IN = 2, 8, 12


def _group(world: int):
    return dist.group.WORLD if world > 1 else None


def _chunk(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world, dim=dim)[rank]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _check_column_plain(rank: int, world: int, sequence_parallel: bool, overlap: bool) -> None:
    torch.manual_seed(0)
    ref = nn.Linear(IN, 4 * world, bias=True)
    x, gy = torch.randn(B, T, IN), torch.randn(B, T, 4 * world)
    x_ref = _leaf(x)
    (ref(x_ref) * gy).sum().backward()
    layer = ColumnParallelLinear.from_linear(
        ref, _group(world), sequence_parallel=sequence_parallel, overlap_grad_comm=overlap
    )
    x_tp = _leaf(_chunk(x, 1, rank, world) if sequence_parallel else x)
    y = layer(x_tp)  # (B, T, out/tp) either way: SP gathers the sequence inside
    close(y, _chunk(ref(x), -1, rank, world))
    (y * _chunk(gy, -1, rank, world)).sum().backward()
    close(x_tp.grad, _chunk(x_ref.grad, 1, rank, world) if sequence_parallel else x_ref.grad)
    close(layer.weight.grad, _chunk(ref.weight.grad, 0, rank, world))
    close(layer.bias.grad, _chunk(ref.bias.grad, 0, rank, world))
    exact(layer.full_weight(), ref.weight)
    exact(layer.full_bias(), ref.bias)


def _qkv_rows(rank: int, world: int, nh: int, nkv: int, hd: int) -> torch.Tensor:
    """Rows of the full [q; k; v] weight that rank ``rank`` must hold, written out by hand."""
    q_per = nh // world
    q = torch.arange(rank * q_per * hd, (rank + 1) * q_per * hd)
    if nkv % world == 0:
        kv_per = nkv // world
        kv_heads = range(rank * kv_per, (rank + 1) * kv_per)
    else:  # replicated: the one KV head serving this rank's query heads
        kv_heads = [rank * q_per // (nh // nkv)]
    k = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kv_heads]) + nh * hd
    return torch.cat([q, k, k + nkv * hd])


def _check_column_fused(rank: int, world: int, nkv: int, gather_output: bool) -> None:
    torch.manual_seed(1)
    nh, hd = 2 * world, 3
    out = (nh + 2 * nkv) * hd
    ref = nn.Linear(IN, out, bias=True)
    x, gy = torch.randn(B, T, IN), torch.randn(B, T, out)
    x_ref = _leaf(x)
    (ref(x_ref) * gy).sum().backward()
    shards = world if nkv % world == 0 else nkv
    layer = ColumnParallelLinear.from_linear(
        ref,
        _group(world),
        gather_output=gather_output,
        part_sizes=[nh * hd, nkv * hd, nkv * hd],
        part_shards=[world, shards, shards],
    )
    rows = _qkv_rows(rank, world, nh, nkv, hd)
    exact(layer.weight, ref.weight[rows])
    x_tp = _leaf(x)
    y = layer(x_tp)
    if gather_output:
        close(y, ref(x))
        (y * gy).sum().backward()
    else:
        close(y, ref(x)[..., rows])
        if shards < world:
            # Each replica of a KV head takes the grad of the query heads on its own rank only; the
            # full grad is the sum over replicas, which the layer's hook must restore.
            gy = gy.clone()
            replica_rows = rows[nh // world * hd :]
            gy[..., replica_rows] /= world // shards
        (y * gy[..., rows]).sum().backward()
    close(x_tp.grad, x_ref.grad)
    close(layer.weight.grad, ref.weight.grad[rows])
    close(layer.bias.grad, ref.bias.grad[rows])
    exact(layer.full_weight(), ref.weight)
    exact(layer.full_bias(), ref.bias)


def _check_column_padded(rank: int, world: int) -> None:
    torch.manual_seed(2)
    vocab, pad_to = 13, 4
    ref = nn.Linear(IN, vocab, bias=False)
    padded = padded_vocab_size(vocab, world, pad_to)
    layer = ColumnParallelLinear.from_linear(ref, _group(world), gather_output=True, padded_out_features=padded)
    assert layer.weight.shape == (padded // world, IN)
    x = torch.randn(B, T, IN)
    close(layer(x), ref(x))
    exact(layer.full_weight(), ref.weight)


def _check_row(rank: int, world: int, sequence_parallel: bool, input_is_parallel: bool) -> None:
    torch.manual_seed(3)
    ref = nn.Linear(4 * world, IN, bias=True)
    x, gy = torch.randn(B, T, 4 * world), torch.randn(B, T, IN)
    x_ref = _leaf(x)
    y_ref = ref(x_ref)
    (y_ref * gy).sum().backward()
    layer = RowParallelLinear.from_linear(
        ref, _group(world), input_is_parallel=input_is_parallel, sequence_parallel=sequence_parallel
    )
    x_tp = _leaf(_chunk(x, -1, rank, world) if input_is_parallel else x)
    y = layer(x_tp)
    if sequence_parallel:
        y_ref, gy = _chunk(y_ref, 1, rank, world), _chunk(gy, 1, rank, world)
    close(y, y_ref)
    (y * gy).sum().backward()
    close(x_tp.grad, _chunk(x_ref.grad, -1, rank, world) if input_is_parallel else x_ref.grad)
    close(layer.weight.grad, _chunk(ref.weight.grad, 1, rank, world))
    bias_grad = layer.bias.grad
    if sequence_parallel:  # a partial sum over this rank's tokens: the trainer all-reduces it
        assert layer.bias.sequence_parallel
        if world > 1:
            dist.all_reduce(bias_grad)
    close(bias_grad, ref.bias.grad)
    exact(layer.full_weight(), ref.weight)


def _check_embedding(rank: int, world: int, sequence_parallel: bool, pad_to: int) -> None:
    torch.manual_seed(4)
    vocab, dim = 13, 6
    ref = nn.Embedding(vocab, dim)
    ids = torch.cat([torch.arange(vocab), torch.randint(0, vocab, (B * T - vocab,))]).view(B, T)
    gy = torch.randn(B, T, dim)
    (ref(ids) * gy).sum().backward()
    layer = VocabParallelEmbedding.from_embedding(
        ref, _group(world), sequence_parallel=sequence_parallel, pad_to=pad_to
    )
    local = padded_vocab_size(vocab, world, pad_to) // world
    assert layer.weight.shape == (local, dim)
    y, y_ref = layer(ids), ref(ids)
    if sequence_parallel:
        y_ref, gy = _chunk(y_ref, 1, rank, world), _chunk(gy, 1, rank, world)
    exact(y, y_ref)
    (y * gy).sum().backward()
    lo, hi = rank * local, min((rank + 1) * local, vocab)
    close(layer.weight.grad[: max(hi - lo, 0)], ref.weight.grad[lo:hi])
    exact(layer.weight.grad[max(hi - lo, 0) :], torch.zeros_like(layer.weight.grad[max(hi - lo, 0) :]))
    exact(layer.full_weight(), ref.weight)


def _check_cross_entropy(rank: int, world: int, pad_to: int) -> None:
    torch.manual_seed(5)
    vocab = 13
    padded = padded_vocab_size(vocab, world, pad_to)
    logits = torch.randn(B, T, vocab) * 3
    target = torch.randint(0, vocab, (B, T))
    target[0, :3] = -100
    full = _leaf(logits)
    F.cross_entropy(full.reshape(-1, vocab), target.reshape(-1), ignore_index=-100).backward()
    # padded columns hold garbage on purpose: only masking keeps them out of the loss
    padded_logits = torch.cat([logits, torch.full((B, T, padded - vocab), 50.0)], dim=-1)
    local = _leaf(_chunk(padded_logits, -1, rank, world))
    loss = vocab_parallel_cross_entropy(local, target, _group(world), vocab_size=vocab)
    close(loss, F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1)))
    loss.backward()
    grad_full = torch.cat([full.grad, torch.zeros(B, T, padded - vocab)], dim=-1)
    close(local.grad, _chunk(grad_full, -1, rank, world))
    # every target ignored: NaN (0 / 0) with zero gradients, as F.cross_entropy and kernels.cross_entropy
    local.grad = None
    all_ignored = vocab_parallel_cross_entropy(local, torch.full_like(target, -100), _group(world), vocab)
    assert all_ignored.isnan()
    all_ignored.backward()
    exact(local.grad, torch.zeros_like(local))


def check_all_layers(rank: int, world: int) -> None:
    for sp in (False, True):
        for overlap in (False, True):
            _check_column_plain(rank, world, sp, overlap)
        _check_row(rank, world, sp, input_is_parallel=True)
        _check_embedding(rank, world, sp, pad_to=1)
    _check_row(rank, world, False, input_is_parallel=False)
    _check_embedding(rank, world, False, pad_to=4)
    for nkv in sorted({world, max(world // 2, 1)}):  # KV heads split, then replicated
        for gather in (False, True):
            _check_column_fused(rank, world, nkv, gather)
    _check_column_padded(rank, world)
    for pad_to in (1, 4, 8):  # 8: at tp=4 the last two ranks hold padding only
        _check_cross_entropy(rank, world, pad_to)


def test_layers_tp1_single_process():
    check_all_layers(0, 1)


def test_row_parallel_refuses_sequence_parallel_with_an_unsplit_input():
    """Under SP the input is sequence-sharded (B, T/tp, in): splitting its features too, then
    reduce-scattering T again, would return (B, T/tp^2, out) on any tp > 1 (Megatron refuses it)."""
    with pytest.raises(ValueError, match="sequence_parallel=True needs input_is_parallel=True"):
        RowParallelLinear(nn.Linear(IN, 4), None, input_is_parallel=False, sequence_parallel=True)


def test_layers_tp2(world2):
    world2.run(check_all_layers)


def test_layers_tp4(world4):
    world4.run(check_all_layers)


def check_cross_entropy_on_triton_partials(rank: int, world: int) -> list[int]:
    """``_check_cross_entropy`` with each rank's partials from the Triton kernel; returns its launches."""
    from megatron_lite.kernels import fused_cross_entropy

    assert os.environ.get("TRITON_INTERPRET") == "1", "the ranks' tensors are on the CPU: Triton needs its interpreter"
    launches, real = [], fused_cross_entropy.ce_partials_fwd
    fused_cross_entropy.ce_partials_fwd = lambda *a: launches.append(a[2]) or real(*a)
    kernels.set_backend("triton")
    try:
        for pad_to in (1, 4, 8):
            _check_cross_entropy(rank, world, pad_to)
    finally:
        kernels.set_backend("auto")
        fused_cross_entropy.ce_partials_fwd = real
    return launches


def test_vocab_parallel_loss_on_triton_partials_tp2(monkeypatch):
    """The TP loss with the kernels' vocab-parallel form under the Triton backend matches the unsharded
    loss and gradients on 2 gloo ranks. A fresh world, not the session's: Triton fixes interpreter or
    compiled mode at its import, and the session's ranks may have imported it for compiled kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # gloo ranks hold CPU tensors; they inherit it before importing Triton
    launches = run_world(2, check_cross_entropy_on_triton_partials)
    # vocab 13 over 2 ranks: rank 1's columns start at 7 (padded to 14) or 8 (padded to 16); one launch
    # for the mixed batch and one for the all-ignored one, per pad_to
    assert launches == [[0] * 6, [7, 7, 8, 8, 8, 8]], launches
