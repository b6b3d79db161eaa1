"""Shared by the benchmark scripts (run as ``python tools/bench/NAME.py``, so this imports by name)."""

from __future__ import annotations

import argparse

from megatron_lite.config import ModelConfig


def llama_config(args: argparse.Namespace) -> ModelConfig:
    """A resolved llama ModelConfig from ``--layers --hidden --ffn --vocab --seq`` (head dim 64, MHA, untied)."""
    return ModelConfig(
        arch="llama",
        layers=args.layers,
        hidden=args.hidden,
        heads=args.hidden // 64,
        kv_heads=args.hidden // 64,
        ffn_hidden=args.ffn,
        vocab_size=args.vocab,
        seq_len=args.seq,
        norm="rmsnorm",
        activation="swiglu",
        tie_embeddings=False,
        norm_eps=1e-5,
    )
