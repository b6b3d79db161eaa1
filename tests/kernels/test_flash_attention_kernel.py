"""Flash attention kernels (forward, dQ, dK, dV; GQA; causal or not) against ``reference.flash_attention``."""

import logging

import pytest
import torch
from megatron_lite.kernels import reference
from megatron_lite.kernels.fused_attention import flash_attention, unsupported_reason

GPU = torch.cuda.is_available()


def _qkv(check, b, h, hkv, t, d, dtype):
    return (
        check.randn(b, h, t, d, dtype=dtype),
        check.randn(b, hkv, t, d, dtype=dtype),
        check.randn(b, hkv, t, d, dtype=dtype),
    )


def _check(check, qkv, causal, dtype):
    check("flash_attention", lambda q, k, v: flash_attention(q, k, v, causal),
          lambda q, k, v: reference.flash_attention(q, k, v, causal), list(qkv), dtype)  # fmt: skip


# T = 33: one query tile and a masked tail; H = 4 over Hkv = 2 is grouped-query attention.
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_attention_head_dims_fp32(check, head_dim):
    _check(check, _qkv(check, 2, 4, 2, 33, head_dim, torch.float32), True, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (4, 1)])  # GQA, MHA, MQA
def test_attention_matches_reference(check, heads, causal, dtype):
    _check(check, _qkv(check, 2, heads[0], heads[1], 47, 64, dtype), causal, dtype)


@pytest.mark.skipif(not GPU, reason="T=1024, D=128 in the interpreter takes minutes; compiled kernels only")
def test_attention_bf16_long_sequence_gpu(check):
    # Autotuned tiles (64 to 128) at a realistic length: every tile full, causal diagonal on tile edges.
    _check(check, _qkv(check, 2, 8, 2, 1024, 128, torch.bfloat16), True, torch.bfloat16)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_of_one_token_over_one_kv_head(check, causal):
    """T = 1 (every descriptor dim but D of size 1, their strides replaced) and Hkv = 1: the softmax over one
    key is 1, so the output is v, dV sums dO over the query group and dQ, dK are 0 up to the rounding of
    dS = P * (dO.v - delta), D-term dot products of |dO| |v| each (torch's fp32 SDPA leaves ~1e-8 there
    too, which a tolerance relative to a zero gradient cannot absorb)."""
    q, k, v = (t.requires_grad_() for t in _qkv(check, 2, 3, 1, 1, 16, torch.float32))
    grad = check.randn(2, 3, 1, 16)
    out = flash_attention(q, k, v, causal)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, v.detach().expand(2, 3, 1, 16))
    torch.testing.assert_close(dv, grad.sum(1, keepdim=True))
    d, eps = 16, torch.finfo(torch.float32).eps
    ds_bound = 2 * d * eps * (grad.norm(dim=-1) * v.detach().norm(dim=-1)).max()
    for name, g, other in (("dq", dq, k), ("dk", dk, q)):
        bound = ds_bound * other.detach().norm(dim=-1).max() / d**0.5 * (3 if name == "dk" else 1)  # dK sums 3 queries
        assert g.abs().max() <= bound, f"{name} {g.abs().max():.2e} > {bound:.2e}"


@pytest.mark.parametrize(
    "d, dtype, reason",
    [(48, torch.float32, "head dim 48"), (16, torch.float64, "dtype torch.float64 is not one of fp16/bf16/fp32")],
)
def test_attention_unsupported_input_falls_back(check, caplog, d, dtype, reason):
    # fp64 runs the twin in fp64: the kernels' fp32 statistics would leave it 3e-7 off.
    q, k, v = _qkv(check, 1, 2, 2, 9, d, dtype)
    with caplog.at_level(logging.WARNING):
        out = flash_attention(q, k, v)
    torch.testing.assert_close(out, reference.flash_attention(q, k, v), rtol=0, atol=0)
    assert reason in caplog.text


@pytest.mark.parametrize("heads", [(5, 5), (6, 3)])
def test_attention_launch_order_in_sections_of_heads(check, monkeypatch, heads):
    # An L2 that holds the streamed tiles of two heads: the causal launch order runs two heads at a
    # time (MHA: 2 + 2 + 1; GQA forward and dQ: 4 + 2 query heads, dK/dV: one K/V head per section),
    # the last section short. Every program must still own exactly one tile of one head.
    from megatron_lite.kernels import _attention_common

    t, d = 47, 16
    monkeypatch.setattr(_attention_common, "L2_BYTES", 2 * 2 * t * d * 4)
    assert _attention_common.section_heads(6, 2 * t * d * 4, 2) == 4
    _check(check, _qkv(check, 1, heads[0], heads[1], t, d, torch.float32), True, torch.float32)


@pytest.mark.skipif(not GPU, reason="65536 heads are 65536 programs per kernel: minutes in the interpreter")
def test_attention_of_many_heads_gpu(check):
    # The kernels' grids are 1-D (tiles x batch x heads, up to 2^31 - 1 programs): 65536 heads, past
    # the 65535 a CUDA grid's second axis takes, run the kernels.
    assert unsupported_reason(*_qkv(check, 2, 32768, 1, 3, 16, torch.bfloat16)) is None
    _check(check, _qkv(check, 2, 32768, 1, 3, 16, torch.bfloat16), True, torch.bfloat16)


def test_attention_of_an_empty_batch_is_empty(check):
    q, k, v = _qkv(check, 0, 2, 2, 9, 16, torch.float32)
    assert flash_attention(q, k, v).shape == (0, 2, 9, 16)


def test_attention_rejects_bad_grouping(check):
    q, k, v = _qkv(check, 1, 4, 3, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="Hkv dividing H"):
        flash_attention(q, k, v)


def test_attention_takes_the_models_layout_and_unaligned_views(check):
    """The model passes (B, T, H, D).transpose(1, 2) views: descriptors cover them as they are. A view
    whose base is not 16-byte aligned cannot be described and is copied first; both match the reference."""
    from megatron_lite.kernels._attention_common import describable

    b, t, h, hkv, d = 2, 40, 4, 2, 32
    q, k, v = (check.randn(b, t, n, d).transpose(1, 2) for n in (h, hkv, hkv))
    assert describable(q) is q and not q.is_contiguous()
    _check(check, (q, k, v), True, torch.float32)
    flat = check.randn(b * h * t * d + 1)
    shifted = flat[1:].view(b, h, t, d)  # 4 bytes past an aligned allocation
    copied = describable(shifted)
    assert copied is not shifted and copied.data_ptr() % 16 == 0 and torch.equal(copied, shifted)
    _check(check, (shifted, k, v), False, torch.float32)
    expanded = check.randn(1, 1, 1, d).expand(b, h, t, d)  # the upstream gradient of out.sum() looks like this
    assert describable(expanded) is not expanded and describable(expanded).is_contiguous()


def _errors(fn, inputs: list, grad: torch.Tensor, truth: list) -> list[float]:
    """Max |error| of fn's output and input gradients against float64 ``truth``, over each one's rms."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    got = [out.detach()] + [t.grad for t in leaves]
    return [((g.double() - e).abs().max() / e.square().mean().sqrt()).item() for g, e in zip(got, truth)]


# exp2 of the masked-out scores overflows to inf before tl.where drops it (on a GPU too), and dK/dV
# rows of keys past T, never stored, can hold inf * 0; numpy warns about both.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("causal", [True, False])
def test_attention_gradients_stay_finite_when_every_score_is_very_negative(check, causal):
    """Keys past T read as zeros (score 0); unmasked, exp2(0 - lse) overflows when every real score is
    far below 0 and dQ turns NaN (T = 20 leaves a partial key tile for the interpreter's 16-key tiles).

    Scores near -150 (q.k = -576 over sqrt(16)) carry their own fp32 rounding (ulp 6e-5 at 576) into
    exp, and dS = P * (dP - delta) cancels, so fp32 results differ from the exact ones by ~1e-4 of
    their rms whatever the summation order. Kernel and torch's fp32 attention are therefore both held
    against float64: the kernel must be finite and within 4x torch's own error (plus 1e-6 for ties)."""
    b, h, t, d = 1, 2, 20, 16
    q = -6.0 + 0.1 * check.randn(b, h, t, d)
    k = 6.0 + 0.1 * check.randn(b, h, t, d)
    v = check.randn(b, h, t, d)
    grad = check.randn(b, h, t, d)
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    out = reference.flash_attention(*exact, causal)
    out.backward(grad.double())
    truth = [out.detach()] + [x.grad for x in exact]
    ours = _errors(lambda *x: flash_attention(*x, causal), [q, k, v], grad, truth)
    torch_fp32 = _errors(lambda *x: reference.flash_attention(*x, causal), [q, k, v], grad, truth)
    print(f"causal={causal} errors over rms (out, dq, dk, dv): kernel {ours}, torch fp32 {torch_fp32}")
    for name, e, r in zip(("output", "dq", "dk", "dv"), ours, torch_fp32):
        assert e <= 4 * r + 1e-6, f"{name}: kernel error {e:.2e} of rms against float64, torch fp32's {r:.2e}"


def test_attention_autotune_keys_tell_fp32_from_16_bit():
    """Descriptors carry no dtype into Triton's autotune cache key: without PRECISION an fp32 call would
    reuse the tile a bf16 call chose (too much shared memory, or minutes of ptxas)."""
    from megatron_lite.kernels import fused_attention, fused_attention_bwd

    for kernel in (fused_attention._attn_fwd_kernel, fused_attention_bwd._attn_bwd_dkdv_kernel,
                   fused_attention_bwd._attn_bwd_dq_kernel):  # fmt: skip
        assert "PRECISION" in kernel.keys and "PRECISION" in kernel.arg_names
