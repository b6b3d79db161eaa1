"""The single-device model: shapes, GQA, init determinism, meta build, tied weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_lite import kernels
from megatron_lite.config import fill_defaults, load_config
from megatron_lite.models.transformer import build_model, count_parameters, rope_tables


def tiny(*overrides):
    cfg = load_config(None, ["model.layers=2", "model.hidden=32", "model.heads=4", "model.seq_len=16", *overrides])
    return fill_defaults(cfg, vocab_size=97).model


def test_forward_shapes_and_loss_for_both_families():
    for arch in ("llama", "gpt2"):
        m = build_model(tiny(f"model.arch={arch}", "model.kv_heads=2" if arch == "llama" else "model.kv_heads=4"), 0)
        x = torch.randint(0, 97, (3, 16))
        logits = m(x)
        assert logits.shape == (3, 16, 97)
        loss = m(x[:, :-1], x[:, 1:])
        ref = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        torch.testing.assert_close(loss, ref, rtol=0, atol=0)
        # an untrained model with small init predicts nearly uniformly
        assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_init_is_deterministic_and_per_parameter():
    a, b = build_model(tiny(), seed=5), build_model(tiny(), seed=5)
    c = build_model(tiny(), seed=6)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
        if p.ndim == 2:
            assert not torch.equal(p, r), n
    # a parameter's init depends on its name only: a deeper model shares the first layers' values
    deeper = build_model(tiny("model.layers=3"), seed=5)
    assert torch.equal(deeper.layers[1].attn.qkv.weight, a.layers[1].attn.qkv.weight)


def test_parameter_names_and_layouts():
    m = build_model(tiny("model.kv_heads=2", "model.tie_embeddings=false", "model.ffn_hidden=48"), 0)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    hd = 32 // 4
    assert shapes["embed.weight"] == (97, 32) and shapes["head.weight"] == (97, 32)
    assert shapes["layers.0.attn.qkv.weight"] == ((4 + 2 * 2) * hd, 32)
    assert shapes["layers.0.mlp.gate_up.weight"] == (96, 32) and shapes["layers.1.mlp.down.weight"] == (
        32,
        48,
    )
    tied = build_model(tiny("model.tie_embeddings=true"), 0)
    assert tied.head is None and "head.weight" not in dict(tied.named_parameters())
    g = build_model(tiny("model.arch=gpt2"), 0)
    assert {"pos_embed.weight", "layers.0.attn.qkv.bias", "layers.0.mlp.up.weight"} <= set(dict(g.named_parameters()))
    assert count_parameters(tied) == sum(p.numel() for p in tied.parameters())


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_equals_repeated_kv_heads(kv_heads):
    # kv_heads=2 of 4 query heads tells grouping apart: query heads 0, 1 use KV head 0 and 2, 3 use
    # KV head 1 (Llama's repeat_kv), which tiling the KV heads (0, 1, 0, 1) would get wrong
    m = build_model(tiny(f"model.kv_heads={kv_heads}"), 3)
    x = torch.randint(0, 97, (2, 16))
    out = m(x)
    # expand each KV head into the 4 // kv_heads query heads it serves: multi-head attention with the same function
    full = build_model(tiny("model.kv_heads=4"), 3)
    full.load_state_dict({k: v for k, v in m.state_dict().items() if "qkv" not in k}, strict=False)
    hd, group = 32 // 4, 4 // kv_heads
    for blk_full, blk in zip(full.layers, m.layers):
        q, k, v = blk.attn.qkv.weight.split([32, kv_heads * hd, kv_heads * hd])
        heads = [torch.cat([t[h * hd : (h + 1) * hd]] * group) for t in (k, v) for h in range(kv_heads)]
        with torch.no_grad():
            blk_full.attn.qkv.weight.copy_(torch.cat([q, *heads]))
    # fp32: the qkv GEMM of 96 rows and the one of 32 + 16 * kv_heads rows may be blocked differently by
    # BLAS, a few ulps (~1e-7 relative) per logit; the logits are O(1), so 1e-6 is ~10x that
    torch.testing.assert_close(full(x), out, rtol=1e-6, atol=1e-6)


def test_rope_matches_complex_rotation():
    # Llama's angles t * theta^(-2j/d), in float64 by the standard library: cos and sin are each
    # those angles rounded once to fp32 (two float64 evaluations may round to neighbouring fp32
    # values: one fp32 ulp, 2^-23 relative, 2^-24 absolute near 0)
    cos, sin = rope_tables(5, 8, 10000.0)
    angles = [[t * 10000.0 ** (-2 * j / 8) for j in range(4)] for t in range(5)]
    ulp = dict(rtol=2**-23, atol=2**-24)
    torch.testing.assert_close(cos, torch.tensor([[math.cos(a) for a in row] for row in angles]), **ulp)
    torch.testing.assert_close(sin, torch.tensor([[math.sin(a) for a in row] for row in angles]), **ulp)
    # the model's rotation multiplies each pair (x_j, x_{j + d/2}), as a complex number, by e^(i angle)
    x = torch.randn(2, 5, 3, 8, generator=torch.Generator().manual_seed(0))
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.complex(cos, sin)[None, :, None]
    # fp32: x1*cos - x2*sin rounded per product (or fused) against complex64's own order, ~1 ulp of |x|
    torch.testing.assert_close(kernels.apply_rope(x, cos, sin), torch.cat([z.real, z.imag], -1), rtol=1e-6, atol=1e-6)


def test_causality_future_tokens_do_not_change_past_logits():
    m = build_model(tiny(), 1)
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 97
    torch.testing.assert_close(m(x)[0, :10], m(y)[0, :10], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_gives_identical_grads(mode):
    m = build_model(tiny(), 2)
    x = torch.randint(0, 97, (2, 16))
    m(x[:, :-1], x[:, 1:]).backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.recompute = mode
    m(x[:, :-1], x[:, 1:]).backward()
    for a, p in zip(g1, m.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=0, atol=0)


class _OpCounter(TorchDispatchMode):
    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names, self.counts = names, dict.fromkeys(names, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.counts:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def test_selective_recompute_reruns_the_elementwise_ops_but_no_matmul_or_attention():
    ops = ("mm", "_scaled_dot_product_flash_attention_for_cpu", "rsqrt", "silu")
    x = torch.randint(0, 97, (2, 16))
    counts = {}
    for mode in ("none", "selective", "full"):
        m = build_model(tiny(), 2)
        m.recompute = mode
        loss = m(x[:, :-1], x[:, 1:])
        with _OpCounter(ops) as counter:
            loss.backward()
        counts[mode] = counter.counts
    none, sel, full = counts["none"], counts["selective"], counts["full"]
    layers = tiny().layers
    assert none["rsqrt"] == none["silu"] == none["_scaled_dot_product_flash_attention_for_cpu"] == 0
    # selective: the norms and the activation re-run in backward, the GEMMs and attention do not
    assert sel["rsqrt"] == 2 * layers and sel["silu"] == layers
    assert sel["mm"] == none["mm"] and sel["_scaled_dot_product_flash_attention_for_cpu"] == 0
    # full: the block forward re-runs, GEMMs and attention too (qkv, proj and gate_up: the re-run
    # stops before `down`, whose output backward never needs)
    assert full["mm"] == none["mm"] + 3 * layers and full["_scaled_dot_product_flash_attention_for_cpu"] == layers


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_block_adds_its_first_residual_inside_the_mlps_norm(arch, monkeypatch):
    """h = x + attn(norm(x)) and norm(h) are one op (``kernels.rms_norm``'s residual: one pass over
    the activations on a GPU), the same numbers as the add, then the norm (bitwise on CPU)."""
    m = build_model(tiny(f"model.arch={arch}", "model.kv_heads=4"), 4)
    block, x = m.layers[0], torch.randn(2, 16, 32)
    rope = rope_tables(16, 8, 10000.0) if arch == "llama" else None
    calls, real = [], kernels.rms_norm
    record = lambda x, w, eps, r=None: calls.append(r is not None) or real(x, w, eps, r)  # noqa: E731
    monkeypatch.setattr(kernels, "rms_norm", record)
    out = block(x, rope)
    assert calls == ([False, True] if arch == "llama" else [])  # attn_norm(x), then mlp_norm(attn, residual=x)
    h = x + block.attn(block.attn_norm(x), rope)
    assert torch.equal(out, h + block.mlp(block.mlp_norm(h)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_model_under_autocast_adds_its_bf16_attention_output_to_the_fp32_stream(arch):
    """Under ``torch.autocast`` the attention output is bf16 and the block input fp32: the residual
    add promotes as torch's ``+`` (the fused norm takes one dtype), the same numbers as the add apart."""
    m = build_model(tiny(f"model.arch={arch}", "model.kv_heads=4"), 4)
    block, x = m.layers[0], torch.randn(2, 16, 32)
    rope = rope_tables(16, 8, 10000.0) if arch == "llama" else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, rope)
        h = x + block.attn(block.attn_norm(x), rope)
        assert h.dtype == torch.float32
        assert torch.equal(out, h + block.mlp(block.mlp_norm(h)))
