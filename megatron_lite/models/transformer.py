"""The decoder-only language model, as plain single-device PyTorch.

Nothing here knows about parallelism: tensor, sequence and pipeline parallelism are applied from
outside (``models/parallelize.py``) by replacing submodules. The fused ops come from
``megatron_lite.kernels``, which dispatches to Triton on CUDA and to plain torch on CPU.

Parameter names and layouts (the checkpoint format and the Hugging Face converter rely on these)::

    embed.weight                       (V, H)     token embedding
    pos_embed.weight                   (T, H)     learned positions (gpt2 only)
    layers.{i}.attn_norm.weight        (H,)       [.bias (H,) for layernorm]
    layers.{i}.attn.qkv.weight         ((nh + 2*nkv) * hd, H)   rows: [q heads | k heads | v heads],
                                                  each head's hd rows contiguous [.bias for gpt2]
    layers.{i}.attn.proj.weight        (H, nh * hd)             [.bias for gpt2]
    layers.{i}.mlp_norm.weight         (H,)       [.bias]
    layers.{i}.mlp.gate_up.weight      (2 * F, H) rows: [gate | up]            (swiglu)
    layers.{i}.mlp.up.weight           (F, H)     [.bias]                      (gelu)
    layers.{i}.mlp.down.weight         (H, F)     [.bias for gelu]
    final_norm.weight                  (H,)       [.bias]
    head.weight                        (V, H)     absent when tie_embeddings (embed.weight is used)

RoPE uses the half-split rotation of Hugging Face's Llama (``kernels.apply_rope``): within a head,
dim j pairs with dim j + hd/2, frequency ``rope_theta ** (-2j / hd)``.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from megatron_lite import kernels
from megatron_lite.config import ModelConfig
from megatron_lite.models.recompute import run_block


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (no bias)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with ``residual``, ``(norm(x + residual), x + residual)`` in one pass (one kernel).

        Inputs of two dtypes (under ``torch.autocast`` a bf16 attention output meets the fp32 stream)
        are added apart, promoted as torch's ``+`` does: the fused kernel takes one dtype."""
        if residual is not None and residual.dtype != x.dtype:
            h = x + residual
            return kernels.rms_norm(h, self.weight, self.eps), h
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    """LayerNorm with learned scale and bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with ``residual``, ``(norm(x + residual), x + residual)`` (the add apart: no fused kernel)."""
        if residual is None:
            return kernels.layer_norm(x, self.weight, self.bias, self.eps)
        h = x + residual
        return kernels.layer_norm(h, self.weight, self.bias, self.eps), h


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.hidden, cfg.norm_eps) if cfg.norm == "rmsnorm" else LayerNorm(cfg.hidden, cfg.norm_eps)


def rope_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (seq_len, head_dim/2), in fp32 (Llama's inv_freq = theta^(-2j/hd))."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads.

    ``n_heads`` / ``n_kv_heads`` are the heads this module computes; tensor parallelism sets them to
    the per-rank counts when it shards ``qkv`` and ``proj``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.hidden // cfg.heads
        self.use_rope = cfg.arch == "llama"
        bias = cfg.arch == "gpt2"
        self.qkv = nn.Linear(cfg.hidden, (cfg.heads + 2 * cfg.kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(cfg.heads * self.head_dim, cfg.hidden, bias=bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        qkv = self.qkv(x)  # (B, T, (nh + 2 nkv) hd)
        B, T, _ = qkv.shape  # from qkv, not x: under sequence parallelism x holds T/tp tokens
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if self.use_rope:
            cos, sin = rope
            q, k = kernels.apply_rope(q, cos[:T], sin[:T]), kernels.apply_rope(k, cos[:T], sin[:T])
        # (B, nh, T, hd) for attention; k, v keep nkv heads (GQA is handled inside the kernel)
        y = kernels.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    """SwiGLU (fused gate and up projection) or GELU feed-forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        bias = cfg.arch == "gpt2"
        if self.swiglu:
            self.gate_up = nn.Linear(cfg.hidden, 2 * cfg.ffn_hidden, bias=bias)
        else:
            self.up = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=bias)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, F) each
            return self.down(kernels.swiglu(gate, up))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: h = x + attn(norm(x)), then h + mlp(norm(h)); the first residual add
    is the MLP norm's ``residual``: with RMSNorm one fused op (``kernels.rms_norm``'s ``residual``: one
    read of x and attn's output, one write of h and norm(h)), the same arithmetic as the add, then the
    norm; LayerNorm, and inputs of two dtypes, add apart."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = make_norm(cfg), Attention(cfg)
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        y, h = self.mlp_norm(self.attn(self.attn_norm(x), rope), residual=x)
        return h + self.mlp(y)


class LMLoss(nn.Module):
    """Mean next-token cross-entropy over non-ignored labels; tensor parallelism swaps in a
    vocab-parallel version that never gathers full logits."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return kernels.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class Transformer(nn.Module):
    """Decoder-only LM. ``forward(input_ids (B, T), labels=None)``: logits (B, T, V), or the mean
    loss when ``labels`` (B, T) are given.

    ``layer_context``: a zero-argument factory of the context the blocks run in (default none;
    ``train.dtype=fp8`` sets Transformer Engine's fp8_autocast, ``training/fp8.py``)."""

    layer_context = contextlib.nullcontext

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos_embed = nn.Embedding(cfg.seq_len, cfg.hidden) if cfg.arch == "gpt2" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.final_norm = make_norm(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.loss_fn = LMLoss()
        self.recompute = "none"  # train.recompute: none | full | selective (models/recompute.py)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (cos, sin) tables, built once per device (not parameters, not saved)."""
        if self.cfg.arch != "llama":
            return None
        if self._rope is None or self._rope[0].device != device:
            self._rope = rope_tables(self.cfg.seq_len, self.cfg.hidden // self.cfg.heads, self.cfg.rope_theta, device)
        return self._rope

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)  # (B, T, H)
        if self.pos_embed is not None:
            h = h + self.pos_embed(torch.arange(input_ids.shape[1], device=input_ids.device))
        return h

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.final_norm(h)
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(h, weight)  # (B, T, V)

    def run_layers(self, h: torch.Tensor) -> torch.Tensor:
        rope = self.rope(h.device)
        with self.layer_context():
            for block in self.layers:
                h = run_block(block, self.recompute, h, rope)
        return h

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.output_logits(self.run_layers(self.embed_tokens(input_ids)))
        return logits if labels is None else self.loss_fn(logits, labels)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init: each parameter draws from its own generator seeded by (seed, name),
        so any subset of the model (a pipeline stage, a shard) gets the same values as the whole."""
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.fill_(0.0 if name.endswith(".bias") else 1.0)
                continue
            g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            sd = out_std if name.endswith(("attn.proj.weight", "mlp.down.weight")) else std
            p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, sd, generator=g))


def build_model(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> Transformer:
    """Build on the meta device (no memory), materialise on ``device``, then init from ``seed``."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


class _SkipInit(TorchFunctionMode):
    """Skips every ``torch.nn.init`` call (the layers' default init): on the meta device it runs
    through torch's reference ops, which import ``torch._dynamo`` and, through it, Triton."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def state_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every state-dict entry of the model ``cfg`` builds: no memory, no init, nothing
    imported (the converter's checks run where no GPU library may be loaded)."""
    with torch.device("meta"), _SkipInit():
        return {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameter count; tied weights count once."""
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= sum(p.numel() for name, p in model.named_parameters() if "embed" in name)
    return n
