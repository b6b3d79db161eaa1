"""``train.dtype=fp8``: the block projections run as Transformer Engine ``te.Linear`` layers in FP8.

The regime is bf16's (``parallel/precision.py``: bf16 parameters and activations, fp32 main grads
and master weights) with one change: every linear layer inside the transformer blocks (attention
qkv and output projections, the MLP's gate/up and down) becomes a ``te.Linear`` holding the same
weights under the same names, and the blocks run under ``te.fp8_autocast`` with a delayed-scaling
recipe (E4M3 forward, E5M2 gradients: ``Format.HYBRID``; an amax history of 1024 steps reduced
with ``max``, Transformer Engine's ``DelayedScaling`` defaults). The embedding, the norms and the
output head stay bf16, as in Megatron and NeMo.

Requirements, checked before the model is built (:func:`config_problem` by ``plan.check_layout``,
:func:`device_problem` by the trainer once the device is known), each failing with one
message that names the fix: a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell),
a working Transformer Engine (``kernels.accelerators.transformer_engine_problem``), and shapes FP8
GEMMs accept (every projection width a multiple of 16, tokens per microbatch a multiple of 16).
Not combined with megatron-lite's own tensor-parallel layers (``parallel.tp`` must be 1;
data and pipeline parallelism apply unchanged), with ``train.recompute`` (FP8 recompute needs TE's
own checkpoint function to replay the scaling state) or with ``train.compile``.

The FP8 scaling state (amax histories) lives in the modules and is not saved in checkpoints: a
resumed run rebuilds it within the first steps. Checkpoints and HF exports hold the bf16/fp32
weights under the usual names, so an FP8 run resumes in bf16 and the other way round.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from megatron_lite.kernels.accelerators import transformer_engine_problem

if TYPE_CHECKING:
    from megatron_lite.config import Config

log = logging.getLogger(__name__)
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
ALIGN = 16  # TE's FP8 GEMMs: matrix widths (and token counts) in multiples of 16
AMAX_HISTORY = 1024


def device_problem(device: torch.device) -> str | None:
    """Why ``train.dtype=fp8`` cannot run on ``device`` (with the fix), or None."""
    if device.type != "cuda":
        return f"it needs a CUDA GPU of compute capability >= 8.9, and this run is on {device.type}; use bf16"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"{name} has compute capability {capability[0]}.{capability[1]}; FP8 GEMMs need 8.9+ "
            "(Ada, Hopper or newer): use train.dtype=bf16"
        )
    te = transformer_engine_problem()
    if te is not None:
        return f"Transformer Engine is {te}: pip install transformer-engine[pytorch], or use train.dtype=bf16"
    return None


def config_problem(cfg: Config) -> str | None:
    """Why ``train.dtype=fp8`` cannot run with ``cfg`` whatever the device: layout, options, shapes."""
    m, t = cfg.model, cfg.train
    if cfg.parallel.tp > 1:
        return f"parallel.tp={cfg.parallel.tp}: FP8 layers are not combined with tensor parallelism yet; use tp=1"
    if t.recompute != "none":
        return f"train.recompute={t.recompute}: FP8 recompute is not supported; use train.recompute=none"
    if t.compile:
        return "train.compile=true is not combined with FP8 layers; use train.compile=false"
    head_dim = m.hidden // m.heads
    widths = {
        "model.hidden": m.hidden,
        "model.ffn_hidden": m.ffn_hidden,
        "qkv width (heads + 2 kv_heads) x head dim": (m.heads + 2 * m.kv_heads) * head_dim,
        "tokens per microbatch (micro_batch_size x seq_len)": t.micro_batch_size * m.seq_len,
    }
    bad = [f"{name} = {value}" for name, value in widths.items() if value % ALIGN]
    if bad:
        return f"FP8 GEMMs need multiples of {ALIGN}: {', '.join(bad)}"
    return None


def convert_to_te(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` inside ``model.layers`` by a ``te.Linear`` holding the same
    weights under the same names (parameters in ``dtype``); returns how many were replaced.
    Call after the weights are final (initialised or loaded) and before building the optimizer."""
    import transformer_engine.pytorch as te

    swapped = 0
    for block in model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                weight = child.weight
                layer = te.Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    params_dtype=dtype,
                    device=weight.device,
                )
                with torch.no_grad():
                    layer.weight.copy_(weight)
                    if child.bias is not None:
                        layer.bias.copy_(child.bias)
                setattr(parent, name, layer)
                swapped += 1
    return swapped


def autocast_factory(group: torch.distributed.ProcessGroup | None) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of ``te.fp8_autocast`` contexts (delayed scaling, HYBRID format);
    ``group``: the ranks whose amax values are reduced together (the data-parallel replicas)."""
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling, Format

    recipe = DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=AMAX_HISTORY, amax_compute_algo="max")
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


def enable(chunks: list[nn.Module], dtype: torch.dtype, group: torch.distributed.ProcessGroup | None) -> None:
    """Turn each model chunk's blocks into FP8 ``te.Linear`` layers run under ``te.fp8_autocast``."""
    make_context = autocast_factory(group)
    swapped = 0
    for chunk in chunks:
        swapped += convert_to_te(chunk, dtype)
        chunk.layer_context = make_context
    log.info("fp8: %d block projections run as Transformer Engine te.Linear under fp8_autocast", swapped)
