"""Rotary embedding kernel against ``reference.apply_rope``."""

import pytest
import torch
from megatron_lite.kernels import reference
from megatron_lite.kernels.fused_rope import apply_rope


def _tables(check, t: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Llama's table: theta_{t,i} = t * 10000^(-2i / d); cos/sin are fp32 buffers in the model.
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    theta = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)
    return theta.cos().to(check.device), theta.sin().to(check.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# odd T and H; D from 16 to 128; B = T = H = 1 with D = 2 (one pair: a block of one lane per half)
@pytest.mark.parametrize("shape", [(2, 33, 5, 16), (1, 17, 3, 128), (1, 1, 1, 2)])
def test_rope_matches_reference(check, shape, dtype):
    cos, sin = _tables(check, shape[1], shape[3])
    check("apply_rope", lambda x: apply_rope(x, cos, sin), lambda x: reference.apply_rope(x, cos, sin),
          [check.randn(*shape, dtype=dtype)], dtype)  # fmt: skip


@pytest.mark.parametrize(
    "layout",
    [
        (1, 2),  # q as a transpose of (B, H, T, D): no unit stride on T or H, the kernel uses the strides
        (2, 3),  # (B, T, D, H) seen as (B, T, H, D): D at stride H, which the launcher copies to unit stride
    ],
)
def test_rope_on_strided_input(check, layout):
    cos, sin = _tables(check, 33, 32)
    shape = [2, 33, 3, 32]
    shape[layout[0]], shape[layout[1]] = shape[layout[1]], shape[layout[0]]
    check("apply_rope", lambda x: apply_rope(x.transpose(*layout), cos, sin),
          lambda x: reference.apply_rope(x.transpose(*layout), cos, sin),
          [check.randn(*shape)], torch.float32)  # fmt: skip


def test_rope_rejects_wrong_table(check):
    cos, sin = _tables(check, 8, 16)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(check.randn(1, 9, 2, 16), cos, sin)
