"""megatron_lite.checkpoint."""
