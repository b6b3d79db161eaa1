"""megatron-lite: a Megatron-style 3D-parallel pretraining framework on PyTorch."""

__version__ = "0.1.0"
