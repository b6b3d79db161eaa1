"""SwiGLU kernel against ``reference.swiglu``."""

import pytest
import torch
from megatron_lite.kernels import reference
from megatron_lite.kernels.fused_swiglu import swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 123, 123), (3, 2051)])  # 2051 > 2 x the 1024-wide column block
def test_swiglu_matches_reference(check, shape, dtype):
    gate, up = check.randn(*shape, dtype=dtype, scale=3.0), check.randn(*shape, dtype=dtype)
    check("swiglu", swiglu, reference.swiglu, [gate, up], dtype)


def test_swiglu_on_halves_of_a_fused_projection(check):
    # gate and up as the two chunks of one (B, T, 2F) projection: views with row stride 2F.
    def split_then(fn):
        return lambda h: fn(*h.chunk(2, dim=-1))

    check("swiglu", split_then(swiglu), split_then(reference.swiglu), [check.randn(2, 9, 2 * 77)], torch.float32)


def test_swiglu_rejects_mismatched_shapes(check):
    with pytest.raises(ValueError, match="must match"):
        swiglu(check.randn(3, 8), check.randn(3, 9))
