"""Pipeline parallelism: stages x virtual chunks, schedules as data, a simulator and a runtime.

- ``partition.py``: layers -> pp stages x vp chunks (balanced by cost, or explicit), and the
  chunk modules cut from the single-device model with its global parameter names.
- ``actions.py`` / ``schedules.py``: a schedule is each rank's list of actions; generators for
  gpipe, 1f1b, interleaved and zb-h1; a validator that proves a schedule deadlock-free.
- ``replay.py`` / ``simulate.py``: the blocking semantics without processes; timeline, bubble,
  activations held, ASCII picture.
- ``backward.py``: backward split into input (I) and weight (W) gradients for zero-bubble.
- ``runtime.py``: executes one rank's actions with batched P2P (the trainer's entry point).
"""

from megatron_lite.parallel.pipeline.actions import Action, Op, Schedule, ScheduleError
from megatron_lite.parallel.pipeline.partition import (
    ChunkSpec,
    Partition,
    PipelineChunk,
    build_chunk,
    build_stage_chunks,
    check_coverage,
    layer_equivalents,
    partition_layers,
    plan_for_model,
)
from megatron_lite.parallel.pipeline.runtime import PipelineRuntime, PipelineTimeoutError, tied_embedding_groups
from megatron_lite.parallel.pipeline.schedules import SCHEDULES, build_schedule, validate
from megatron_lite.parallel.pipeline.simulate import Costs, Simulation, render, simulate, theory_bubble_ratio

__all__ = [
    "SCHEDULES",
    "Action",
    "ChunkSpec",
    "Costs",
    "Op",
    "Partition",
    "PipelineChunk",
    "PipelineRuntime",
    "PipelineTimeoutError",
    "Schedule",
    "ScheduleError",
    "Simulation",
    "build_chunk",
    "build_schedule",
    "build_stage_chunks",
    "check_coverage",
    "layer_equivalents",
    "partition_layers",
    "plan_for_model",
    "render",
    "simulate",
    "theory_bubble_ratio",
    "tied_embedding_groups",
    "validate",
]
