"""The argument checks run on every call of every public op (before each Triton launch on a GPU), so on
good input they read each argument's shape, dtype and device at most once and format no message:
counted through a tensor subclass that sees every attribute read, never timed."""

from collections import Counter

import pytest
import torch
from megatron_lite.kernels import _checks

READS = Counter()
COUNTED = {"shape", "dtype", "device"}


class Counting(torch.Tensor):
    """Counts each ``shape``/``dtype``/``device`` read per tensor (torch routes a subclass's attribute
    reads through ``__torch_function__`` as the descriptor's ``__get__``)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) == "__get__" and func.__self__.__name__ in COUNTED:
            READS[id(args[0]), func.__self__.__name__] += 1
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def t(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype).as_subclass(Counting)


GOOD = {
    "rms_norm with residual": lambda: _checks.check_norm("rms_norm", t(2, 3, 8), t(8), None, 1e-5, t(2, 3, 8)),
    "layer_norm with bias": lambda: _checks.check_norm("layer_norm", t(2, 8), t(8), t(8), 1e-5),
    "swiglu": lambda: _checks.check_swiglu(t(2, 3, 8), t(2, 3, 8)),
    "rope": lambda: _checks.check_rope(t(2, 5, 3, 8), t(5, 4), t(5, 4)),
    "cross_entropy": lambda: _checks.check_cross_entropy(
        "cross_entropy_partials", t(6, 10), t(6, dtype=torch.int64), -100, 10
    ),
    "attention": lambda: _checks.check_attention(t(2, 4, 9, 16), t(2, 2, 9, 16), t(2, 2, 9, 16), True),
}


@pytest.mark.parametrize("case", GOOD)
def test_good_input_reads_each_attribute_once_and_formats_nothing(case, monkeypatch):
    formatted = []
    # every message formats a shape, so a tuple(...) of one on the good path is a message built in vain
    monkeypatch.setattr(_checks, "tuple", lambda *a: formatted.append(a) or tuple(*a), raising=False)
    READS.clear()
    GOOD[case]()
    assert READS, "the counting tensor saw no read: the spy is broken"
    assert [k for k, n in READS.items() if n > 1] == []
    assert formatted == []


def test_the_spies_see_a_message_being_built(monkeypatch):
    formatted = []
    monkeypatch.setattr(_checks, "tuple", lambda *a: formatted.append(a) or tuple(*a), raising=False)
    READS.clear()
    with pytest.raises(ValueError, match="need k == v shapes"):
        _checks.check_attention(t(2, 4, 9, 16), t(2, 2, 9, 16), t(2, 2, 9, 8), True)
    assert len(formatted) == 3
