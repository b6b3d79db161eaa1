"""Overrides for a tiny model that plans and renders in milliseconds (shared by the plan and launch tests)."""


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
