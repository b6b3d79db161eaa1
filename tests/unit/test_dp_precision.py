"""The loss scaler, the precision policy and the global-norm bookkeeping, in one process."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from megatron_lite.parallel.grad_utils import (
    TIED_COPY_ATTR,
    TP_SHARDED_ATTR,
    TP_UNIQUE_ROWS_ATTR,
    clip_grad_norm_,
    counted_runs,
    global_grad_norm,
)
from megatron_lite.parallel.precision import DynamicLossScaler, Precision


def test_scaler_backs_off_on_overflow_and_grows_after_clean_interval():
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3, min_scale=2.0)
    scaler.update(found_inf=True)
    assert scaler.scale == 4.0
    for _ in range(2):
        scaler.update(found_inf=False)
    assert scaler.scale == 4.0
    scaler.update(found_inf=False)
    assert scaler.scale == 8.0
    for _ in range(5):
        scaler.update(found_inf=True)
    assert scaler.scale == 2.0  # floored at min_scale
    state = scaler.state_dict()
    other = DynamicLossScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_scaled_loss_is_fp32_so_fp16_losses_do_not_overflow():
    loss = torch.tensor(10.0, dtype=torch.float16)
    scaled = DynamicLossScaler().scale_loss(loss)
    assert scaled.dtype == torch.float32 and scaled.item() == 10.0 * 2**16


def test_precision_from_train_dtype():
    assert Precision.from_name("fp32").param_dtype == torch.float32
    assert Precision.from_name("bf16").make_scaler() is None
    fp16 = Precision.from_name("fp16")
    assert fp16.loss_scaling and isinstance(fp16.make_scaler(), DynamicLossScaler)
    assert fp16.cast_model(nn.Linear(2, 2)).weight.dtype == torch.float16
    with pytest.raises(ValueError, match="train.dtype"):
        Precision.from_name("auto")


def _param(shape=(2,), **attrs) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(shape))
    for name, value in attrs.items():
        setattr(p, name, value)
    return p


def test_what_counts_in_the_norm():
    sharded, replicated, tied = _param(**{TP_SHARDED_ATTR: True}), _param(), _param(**{TIED_COPY_ATTR: True})
    assert counted_runs(sharded, 1, 0, 2) == counted_runs(sharded, 0, 0, 2) == [(0, 2, True)]
    assert counted_runs(replicated, 0, 0, 2) == [(0, 2, True)] and counted_runs(replicated, 1, 0, 2) == [(0, 2, False)]
    assert counted_runs(tied, 0, 0, 2) == [(0, 2, False)]
    # a (3, 2) weight whose middle row is a replica another tp rank counts; a shard starting at element 1
    gqa = _param((3, 2), **{TP_SHARDED_ATTR: True, TP_UNIQUE_ROWS_ATTR: torch.tensor([True, False, True])})
    assert counted_runs(gqa, 1, 1, 4) == [(0, 1, True), (1, 3, False), (3, 4, True)]
    assert counted_runs(gqa, 1, 2, 2) == [(0, 2, False)]  # a shard inside one run


def test_a_row_masked_gradient_is_normed_without_waiting_for_the_device():
    """Splitting a GQA weight's gradient into the rows this rank counts and the rest uses no op
    whose result size depends on the data (boolean indexing: on a GPU the host waits for every
    kernel queued before it, in each step's norm, for every such weight). The meta device stands for
    the GPU here: such ops cannot run on it. The mask lives on the CPU, as tensor_parallel.py sets it."""
    rows = torch.tensor([True, False, False, True])
    for device in ("meta", "cpu"):
        gqa = nn.Parameter(torch.zeros((4, 3), device=device))
        setattr(gqa, TP_SHARDED_ATTR, True)
        setattr(gqa, TP_UNIQUE_ROWS_ATTR, rows)
        # elements 2-10 of the (4, 3) weight: the last of row 0 (counted), rows 1-2 (replicas), two of row 3
        grad = torch.tensor([3.0, 7, 7, 7, 7, 7, 7, 4, 0], device=device)
        norm = global_grad_norm([(gqa, grad, 2)], [], tp_rank=1)
        assert norm.device == torch.device(device) and norm.shape == ()
    assert norm.item() == 5.0


def test_norm_skips_duplicates_but_not_their_infs():
    counted, duplicate = _param(**{TP_SHARDED_ATTR: True}), _param()
    g = torch.tensor([3.0, 4.0])
    norm = global_grad_norm([(counted, g, 0), (duplicate, torch.tensor([100.0, 0.0]), 0)], [], tp_rank=1)
    assert norm.item() == 5.0
    norm = global_grad_norm([(counted, g, 0), (duplicate, torch.tensor([math.inf, 0.0]), 0)], [], tp_rank=1)
    assert not torch.isfinite(norm)
    # a GQA weight: its replicated middle row is not counted, but an inf there still makes the norm inf
    gqa = _param((3, 2), **{TP_SHARDED_ATTR: True, TP_UNIQUE_ROWS_ATTR: torch.tensor([True, False, True])})
    rows = torch.tensor([3.0, 0.0, 100.0, 100.0, 0.0, 4.0])
    assert global_grad_norm([(gqa, rows, 0)], [], tp_rank=1).item() == 5.0
    rows[2] = math.inf
    assert not torch.isfinite(global_grad_norm([(gqa, rows, 0)], [], tp_rank=1))


def test_norm_joins_only_gradients_that_are_neighbours_in_memory():
    buffer, p = torch.tensor([3.0, 4.0, 100.0, 12.0, 0.0]), _param(**{TP_SHARDED_ATTR: True})
    assert global_grad_norm([(p, buffer[0:2], 0), (p, buffer[3:5], 0)], [], tp_rank=0).item() == 13.0  # not the 100
    assert global_grad_norm([(p, buffer[3:5], 0), (p, buffer[0:2], 0)], [], tp_rank=0).item() == 13.0
    other = torch.tensor([100.0, 0.0])  # another storage
    assert global_grad_norm([(p, buffer[0:1], 0), (p, other[1:2], 0)], [], tp_rank=0).item() == 3.0
    assert global_grad_norm([(p, buffer[0:1], 0), (p, buffer[1:2], 0)], [], tp_rank=0).item() == 5.0  # joined


class _Replicated:
    """The part of ``ReplicatedAdamW`` that ``clip_grad_norm_`` uses, over plain ``.grad``s."""

    sharded, dp_group = False, None

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params

    @property
    def device(self) -> torch.device:
        return self.params[0].grad.device

    def grad_segments(self):
        return [(p, p.grad.view(-1), 0) for p in self.params]

    def scale_grads(self, factor) -> None:
        torch._foreach_mul_([p.grad for p in self.params], factor)


def _with_grad(*values: float) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(len(values)))
    p.grad = torch.tensor(values)
    return p


def test_clipping_is_torchs_and_zero_or_a_non_finite_norm_leaves_the_grads():
    ours, theirs = _with_grad(3.0, 4.0), _with_grad(3.0, 4.0)
    norm, finite = clip_grad_norm_(_Replicated([ours]), 1.0, tp_group=None, pp_group=None)
    want = torch.nn.utils.clip_grad_norm_([theirs], 1.0)
    assert finite and norm.item() == want.item() == 5.0
    # bitwise: the same factor max_norm / (norm + 1e-6) as torch, so clipped runs match the one-process trainer
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)
    assert not torch.equal(ours.grad, torch.tensor([3.0, 4.0]) / 5.0)  # the 1e-6 shows in fp32
    kept = _with_grad(3.0, 4.0)
    assert clip_grad_norm_(_Replicated([kept]), 0.0, tp_group=None, pp_group=None)[0].item() == 5.0
    assert kept.grad.tolist() == [3.0, 4.0]  # optim.clip_grad=0: no clipping
    bad = _with_grad(math.inf, 4.0)
    norm, finite = clip_grad_norm_(_Replicated([bad]), 1.0, tp_group=None, pp_group=None)
    assert not finite and bad.grad.tolist() == [math.inf, 4.0]  # the step is skipped, grads left as they were


def test_norm_of_a_long_gradient_with_a_wide_range_is_accurate():
    # like an embedding gradient: a few rows of large values, the rest tiny (tied-head softmax terms)
    # (torch's single vector_norm of this vector on CPU is 2e-4 low)
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(8192 * 64 + 37, generator=gen) * 6e-5
    g[:640] = torch.randn(640, generator=gen) * 0.05
    want = g.double().square().sum().sqrt().item()
    got = global_grad_norm([(_param(**{TP_SHARDED_ATTR: True}), g, 0)], [], tp_rank=0).item()
    assert got == pytest.approx(want, rel=1e-6)
