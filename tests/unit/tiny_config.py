"""Tiny models that plan, render and step in milliseconds: overrides (the plan and launch tests) and a
resolved Config (the engine tests)."""

from megatron_lite.config import Config, fill_defaults


def tiny(layers: int = 2) -> list[str]:
    """A 4-head, 64-wide model of ``layers`` blocks over a 500-token vocabulary (model and data agree)."""
    return [
        f"model.layers={layers}",
        "model.hidden=64",
        "model.heads=4",
        "model.vocab_size=500",
        "data.vocab_size=500",
        "model.seq_len=32",
    ]


def tiny_cfg(section: str, **values) -> Config:
    """A resolved Config of a 2-layer, 64-wide model over a 96-token vocabulary, batches of 2 x 16
    tokens, with ``values`` set in ``section`` (e.g. ``tiny_cfg("train", dtype="fp8")``)."""
    cfg = Config()
    m = cfg.model
    m.layers, m.hidden, m.heads, m.kv_heads, m.ffn_hidden, m.seq_len = 2, 64, 4, 2, 128, 16
    cfg.train.micro_batch_size = cfg.train.global_batch_size = 2
    for k, v in values.items():
        setattr(getattr(cfg, section), k, v)
    fill_defaults(cfg, vocab_size=96)
    return cfg
