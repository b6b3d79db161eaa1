"""Named RNG streams, so random ops agree or differ across TP ranks exactly where they must.

Two streams (Megatron's scheme):

- the DEFAULT torch stream, seeded identically on every TP rank of a model replica: dropout on
  activations that are replicated across TP (outside attention/MLP without sequence parallelism)
  must drop the same elements everywhere, or the replicas diverge;
- the ``"model-parallel"`` stream, seeded per TP rank: dropout inside a TP region (attention
  probabilities of this rank's heads, the sharded MLP activation) must differ between ranks, or
  every shard would drop the same pattern and the layer would not match the single-device model
  in distribution. Under sequence parallelism, dropout on sequence-sharded activations also uses it.

Both streams also differ between pipeline stages (the seed is offset by the stage, as Megatron's),
since each stage holds other layers.

Use: ``tracker = seed_tensor_parallel(seed, mesh.tp_rank, pp_rank=mesh.pp_rank)``, then
``with tracker.fork():`` around ops that must differ per TP rank. Initialisation does not need
it: TP layers are sliced from the single-device model's initialised weights
(``tensor_parallel.py``). The model has no dropout yet; the tracker is what a dropout layer must
use when it gets one. Activation recompute (``models/recompute.py``) then needs more: torch's
checkpoint restores only the default streams before it re-runs a block, so a fork inside the block
would draw the NEXT masks of the named stream, not the ones the forward used, and the gradients
would be wrong. The named states must be saved with the block's input and restored for its re-run
(Megatron's ``CheckpointFunction`` does this with its tracker's ``get_states``/``set_states``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

MODEL_PARALLEL = "model-parallel"
_TP_SEED_OFFSET = 2718  # Megatron's offset: keeps the per-rank seeds away from the default seed
_PP_SEED_STRIDE = 100  # Megatron's: seed + 100 * pp_rank per pipeline stage


class RNGTracker:
    """Named RNG states for one device; :meth:`fork` runs a block on a named stream.

    The default stream is saved on entry and restored on exit, so forking never advances it; the
    named stream continues where its last fork stopped.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}

    def _get_state(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set_state(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed`` (without touching the default stream)."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        saved = self._get_state()
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self._states[name] = self._get_state()
        self._set_state(saved)

    @contextmanager
    def fork(self, name: str = MODEL_PARALLEL) -> Iterator[None]:
        """Run the block with stream ``name`` as the device's RNG."""
        saved = self._get_state()
        self._set_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._get_state()
            self._set_state(saved)


def seed_tensor_parallel(seed: int, tp_rank: int, device: torch.device | str = "cpu", pp_rank: int = 0) -> RNGTracker:
    """Seed the default stream with ``seed + 100 * pp_rank`` (equal on every TP and DP rank of a
    pipeline stage) and return a tracker whose ``"model-parallel"`` stream is seeded with that seed
    ``+ 2718 + tp_rank`` (distinct per TP rank). The pipeline offset is Megatron's: stages hold
    different layers, which must not draw the same dropout masks."""
    stage_seed = seed + _PP_SEED_STRIDE * pp_rank
    torch.manual_seed(stage_seed)
    tracker = RNGTracker(device)
    tracker.add(MODEL_PARALLEL, stage_seed + _TP_SEED_OFFSET + tp_rank)
    return tracker
