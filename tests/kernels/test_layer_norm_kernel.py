"""LayerNorm kernel (with and without bias) against ``reference.layer_norm``."""

import pytest
import torch
from megatron_lite.kernels import reference
from megatron_lite.kernels.fused_layer_norm import layer_norm

# Odd row counts and widths, and one row wider than 4K (block 8192).
# (6, 256): a power-of-two width, whose row fills its block (the kernels' unmasked EVEN case).
SHAPES = [(5, 123, 123), (7, 4099), (6, 256)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_reference(check, shape, dtype, with_bias):
    x, w = check.randn(*shape, dtype=dtype), check.randn(shape[-1], dtype=dtype)
    if with_bias:
        check("layer_norm", lambda x, w, b: layer_norm(x, w, b, 1e-5),
              lambda x, w, b: reference.layer_norm(x, w, b, 1e-5),
              [x, w, check.randn(shape[-1], dtype=dtype)], dtype)  # fmt: skip
    else:
        check("layer_norm", lambda x, w: layer_norm(x, w, None, 1e-5),
              lambda x, w: reference.layer_norm(x, w, None, 1e-5), [x, w], dtype)  # fmt: skip


def test_layer_norm_large_mean(check):
    # Activations with |mean| = 300 >> std = 1: a one-pass E[x^2] - mean^2 variance
    # would be off by ~1%.
    x = check.randn(9, 257) + 300.0
    check("layer_norm_offset", lambda x, w: layer_norm(x, w, None, 1e-5),
          lambda x, w: reference.layer_norm(x, w, None, 1e-5), [x, check.randn(257)], torch.float32)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_eps_counts(check, dtype):
    # var(x) = 1e-2 = eps: a kernel that dropped eps (or used another) would be off by up to 1/sqrt(2)
    x, w, b = check.randn(5, 37, dtype=dtype, scale=0.1), check.randn(37, dtype=dtype), check.randn(37, dtype=dtype)
    check("layer_norm", lambda x, w, b: layer_norm(x, w, b, 1e-2), lambda x, w, b: reference.layer_norm(x, w, b, 1e-2),
          [x, w, b], dtype)  # fmt: skip
