"""Argument checks shared by every implementation of an op: the Triton file, the torch twin in
``reference.py`` and (for the norms) ``apex_norms.py``, so that each backend rejects bad input with
the same one error before anything runs, instead of a Triton compile error, an index error deep in
torch, or a silently wrong result (a Triton kernel reads whatever memory a wrong shape points at).

Python comparisons of shapes, dtypes and arguments only: nothing here reads tensor values or waits
for a device, so the checks cost microseconds per call on the hot path of a training step.
"""

from __future__ import annotations

import math

import torch


def floating(op: str, name: str, t: torch.Tensor) -> None:
    """``t`` is a floating-point tensor (the ops compute in fp32 and return the input's dtype)."""
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}; cast it (e.g. .float())")


def same_device(op: str, name: str, first: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` is on ``first``'s device (a Triton kernel cannot read across devices,
    and torch's own message does not name the argument)."""
    for other, t in others.items():
        if t is not None and t.device != first.device:
            raise ValueError(f"{op}: {other} is on {t.device} but {name} is on {first.device}; move them to one "
                             f"device (e.g. {other}.to({name}.device))")  # fmt: skip


def check_norm(
    op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, residual=None
) -> None:
    """x (..., N) floating; weight (N,) and bias (N,) or None floating (any float dtype: fp32 weights may
    scale bf16 activations), on x's device; eps a finite number >= 0; residual, when given, exactly x's
    shape and dtype."""
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (..., N), got a 0-d tensor")
    n = x.shape[-1]
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a tensor of shape ({n},), got {type(weight).__name__}; for a "
                        f"norm without a learned scale pass torch.ones({n})")  # fmt: skip
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a tensor of shape ({n},) or None, got {type(bias).__name__}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, but x {tuple(x.shape)} needs ({n},): "
                             f"one value per element of x's last dim")  # fmt: skip
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None:
            floating(op, name, t)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a Python number, got {type(eps).__name__}; pass float(eps)")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0 (it keeps rsqrt finite), got {eps}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{op}: residual {tuple(residual.shape)} {residual.dtype} must have x's shape and dtype "
                         f"{tuple(x.shape)} {x.dtype}; expand or cast it first")  # fmt: skip
    same_device(op, "x", x, weight=weight, bias=bias, residual=residual)


def check_swiglu(gate: torch.Tensor, up: torch.Tensor) -> None:
    """gate and up (..., N) floating, of one shape and dtype (no broadcasting: one fused projection's halves)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must "
                         "match in shape and dtype; split one projection, or expand/cast one of them")  # fmt: skip
    if gate.dim() == 0:
        raise ValueError("swiglu: gate and up must have at least one dimension (..., N), got 0-d tensors")
    floating("swiglu", "gate", gate)
    same_device("swiglu", "gate", gate, up=up)


def check_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x (B, T, H, D) floating with D even; cos and sin (T, D/2) floating constants (no gradient)."""
    if x.dim() != 4:
        raise ValueError(f"apply_rope: x must be (B, T, H, D), got shape {tuple(x.shape)}; reshape it to 4-D")
    floating("apply_rope", "x", x)
    T, D = x.shape[1], x.shape[3]
    if D % 2:
        raise ValueError(f"apply_rope: x {tuple(x.shape)} has head dim D={D}, but D must be even (RoPE rotates "
                         "pairs of channels); use an even head dim")  # fmt: skip
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (T, D // 2):
            longer = t.dim() == 2 and t.shape[0] > T and t.shape[1] == D // 2
            fix = f"slice the table to T ({name}[:T])" if longer else "give T rows (positions), D/2 columns"
            raise ValueError(f"apply_rope: {name} has shape {tuple(t.shape)}, but x {tuple(x.shape)} needs cos/sin "
                             f"of shape (T, D/2) = {(T, D // 2)}; {fix}")  # fmt: skip
    floating("apply_rope", "cos", cos)
    floating("apply_rope", "sin", sin)
    same_device("apply_rope", "x", x, cos=cos, sin=sin)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("apply_rope: cos/sin require grad, but the tables are constants that get no gradient "
                         "(the Triton kernel has none to give); pass cos.detach() and sin.detach()")  # fmt: skip


def _integer(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be a Python int, got {type(value).__name__}; pass int({name})")


def check_cross_entropy(
    op: str, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, vocab_start: int = 0
) -> None:
    """logits (N, V) floating with V >= 1; target (N,) integer class ids; ignore_index and vocab_start ints.

    A target outside the vocabulary is not checked here: that needs the values, a device sync."""
    if logits.dim() == 2 and target.dim() == 1 and target.shape != logits.shape[:1]:
        raise ValueError(f"{op}: logits {tuple(logits.shape)} has {logits.shape[0]} rows but target "
                         f"{tuple(target.shape)} has {target.shape[0]} ids; give one target id per row of "
                         "logits")  # fmt: skip
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"{op}: logits must be (N, V) and target (N,), got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}; flatten them: logits.reshape(-1, V), target.reshape(-1)")  # fmt: skip
    floating(op, "logits", logits)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"{op}: target must hold integer class ids (int64), got {target.dtype}; "
                         "soft (probability) targets are not supported")  # fmt: skip
    if logits.shape[1] == 0:
        what = "a vocab shard with no columns adds nothing: leave it out" if op != "cross_entropy" else "V >= 1"
        raise ValueError(f"{op}: logits {tuple(logits.shape)} have no vocabulary columns; {what}")
    same_device(op, "logits", logits, target=target)
    _integer(op, "ignore_index", ignore_index)
    _integer(op, "vocab_start", vocab_start)


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    """q (B, H, T, D), k and v (B, Hkv, T', D) of one floating dtype, Hkv dividing H; causal a bool."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention: {shapes}: q must be (B, H, T, D) and k, v (B, Hkv, T, D)")
    B, H, _, D = q.shape
    hkv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != B or k.shape[-1] != D or (H % hkv if hkv else H):
        raise ValueError(f"flash_attention: {shapes}: need k == v shapes, the same batch and head dim, "
                         "and Hkv dividing H (no broadcasting)")  # fmt: skip
    floating("flash_attention", "q", q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype} and "
                         f"{v.dtype}; cast k and v to q's")  # fmt: skip
    same_device("flash_attention", "q", q, k=k, v=v)
    if not isinstance(causal, bool):
        raise TypeError(f"flash_attention: causal must be a bool, got {type(causal).__name__}")
