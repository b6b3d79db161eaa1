"""megatron_lite.data."""
