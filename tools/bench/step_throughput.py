"""Train-step throughput of megatron-lite against two baselines, in one process.

    python tools/bench/step_throughput.py [--steps 8] [--layers 6] [--hidden 384] [--seq 256] [--batch 8]
    python tools/bench/step_throughput.py --device cuda --layers 12 --hidden 2048 --heads 16 \
        --kv-heads 4 --ffn 5632 --seq 2048 --batch 4          # a ~0.56B Llama on one GPU, bf16

1. ours: the framework's own ``Trainer.train_step``: the next batch of its loader, the check of its
   token ids against the vocabulary (``check_batch_ids``: one reduction, one host read), and the
   engine's step (copy to the device, model, loss, backward, clipping, AdamW, one host read);
2. plain: the same Llama written here in plain eager PyTorch, the straightforward way (separate
   q/k/v and gate/up projections, rotate-half RoPE, SDPA), with the same optimizer and clipping;
3. hf: ``transformers.LlamaForCausalLM`` with the same config, batch, optimizer and clipping.

The baselines' steps (``make_step``) take their data as ours does: the next batch of a
``PretrainingLoader`` over the trainer's dataset (one loader each, from the first batch, so all
three train on the same sequence of batches), copied with ``.to(device, non_blocking=True)`` as the
engine copies it, then forward, backward, clipping, AdamW and the loss read on the host. Only the
token-id check is ours alone, so the ratios compare training steps, not data handling.

Precision: fp32 on CPU. With ``--dtype bf16`` (the default on CUDA) ours runs its own bf16 regime
(bf16 parameters and activations, fp32 main grads and master weights, ``parallel/precision.py``)
and the two baselines run the way their users train in bf16: fp32 parameters and AdamW under
``torch.autocast(dtype=torch.bfloat16)`` (what ``transformers.Trainer(bf16=True)`` does).

The three run in interleaved rounds (ours, plain, hf, ours, ...) so machine noise hits all alike;
each reports the median step time. The last line is JSON: ``{"vs_plain_torch": r1, "vs_hf": r2}``
(tokens/s ratios, > 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import load_config
from megatron_lite.data.corpus import default_corpus_files
from megatron_lite.data.gpt_dataset import PretrainingLoader
from megatron_lite.training.trainer import Trainer


class PlainBlock(nn.Module):
    def __init__(self, d: int, nh: int, nkv: int, ffn: int) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, d // nh
        self.q, self.k = nn.Linear(d, d, bias=False), nn.Linear(d, nkv * self.hd, bias=False)
        self.v, self.o = nn.Linear(d, nkv * self.hd, bias=False), nn.Linear(d, d, bias=False)
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)
        self.n1, self.n2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))

    @staticmethod
    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.norm(x, self.n1)
        q = self.rope(self.q(h).view(B, T, self.nh, self.hd).transpose(1, 2), cos, sin)
        k = self.rope(self.k(h).view(B, T, self.nkv, self.hd).transpose(1, 2), cos, sin)
        v = self.v(h).view(B, T, self.nkv, self.hd).transpose(1, 2)
        rep = self.nh // self.nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, D))
        h = self.norm(x, self.n2)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class PlainLlama(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, nh: int, nkv: int, ffn: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(PlainBlock(d, nh, nkv, ffn) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(d))
        hd = d // nh
        inv = 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.outer(torch.arange(seq).float(), inv)
        self.register_buffer("cos", torch.cat((ang, ang), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((ang, ang), -1).sin(), persistent=False)

    def forward(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        T = idx.shape[1]
        for b in self.blocks:
            x = b(x, self.cos[:T], self.sin[:T])
        logits = PlainBlock.norm(x, self.norm) @ self.embed.weight.T
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def make_step(
    model: nn.Module, loss_of, loader: PretrainingLoader, device: torch.device, autocast: bool, lr: float = 1e-3
):
    """One optimizer step of ``model`` the way every baseline does it: the loader's next batch copied
    to ``device`` (as the trainer's engine copies it), forward, backward, clip, AdamW."""
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

    def step() -> float:
        (batch,) = loader.next_step()  # one microbatch: global batch = micro batch
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def build_all(a: argparse.Namespace):
    """(ours, plain, hf) step functions, each drawing its batches from its own loader."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ov = [
        f"model.layers={a.layers}",
        f"model.hidden={a.hidden}",
        f"model.heads={a.heads}",
        f"model.kv_heads={a.kv_heads}",
        f"model.ffn_hidden={a.ffn}",
        f"model.seq_len={a.seq}",
        "model.tie_embeddings=true",
        f"train.micro_batch_size={a.batch}",
        f"train.global_batch_size={a.batch}",
        "train.steps=1000000",
        "log.progress=false",
        "checkpoint.resume=none",
        "data.valid_fraction=0",
        f"log.dir={tempfile.mkdtemp()}",
        f"train.device={a.device}",
        f"train.dtype={a.dtype}",
    ]
    trainer = Trainer(load_config(None, ov))
    vocab = trainer.cfg.model.vocab_size
    device = trainer.device
    autocast = a.dtype == "bf16"

    def ours() -> float:
        return trainer.train_step()["loss"]

    def loader() -> PretrainingLoader:
        return PretrainingLoader(trainer.loader.dataset, a.batch, a.batch)

    plain_model = PlainLlama(vocab, a.hidden, a.layers, a.heads, a.kv_heads, a.ffn, a.seq)
    plain = make_step(plain_model, lambda b: plain_model(b[:, :-1], b[:, 1:]), loader(), device, autocast)
    hf_cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=a.hidden,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=a.seq,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    hf_model = LlamaForCausalLM(hf_cfg)
    # HF shifts labels internally: T+1 tokens in gives the same T predictions as ours
    hf = make_step(hf_model, lambda b: hf_model(input_ids=b, labels=b).loss, loader(), device, autocast)
    return {"ours": ours, "plain": plain, "hf": hf}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="measured steps per implementation")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="default: bf16 on CUDA, fp32 on CPU")
    a = p.parse_args()
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    if not default_corpus_files():
        sys.exit("no stdlib corpus found")
    steps = build_all(a)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(a.steps + 2):  # two warm-up rounds
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            if a.device == "cuda":  # every step ends with its GPU work done, whichever returns first
                torch.cuda.synchronize()
            if r >= 2:
                times[name].append(time.perf_counter() - start)
    tokens = a.batch * a.seq
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"{'impl':<8}{'median step (ms)':>18}{'tokens/s':>12}")
    for k, v in times.items():
        print(f"{k:<8}{statistics.median(v) * 1e3:>18.1f}{tps[k]:>12.0f}")
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {a.dtype}, batch {a.batch} x {a.seq}")
    print(
        json.dumps(
            {
                "vs_plain_torch": round(tps["ours"] / tps["plain"], 3),
                "vs_hf": round(tps["ours"] / tps["hf"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
