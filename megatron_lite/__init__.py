"""megatron-lite: a Megatron-style 3D-parallel pretraining framework on PyTorch."""

# First, before any slow import: the parent pid this process started with, against which a rank
# under torchrun tells whether its launcher died before the rank asked to be signalled (orphan.py).
from megatron_lite.launcher import orphan as _orphan  # noqa: F401

__version__ = "0.1.0"
