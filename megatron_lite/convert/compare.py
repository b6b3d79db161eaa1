"""Tensor by tensor: does an HF directory hold exactly a checkpoint's weights under the name map?

``convert verify`` runs this before comparing logits. The logits on a sample text and random ids
can miss a change that only some inputs reach (one embedding row no sampled id selects), so every
tensor of the HF directory is compared with the checkpoint's tensor mapped to it by the adapter
(``checkpoint/hf.py``), after the same transform ``to-hf`` applies. Equal means equal within the
rounding of the coarser of the two dtypes (``|a - b| <= eps * max(|a|, |b|)``): an export written in
the dtype it trained in is bitwise equal; one re-saved in a coarser dtype still passes, a tampered
or mis-copied tensor does not. HF tensors the name map does not use must be what an import may
drop too (:func:`unused_tensor_problem`).

Before either, :func:`config_problem` checks that an HF directory's ``config.json`` describes its own
weights (names and shapes from the safetensors headers): otherwise ``transformers`` would load it
with layers left random or refuse it, after printing its load report. :func:`refuse_other_task` comes
first: a ``config.json`` naming a model that predicts no tokens (a classifier, a base model without a
head) is right about its weights, and the error names that model's class instead.

Memory: one checkpoint tensor and one HF tensor at a time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from megatron_lite.checkpoint.hf import Adapter
from megatron_lite.config import ModelConfig
from megatron_lite.convert.io import CheckpointSource, HFWeights, Shape
from megatron_lite.errors import UserError

# config.json's keys for the model sizes, as (HF key, ModelConfig field), layers first
_SIZE_KEYS = {
    "gpt2": (
        ("n_layer", "layers"), ("n_embd", "hidden"), ("n_inner", "ffn_hidden"), ("n_head", "heads"),
        ("vocab_size", "vocab_size"), ("n_positions", "seq_len"),
    ),
    "llama": (
        ("num_hidden_layers", "layers"), ("hidden_size", "hidden"), ("intermediate_size", "ffn_hidden"),
        ("num_attention_heads", "heads"), ("num_key_value_heads", "kv_heads"), ("vocab_size", "vocab_size"),
    ),
}  # fmt: skip


def hf_shapes(adapter: Adapter, m: ModelConfig) -> dict[str, Shape]:
    """Full HF tensor name -> shape of the model ``m`` in the adapter's HF class (the tensors the name map
    gives; not the optional ones: buffers, a stored copy of a tied head, Qwen2's zero biases)."""
    from megatron_lite.models.transformer import Transformer

    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in Transformer(m).state_dict().items()}
    return {
        hf_name: tuple(shape)
        for name, (hf_names, transform) in adapter.name_map(m).items()
        for hf_name, shape in zip(hf_names, transform.hf_shapes(ours[name], m))
    }


def _layers_problem(adapter: Adapter, m: ModelConfig, names: set[str], layers_key: str) -> str | None:
    prefix = next(h for rule in adapter.rules for h in rule.hf if "{i}" in h).split("{i}")[0]
    found = {int(x.group(1)) for x in map(re.compile(re.escape(prefix) + r"(\d+)\.").match, names) if x}
    if found == set(range(m.layers)):
        return None
    n = len(found)
    if found == set(range(n)):
        held = f"{n} layers ({prefix}0 to {prefix}{n - 1})" if n else "no layers"
    else:
        held = f"layers {', '.join(map(str, sorted(found)))} of {prefix}*"
    return f"it says {layers_key}={m.layers}, the weights hold {held}"


def config_problem(adapter: Adapter, m: ModelConfig, weights: HFWeights) -> str | None:
    """What in an HF directory's ``config.json`` (as ``m``) disagrees with its weights, or None: the number
    of layers, a tensor the configured model has and the weights lack, a shape (headers only), or a tied
    head (``tie_word_embeddings``) stored with other values than the embedding."""
    keys = _SIZE_KEYS["gpt2" if adapter.arch == "gpt2" else "llama"]
    by_hf = weights.full_names(adapter)
    problem = _layers_problem(adapter, m, set(by_hf), keys[0][0])
    if problem:
        return problem
    sizes = ", ".join(f"{key}={getattr(m, field)}" for key, field in keys[1:])
    for hf_name, shape in hf_shapes(adapter, m).items():
        if hf_name not in by_hf:
            return f"the weights lack {hf_name}, which the {adapter.hf_class} it describes has"
        stored = weights.shape(by_hf[hf_name])
        if stored != shape:
            return f"{hf_name} is {stored} in the weights, but {shape} in the model it describes ({sizes})"
    if m.tie_embeddings and "lm_head.weight" in by_hf:
        embed = adapter.name_map(m)["embed.weight"][0][0]
        head, emb = weights.get(by_hf["lm_head.weight"]), weights.get(by_hf[embed])
        if tensor_difference(emb, head):
            return (
                f"it says tie_word_embeddings=true (the output head is {embed}), but the weights hold an "
                "lm_head.weight that differs from it"
            )
    return None


def unused_tensor_problem(adapter: Adapter, m: ModelConfig, weights: HFWeights, used: set[str]) -> str | None:
    """What is wrong with the HF tensors outside ``used`` (full HF names): None when each is a buffer,
    a stored copy of the tied head, or an all-zero bias our model lacks (Qwen2's q/k/v)."""
    by_hf = weights.full_names(adapter)
    zero_only = adapter.zero_shapes(m)
    for hf_name in sorted(set(by_hf) - used):
        if re.search(adapter.ignored, hf_name) or (hf_name == "lm_head.weight" and m.tie_embeddings):
            continue
        if hf_name in zero_only:
            if weights.get(by_hf[hf_name]).count_nonzero():
                return f"{hf_name} is non-zero: megatron-lite's llama has no q/k/v biases"
            continue
        return f"unexpected tensor {hf_name}"
    return None


def refuse_other_task(hf_dir: Path, raw: dict[str, Any], adapter: Adapter, m: ModelConfig, weights: HFWeights) -> None:
    """Refuse an HF directory whose ``config.json`` (``raw``, as ``m``) names in ``architectures`` a model that
    does not predict tokens: another task's head (``LlamaForSequenceClassification``: ``score.weight``), or a
    base model (``LlamaModel``) with neither an ``lm_head.weight`` nor a head tied to the embedding."""
    base = adapter.hf_class.removesuffix("ForCausalLM").removesuffix("LMHeadModel") + "Model"
    named = raw.get("architectures")
    for cls in named if isinstance(named, list) else []:
        if not isinstance(cls, str) or cls.endswith(("ForCausalLM", "LMHeadModel")):
            continue
        if cls != base:
            raise UserError(
                f"{hf_dir / 'config.json'} describes a {cls} (its architectures), a model for another task than "
                f"predicting the next token; megatron-lite imports causal language models ({adapter.hf_class}): "
                f"import this model's {adapter.hf_class} checkpoint"
            )
        if not m.tie_embeddings and "lm_head.weight" not in weights.full_names(adapter):
            raise UserError(
                f"{hf_dir / 'config.json'} describes a {cls} (its architectures), a base model without the output "
                "head that predicts tokens (no lm_head.weight, and tie_word_embeddings is false); import this "
                f"model's {adapter.hf_class} checkpoint, which has it"
            )


def refuse_config_mismatch(hf_dir: Path, adapter: Adapter, m: ModelConfig, weights: HFWeights) -> None:
    """One :class:`UserError` naming what in ``hf_dir``'s ``config.json`` (as ``m``) disagrees with its
    weights (:func:`config_problem`), before ``transformers`` or an import reads any tensor data; it names the
    directory's shards the index leaves out, which may hold the weights config.json describes."""
    problem = config_problem(adapter, m, weights)
    if problem and weights.unlisted:  # a shard the index leaves out may hold what config.json describes
        more = f" (and {len(weights.unlisted) - 1} more)" if len(weights.unlisted) > 1 else ""
        raise UserError(
            f"{hf_dir / 'config.json'} does not match the weights in {hf_dir}: {problem}; model.safetensors.index.json "
            f"does not list {weights.unlisted[0]}{more}, which is in {hf_dir}: if it holds those weights, restore the "
            "index from the model's source, else correct config.json to describe the weights"
        )
    if problem:
        raise UserError(
            f"{hf_dir / 'config.json'} does not match the weights in {hf_dir}: {problem}; correct config.json "
            "to describe the weights (or restore both from the model's source)"
        )


def tensor_difference(expected: torch.Tensor, got: torch.Tensor) -> str | None:
    """None when ``got`` equals ``expected`` within the coarser dtype's rounding, else how it differs."""
    if tuple(got.shape) != tuple(expected.shape):
        return f"has shape {tuple(got.shape)}, the checkpoint's gives {tuple(expected.shape)}"
    if got.dtype == expected.dtype and torch.equal(got, expected):
        return None
    eps = max(torch.finfo(expected.dtype).eps, torch.finfo(got.dtype).eps)
    a, b = expected.float(), got.float()
    diff = (a - b).abs()
    bad = ~(diff <= eps * torch.maximum(a.abs(), b.abs())) & ~(a.isnan() & b.isnan())
    if not bad.any():
        return None
    first = tuple(bad.nonzero()[0].tolist())
    return (
        f"differs from the checkpoint in {int(bad.sum())} of {bad.numel()} elements "
        f"(first at {list(first)}: {b[first].item():.6g}, checkpoint {a[first].item():.6g})"
    )


def compare_tensors(src: CheckpointSource, hf_dir: Path, adapter: Adapter) -> tuple[int, str | None]:
    """(HF tensors found equal, the first problem or None): each of ``src``'s tensors, transformed as
    ``to-hf`` does, against the HF tensor the name map gives it; then the tensors left over."""
    m = src.config.model
    weights = HFWeights(hf_dir)
    by_hf = weights.full_names(adapter)
    name_map = adapter.name_map(m)
    used: set[str] = set()
    for ours, t in src.tensors():
        if ours not in name_map:
            return len(used), f"checkpoint tensor {ours} has no counterpart in a {adapter.arch} model"
        hf_names, transform = name_map[ours]
        parts = list(zip(hf_names, transform.to_hf(t, m)))
        if ours == "embed.weight" and m.tie_embeddings and "lm_head.weight" in by_hf:
            parts.append(("lm_head.weight", parts[0][1]))  # a stored copy of the tied head must match too
        for hf_name, part in parts:
            if hf_name not in by_hf:
                return len(used), f"{hf_name} is missing (the checkpoint's {ours} maps to it)"
            problem = tensor_difference(part, weights.get(by_hf[hf_name]))
            if problem:
                return len(used), f"{hf_name} {problem}"
            used.add(hf_name)
    missing = sorted({h for hs, _ in name_map.values() for h in hs} - used)
    if missing:
        return len(used), f"the checkpoint has no tensor for {missing[0]}"
    return len(used), unused_tensor_problem(adapter, m, weights, used)
