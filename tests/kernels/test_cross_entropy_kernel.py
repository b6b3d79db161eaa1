"""Cross-entropy kernels, whole and vocab-parallel, against ``reference.cross_entropy(_partials)``."""

import pytest
import torch
from megatron_lite.kernels import fused_cross_entropy, reference
from megatron_lite.kernels.fused_cross_entropy import cross_entropy, cross_entropy_partials

from megatron_lite import kernels
from megatron_lite.parallel.vocab_parallel_loss import vocab_parallel_cross_entropy

# V spans several vocab chunks with a masked tail in the interpreter (256 wide); on a GPU (4096) it is
# one masked chunk
N, V = 67, 1001


def _targets(check, n: int = N) -> torch.Tensor:
    target = torch.randint(0, V, (n,), generator=check.gen)
    target[::5] = -100  # every fifth position is padding
    return target.to(check.device)


@pytest.mark.parametrize(
    "dtype, scale", [(torch.float32, 4.0), (torch.bfloat16, 4.0), (torch.bfloat16, 3e4), (torch.float32, 3e4)]
)
def test_cross_entropy_matches_reference(check, dtype, scale):
    target = _targets(check)
    # Logits of std 4: a peaked softmax, as late in training, where a naive exp would overflow in bf16.
    # Std 3e4 (bf16's ulp there is 128): a one-hot softmax whose every exp but the max underflows.
    logits = check.randn(N, V, dtype=dtype, scale=scale)
    check("cross_entropy", lambda x: cross_entropy(x, target), lambda x: reference.cross_entropy(x, target),
          [logits], dtype)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_all_ignored_is_nan_like_torch(check, dtype):
    target = torch.full((4,), -100, device=check.device)
    check("cross_entropy", lambda x: cross_entropy(x, target), lambda x: reference.cross_entropy(x, target),
          [check.randn(4, V, dtype=dtype)], dtype)  # fmt: skip


def _combine(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], target: torch.Tensor) -> torch.Tensor:
    """The documented recipe, with the all-reduces done over a list of shards in one process."""
    m = torch.stack([p[0] for p in parts])
    big_m = m.max(dim=0).values  # all_reduce(m, MAX)
    s = sum(p[1] * torch.exp(p[0] - big_m) for p in parts)  # all_reduce(s * exp(m - M), SUM)
    x_t = sum(p[2] for p in parts)  # all_reduce(x_t, SUM)
    valid = target != -100
    return ((big_m + torch.log(s) - x_t) * valid).sum() / valid.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bounds", [(0, 500, V), (0, 334, 667, V)])  # 2 and 3 shards of unequal width
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_vocab_parallel_partials_combine_to_cross_entropy(check, bounds, dtype, impl):
    partials = cross_entropy_partials if impl == "triton" else reference.cross_entropy_partials
    target = _targets(check)

    def sharded_loss(x):
        return _combine([partials(x[:, a:b], target, a) for a, b in zip(bounds, bounds[1:])], target)

    check("cross_entropy_partials", sharded_loss, lambda x: reference.cross_entropy(x, target),
          [check.randn(N, V, dtype=dtype, scale=4.0)], dtype)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partials_match_reference_partials(check, dtype):
    # Each quantity on its own, with independent upstream gradients for s and x_t.
    target = _targets(check)
    check("cross_entropy_partials", lambda x: cross_entropy_partials(x[:, 400:900], target, 400),
          lambda x: reference.cross_entropy_partials(x[:, 400:900], target, 400),
          [check.randn(N, V, dtype=dtype, scale=4.0)], dtype)  # fmt: skip


def test_tensor_parallel_loss_runs_the_partials_kernel(check, monkeypatch):
    """The TP loss goes through the dispatcher: with the Triton backend it runs this file's kernel
    (one rank here, whose shard ends in padding columns that must stay out of the loss)."""
    launches, real = [], fused_cross_entropy.ce_partials_fwd
    monkeypatch.setattr(fused_cross_entropy, "ce_partials_fwd", lambda *a: launches.append(a[2]) or real(*a))
    target, pad = _targets(check), torch.full((N, 23), 50.0, device=check.device)

    def tp_loss(x):
        return vocab_parallel_cross_entropy(torch.cat([x, pad], -1), target, None, vocab_size=V)

    kernels.set_backend("triton")
    try:
        check("cross_entropy_partials", tp_loss, lambda x: reference.cross_entropy(x, target),
              [check.randn(N, V, scale=4.0)], torch.float32)  # fmt: skip
    finally:
        kernels.set_backend("auto")
    assert launches == [0]  # one forward launch, for the shard starting at vocabulary id 0
