"""Backend selection, ``describe()`` and the lazy detection of optional accelerators."""

import subprocess
import sys
import types

import megatron_lite.kernels as kernels
import pytest
import torch
from megatron_lite.kernels import accelerators, dispatch, reference


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    kernels.set_backend("auto")


def test_set_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="auto, triton, torch"):
        kernels.set_backend("cuda")


def test_set_backend_triton_needs_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="Triton is not importable"):
        kernels.set_backend("triton")
    assert kernels.get_backend() == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # set by this folder's conftest
    assert "needs a CUDA GPU (or TRITON_INTERPRET=1" in dispatch.triton_problem("cpu")
    kernels.set_backend("triton")  # selecting stays allowed (the trainer refuses it with a UserError)
    assert "UNUSABLE here: needs a CUDA GPU" in kernels.describe("cpu")["rms_norm"]
    with pytest.raises(RuntimeError, match="kernels backend 'triton' on a cpu tensor: needs a CUDA GPU"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8))  # not Triton's own "0 active drivers"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.triton_problem("cpu") is None
    assert "UNUSABLE" not in kernels.describe("cpu")["rms_norm"]
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert "not importable" in dispatch.triton_problem("cpu")


def _forbid_triton(*args):
    raise AssertionError(f"dispatch took the Triton path {args} for a CPU tensor under auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path of auto")
def test_auto_runs_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "_triton_op", _forbid_triton)
    x, w = torch.randn(4, 8), torch.randn(8)
    assert not kernels.use_triton(x)
    torch.testing.assert_close(kernels.rms_norm(x, w), reference.rms_norm(x, w), rtol=0, atol=0)
    for value in [kernels.describe()[op] for op in dispatch.OPS]:
        assert value.startswith("torch: auto runs Triton on CUDA tensors only"), value


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_runs_triton_on_cuda():
    assert kernels.use_triton(torch.randn(2, device="cuda"))
    assert not kernels.use_triton(torch.randn(2, device="cuda"), "flash_attention")  # SDPA measured faster
    described = kernels.describe()
    assert described["flash_attention"].startswith("torch: SDPA measured faster")
    assert all(described[op].startswith("triton: CUDA device") for op in dispatch.OPS if op != "flash_attention")


def test_backend_triton_dispatches_every_op(monkeypatch):
    # Forced Triton runs the fused files (compiled on GPU, interpreted here), each via _triton_op.
    called = []
    real = kernels._triton_op
    monkeypatch.setattr(kernels, "_triton_op", lambda module, name: called.append(name) or real(module, name))
    kernels.set_backend("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w = torch.randn(3, 16, device=dev), torch.randn(16, device=dev)
    kernels.rms_norm(x, w)
    kernels.layer_norm(x, w, None)
    kernels.swiglu(x, x)
    kernels.apply_rope(x.view(1, 3, 1, 16), torch.ones(3, 8, device=dev), torch.zeros(3, 8, device=dev))
    kernels.cross_entropy(x, torch.tensor([1, 2, 3], device=dev))
    kernels.cross_entropy_partials(x, torch.tensor([1, 2, 3], device=dev), 0)
    kernels.flash_attention(x.view(1, 1, 3, 16), x.view(1, 1, 3, 16), x.view(1, 1, 3, 16))
    assert called == [*dispatch.OPS[:5], "cross_entropy_partials", "flash_attention"]


def test_backend_torch_is_reported_and_used(monkeypatch):
    kernels.set_backend("torch")
    monkeypatch.setattr(kernels, "_triton_op", _forbid_triton)
    kernels.swiglu(torch.randn(2, 4), torch.randn(2, 4))
    assert {kernels.describe()[op] for op in dispatch.OPS} == {"torch: set_backend('torch')"}


def test_describe_reports_accelerators():
    info = kernels.describe("cpu")
    assert set(info) == {*dispatch.OPS, "apex", "transformer_engine"}
    assert all(v.split(":")[0] in ("triton", "torch") for k, v in info.items() if k in dispatch.OPS)
    assert info["apex"].startswith(("available", "unavailable"))
    if not torch.cuda.is_available():
        assert not kernels.apex_available() and not kernels.transformer_engine_available()
        with pytest.raises(ValueError, match="no CUDA device"):
            kernels.describe("cuda")


def test_pypi_apex_is_not_mistaken_for_nvidia_apex(monkeypatch):
    # PyPI's `apex` (a web toolkit) imports as `apex` but has no apex.normalization.
    monkeypatch.setattr(accelerators, "_find", lambda name: name == "apex")
    accelerators.apex_problem.cache_clear()
    try:
        assert "not NVIDIA apex" in accelerators.apex_problem()
    finally:
        accelerators.apex_problem.cache_clear()


def test_import_loads_no_op_file_and_no_accelerator():
    # A fresh interpreter: importing the package must not pull in Triton kernels, apex or TE.
    prefixes = ("apex", "transformer_engine", "megatron_lite.kernels.fused_")
    lines = [
        "import sys, megatron_lite.kernels",
        f"bad = [m for m in sys.modules if m.startswith({prefixes})]",
        "assert not bad, bad",
    ]
    subprocess.run([sys.executable, "-c", "; ".join(lines)], check=True)


def _stand_in_apex(monkeypatch) -> list[str]:
    """NVIDIA apex's fused norm functions, as ``apex_norms`` calls them, computed by the twins."""
    calls: list[str] = []

    def fused_rms_norm_affine(x, weight, normalized_shape, eps):
        assert tuple(normalized_shape) == (x.shape[-1],) and weight.dtype == x.dtype
        calls.append("rms")
        return reference.rms_norm(x, weight, eps)

    def fused_layer_norm_affine(x, weight, bias, normalized_shape, eps):
        assert tuple(normalized_shape) == (x.shape[-1],) and bias is not None
        calls.append("ln")
        return reference.layer_norm(x, weight, bias, eps)

    module = types.ModuleType("apex.normalization.fused_layer_norm")
    module.fused_rms_norm_affine, module.fused_layer_norm_affine = fused_rms_norm_affine, fused_layer_norm_affine
    for name in ("apex", "apex.normalization"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return calls


def test_auto_takes_apex_norms_on_cuda_only_where_triton_cannot(monkeypatch):
    cuda = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(dispatch, "apex_problem", lambda: None)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.use_apex(cuda) and not dispatch.use_apex(types.SimpleNamespace(is_cuda=False))
    kernels.set_backend("torch")
    assert not dispatch.use_apex(cuda)  # an explicit backend is obeyed
    kernels.set_backend("auto")
    monkeypatch.setattr(dispatch, "apex_problem", lambda: "installed but not working: ...")
    assert not dispatch.use_apex(cuda)
    monkeypatch.setattr(dispatch, "apex_problem", lambda: None)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert not dispatch.use_apex(cuda)  # Triton's norms keep the job


def test_apex_norms_match_the_twins_with_residual_and_without_bias(monkeypatch):
    calls = _stand_in_apex(monkeypatch)
    monkeypatch.setattr(kernels, "use_apex", lambda x: True)
    x, r, w = torch.randn(3, 5, 8), torch.randn(3, 5, 8), torch.randn(8)
    y, h = kernels.rms_norm(x, w, 1e-6, r)
    ref_y, ref_h = reference.rms_norm(x, w, 1e-6, r)
    torch.testing.assert_close((y, h), (ref_y, ref_h), rtol=0, atol=0)
    torch.testing.assert_close(kernels.layer_norm(x, w, None, 1e-5), reference.layer_norm(x, w, None, 1e-5))
    assert calls == ["rms", "ln"]


def test_describe_names_apex_for_the_norms_where_it_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    monkeypatch.setattr(dispatch, "apex_problem", lambda: None)
    monkeypatch.setattr(dispatch, "transformer_engine_problem", lambda: "not installed")
    info = kernels.describe("cuda")
    assert info["rms_norm"] == info["layer_norm"] == "apex: fused norms (Triton is not importable)"
    assert info["swiglu"] == "torch: Triton is not importable"
    assert info["apex"].startswith("available: runs the norms under auto")


def test_describe_states_the_kernel_limits_the_op_files_check(monkeypatch):
    """dispatch.py defines the row width and head dims past which the kernels run the twins (the op
    files import them, dispatch.py cannot import those without Triton); describe() words those values."""
    from megatron_lite.kernels import _common, fused_attention

    assert (_common.MAX_ROW_BLOCK, fused_attention.SUPPORTED_HEAD_DIMS) == (
        dispatch.MAX_ROW_BLOCK,
        dispatch.SUPPORTED_HEAD_DIMS,
    )
    monkeypatch.setattr(dispatch, "MAX_ROW_BLOCK", 4096)
    monkeypatch.setattr(dispatch, "SUPPORTED_HEAD_DIMS", (64, 128))
    kernels.set_backend("triton")
    info = kernels.describe("cpu")
    assert info["rms_norm"].endswith("; rows wider than 4096 values fall back to torch"), info["rms_norm"]
    assert info["layer_norm"] == info["rms_norm"]
    assert "; head dims outside 64/128 and GPUs before Hopper fall back to torch" in info["flash_attention"]
