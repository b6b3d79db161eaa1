"""Tensor hooks that do not keep their owner alive.

A hook registered on a parameter (``register_hook``, ``register_post_accumulate_grad_hook``) is held
by the tensor's C++ autograd metadata, where Python's garbage collector cannot see it. A bound method
of an object that itself holds the parameter (a grad buffer, a layer) is then a cycle the collector
cannot break: the object, its parameters and its process groups live until the process exits, and
a gloo group alive at interpreter exit can abort the process. Register :func:`weak_hook` instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any


def weak_hook(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (bound) as a hook holding only a weak reference to its object. Once the object is
    gone the hook returns None: a tensor hook's "leave the value unchanged"."""
    ref = weakref.WeakMethod(method)

    def hook(*args: Any) -> Any:
        bound = ref()
        return None if bound is None else bound(*args)

    return hook
