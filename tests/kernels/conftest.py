"""Kernel tests: each Triton op against its twin in ``reference.py``, forward and every gradient.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. ``TRITON_INTERPRET`` is read
when the op files' ``@triton.jit`` decorators run, so it is set here, at conftest import, before any
test module imports an op file (``megatron_lite.kernels`` itself imports none of them). With a GPU
the same tests run the compiled kernels on CUDA tensors.

Every comparison uses ``TOL``, one table keyed by (op, dtype): a tensor passes when
``|actual - expected| <= tol * (rms(expected) + |expected|)`` everywhere, i.e. a relative error
measured against the larger of the element and the tensor's typical size (sums with cancellation,
like dW over many rows, have absolute errors that scale with the tensor, not the element).
bf16 results are compared with the reference computed in fp32 on the same bf16 inputs: the
kernels compute in fp32 and round once, so what is left is that rounding. On a GPU it is
round-to-nearest, 2^-9 = 2e-3 relative; Triton 3.9's interpreter converts fp32 to bf16 up to one
ulp worse (0.1260 -> 0.1250, measured), 2^-7 = 7.8e-3. The bf16 entries cover the interpreter.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    if "megatron_lite.kernels._common" in sys.modules:
        raise RuntimeError("a Triton op file was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1")
    # Triton's own @jit helpers (tl.sigmoid, ...) are built at its import for the mode then set: a
    # first import by a test that unsets the variable would leave kernels calling compiled helpers.
    import triton  # noqa: F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16 = torch.float32, torch.bfloat16

# Worst errors in brackets were measured in the interpreter over this directory's tests. The bf16
# entries sit 1.5-3x above them; the fp32 ones 8-36x (layer_norm_offset 3.8x, rope measured exact),
# since on a GPU the same tests run the compiled kernels, whose reductions and exp differ from the
# interpreter's numpy (not measured here).
TOL: dict[tuple[str, torch.dtype], float] = {
    # fp32 row reductions reordered against torch's: a few ulps (max 9e-7).
    ("rms_norm", F32): 1e-5,
    ("layer_norm", F32): 1e-5,
    # Inputs offset by 300 (std 1): their own fp32 ulp (3e-5) leaves ~1e-4 after centring, in torch
    # and the kernel alike (1.0e-4 and 8e-5 against fp64; max 1.3e-4 between the two); a one-pass
    # E[x^2] - mean^2 variance would be off by ~1e-2.
    ("layer_norm_offset", F32): 5e-4,
    # Element-wise: ulps of exp / sigmoid (max 3e-7); the rotation is exact up to fma (max 0).
    ("swiglu", F32): 1e-5,
    ("apply_rope", F32): 1e-6,
    # Online logsumexp in fp32 against torch's two passes (max 1.1e-6, the gradient of the std-4 logits).
    ("cross_entropy", F32): 1e-5,
    ("cross_entropy_partials", F32): 1e-5,
    # Blockwise online softmax reorders sums over <= 1024 keys; fp32 dots are exact in the
    # interpreter and "ieee" (tf32 off) on GPU (max 5.9e-6, dQ of multi-query attention).
    ("flash_attention", F32): 5e-5,
    # (Scores near -150 are held against float64 instead, kernel and torch alike, in
    # test_attention_gradients_stay_finite_when_every_score_is_very_negative: on a GPU torch's own
    # fp32 attention is off by 7e-4 of the rms there, the kernel by 8e-5.)
    # One rounding to bf16 of each output and gradient, 2^-7 in the interpreter (max 8.3e-3;
    # the fused residual's rounded x + r moves dW by about as much).
    ("rms_norm", BF16): 1.6e-2,
    ("layer_norm", BF16): 1.6e-2,
    ("swiglu", BF16): 1.6e-2,
    ("apply_rope", BF16): 1.6e-2,
    # bf16 logits upcast exactly, so losses match as in fp32 (4e-8); the gradient is rounded once (max 7e-3).
    ("cross_entropy", BF16): 1.6e-2,
    ("cross_entropy_partials", BF16): 1.6e-2,
    # P and dS are rounded to bf16 before their matmuls, as in FlashAttention: torch's own bf16
    # attention is off from fp32 by up to 3.9e-2 (dQ, causal, T = 47, GQA), the kernel by up to 5.3e-2
    # (dK, causal, T = 47, MHA; torch's 1.3e-2 there). Margin 1.5x.
    ("flash_attention", BF16): 8e-2,
}


class KernelCheck:
    """Runs a kernel and its reference on the same inputs and compares outputs and gradients."""

    def __init__(self, seed: int = 0):
        self.device = torch.device(DEVICE)
        self.gen = torch.Generator(device="cpu").manual_seed(seed)  # CPU draws: the same inputs on any device

    def randn(self, *shape: int, dtype: torch.dtype = F32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen) * scale).to(device=DEVICE, dtype=dtype)

    def compare(self, op: str, dtype: torch.dtype, actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        tol = TOL[(op, dtype)]
        expected = expected.float()
        finite = expected[expected.isfinite()]
        rms = finite.square().mean().sqrt().item() if finite.numel() else 0.0
        torch.testing.assert_close(
            actual.float(), expected, atol=tol * rms, rtol=tol, equal_nan=True, msg=lambda m: f"{op} {what}: {m}"
        )

    def __call__(self, op: str, kernel, reference, inputs: list, dtype: torch.dtype) -> None:
        """Forward and backward of ``kernel(*inputs)`` vs ``reference`` on fp32 copies of the inputs.

        Floating inputs get gradients; every differentiable output gets a random upstream gradient.
        """
        k_in = [t.detach().clone().requires_grad_() if _is_float(t) else t for t in inputs]
        r_in = [t.detach().float().requires_grad_() if _is_float(t) else t for t in inputs]
        k_out, r_out = _as_tuple(kernel(*k_in)), _as_tuple(reference(*r_in))
        assert len(k_out) == len(r_out)
        pairs = [(k, r) for k, r in zip(k_out, r_out) if k.requires_grad]
        grads = [torch.randn(k.shape, generator=self.gen).to(device=DEVICE, dtype=k.dtype) for k, _ in pairs]
        torch.autograd.backward([k for k, _ in pairs], grads)
        torch.autograd.backward([r for _, r in pairs], [g.float() for g in grads])
        for i, (k, r) in enumerate(zip(k_out, r_out)):
            self.compare(op, dtype, k, r, f"output {i}")
        for i, (k, r) in enumerate(zip(k_in, r_in)):
            if _is_float(k):
                assert k.grad is not None, f"{op}: input {i} got no gradient"
                assert k.grad.dtype == k.dtype, f"{op}: grad of input {i} is {k.grad.dtype}, not {k.dtype}"
                self.compare(op, dtype, k.grad, r.grad, f"grad of input {i}")


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


@pytest.fixture
def check() -> KernelCheck:
    """A seeded :class:`KernelCheck`: ``check(op, kernel, reference, inputs, dtype)``."""
    return KernelCheck()
