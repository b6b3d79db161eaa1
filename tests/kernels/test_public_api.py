"""The kernels API as DESIGN.md's interface names it, called by keyword with its documented shapes on
both backends: ``rms_norm(x, weight, eps)`` (and with ``residual``), ``layer_norm(x, weight, bias, eps)``,
``swiglu(gate, up)``, ``apply_rope(x, cos, sin)`` with x (B, T, H, D) and cos/sin (T, D/2),
``cross_entropy(logits, target, ignore_index=-100)``, ``flash_attention(q, k, v, causal=True)`` with q
(B, H, T, D) and k/v (B, Hkv, T, D), ``set_backend("auto" | "triton" | "torch")``."""

import pytest
import torch

from megatron_lite import kernels
from megatron_lite.config import load_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T, H, HKV, D, V = 2, 5, 4, 2, 16, 11  # odd T and V; GQA: 2 query heads per KV head


def _calls() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(DEVICE)

    x, w, bias, res = r(B, T, D), r(D), r(D), r(B, T, D)
    angle = r(T, D // 2)
    target = torch.tensor([1, -100, 3, 10, -100], device=DEVICE)
    normed, summed = kernels.rms_norm(x, w, eps=1e-5, residual=res)
    return {
        "rms_norm": kernels.rms_norm(x, weight=w, eps=1e-5),
        "rms_norm residual": normed,
        "rms_norm sum": summed,
        "layer_norm": kernels.layer_norm(x, weight=w, bias=bias, eps=1e-5),
        "swiglu": kernels.swiglu(gate=x, up=res),
        "apply_rope": kernels.apply_rope(r(B, T, H, D), cos=angle.cos(), sin=angle.sin()),
        "cross_entropy": kernels.cross_entropy(r(T, V), target, ignore_index=-100),
        "flash_attention": kernels.flash_attention(r(B, H, T, D), r(B, HKV, T, D), r(B, HKV, T, D), causal=True),
    }


SHAPES = {"cross_entropy": (), "apply_rope": (B, T, H, D), "flash_attention": (B, H, T, D)}


def test_each_op_takes_its_documented_arguments_and_shapes_on_both_backends():
    results = {}
    try:
        for backend in ("torch", "triton"):
            kernels.set_backend(backend)
            results[backend] = _calls()
    finally:
        kernels.set_backend("auto")
    for name, got in results["triton"].items():
        want = results["torch"][name]
        assert got.shape == want.shape == SHAPES.get(name, (B, T, D)), name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)  # fp32 both: reduction order only


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_kernels_backend_is_a_config_key_and_a_set_backend_name(backend):
    assert load_config(None, [f"kernels.backend={backend}"]).kernels.backend == backend
    try:
        kernels.set_backend(backend)
        assert kernels.get_backend() == backend
    finally:
        kernels.set_backend("auto")
