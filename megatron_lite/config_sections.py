"""The sections of a run configuration: one dataclass per section, :class:`Config` holding them all.

A config is one :class:`Config` of sections (``model``, ``parallel``, ``optim``, ``train``, ``data``,
``checkpoint``, ``log``, ``kernels``). Each field's docstring is the attribute docstring right below
it; ``docs/config.md`` is generated from them by ``python -m megatron_lite.config_docs``. Loading,
overriding and rebuilding a Config is ``config.py``'s, which re-exports every name of this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    arch: str = "llama"
    """Architecture family: ``llama`` (RMSNorm, RoPE, GQA, SwiGLU, no biases) or ``gpt2``
    (LayerNorm, learned positions, GELU, biases, tied head)."""
    layers: int = 4
    """Number of transformer blocks."""
    hidden: int = 256
    """Model width (embedding size)."""
    heads: int = 4
    """Attention (query) heads; must divide ``hidden``."""
    kv_heads: int | None = None
    """Key/value heads for grouped-query attention; must divide ``heads`` (gpt2: equal ``heads``).
    Default: ``heads``."""
    ffn_hidden: int | None = None
    """MLP inner width. Default: 4 x hidden (gpt2) or 8/3 x hidden rounded up to 64 (llama)."""
    vocab_size: int | None = None
    """Vocabulary size. Default: the tokenizer's vocabulary size."""
    seq_len: int = 256
    """Training sequence length in tokens (also the gpt2 position table size); at most 2**20."""
    norm: str | None = None
    """``rmsnorm`` or ``layernorm``. Default: rmsnorm (llama), layernorm (gpt2). A llama with
    ``layernorm`` trains, with a startup warning: ``convert to-hf`` refuses it (no HF class)."""
    activation: str | None = None
    """``swiglu`` or ``gelu``. Default: swiglu (llama), gelu (gpt2). A llama with ``gelu`` trains,
    with a startup warning: ``convert to-hf`` refuses it (no HF class)."""
    tie_embeddings: bool | None = None
    """Share the input embedding with the output head. Default: false (llama), true (gpt2)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (llama only)."""
    norm_eps: float | None = None
    """Normalisation epsilon. Default: 1e-5 for both families (GPT-2's, and the published Llama 2 and 3
    configs'; HF's ``LlamaConfig`` class defaults to 1e-6). ``convert`` carries it both ways."""
    init_std: float = 0.02
    """Standard deviation of the normal init; output projections use init_std / sqrt(2 x layers)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (ranks sharing each layer's weights)."""
    pp: int = 1
    """Pipeline-parallel size (stages)."""
    vp: int = 1
    """Virtual pipeline chunks per pipeline rank (interleaved schedule). Microbatches then run in groups
    of pp: a number per step that is no multiple of pp leaves ranks waiting (a startup warning says how
    long)."""
    dp: int | None = None
    """Data-parallel size. Default: world size / (tp x pp), derived again by a relaunch from the run's
    ``config.yaml`` (which leaves it empty), so that a relaunch on another world size resumes."""
    sp: bool = False
    """Sequence parallelism: shard activations outside attention/MLP along the sequence (needs tp > 1)."""
    schedule: str = "1f1b"
    """Pipeline schedule: ``gpipe``, ``1f1b``, ``interleaved`` or ``zb-h1``."""
    overlap_grad_reduce: bool = True
    """Launch each gradient bucket's reduction as soon as it is ready, during backward."""
    overlap_param_gather: bool = True
    """All-gather updated parameters bucket by bucket, overlapped with the next forward."""
    bucket_mb: float = 0
    """Gradient bucket size in MiB of fp32 grads, a fraction allowed (0.01: 2,621 elements; Megatron's
    ``--ddp-bucket-size`` counts elements, 4 bytes each here). 0: the default, 40M elements (152.6 MiB)
    or 1M per data-parallel rank, whichever is larger. A bucket closes at the first whole parameter
    reaching the size, so a size below one parameter gives one bucket per parameter."""
    timeout_s: float = 600.0
    """Seconds any collective or P2P may take before the run fails with an error (not a hang)."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay (``decay_style`` cosine, linear, wsd), and the floor of
    inverse-square-root's; unused by constant."""
    warmup: int = 100
    """Linear warmup steps (step i of the warmup uses ``lr * (i + 1) / warmup``). More than
    ``train.steps`` is a warning at startup: the run would never reach ``lr`` nor decay. The schedule
    counts optimizer updates: a skipped step (non-finite gradients) does not advance it."""
    decay_steps: int | None = None
    """Steps of decay after warmup, at least 1 (for a constant learning rate after warmup set
    ``decay_style=constant``): cosine decay step i (from 0) uses ``min_lr + (lr - min_lr) * (1 + cos(pi
    * i / decay_steps)) / 2``, so the first is at ``lr`` and ``min_lr`` comes at the step after the last.
    Default: train.steps - warmup, so the run's last step is one decay step short of ``min_lr``. A
    decay that ends before ``train.steps`` is a warning at startup (and in ``plan``):
    the last steps train at ``min_lr``. Unused by ``constant`` and ``inverse-square-root``."""
    decay_style: str = "cosine"
    """The learning rate after warmup, at decay step i (from 0) and the run's step s (from 1):
    ``cosine`` (above), ``linear`` (``min_lr + (lr - min_lr) * (1 - i / decay_steps)``), ``constant``
    (``lr``), ``inverse-square-root`` (Megatron's: ``lr * sqrt(warmup) / sqrt(s)``, at least ``min_lr``,
    with no end; warmup 0 counts as 1, so step s uses ``lr / sqrt(s)``) or ``wsd`` (warmup-stable-decay:
    ``lr``, then the last ``wsd_decay_steps`` of the ``decay_steps`` decay along ``wsd_decay_shape``)."""
    wsd_decay_steps: int | None = None
    """``decay_style=wsd`` only, and required there: the last steps of the ``decay_steps`` that decay,
    at most ``decay_steps`` (Megatron's ``--lr-wsd-decay-iters``); those before train at ``lr``. As
    with cosine, the first is at ``lr`` and ``min_lr`` comes at the step after the last."""
    wsd_decay_shape: str | None = None
    """``decay_style=wsd`` only: ``linear`` (the default there), ``cosine`` or ``1-sqrt`` (MiniCPM's,
    torchtitan's ``sqrt``): at wsd decay step j (from 0), p = j / wsd_decay_steps, the share of
    ``lr - min_lr`` left is ``1 - p``, ``(1 + cos(pi p)) / 2`` or ``1 - sqrt(p)``."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not norms, biases)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    distributed: bool = False
    """Shard optimizer state across data-parallel ranks (ZeRO-1)."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks = micro_batch_size x accumulation (<= 65,536) x dp."""
    seed: int = 1234
    """Seed for the initial weights and the training data order: same seed -> same run. The held-out
    split's samples do not depend on it, so eval losses of runs with different seeds compare."""
    dtype: str = "auto"
    """``fp32``, ``bf16``, ``fp16``, ``fp8`` or ``auto`` (bf16 on GPUs that support it, fp32 on CPU).
    ``fp8``: bf16 with the block projections as Transformer Engine FP8 layers (compute capability
    8.9+, Transformer Engine installed, tp=1, no recompute or compile, widths multiple of 16)."""
    recompute: str = "none"
    """Activation recomputation: ``none``, ``full`` (each block re-runs in backward) or ``selective``
    (GEMM and attention outputs kept, only the elementwise ops re-run; not with schedule zb-h1)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    compile: bool = False
    """Wrap each block in ``torch.compile``."""
    eval_every: int = 0
    """Evaluate on the held-out split every N steps (0: only at the end)."""
    eval_iters: int = 4
    """Global batches per evaluation (always the same ones). More samples than the held-out split
    serves before it repeats one is a warning at startup."""
    exit_after: int | None = None
    """Stop (after checkpointing) once this many steps have run in this process."""


@dataclass
class DataConfig:
    path: list[str] = field(default_factory=list)
    """Dataset prefixes (``<prefix>.bin``/``.idx``). Empty: the embedded stdlib corpus."""
    weights: list[float] | None = None
    """Blending weights, one per prefix; only their ratios count, and 0 leaves a prefix out (never
    sampled, so it may be smaller than one sample). Default: proportional to each prefix's token count."""
    tokenizer: str | None = None
    """Sentencepiece ``.model`` path: the one ``data.path`` was preprocessed with (required with
    ``data.path``). Empty: the tokenizer trained for the embedded corpus."""
    vocab_size: int = 8192
    """Vocabulary of the tokenizer trained for the embedded corpus (unused with ``data.path``)."""
    valid_fraction: float = 0.01
    """Fraction of each dataset's documents held out for evaluation, at least one of two or more (a
    startup warning names a dataset where that one is a larger share of its tokens than this). 0:
    none, so no evaluation runs and metrics.jsonl has no ``eval_loss`` (the startup log says so
    once). A dataset whose held-out documents hold fewer than ``seq_len + 1`` tokens is left out of
    the evaluation's blend (the others keep their weights' ratios), with a startup warning naming it;
    with none left, no evaluation runs."""
    cache_dir: str = ".cache/megatron-lite"
    """Where the embedded corpus's tokenizer and dataset are built once and reused. Relative, as every
    relative path of ``data.*``: to the directory the run starts in, which its checkpoints record, so
    ``eval --held-out`` reads the run's own files from any directory (from its own where that
    directory is gone)."""
    index_cache: str | None = None
    """Directory for the per-epoch sample index files (``.npy``, memory-mapped): one rank of a node
    builds each epoch's index and every rank maps it from the page cache, and a restart maps it
    instead of building it again. Best on a disk local to the node; it must be writable. Empty: off,
    each rank builds and holds its own (12 bytes a document and 4 a sample per epoch). The samples
    are the same either way. Its files (as many bytes per epoch read) stay until it is removed."""


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Checkpoint directory. Default: ``<log.dir>/checkpoints``, derived again by a relaunch from the
    run's ``config.yaml`` (which leaves it empty), so a relaunch with another ``log.dir`` keeps its own."""
    every: int = 0
    """Save every N steps (0: only at the end)."""
    keep: int = 2
    """Keep the newest N committed checkpoints of this run (older local saves cut short are removed,
    never counted). Step directories in ``checkpoint.dir`` saved by a run with another ``log.dir``, or
    whose ``metadata.json`` is missing, unreadable or not valid, are kept and not counted (the latter
    named in a startup warning), until this run saves their step again, replacing them with its own."""
    resume: str = "auto"
    """``auto`` (the newest complete and intact checkpoint in dir, if any: incomplete or corrupt ones
    are skipped with a warning, and an error when committed ones exist but none passes), ``none``
    (start fresh; refused when dir already holds committed checkpoints, which the run would save
    over), or a checkpoint path (refused when dir holds checkpoints of later steps, for the same reason)."""
    init_from: str | None = None
    """Start from this checkpoint's model weights (fresh optimizer, step 0), e.g. one made by
    ``megatron-lite convert from-hf``, when there is no checkpoint of this run to resume (a resume
    keeps the one the run started from, with a warning when this one differs)."""
    async_: bool = False
    """Write checkpoints in the background (YAML and overrides spell it ``async``)."""


@dataclass
class LogConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, trackers."""
    every: int = 10
    """Log metrics every N steps, at each evaluation and at the step a run stops at. A row's loss, lr
    and grad_norm are its step's own; its tokens_per_s and mfu are over the steps since the previous
    row (their tokens over their time)."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless an API key is configured), every launch of a run to one
    W&B run. Without the ``wandb`` package installed, an error at startup."""
    wandb_project: str = "megatron-lite"
    """W&B project name."""
    tensorboard: bool = False
    """Write TensorBoard event files under ``<log.dir>/tensorboard``. Without the ``tensorboard``
    package installed, an error at startup."""
    progress: bool = True
    """Show a progress bar on rank 0 where stderr is a terminal (in a file, its redraws would pile up),
    and log the phases of an embedded-corpus build (tokenizer training, tokenizing)."""


@dataclass
class KernelsConfig:
    backend: str = "auto"
    """Fused-op backend: ``auto`` (Triton on CUDA except attention, which keeps torch's SDPA;
    torch on CPU), ``triton`` or ``torch``."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    def __post_init__(self) -> None:
        self.replaced_overrides: list[str] = []
        """Overrides that a later one of the same key replaced: one line each, for
        :func:`~megatron_lite.config.config_warnings`."""
        self.derived: set[str] = set()
        """Keys left empty that :func:`~megatron_lite.config.fill_defaults` filled from other keys
        (``checkpoint.dir`` from ``log.dir``, model sizes from ``model.heads``/``hidden``/``arch``, the
        tokenizer's ``model.vocab_size``) or :func:`~megatron_lite.config.validate` from the world size
        (``parallel.dp``): :meth:`save` with ``relaunch`` writes them empty again."""

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict with the user-facing key names (``async``, not ``async_``)."""
        return {
            s.name: {public_name(f.name): getattr(getattr(self, s.name), f.name) for f in section_fields(s)}
            for s in dataclasses.fields(self)
        }

    def save(self, path: str | Path, relaunch: bool = False) -> None:
        """Write the resolved config as YAML (loadable with :func:`~megatron_lite.config.load_config`).
        ``relaunch``: as a relaunch of the run continues it, with ``checkpoint.resume=auto`` and no
        ``train.exit_after``: a one-off ``none`` or step path would be refused, or rewind the run, and a
        one-off stop would cut every relaunch from the file short again, however far the run got. And
        what was derived from other keys or the world size (:attr:`derived`) is left empty, to be
        derived again: a relaunch on more or fewer ranks resumes, its checkpoint resharded on load, and
        one with another ``log.dir`` keeps its checkpoints in that directory, not the first run's."""
        data = self.to_dict()
        if relaunch:
            data["checkpoint"]["resume"], data["train"]["exit_after"] = "auto", None
            for dotted in self.derived:
                section, key = dotted.split(".")
                data[section][key] = None
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


# section name -> its field of Config, whose default_factory is the section's dataclass
SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def public_name(name: str) -> str:
    """A field's key as users write it: ``async_`` (``async`` is a Python keyword) is ``async``."""
    return name.rstrip("_")


def section_fields(section_field: dataclasses.Field) -> tuple[dataclasses.Field, ...]:
    """The fields of one section, given its field of :class:`Config` (a value of :data:`SECTIONS`)."""
    return dataclasses.fields(section_field.default_factory)
