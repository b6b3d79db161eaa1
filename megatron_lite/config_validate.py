"""Resolving and checking a loaded :class:`~megatron_lite.config.Config`: defaults, validation, batch arithmetic.

:func:`fill_defaults` resolves every ``None`` default that depends on other fields (arch,
tokenizer, steps); :func:`validate` checks each field and the cross-field arithmetic, naming the
numbers in its errors (``config_warnings.py`` names valid settings that are probably mistakes);
:func:`accumulation_steps` is the batch arithmetic that validation guarantees. All are re-exported
by ``megatron_lite.config``, where callers import them from.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from megatron_lite.config_sections import Config, DataConfig, ModelConfig
from megatron_lite.config_values import INT64_MAX, beyond_int64
from megatron_lite.errors import UserError
from megatron_lite.training.lr import DECAY_STYLES, WSD_DECAY_SHAPES, WSD_DEFAULT_SHAPE, check_schedule

_CHOICES = {
    ("model", "arch"): ("llama", "gpt2"),
    ("model", "norm"): ("rmsnorm", "layernorm"),
    ("model", "activation"): ("swiglu", "gelu"),
    ("parallel", "schedule"): ("gpipe", "1f1b", "interleaved", "zb-h1"),
    ("optim", "decay_style"): DECAY_STYLES,
    ("optim", "wsd_decay_shape"): WSD_DECAY_SHAPES,
    ("train", "dtype"): ("auto", "fp32", "bf16", "fp16", "fp8"),
    ("train", "recompute"): ("none", "full", "selective"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("kernels", "backend"): ("auto", "triton", "torch"),
}
# Microbatches per optimizer step (global / (micro x dp)) at most: each rank's pipeline schedule is data
# listing every microbatch's actions, built and replayed before step 1, in time linear in pp x vp x
# microbatches (measured on one CPU core: 1f1b pp=8 with 4,096 microbatches 2 s; interleaved pp=8 vp=5
# with 128 0.3 s; 65,536 at pp=8 about a minute; 2**30, from a global batch of 2**31 sequences at micro
# 2, would take days and hundreds of GB). Real runs use tens to a few thousand.
MAX_MICROBATCHES = 2**16
# model.seq_len at most: the model builds its RoPE tables (seq_len x head_dim / 2, computed in float64)
# or gpt2 position table for it at start, so 10**12 (a damaged config.json) would be terabytes there.
# 2**20 is past the longest context of any released model of the supported families (Qwen2.5-1M:
# 1,010,000 positions).
MAX_SEQ_LEN = 2**20
# parallel.bucket_mb at most: one bucket already holds every gradient of any model that trains; 1e308
# (finite) would overflow to inf in bytes.
MAX_BUCKET_MB = 2**20
_POSITIVE = {
    "model": ("layers", "hidden", "heads", "seq_len"),
    "parallel": ("tp", "pp", "vp"),
    "train": ("steps", "micro_batch_size", "global_batch_size", "eval_iters"),
    "checkpoint": ("keep",),
    "log": ("every",),
    "data": ("vocab_size",),
}

# AdamW's fp32 arithmetic overflows (a traceback at step 1) past ~3.4e38, also in lr x weight_decay: a
# bound far past any value that trains, whose products stay in range.
_OPTIM_MAX = 1e10

# Fields no other check covers, each with its allowed range: AdamW and torch.normal_ raise a bare
# traceback on a few of these at startup, and the rest train on silently broken (a negative
# bucket_mb: one-element buckets; a negative checkpoint.every: a save every step).
_RANGES = {
    ("model", "seq_len"): (lambda v: v <= MAX_SEQ_LEN, f"at most {MAX_SEQ_LEN:,} (2**20) tokens"),
    ("model", "rope_theta"): (lambda v: v > 0, "> 0"),
    ("model", "norm_eps"): (lambda v: v > 0, "> 0"),
    ("model", "init_std"): (lambda v: v >= 0, ">= 0"),
    ("parallel", "bucket_mb"): (
        lambda v: 0 <= v <= MAX_BUCKET_MB,
        f"0 (the default size) or a positive number of MiB up to {MAX_BUCKET_MB:,} (2**20, 1 TiB)",
    ),
    ("parallel", "timeout_s"): (lambda v: v > 0, "> 0 seconds"),
    ("optim", "lr"): (lambda v: 0 < v <= _OPTIM_MAX, f"a number in (0, {_OPTIM_MAX:g}]"),
    ("optim", "min_lr"): (lambda v: 0 <= v <= _OPTIM_MAX, f"a number in [0, {_OPTIM_MAX:g}]"),
    ("optim", "decay_steps"): (
        lambda v: v >= 1,
        ">= 1 (for a constant learning rate after warmup set optim.decay_style=constant)",
    ),
    ("optim", "wsd_decay_steps"): (lambda v: v >= 1, ">= 1 (the last decay steps of optim.decay_style=wsd)"),
    ("optim", "beta1"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim", "beta2"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim", "eps"): (lambda v: 0 <= v <= _OPTIM_MAX, f"in [0, {_OPTIM_MAX:g}]"),
    ("optim", "warmup"): (lambda v: v >= 0, ">= 0 (0: no warmup)"),
    ("optim", "weight_decay"): (lambda v: 0 <= v <= _OPTIM_MAX, f"in [0, {_OPTIM_MAX:g}]"),
    ("optim", "clip_grad"): (lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    ("train", "seed"): (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("train", "eval_every"): (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    ("train", "exit_after"): (lambda v: v >= 1, ">= 1 (steps this process trains; leave it unset for all)"),
    ("checkpoint", "every"): (lambda v: v >= 0, ">= 0 (0: only at the end)"),
}


def fill_defaults(cfg: Config, vocab_size: int | None = None) -> Config:
    """Resolve every ``None`` default that depends on other fields (arch, tokenizer, steps, log.dir,
    decay style).
    Each key filled from another is recorded in ``cfg.derived``, so the relaunch config derives it
    again from that key (``optim.decay_steps`` is kept resolved: README, "What a run leaves behind")."""
    m = cfg.model
    gpt2 = m.arch == "gpt2"
    empty = {f"model.{k}" for k in _MODEL_DERIVED if getattr(m, k) in (None, "")}
    empty |= {"checkpoint.dir"} if cfg.checkpoint.dir is None else set()
    m.kv_heads = m.heads if m.kv_heads is None else m.kv_heads
    if m.ffn_hidden is None:
        m.ffn_hidden = 4 * m.hidden if gpt2 else -(-(8 * m.hidden // 3) // 64) * 64
    m.norm = m.norm or ("layernorm" if gpt2 else "rmsnorm")
    m.activation = m.activation or ("gelu" if gpt2 else "swiglu")
    m.tie_embeddings = gpt2 if m.tie_embeddings is None else m.tie_embeddings
    m.norm_eps = 1e-5 if m.norm_eps is None else m.norm_eps
    if m.vocab_size is None:
        m.vocab_size = vocab_size
    if cfg.optim.decay_steps is None:
        cfg.optim.decay_steps = max(cfg.train.steps - cfg.optim.warmup, 1)
    if cfg.optim.decay_style == "wsd" and cfg.optim.wsd_decay_shape is None:
        cfg.optim.wsd_decay_shape = WSD_DEFAULT_SHAPE
        empty.add("optim.wsd_decay_shape")
    if cfg.checkpoint.dir is None:
        cfg.checkpoint.dir = str(Path(cfg.log.dir) / "checkpoints")
    if m.vocab_size is None:  # no tokenizer yet: filled by a later call
        empty.discard("model.vocab_size")
    cfg.derived |= empty
    return cfg


# model keys whose default follows another key: heads, hidden, arch, the tokenizer's vocabulary
_MODEL_DERIVED = ("kv_heads", "ffn_hidden", "norm", "activation", "tie_embeddings", "vocab_size")


def _check_fields(cfg: Config) -> None:
    for (section, key), options in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value is not None and value not in options:
            raise UserError(f"{section}.{key}={value!r} is not one of: {', '.join(options)}")
    for section, keys in _POSITIVE.items():
        for key in keys:
            value = getattr(getattr(cfg, section), key)
            if value is None or value < 1:
                raise UserError(f"{section}.{key} must be a positive integer, got {value!r}")
    for (section, key), (ok, need) in _RANGES.items():
        value = getattr(getattr(cfg, section), key)
        if value is None:
            continue
        if not ((isinstance(value, int) or math.isfinite(value)) and ok(value)):  # no float holds an int past 1e308
            raise UserError(f"{section}.{key} must be {need}, got {value!r}")
    _check_int64(cfg)
    o = cfg.optim
    if o.min_lr > o.lr and o.decay_style != "constant":  # constant never reads min_lr
        raise UserError(
            f"need optim.min_lr <= optim.lr; got lr={o.lr}, min_lr={o.min_lr}: set optim.min_lr to at most {o.lr}"
        )
    check_schedule(o)
    _check_data(cfg.data)


def _check_int64(cfg: Config) -> None:
    """Every integer key within int64, after the keys' own ranges (``train.seed`` names its own)."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            v = getattr(values, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and not -INT64_MAX - 1 <= v <= INT64_MAX:
                shown = str(v) if v.bit_length() <= 128 else f"about 10**{math.floor(math.log10(abs(v)))}"
                raise beyond_int64(f"{section.name}.{f.name.rstrip('_')}", shown)


def _check_data(d: DataConfig) -> None:
    """The data keys, checked here rather than when the data is opened, after the ranks have started."""
    if not 0 <= d.valid_fraction < 1:
        raise UserError(f"data.valid_fraction must be in [0, 1), got {d.valid_fraction}")
    if d.path and not d.tokenizer:
        raise UserError(
            "data.path is set but data.tokenizer is not: give the sentencepiece .model the "
            "data was preprocessed with (data.tokenizer=PATH). data.path takes datasets (PREFIX for "
            "PREFIX.bin/.idx); text files are tokenized first: `megatron-lite tokenizer train --input FILES "
            "--output tok/NAME --vocab-size N`, then `megatron-lite preprocess --input FILES --tokenizer "
            "tok/NAME.model --output data/NAME`, and data.path=data/NAME data.tokenizer=tok/NAME.model"
        )
    if twice := sorted({p for p in d.path if d.path.count(p) > 1}):  # the dataset also catches links, later
        raise UserError(
            f"data.path lists {', '.join(twice)} more than once: the run would see each of its samples twice in a "
            "row; list it once and give it more weight in data.weights"
        )
    if not d.path:  # the embedded corpus's tokenizer is trained to data.vocab_size
        from megatron_lite.data.tokenizer_train import MAX_VOCAB, MIN_VOCAB

        if d.vocab_size < MIN_VOCAB:
            raise UserError(
                f"data.vocab_size={d.vocab_size} is too small for the embedded corpus's tokenizer: byte "
                f"fallback alone needs {MIN_VOCAB}; set data.vocab_size={MIN_VOCAB} or more (default 8192)"
            )
        if d.vocab_size > MAX_VOCAB:
            raise UserError(
                f"data.vocab_size={d.vocab_size} is too large for the embedded corpus's tokenizer: sentencepiece "
                f"holds at most {MAX_VOCAB:,} (2**31-1) pieces; set a smaller data.vocab_size (default 8192)"
            )
    if d.weights is None:
        return
    if len(d.weights) != len(d.path):
        raise UserError(f"data.weights has {len(d.weights)} entries but data.path has {len(d.path)}")
    if not all(math.isfinite(w) and w >= 0 for w in d.weights) or sum(d.weights) <= 0:
        raise UserError(
            f"data.weights must be finite numbers >= 0, not all zero, one per data.path prefix; got {d.weights}"
        )
    if not math.isfinite(sum(d.weights)):
        raise UserError(
            f"data.weights {d.weights} add up to more than a float holds; only their ratios count, so scale "
            "them down, e.g. to shares that sum to 1"
        )


def _check_gpt2(m: ModelConfig) -> None:
    """GPT-2 as Hugging Face's ``GPT2LMHeadModel`` computes it (the class ``convert to-hf`` writes):
    LayerNorm, GELU and one K/V head per query head. Refused here, before training, not at export."""
    if (m.norm, m.activation) != ("layernorm", "gelu"):
        raise UserError(
            f"model.arch=gpt2 uses norm=layernorm and activation=gelu, got norm={m.norm}, activation={m.activation}; "
            "leave model.norm and model.activation unset (or use model.arch=llama for rmsnorm/swiglu)"
        )
    if m.kv_heads != m.heads:
        raise UserError(
            f"model.arch=gpt2 has no grouped-query attention: model.kv_heads={m.kv_heads} but "
            f"model.heads={m.heads}; set model.kv_heads={m.heads} (equal to model.heads)"
        )


def _check_model(m: ModelConfig, need_vocab: bool = True) -> None:
    if m.hidden % m.heads:
        rope = m.arch == "llama"  # RoPE also needs an even head dim (below): suggest sizes that pass both
        step = 2 * m.heads if rope else m.heads
        near = [h for h in (m.hidden - m.hidden % step, m.hidden - m.hidden % step + step) if h > 0]
        what = f"2 x model.heads = {step} (RoPE needs an even head dim)" if rope else f"model.heads = {step}"
        raise UserError(
            f"model.hidden ({m.hidden}) must be divisible by model.heads ({m.heads}): "
            f"{m.hidden} % {m.heads} = {m.hidden % m.heads}; set model.hidden to a multiple of {what}, e.g. "
            f"{' or '.join(map(str, near))}"
        )
    if m.kv_heads < 1:
        raise UserError(f"model.kv_heads must be a positive integer, got {m.kv_heads} (leave it out for model.heads)")
    if m.heads % m.kv_heads:
        fits = [k for k in range(1, m.heads + 1) if m.heads % k == 0]
        raise UserError(
            f"model.heads ({m.heads}) must be divisible by model.kv_heads ({m.kv_heads}): set model.kv_heads to one "
            f"of {', '.join(map(str, fits))}"
        )
    if m.arch == "llama" and (m.hidden // m.heads) % 2:
        raise UserError(
            f"RoPE needs an even head dim; model.hidden/model.heads = {m.hidden}/{m.heads} = {m.hidden // m.heads}: "
            f"set model.hidden to a multiple of 2 x model.heads = {2 * m.heads} (e.g. {m.hidden + m.heads})"
        )
    if m.arch == "gpt2":
        _check_gpt2(m)
    if m.ffn_hidden < 1:
        raise UserError(f"model.ffn_hidden must be positive, got {m.ffn_hidden} (leave it out for the arch's default)")
    if (need_vocab or m.vocab_size is not None) and (m.vocab_size is None or m.vocab_size < 2):
        raise UserError(f"model.vocab_size must be >= 2 (or left empty to take the tokenizer's), got {m.vocab_size}")


def check_vocab_covers(vocab_size: int, tokens: int) -> None:
    """Refuse a ``model.vocab_size`` below the tokenizer's vocabulary of ``tokens`` pieces: its
    larger ids would index past the embedding (``plan`` and the trainer both ask this)."""
    if vocab_size < tokens:
        raise UserError(
            f"model.vocab_size ({vocab_size}) is smaller than the tokenizer's vocabulary ({tokens}); "
            "leave it empty to use the tokenizer's"
        )


def _check_sizes(cfg: Config) -> None:
    """Products of keys that torch holds in int64: each key fits (``config_values``), but together
    they can overflow, as a tensor's element count or the run's sample counter."""
    m, t = cfg.model, cfg.train
    products = [
        ("train.steps x train.global_batch_size", "samples the run reads", (t.steps, t.global_batch_size)),
        ("train.eval_iters x train.global_batch_size", "evaluation samples", (t.eval_iters, t.global_batch_size)),
        ("model.vocab_size x model.hidden", "elements of the embedding", (m.vocab_size, m.hidden)),
        ("model.hidden x model.ffn_hidden", "elements of one MLP weight", (m.hidden, m.ffn_hidden)),
        ("model.layers x model.hidden x model.ffn_hidden", "parameters (at least)", (m.layers, m.hidden, m.ffn_hidden)),
        (
            "train.micro_batch_size x model.seq_len x model.vocab_size",
            "logits of one microbatch",
            (t.micro_batch_size, m.seq_len, m.vocab_size),
        ),
    ]
    for names, what, factors in products:
        if None not in factors and math.prod(factors) > INT64_MAX:
            raise UserError(
                f"{names} = {' x '.join(map(str, factors))} = {float(math.prod(factors)):.3g} {what}, more than "
                f"int64 holds (2**63-1 = {INT64_MAX:.3g}): no run can have that many; lower one of them"
            )


def _check_layout(cfg: Config, world_size: int) -> int:
    from megatron_lite.parallel.mesh import ParallelDims  # the one owner of the layout arithmetic

    p, t = cfg.parallel, cfg.train
    dp = ParallelDims.resolve(world_size, p.tp, p.pp, p.dp, p.vp).dp
    if p.sp and p.tp == 1:
        raise UserError(
            "parallel.sp=true needs parallel.tp > 1 (it shards the sequence over the tensor-parallel ranks): "
            "set parallel.tp > 1 or parallel.sp=false"
        )
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        fix = f"set train.global_batch_size={max(per_step, t.global_batch_size // per_step * per_step)}"
        per_rank, rest = divmod(t.global_batch_size, dp)
        if rest:  # no micro batch size fits: the global batch must be a multiple of dp
            fix += f" (a multiple of {per_step}; no train.micro_batch_size fits {t.global_batch_size} over dp {dp})"
        else:  # the largest micro batch, up to the current one, that divides each rank's share
            micro = _largest_divisor_upto(per_rank, t.micro_batch_size)
            fix += f" or train.micro_batch_size={micro} (a divisor of global / dp = {per_rank})"
        # a dp derived from the world size is named as such: a relaunch on another world size changes it
        why = f" (dp = world size {world_size} / (tp x pp))" if "parallel.dp" in cfg.derived else ""
        raise UserError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"micro_batch_size x dp = {t.micro_batch_size} x {dp} = {per_step}{why}; {fix}"
        )
    if (microbatches := t.global_batch_size // per_step) > MAX_MICROBATCHES:
        raise UserError(
            f"train.global_batch_size / (train.micro_batch_size x dp) = {t.global_batch_size} / {per_step} = "
            f"{microbatches:,} microbatches per step, more than {MAX_MICROBATCHES:,}: every rank's pipeline "
            f"schedule lists each one's actions; raise train.micro_batch_size (to at least "
            f"{-(-t.global_batch_size // (dp * MAX_MICROBATCHES))}) or lower train.global_batch_size"
        )
    return dp


def _largest_divisor_upto(n: int, limit: int) -> int:
    """The largest divisor of ``n`` up to ``limit``, searched down from ``limit`` over at most 2**16
    candidates (a micro batch of 10**12 must not stall the error suggesting one), else their gcd,
    which divides both."""
    top = min(n, limit)
    for d in range(top, max(top - 2**16, 0), -1):
        if n % d == 0:
            return d
    return math.gcd(n, limit)


def validate(cfg: Config, world_size: int = 1, need_vocab: bool = True) -> Config:
    """Check every field and the cross-field arithmetic; fills ``parallel.dp`` (recorded in
    ``cfg.derived`` where it was empty). Errors show the numbers.

    ``need_vocab=False`` allows an unresolved ``model.vocab_size`` (it comes from the tokenizer),
    so the layout can be checked before any data is opened.
    """
    _check_fields(cfg)
    _check_model(cfg.model, need_vocab)
    _check_sizes(cfg)
    if cfg.parallel.dp is None:
        cfg.derived.add("parallel.dp")
    cfg.parallel.dp = _check_layout(cfg, world_size)
    return cfg


def accumulation_steps(cfg: Config) -> int:
    """Microbatches per optimizer step on each rank: global = micro x accumulation x dp."""
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * cfg.parallel.dp)
