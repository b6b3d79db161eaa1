"""Bad input through the public ops (``megatron_lite.kernels``): under either backend, one clear error
naming the problem, the same one, raised before anything runs; edge cases agree with torch."""

import logging

import pytest
import torch
from dispatch_count import CountOps

from megatron_lite import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend("auto")


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + 1)) * scale).to(DEVICE, dtype)


TARGET = torch.tensor([1, 2, -100, 9, 0, 3], device=DEVICE)


def qkv(batch=1, heads=4, kv_heads=2, t=9, d=16, dtype=torch.float32):
    q = randn(batch, heads, t, d).to(dtype)
    return q, randn(batch, kv_heads, t, d).to(dtype), randn(batch, kv_heads, t, d + 1)[..., :d].to(dtype)


def ints(*shape, dtype=torch.int32):
    return torch.ones(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "op, args, match",
    [
        ("rms_norm", lambda: (randn(4, 8), randn(7)), r"weight has shape \(7,\).*needs \(8,\)"),
        ("rms_norm", lambda: (randn(4, 8), randn(16)), r"weight has shape \(16,\).*needs \(8,\)"),
        ("rms_norm", lambda: (randn(4, 8), randn(1, 8)), r"weight has shape \(1, 8\)"),
        ("rms_norm", lambda: (ints(4, 8), randn(8)), "x must be a floating-point tensor"),
        ("rms_norm", lambda: (torch.tensor(1.0, device=DEVICE), randn(8)), "at least one dimension"),
        ("rms_norm", lambda: (randn(4, 8), randn(8), -1.0), "eps must be a finite number >= 0"),
        ("rms_norm", lambda: (randn(4, 8), randn(8), torch.tensor(1e-6)), "eps must be a Python number"),
        ("rms_norm", lambda: (randn(4, 8), randn(8), 1e-6, randn(1, 8)), "residual .* must have x's shape"),
        ("rms_norm", lambda: (randn(4, 8), randn(8), 1e-6, randn(4, 8, dtype=torch.bfloat16)), "residual"),
        ("rms_norm", lambda: (randn(4, 8), None), r"weight must be a tensor of shape \(8,\).*torch.ones\(8\)"),
        # "meta" stands for any other device: one the kernels cannot read, on a CPU-only machine too.
        ("rms_norm", lambda: (randn(4, 8), randn(8).to("meta")), "weight is on meta but x is on .*weight.to"),
        ("rms_norm", lambda: (randn(4, 8), randn(8), 1e-6, randn(4, 8).to("meta")), "residual is on meta but x"),
        ("layer_norm", lambda: (randn(4, 8), randn(7), None), r"weight has shape \(7,\)"),
        ("layer_norm", lambda: (randn(4, 8), randn(8), randn(7)), r"bias has shape \(7,\)"),
        ("layer_norm", lambda: (ints(4, 8, dtype=torch.int64), randn(8), None), "floating"),
        ("layer_norm", lambda: (randn(4, 8), randn(8), None, float("nan")), "eps must be a finite number"),
        ("layer_norm", lambda: (randn(4, 8), None, randn(8)), "weight must be a tensor of shape"),
        ("layer_norm", lambda: (randn(4, 8), randn(8), 0.0), r"bias must be a tensor of shape \(8,\) or None"),
        ("layer_norm", lambda: (randn(4, 8), randn(8), randn(8).to("meta")), "bias is on meta but x is on"),
        ("swiglu", lambda: (randn(4, 8), randn(4, 9)), "must match in shape and dtype"),
        ("swiglu", lambda: (randn(4, 8), randn(1, 8)), "must match in shape and dtype"),
        ("swiglu", lambda: (randn(4, 8), randn(4, 8, dtype=torch.bfloat16)), "must match in shape and dtype"),
        ("swiglu", lambda: (ints(4, 8), ints(4, 8)), "gate must be a floating-point tensor"),
        ("swiglu", lambda: (randn(4, 8), randn(4, 8).to("meta")), "up is on meta but gate is on"),
        ("swiglu", lambda: (torch.tensor(1.0, device=DEVICE), torch.tensor(2.0, device=DEVICE)), "at least one dim"),
        ("apply_rope", lambda: (randn(5, 3, 8), randn(5, 4), randn(5, 4)), r"x must be \(B, T, H, D\)"),
        ("apply_rope", lambda: (randn(1, 2, 5, 3, 8), randn(5, 4), randn(5, 4)), r"x must be \(B, T, H, D\)"),
        (
            "apply_rope",
            lambda: (randn(2, 5, 3, 8), randn(6, 4), randn(6, 4)),
            r"cos has shape \(6, 4\), but x "
            r"\(2, 5, 3, 8\) needs cos/sin of shape \(T, D/2\) = \(5, 4\); slice the table to T \(cos\[:T\]\)",
        ),
        ("apply_rope", lambda: (randn(2, 5, 3, 8), randn(5, 4), randn(5, 8)), r"sin has shape \(5, 8\).*D/2 columns"),
        ("apply_rope", lambda: (randn(2, 5, 3, 8), randn(1, 5, 1, 4), randn(1, 5, 1, 4)), r"= \(5, 4\); give T rows"),
        (
            "apply_rope",
            lambda: (randn(2, 5, 3, 7), randn(5, 3), randn(5, 3)),
            r"x \(2, 5, 3, 7\) has head dim D=7, "
            r"but D must be even \(RoPE rotates pairs of channels\); use an even head dim$",
        ),
        ("apply_rope", lambda: (ints(2, 5, 3, 8), randn(5, 4), randn(5, 4)), "x must be a floating-point tensor"),
        ("apply_rope", lambda: (randn(2, 5, 3, 8), randn(5, 4).requires_grad_(), randn(5, 4)), "cos.detach()"),
        ("apply_rope", lambda: (randn(2, 5, 3, 8), randn(5, 4), randn(5, 4).to("meta")), "sin is on meta but x is on"),
        (
            "cross_entropy",
            lambda: (randn(6, 10), TARGET[:5]),
            r"logits \(6, 10\) has 6 rows but target \(5,\) has 5 "
            "ids; give one target id per row of logits",
        ),
        ("cross_entropy", lambda: (randn(6, 10), TARGET.view(6, 1)), "flatten them"),
        ("cross_entropy", lambda: (randn(10), TARGET[0]), r"logits must be \(N, V\)"),
        ("cross_entropy", lambda: (randn(2, 3, 10), TARGET.view(2, 3)), "flatten them"),
        ("cross_entropy", lambda: (randn(6, 10), TARGET.float()), "target must hold integer class ids"),
        ("cross_entropy", lambda: (randn(6, 10), TARGET > 0), "target must hold integer class ids"),
        ("cross_entropy", lambda: (randn(6, 10), randn(6, 10).softmax(-1)), "target"),
        ("cross_entropy", lambda: (ints(6, 10), TARGET), "logits must be a floating-point tensor"),
        ("cross_entropy", lambda: (randn(6, 0), torch.full_like(TARGET, -100)), "no vocabulary columns"),
        ("cross_entropy", lambda: (randn(6, 10), TARGET, torch.tensor(-100)), "ignore_index must be a Python int"),
        ("cross_entropy", lambda: (randn(6, 10), TARGET.to("meta")), "target is on meta but logits is on"),
        ("cross_entropy_partials", lambda: (randn(6, 5), TARGET[:4], 3), r"6 rows but target \(4,\) has 4 ids"),
        ("cross_entropy_partials", lambda: (randn(6, 5), TARGET.float(), 3), "integer class ids"),
        ("cross_entropy_partials", lambda: (randn(6, 0), TARGET, 3), "no vocabulary columns; a vocab shard"),
        ("cross_entropy_partials", lambda: (randn(6, 5), TARGET, torch.tensor(3)), "vocab_start must be a Python int"),
        ("cross_entropy_partials", lambda: (randn(6, 5), TARGET.to("meta"), 3), "target is on meta but logits"),
        ("flash_attention", lambda: qkv(kv_heads=3), "Hkv dividing H"),
        ("flash_attention", lambda: qkv(heads=2, kv_heads=4), "Hkv dividing H"),
        ("flash_attention", lambda: (*qkv()[:2], randn(1, 2, 9, 32)), "need k == v shapes"),
        ("flash_attention", lambda: (randn(1, 4, 9, 16), *qkv(batch=2)[1:]), "the same batch"),
        ("flash_attention", lambda: (randn(2, 4, 9, 16), *qkv(batch=1)[1:]), "no broadcasting"),
        ("flash_attention", lambda: tuple(t[0] for t in qkv()), r"q must be \(B, H, T, D\)"),
        ("flash_attention", lambda: qkv(dtype=torch.int32), "q must be a floating-point tensor"),
        ("flash_attention", lambda: (qkv()[0], *(t.bfloat16() for t in qkv()[1:])), "share one dtype"),
        ("flash_attention", lambda: (*qkv()[:2], qkv()[2].bfloat16()), "share one dtype"),
        ("flash_attention", lambda: (*qkv(), None), "causal must be a bool"),
        ("flash_attention", lambda: (*qkv()[:2], qkv()[2].to("meta")), "v is on meta but q is on"),
        ("flash_attention", lambda: (*qkv(), torch.tensor(True)), "causal must be a bool"),
    ],
)
def test_bad_input_gets_one_clear_error(backend, op, args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        getattr(kernels, op)(*args())


@pytest.mark.parametrize("mixed", ["weight", "bias"])
def test_norms_take_fp32_weights_on_bf16_activations(backend, mixed):
    # Mixed precision keeps fp32 norm weights next to bf16 activations: allowed, output in x's dtype.
    x, w, b = randn(3, 8, dtype=torch.bfloat16), randn(8), randn(8)
    assert kernels.layer_norm(x, w, b if mixed == "bias" else b.bfloat16()).dtype == torch.bfloat16
    assert kernels.rms_norm(x, w).dtype == torch.bfloat16


ROUND_ONCE = {
    "rms_norm": lambda x, w: kernels.reference.rms_norm(x, w),
    "layer_norm": lambda x, w: kernels.reference.layer_norm(x, w, w.flip(0)),
    "swiglu": lambda x, w: kernels.reference.swiglu(x, x.detach().flip(-1)),  # dgate: the silu derivative
    "apply_rope": lambda x, w: kernels.reference.apply_rope(x.view(2, 3, 1, 8), w[:4].expand(3, 4), w[4:].expand(3, 4)),
}


@pytest.mark.parametrize("op", ROUND_ONCE)
def test_bf16_twins_compute_in_fp32_and_round_once(op):
    # The Triton kernels load bf16, compute in fp32 and round each result once: the twins must give
    # exactly that, output and gradient, or the two backends differ by an ulp on a third of the values.
    x = randn(6, 8, dtype=torch.bfloat16, scale=3.0)
    w = randn(8)  # fp32 weights and rope tables next to bf16 activations, as in mixed precision
    grad = randn(6, 8, dtype=torch.bfloat16).view(ROUND_ONCE[op](x, w).shape)
    outs = []
    for dtype in (torch.bfloat16, torch.float32):
        leaf = x.to(dtype).requires_grad_()
        out = ROUND_ONCE[op](leaf, w)
        (g,) = torch.autograd.grad(out, leaf, grad.to(dtype))
        outs.append((out.detach().bfloat16(), g.bfloat16()))
    assert torch.equal(outs[0][0], outs[1][0]), f"{op}: bf16 output is not the fp32 result rounded once"
    assert torch.equal(outs[0][1], outs[1][1]), f"{op}: bf16 gradient is not the fp32 result rounded once"


@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_norms_take_weight_views(backend, view):
    # The Triton kernels read weight and bias at unit stride: views must give the twin's result and gradient.
    def as_view(t):
        return t.repeat_interleave(2)[::2] if view == "strided" else t[:1].expand(8)

    x, w, b = randn(3, 8), randn(8).requires_grad_(), randn(8).requires_grad_()
    for op, args in (("rms_norm", (as_view(w), 1e-6)), ("layer_norm", (as_view(w), as_view(b), 1e-5))):
        out = getattr(kernels, op)(x, *args)
        expected = getattr(kernels.reference, op)(x, *args)
        torch.testing.assert_close(out, expected)
        grads = torch.autograd.grad(out.square().sum(), [w, b] if op == "layer_norm" else [w])
        expected_grads = torch.autograd.grad(expected.square().sum(), [w, b] if op == "layer_norm" else [w])
        torch.testing.assert_close(grads, expected_grads)


def test_cross_entropy_takes_any_integer_target_dtype(backend):
    # F.cross_entropy itself takes int64 and uint8 only; int32 token ids (a common dataset dtype) work too.
    logits, target = randn(6, 10), TARGET.clamp(min=0)
    expected = torch.nn.functional.cross_entropy(logits, target)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(kernels.cross_entropy(logits, target.to(dtype)), expected)
    parts = kernels.cross_entropy_partials(logits, target.int(), 0)
    torch.testing.assert_close(parts, kernels.reference.cross_entropy_partials(logits, target, 0))


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # 0/0 mean of no values
@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_cross_entropy_of_no_counted_target_is_nan_with_zero_grad(backend, ignore_index):
    # The documented mean over zero targets, as F.cross_entropy gives: NaN loss, zero gradient.
    for logits, target in ((randn(4, 10), torch.full((4,), ignore_index, device=DEVICE)),
                           (randn(0, 10), torch.zeros(0, dtype=torch.long, device=DEVICE))):  # fmt: skip
        logits.requires_grad_()
        loss = kernels.cross_entropy(logits, target, ignore_index)
        assert loss.isnan(), loss
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad, torch.zeros_like(logits))


def test_cross_entropy_ignore_index_inside_the_vocabulary(backend):
    # ignore_index = 7, a real class id: rows targeting it drop out of the mean and get no gradient.
    logits, target = randn(6, 10).requires_grad_(), torch.tensor([7, 2, 7, 9, 0, 3], device=DEVICE)
    loss = kernels.cross_entropy(logits, target, 7)
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=7)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, logits), torch.autograd.grad(expected, logits))


# Each norm's public call and its inputs for rows of n values (the residual is rms_norm's fused add).
WIDE_NORMS = {
    "rms_norm": (lambda m, x, w: m.rms_norm(x, w, 1e-6), lambda n: [randn(2, n), randn(n)]),
    "rms_norm+residual": (lambda m, x, w, r: m.rms_norm(x, w, 1e-6, r), lambda n: [randn(2, n), randn(n), randn(2, n)]),
    "layer_norm": (lambda m, x, w, b: m.layer_norm(x, w, b, 1e-5), lambda n: [randn(2, n), randn(n), randn(n)]),
}


@pytest.mark.parametrize("op", WIDE_NORMS)
def test_norm_rows_past_the_kernel_limit_run_the_twin_with_one_warning(op, check, caplog):
    # The kernels hold a row in registers (MAX_ROW_BLOCK = 65536 values): rows of 65536 run them, wider
    # rows (two widths, one cause) run the twin, forward and backward, say so once, and describe() tells.
    from megatron_lite.kernels import _common

    call, inputs = WIDE_NORMS[op]
    kernel, twin = (lambda *a: call(kernels, *a)), (lambda *a: call(kernels.reference, *a))
    name = op.split("+")[0]
    _common.warn_fallback.cache_clear()  # logged once per process: forget what earlier tests logged
    warned = {}
    kernels.set_backend("triton")
    try:
        with caplog.at_level(logging.WARNING):
            for n in (65536, 65537, 70001):
                check(name, kernel, twin, inputs(n), torch.float32)
                warned[n] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert kernels.describe(DEVICE)[name].endswith("; rows wider than 65536 values fall back to torch")
    finally:
        kernels.set_backend("auto")
    reason = f"{name} runs the torch reference: rows wider than 65536 values (a program holds one row in registers)"
    assert warned == {65536: [], 65537: [reason], 70001: [reason]}


def test_attention_with_no_heads_is_empty(backend):
    q, k, v = qkv(heads=0, kv_heads=0)  # no heads: an empty output, no modulo by zero in the launcher
    assert kernels.flash_attention(q, k, v).shape == (1, 0, 9, 16)


DOUBLE_BACKWARD = {
    "rms_norm": lambda x: kernels.rms_norm(x, randn(8)),
    "rms_norm+residual": lambda x: kernels.rms_norm(x, randn(8), 1e-6, randn(4, 8))[0],
    "layer_norm": lambda x: kernels.layer_norm(x, randn(8), randn(8)),
    "swiglu": lambda x: kernels.swiglu(x, randn(4, 8)),
    "apply_rope": lambda x: kernels.apply_rope(x.view(1, 4, 1, 8), randn(4, 4), randn(4, 4)),
    "cross_entropy": lambda x: kernels.cross_entropy(x, TARGET[:4].clamp(min=0)),
    "cross_entropy_partials": lambda x: kernels.cross_entropy_partials(x, TARGET[:4], 0)[1],
    "flash_attention": lambda x: kernels.flash_attention(*(x.view(1, 2, 1, 16).expand(1, 2, 9, 16),) * 3),
}


@pytest.mark.parametrize("op", DOUBLE_BACKWARD)
def test_double_backward_through_triton_is_one_clear_error(op):
    # create_graph=True records the backward for a second derivative; the kernels' backwards have none,
    # which gave "element 0 of tensors does not require grad" later, or silently lost the op's terms.
    x = randn(4, 8).requires_grad_()
    kernels.set_backend("triton")
    try:
        y = DOUBLE_BACKWARD[op](x)
        with pytest.raises(RuntimeError, match=f"{op.split('+')[0]}: the Triton kernel's backward is first-order"):
            torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (grad,) = torch.autograd.grad(DOUBLE_BACKWARD[op](x).square().sum(), x)  # first order still works
    finally:
        kernels.set_backend("auto")
    assert grad.shape == x.shape


EMPTY = {
    "rms_norm": lambda: kernels.rms_norm(randn(4, 0), randn(0)),
    "rms_norm 0 rows": lambda: kernels.rms_norm(randn(0, 8), randn(8), 1e-6, randn(0, 8)),
    "layer_norm": lambda: kernels.layer_norm(randn(2, 3, 0), randn(0), randn(0)),
    "swiglu": lambda: kernels.swiglu(randn(4, 0), randn(4, 0)),
    "apply_rope H=0": lambda: kernels.apply_rope(randn(2, 5, 0, 8), randn(5, 4), randn(5, 4)),
    "apply_rope D=0": lambda: kernels.apply_rope(randn(2, 5, 3, 0), randn(5, 0), randn(5, 0)),
    "apply_rope T=0": lambda: kernels.apply_rope(randn(2, 0, 3, 8), randn(0, 4), randn(0, 4)),
}


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # 0/0 mean of no values
@pytest.mark.parametrize("case", EMPTY)
def test_empty_inputs_give_empty_outputs_like_torch(backend, case):
    # Rows of 0 values failed in as_rows' reshape(-1, 0); heads of 0 in the RoPE launch (arange of 0 lanes).
    out = EMPTY[case]()
    kernels.set_backend("torch")
    expected = EMPTY[case]()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("op", ROUND_ONCE)
def test_fp64_twins_keep_fp64(op):
    # The twins compute in at least fp32: fp64 inputs (references in tests, gradient checks) stay fp64
    # rather than being rounded to fp32 on the way through.
    x, w = randn(6, 8, dtype=torch.float64, scale=3.0), randn(8, dtype=torch.float64)
    out64 = ROUND_ONCE[op](x, w)
    out32 = ROUND_ONCE[op](x.float(), w.float())
    assert out64.dtype == torch.float64
    assert 0 < (out64 - out32.double()).abs().max() < 1e-5, f"{op}: the fp64 result is the fp32 one"


@pytest.mark.parametrize("op", ROUND_ONCE)
def test_fp32_twins_promote_and_cast_nothing(op):
    # fp32 in, fp32 out: no dtype promotion or cast is dispatched (host work a training step pays for
    # each of the few calls per layer)
    x, w = randn(6, 8), randn(8)
    with CountOps() as counted:
        out = ROUND_ONCE[op](x, w)
    assert out.dtype == torch.float32
    assert not {"aten.promote_types.default", "aten._to_copy.default"} & set(counted.ops), counted.ops
