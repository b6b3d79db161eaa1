"""megatron_lite.training."""
