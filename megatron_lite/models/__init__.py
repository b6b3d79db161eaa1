"""megatron_lite.models."""
