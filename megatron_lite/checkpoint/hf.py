"""Adapters between megatron-lite parameter names and Hugging Face ``transformers`` ones.

One :class:`Adapter` per architecture family holds a literal name map: each rule takes one of our
tensors (names and layouts documented in ``models/transformer.py``) to one or more HF tensors with
a per-tensor transform, and back. ``{i}`` stands for the layer index.

- ``llama`` exports as ``LlamaForCausalLM``, the exact match of our llama (and the class every
  serving stack reads), except that a checkpoint imported from a Mistral (its ``origin.json`` says
  so, :func:`export_type`) goes back to ``MistralForCausalLM``: the same network plus a sliding
  window, kept when it covers ``seq_len`` and dropped otherwise (our model attends to the whole
  sequence). On import we accept ``llama``, ``mistral`` and ``qwen2``. Qwen2 always carries q/k/v
  biases, which we do not have: they must be all zero (they are then dropped, :meth:`Adapter.zero_shapes`)
  or the import is refused. Qwen2 imports still export as Llama: transformers 5 loads the tokenizer of
  every ``qwen2`` directory as its byte-level ``Qwen2Tokenizer`` whatever ``tokenizer_config.json``
  says, which cannot give our sentencepiece ids (and a real Qwen2 has no sentencepiece model for
  ``to-hf`` to convert).
- RoPE: our model and HF's Llama both use the half-split rotation (dim j pairs with j + hd/2), so q
  and k rows are copied as they are, with no interleave permutation; the logits test proves it.
- ``gpt2`` exports as ``GPT2LMHeadModel``: HF's ``Conv1D`` stores weights as (in, out), the
  transpose of our ``nn.Linear``; ``c_attn`` columns are [q | k | v] like our qkv rows; GELU is the
  tanh approximation (``gelu_new``); ``wpe`` holds the learned positions.
- Embedding and head rows beyond ``model.vocab_size`` (padding a parallel layout may add) are
  stripped on export.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_lite.config import ModelConfig
from megatron_lite.config_validate import MAX_SEQ_LEN
from megatron_lite.errors import UserError

log = logging.getLogger(__name__)
Shape = tuple[int, ...]
SUPPORTED = "llama, mistral, qwen2 (with all-zero q/k/v biases), gpt2"


class Copy:
    """The tensor is the same on both sides."""

    def to_hf(self, t: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
        return [t]

    def from_hf(self, parts: list[torch.Tensor], m: ModelConfig) -> torch.Tensor:
        return parts[0]

    def hf_shapes(self, shape: Shape, m: ModelConfig) -> list[Shape]:
        return [shape]


class VocabRows(Copy):
    """Embedding or head: rows past ``vocab_size`` are padding, stripped on export."""

    def to_hf(self, t: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
        return [t[: m.vocab_size]]

    def hf_shapes(self, shape: Shape, m: ModelConfig) -> list[Shape]:
        return [(min(shape[0], m.vocab_size), *shape[1:])]


class SplitRows:
    """One fused tensor of ours is several HF tensors stacked along rows (dim 0)."""

    def __init__(self, sizes: Callable[[ModelConfig], tuple[int, ...]]) -> None:
        self.sizes = sizes

    def to_hf(self, t: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
        return list(t.split(self.sizes(m), dim=0))

    def from_hf(self, parts: list[torch.Tensor], m: ModelConfig) -> torch.Tensor:
        return torch.cat(parts, dim=0)

    def hf_shapes(self, shape: Shape, m: ModelConfig) -> list[Shape]:
        return [(n, *shape[1:]) for n in self.sizes(m)]


class Transpose:
    """HF's GPT-2 ``Conv1D`` keeps weights as (in, out); ``nn.Linear`` keeps (out, in)."""

    def to_hf(self, t: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
        return [t.t().contiguous()]

    def from_hf(self, parts: list[torch.Tensor], m: ModelConfig) -> torch.Tensor:
        return parts[0].t().contiguous()

    def hf_shapes(self, shape: Shape, m: ModelConfig) -> list[Shape]:
        return [shape[::-1]]


Transform = Copy | SplitRows | Transpose
COPY, VOCAB, TRANSPOSE = Copy(), VocabRows(), Transpose()


def _qkv_rows(m: ModelConfig) -> tuple[int, int, int]:
    hd = m.hidden // m.heads
    return m.heads * hd, m.kv_heads * hd, m.kv_heads * hd  # [q heads | k heads | v heads]


QKV = SplitRows(_qkv_rows)
GATE_UP = SplitRows(lambda m: (m.ffn_hidden, m.ffn_hidden))  # [gate | up]


@dataclass(frozen=True)
class Rule:
    """Our tensor ``ours`` is the HF tensors ``hf`` under ``transform``."""

    ours: str
    hf: tuple[str, ...]
    transform: Transform = COPY


_L, _H = "model.layers.{i}", "transformer.h.{i}"
LLAMA_RULES = (
    Rule("embed.weight", ("model.embed_tokens.weight",), VOCAB),
    Rule("layers.{i}.attn_norm.weight", (f"{_L}.input_layernorm.weight",)),
    Rule(
        "layers.{i}.attn.qkv.weight",
        (f"{_L}.self_attn.q_proj.weight", f"{_L}.self_attn.k_proj.weight", f"{_L}.self_attn.v_proj.weight"),
        QKV,
    ),
    Rule("layers.{i}.attn.proj.weight", (f"{_L}.self_attn.o_proj.weight",)),
    Rule("layers.{i}.mlp_norm.weight", (f"{_L}.post_attention_layernorm.weight",)),
    Rule("layers.{i}.mlp.gate_up.weight", (f"{_L}.mlp.gate_proj.weight", f"{_L}.mlp.up_proj.weight"), GATE_UP),
    Rule("layers.{i}.mlp.down.weight", (f"{_L}.mlp.down_proj.weight",)),
    Rule("final_norm.weight", ("model.norm.weight",)),
    Rule("head.weight", ("lm_head.weight",), VOCAB),
)
GPT2_RULES = (
    Rule("embed.weight", ("transformer.wte.weight",), VOCAB),
    Rule("pos_embed.weight", ("transformer.wpe.weight",)),
    Rule("layers.{i}.attn_norm.weight", (f"{_H}.ln_1.weight",)),
    Rule("layers.{i}.attn_norm.bias", (f"{_H}.ln_1.bias",)),
    Rule("layers.{i}.attn.qkv.weight", (f"{_H}.attn.c_attn.weight",), TRANSPOSE),
    Rule("layers.{i}.attn.qkv.bias", (f"{_H}.attn.c_attn.bias",)),
    Rule("layers.{i}.attn.proj.weight", (f"{_H}.attn.c_proj.weight",), TRANSPOSE),
    Rule("layers.{i}.attn.proj.bias", (f"{_H}.attn.c_proj.bias",)),
    Rule("layers.{i}.mlp_norm.weight", (f"{_H}.ln_2.weight",)),
    Rule("layers.{i}.mlp_norm.bias", (f"{_H}.ln_2.bias",)),
    Rule("layers.{i}.mlp.up.weight", (f"{_H}.mlp.c_fc.weight",), TRANSPOSE),
    Rule("layers.{i}.mlp.up.bias", (f"{_H}.mlp.c_fc.bias",)),
    Rule("layers.{i}.mlp.down.weight", (f"{_H}.mlp.c_proj.weight",), TRANSPOSE),
    Rule("layers.{i}.mlp.down.bias", (f"{_H}.mlp.c_proj.bias",)),
    Rule("final_norm.weight", ("transformer.ln_f.weight",)),
    Rule("final_norm.bias", ("transformer.ln_f.bias",)),
    Rule("head.weight", ("lm_head.weight",), VOCAB),
)


@dataclass(frozen=True)
class Adapter:
    """The name map of one architecture family and what its HF checkpoints may carry besides."""

    arch: str
    hf_class: str
    rules: tuple[Rule, ...]
    base_prefix: str
    """Prefix a base-model checkpoint (``GPT2Model`` rather than ``GPT2LMHeadModel``) lacks."""
    ignored: str
    """Regex of HF tensors that are buffers, not weights (old checkpoints saved them)."""
    zero_biases: bool = False
    """The HF class has q/k/v biases we lack (Qwen2): imported only when all zero."""

    def name_map(self, m: ModelConfig) -> dict[str, tuple[tuple[str, ...], Transform]]:
        """Our tensor names of a model with config ``m`` -> (HF names, transform), in layer order."""
        out: dict[str, tuple[tuple[str, ...], Transform]] = {}
        for rule in self.rules:
            if rule.ours == "head.weight" and m.tie_embeddings:
                continue  # the tied head is embed.weight; HF ties lm_head to the embedding itself
            layers = range(m.layers) if "{i}" in rule.ours else [None]
            for i in layers:
                hf = tuple(h.format(i=i) for h in rule.hf)
                out[rule.ours.format(i=i)] = (hf, rule.transform)
        return out

    def zero_shapes(self, m: ModelConfig) -> dict[str, Shape]:
        """HF tensors the class has and our model lacks, all zero in an exact import: name -> shape."""
        if not self.zero_biases:
            return {}
        rows = dict(zip("qkv", _qkv_rows(m)))
        return {f"model.layers.{i}.self_attn.{p}_proj.bias": (rows[p],) for i in range(m.layers) for p in "qkv"}

    def hf_name(self, name: str) -> str:
        """``name`` with the base-model prefix added where a base-model checkpoint left it out."""
        return name if name.startswith(self.base_prefix) or name == "lm_head.weight" else self.base_prefix + name


_INV_FREQ = r"\.rotary_emb\.inv_freq$"
LLAMA = Adapter("llama", "LlamaForCausalLM", LLAMA_RULES, "model.", _INV_FREQ)
MISTRAL = Adapter("mistral", "MistralForCausalLM", LLAMA_RULES, "model.", _INV_FREQ)
QWEN2 = Adapter("qwen2", "Qwen2ForCausalLM", LLAMA_RULES, "model.", _INV_FREQ, zero_biases=True)
GPT2 = Adapter("gpt2", "GPT2LMHeadModel", GPT2_RULES, "transformer.", r"\.attn\.(bias|masked_bias)$")
ADAPTERS = {"llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2, "gpt2": GPT2}
"""By HF ``model_type``; our ``model.arch`` values (llama, gpt2) are among them."""


def adapter_for(model_type: str | None) -> Adapter:
    """The adapter of an HF ``model_type``, or a :class:`UserError` listing the supported ones."""
    if model_type not in ADAPTERS:
        raise UserError(f"Hugging Face model_type {model_type!r} is not supported; supported: {SUPPORTED}")
    return ADAPTERS[model_type]


def export_type(m: ModelConfig, origin: dict[str, Any] | None = None) -> str:
    """The HF ``model_type`` to export ``m`` as: ``mistral`` for a llama imported from a Mistral
    (``origin``: the checkpoint's ``origin.json`` from ``convert from-hf``), else ``m.arch``."""
    source = (origin or {}).get("model_type")
    return "mistral" if m.arch == "llama" and source == "mistral" else m.arch


def check_exportable(m: ModelConfig) -> None:
    """Refuse, naming what is wrong and what would work, a model no Hugging Face class computes
    (run before anything else in ``to-hf``: a llama with LayerNorm or GELU also has other tensors)."""
    # the gpt2 rules repeat config validation's: a checkpoint's saved config.yaml is read back here unvalidated
    if m.arch == "gpt2" and m.kv_heads != m.heads:
        raise UserError(
            f"GPT-2 has no grouped-query attention; this model has kv_heads={m.kv_heads}, heads={m.heads} "
            "(GPT2LMHeadModel needs kv_heads = heads)"
        )
    if m.arch == "gpt2" and (m.norm, m.activation) != ("layernorm", "gelu"):
        raise UserError(
            f"model.arch=gpt2 with norm={m.norm}, activation={m.activation} has no Hugging Face class; "
            "GPT-2 needs norm=layernorm and activation=gelu"
        )
    if m.arch == "llama" and (m.norm, m.activation) != ("rmsnorm", "swiglu"):
        raise UserError(
            f"model.arch=llama with norm={m.norm}, activation={m.activation} has no Hugging Face class; "
            "Llama needs norm=rmsnorm and activation=swiglu (LayerNorm + GELU is model.arch=gpt2)"
        )


def _llama_family_config(m: ModelConfig, model_type: str, source: dict[str, Any], common: dict[str, Any]) -> Any:
    """``LlamaConfig``, or ``MistralConfig`` (see :func:`export_type`), computing our llama."""
    import transformers

    kw = dict(
        hidden_size=m.hidden,
        intermediate_size=m.ffn_hidden,
        num_hidden_layers=m.layers,
        num_attention_heads=m.heads,
        num_key_value_heads=m.kv_heads,
        head_dim=m.hidden // m.heads,
        hidden_act="silu",
        max_position_embeddings=m.seq_len,
        rms_norm_eps=m.norm_eps,
        rope_theta=float(m.rope_theta),  # transformers 5 files it under rope_parameters (to_hf adds it on top)
        **common,
    )
    if model_type == "mistral":  # a window covering seq_len never binds within it; a shorter one would
        window = source.get("sliding_window")
        return transformers.MistralConfig(sliding_window=window if window and window >= m.seq_len else None, **kw)
    return transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **kw)


def export_config(
    m: ModelConfig,
    special_ids: dict[str, int | None],
    dtype: torch.dtype = torch.float32,
    origin: dict[str, Any] | None = None,
) -> Any:
    """The ``transformers`` config object of our model config (refusing what HF cannot express);
    ``dtype`` is the weights' (the dtype ``from_pretrained(..., dtype="auto")`` loads them in);
    ``origin`` the checkpoint's ``origin.json``, which picks the class (:func:`export_type`)."""
    import transformers

    check_exportable(m)
    common = dict(vocab_size=m.vocab_size, initializer_range=m.init_std, tie_word_embeddings=m.tie_embeddings)
    common.update(special_ids, dtype=str(dtype).removeprefix("torch."), use_cache=True)
    model_type = export_type(m, origin)
    if m.arch == "gpt2":
        cfg = transformers.GPT2Config(
            n_positions=m.seq_len,
            n_embd=m.hidden,
            n_layer=m.layers,
            n_head=m.heads,
            n_inner=m.ffn_hidden,
            activation_function="gelu_new",
            layer_norm_epsilon=m.norm_eps,
            # our model has no dropout; HF's 0.1 defaults would change fine-tuning behaviour
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **common,
        )
    else:
        cfg = _llama_family_config(m, model_type, (origin or {}).get("hf_config") or {}, common)
    cfg.architectures = [ADAPTERS[model_type].hf_class]
    return cfg


def _need(ok: bool, model_type: str, what: str) -> None:
    """Refuse an HF config using ``what``, which megatron-lite's model cannot compute."""
    if not ok:
        raise UserError(
            f"this {model_type} model cannot be imported: {what}; megatron-lite's model does not compute it, "
            f"so the imported weights would give other outputs. Import a {model_type} checkpoint with the standard "
            "architecture, or fine-tune this one with a framework that supports it"
        )


def _llama_family(c: Any, mt: str, quiet: bool = False) -> ModelConfig:
    """Our config of a Llama, Mistral or Qwen2 HF config, refusing features we do not have."""
    rope = getattr(c, "rope_parameters", None) or {}
    _need(
        rope.get("rope_type", "default") == "default", mt, f"RoPE scaling {rope.get('rope_type')!r} is not implemented"
    )
    _need(c.hidden_act == "silu", mt, f"activation {c.hidden_act!r} (only silu/SwiGLU)")
    _need(not getattr(c, "attention_bias", False), mt, "attention biases")
    _need(not getattr(c, "mlp_bias", False), mt, "MLP biases")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    _need(head_dim * c.num_attention_heads == c.hidden_size, mt, f"head_dim {head_dim} != hidden / heads")
    seq_len = c.max_position_embeddings
    window = getattr(c, "sliding_window", None)
    uses_window = mt == "mistral" or "sliding_attention" in (getattr(c, "layer_types", None) or [])
    if uses_window and window and window < seq_len:
        seq_len = window  # sequences no longer than the window see full causal attention
        (log.debug if quiet else log.warning)(
            "this %s model attends within a sliding window of %d tokens, fewer than its max_position_embeddings "
            "(%d): model.seq_len is set to %d, the longest sequence on which megatron-lite's full causal "
            "attention computes the same model",
            mt,
            window,
            c.max_position_embeddings,
            window,
        )
    return ModelConfig(
        arch="llama",
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads or c.num_attention_heads,
        ffn_hidden=c.intermediate_size,
        vocab_size=c.vocab_size,
        seq_len=seq_len,
        norm="rmsnorm",
        activation="swiglu",
        tie_embeddings=bool(c.tie_word_embeddings),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        norm_eps=float(c.rms_norm_eps),
        init_std=float(c.initializer_range),
    )


def _gpt2(c: Any) -> ModelConfig:
    """Our config of an HF GPT-2 config, refusing variants our block does not compute."""
    _need(c.activation_function in ("gelu_new", "gelu_pytorch_tanh"), "gpt2", f"activation {c.activation_function!r}")
    _need(c.scale_attn_weights and not c.scale_attn_by_inverse_layer_idx, "gpt2", "non-standard attention scaling")
    _need(not c.add_cross_attention, "gpt2", "cross-attention")
    return ModelConfig(
        arch="gpt2",
        layers=c.n_layer,
        hidden=c.n_embd,
        heads=c.n_head,
        kv_heads=c.n_head,
        ffn_hidden=c.n_inner or 4 * c.n_embd,
        vocab_size=c.vocab_size,
        seq_len=c.n_positions,
        norm="layernorm",
        activation="gelu",
        tie_embeddings=bool(c.tie_word_embeddings),
        norm_eps=float(c.layer_norm_epsilon),
        init_std=float(c.initializer_range),
    )


def import_config(hf_config: Any, quiet: bool = False) -> ModelConfig:
    """Our fully resolved model config of a ``transformers`` config object (``quiet``: no warning that a
    short sliding window sets ``seq_len``, for callers that only read the tensor shapes)."""
    mt = hf_config.model_type
    adapter_for(mt)
    m = _gpt2(hf_config) if mt == "gpt2" else _llama_family(hf_config, mt, quiet)
    if m.seq_len > MAX_SEQ_LEN:  # it would become model.seq_len: refused here, naming the HF key
        key = "n_positions" if mt == "gpt2" else "max_position_embeddings"
        raise UserError(
            f"this {mt} model's {key} is {m.seq_len:,}, more than the {MAX_SEQ_LEN:,} (2**20) tokens megatron-lite's "
            f"model.seq_len may be (its position tables are built for it); set {key} in its config.json to the "
            "context the model was trained for"
        )
    return m
