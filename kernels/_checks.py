"""Argument checks shared by every implementation of an op: the Triton file, the torch twin in
``reference.py`` and (for the norms) ``apex_norms.py``, so that each backend rejects bad input with
the same one error before anything runs, instead of a Triton compile error, an index error deep in
torch, or a silently wrong result (a Triton kernel reads whatever memory a wrong shape points at).

Python comparisons of shapes, dtypes and arguments only: nothing here reads tensor values or waits
for a device. Every public op runs its check on every call (before each Triton launch on a GPU), so
the good path reads each argument's shape, dtype and device once and builds no string: messages are
formatted only where they are raised (~1 us a check on a 2-core CPU).
"""

from __future__ import annotations

import math

import torch


def floating(op: str, names: str, *tensors: torch.Tensor | None) -> None:
    """Each of ``tensors`` (named by the words of ``names``; None skipped) is a floating-point tensor
    (the ops compute in fp32 and return the input's dtype)."""
    for t in tensors:
        if t is not None and not t.is_floating_point():
            name = _name_of(t, names, tensors)
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}; cast it (e.g. .float())")


def same_device(op: str, names: str, first: torch.Tensor, *others: torch.Tensor | None) -> None:
    """Each of ``others`` (None skipped) is on ``first``'s device, the tensors named by the words of
    ``names`` in order (a Triton kernel cannot read across devices, and torch's own message does not
    name the argument)."""
    device = first.device
    for t in others:
        if t is not None and t.device != device:
            name, other = names.split()[0], _name_of(t, names, (first, *others))
            raise ValueError(f"{op}: {other} is on {t.device} but {name} is on {device}; move them to one "
                             f"device (e.g. {other}.to({name}.device))")  # fmt: skip


def _name_of(t: torch.Tensor, names: str, tensors: tuple) -> str:
    """The word of ``names`` at ``t``'s first place in ``tensors`` (only for a message: the loops above
    test the tensors without counting places)."""
    return names.split()[[o is t for o in tensors].index(True)]


def _vector_error(op: str, name: str, t: torch.Tensor, x: torch.Tensor, n: int) -> ValueError:
    return ValueError(f"{op}: {name} has shape {tuple(t.shape)}, but x {tuple(x.shape)} needs ({n},): "
                      f"one value per element of x's last dim")  # fmt: skip


def check_norm(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> None:
    """x (..., N) floating; weight (N,) and bias (N,) or None floating (any float dtype: fp32 weights may
    scale bf16 activations), on x's device; eps a finite number >= 0; residual, when given, exactly x's
    shape and dtype."""
    shape = x.shape
    if not shape:
        raise ValueError(f"{op}: x must have at least one dimension (..., N), got a 0-d tensor")
    n = shape[-1]
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a tensor of shape ({n},), got {type(weight).__name__}; for a "
                        f"norm without a learned scale pass torch.ones({n})")  # fmt: skip
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a tensor of shape ({n},) or None, got {type(bias).__name__}")
    if weight.shape != (n,):
        raise _vector_error(op, "weight", weight, x, n)
    if bias is not None and bias.shape != (n,):
        raise _vector_error(op, "bias", bias, x, n)
    floating(op, "x weight bias", x, weight, bias)
    if type(eps) is not float or not 0 <= eps < math.inf:  # a float in [0, inf) passes in one test
        _check_eps(op, eps)
    if residual is not None and (residual.shape != shape or residual.dtype != x.dtype):
        raise ValueError(f"{op}: residual {tuple(residual.shape)} {residual.dtype} must have x's shape and dtype "
                         f"{tuple(shape)} {x.dtype}; expand or cast it first")  # fmt: skip
    same_device(op, "x weight bias residual", x, weight, bias, residual)


def _check_eps(op: str, eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a Python number, got {type(eps).__name__}; pass float(eps)")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0 (it keeps rsqrt finite), got {eps}")


def check_swiglu(gate: torch.Tensor, up: torch.Tensor) -> None:
    """gate and up (..., N) floating, of one shape and dtype (no broadcasting: one fused projection's halves)."""
    shape, dtype = gate.shape, gate.dtype
    if shape != up.shape or dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(shape)} {dtype} and up {tuple(up.shape)} {up.dtype} must "
                         "match in shape and dtype; split one projection, or expand/cast one of them")  # fmt: skip
    if not shape:
        raise ValueError("swiglu: gate and up must have at least one dimension (..., N), got 0-d tensors")
    floating("swiglu", "gate", gate)
    same_device("swiglu", "gate up", gate, up)


def check_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x (B, T, H, D) floating with D even; cos and sin (T, D/2) floating constants (no gradient)."""
    shape = x.shape
    if len(shape) != 4:
        raise ValueError(f"apply_rope: x must be (B, T, H, D), got shape {tuple(shape)}; reshape it to 4-D")
    floating("apply_rope", "x", x)
    T, D = shape[1], shape[3]
    if D % 2:
        raise ValueError(f"apply_rope: x {tuple(shape)} has head dim D={D}, but D must be even (RoPE rotates "
                         "pairs of channels); use an even head dim")  # fmt: skip
    table = (T, D // 2)
    if cos.shape != table or sin.shape != table:
        name, t = ("cos", cos) if cos.shape != table else ("sin", sin)
        longer = t.dim() == 2 and t.shape[0] > T and t.shape[1] == D // 2
        fix = f"slice the table to T ({name}[:T])" if longer else "give T rows (positions), D/2 columns"
        raise ValueError(f"apply_rope: {name} has shape {tuple(t.shape)}, but x {tuple(shape)} needs cos/sin "
                         f"of shape (T, D/2) = {table}; {fix}")  # fmt: skip
    floating("apply_rope", "cos sin", cos, sin)
    same_device("apply_rope", "x cos sin", x, cos, sin)
    if (cos.requires_grad or sin.requires_grad) and torch.is_grad_enabled():
        raise ValueError("apply_rope: cos/sin require grad, but the tables are constants that get no gradient "
                         "(the Triton kernel has none to give); pass cos.detach() and sin.detach()")  # fmt: skip


def _integer(op: str, name: str, value) -> None:
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{op}: {name} must be a Python int, got {type(value).__name__}; pass int({name})")


def check_cross_entropy(
    op: str, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, vocab_start: int = 0
) -> None:
    """logits (N, V) floating with V >= 1; target (N,) integer class ids; ignore_index and vocab_start ints.

    A target outside the vocabulary is not checked here: that needs the values, a device sync."""
    shape, ids = logits.shape, target.shape
    if len(shape) != 2 or len(ids) != 1 or ids[0] != shape[0]:
        raise _cross_entropy_shape_error(op, shape, ids)
    floating(op, "logits", logits)
    dtype = target.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(f"{op}: target must hold integer class ids (int64), got {dtype}; "
                         "soft (probability) targets are not supported")  # fmt: skip
    if shape[1] == 0:
        what = "a vocab shard with no columns adds nothing: leave it out" if op != "cross_entropy" else "V >= 1"
        raise ValueError(f"{op}: logits {tuple(shape)} have no vocabulary columns; {what}")
    same_device(op, "logits target", logits, target)
    _integer(op, "ignore_index", ignore_index)
    _integer(op, "vocab_start", vocab_start)


def _cross_entropy_shape_error(op: str, shape: torch.Size, ids: torch.Size) -> ValueError:
    if len(shape) == 2 and len(ids) == 1:
        return ValueError(f"{op}: logits {tuple(shape)} has {shape[0]} rows but target {tuple(ids)} has {ids[0]} "
                          "ids; give one target id per row of logits")  # fmt: skip
    return ValueError(f"{op}: logits must be (N, V) and target (N,), got {tuple(shape)} and {tuple(ids)}; "
                      "flatten them: logits.reshape(-1, V), target.reshape(-1)")  # fmt: skip


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    """q (B, H, T, D), k and v (B, Hkv, T', D) of one floating dtype, Hkv dividing H; causal a bool."""
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise ValueError(f"flash_attention: {_qkv(qs, ks, vs)}: q must be (B, H, T, D) and k, v (B, Hkv, T, D)")
    B, H, _, D = qs
    hkv = ks[1]
    if ks != vs or ks[0] != B or ks[3] != D or (H % hkv if hkv else H):
        raise ValueError(f"flash_attention: {_qkv(qs, ks, vs)}: need k == v shapes, the same batch and head dim, "
                         "and Hkv dividing H (no broadcasting)")  # fmt: skip
    floating("flash_attention", "q", q)
    dtype = q.dtype
    if k.dtype != dtype or v.dtype != dtype:
        raise ValueError(f"flash_attention: q, k and v must share one dtype, got {dtype}, {k.dtype} and "
                         f"{v.dtype}; cast k and v to q's")  # fmt: skip
    same_device("flash_attention", "q k v", q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"flash_attention: causal must be a bool, got {type(causal).__name__}")


def _qkv(qs: torch.Size, ks: torch.Size, vs: torch.Size) -> str:
    return f"q {tuple(qs)}, k {tuple(ks)}, v {tuple(vs)}"
