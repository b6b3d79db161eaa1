"""megatron_lite.parallel."""
