"""RMSNorm kernel (with and without the fused residual add) against ``reference.rms_norm``."""

import pytest
import torch
from megatron_lite.kernels import reference
from megatron_lite.kernels.fused_rms_norm import rms_norm

# (5, 123, 123): 615 rows of 123 values, neither a power of two nor a multiple of a block;
# (7, 4099): a row wider than 4K, so the block (8192) and warp count of wide rows are covered.
# (6, 256): a power-of-two width, whose row fills its block (the kernels' unmasked EVEN case).
SHAPES = [(5, 123, 123), (7, 4099), (6, 256)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(check, shape, dtype):
    x, w = check.randn(*shape, dtype=dtype), check.randn(shape[-1], dtype=dtype)
    check("rms_norm", lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: reference.rms_norm(x, w, 1e-6), [x, w], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_fused_residual_matches_reference(check, shape, dtype):
    x, r, w = check.randn(*shape, dtype=dtype), check.randn(*shape, dtype=dtype), check.randn(shape[-1], dtype=dtype)
    check("rms_norm", lambda x, w, r: rms_norm(x, w, 1e-6, r), lambda x, w, r: reference.rms_norm(x, w, 1e-6, r),
          [x, w, r], dtype)  # fmt: skip


def test_rms_norm_gradient_through_residual_output_alone(check):
    # Only h = x + residual is used downstream (dy is None): the backward must still pass dh through.
    w = check.randn(37)
    check("rms_norm", lambda x, r: rms_norm(x, w, 1e-6, r)[1], lambda x, r: reference.rms_norm(x, w, 1e-6, r)[1],
          [check.randn(3, 37), check.randn(3, 37)], torch.float32)  # fmt: skip


def test_rms_norm_rejects_mismatched_residual(check):
    with pytest.raises(ValueError, match="residual"):
        rms_norm(check.randn(3, 8), check.randn(8), 1e-6, check.randn(3, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_eps_counts(check, dtype):
    # mean(x^2) = 1e-2 = eps: a kernel that dropped eps (or used another) would be off by up to 1/sqrt(2)
    x, r = check.randn(5, 37, dtype=dtype, scale=0.1), check.randn(5, 37, dtype=dtype, scale=0.1)
    w = check.randn(37, dtype=dtype)
    check("rms_norm", lambda x, w: rms_norm(x, w, 1e-2), lambda x, w: reference.rms_norm(x, w, 1e-2), [x, w], dtype)
    # the fused residual path: mean((x + r)^2) = 2e-2
    check("rms_norm", lambda x, w, r: rms_norm(x, w, 1e-2, r), lambda x, w, r: reference.rms_norm(x, w, 1e-2, r),
          [x, w, r], dtype)  # fmt: skip
