"""The model card (``README.md``) of an exported model: architecture, size, training data, lineage.

The lineage shown is the checkpoint's (``checkpoint/lineage.py``): code commit, Python, the directory
the run started in, each dataset's fingerprint and the tokenizer's sha256. Paths are shown as the run
recorded them, a relative one with the directory it is relative to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_lite.checkpoint.lineage import recorded_datasets, recorded_workdir
from megatron_lite.convert.io import CheckpointSource
from megatron_lite.convert.verify import VerifyResult


def _architecture(src: CheckpointSource, hf_class: str, n_params: int, tokenizer_vocab: int | None) -> list[str]:
    m = src.config.model
    positions = f"RoPE, half-split rotation, theta {m.rope_theta:g}" if m.arch == "llama" else "learned (wpe)"
    tok = f" (tokenizer: {tokenizer_vocab})" if tokenizer_vocab is not None else ""
    rows = [
        ("class", f"`{hf_class}`"),
        ("parameters", f"{n_params:,}" + (" (embedding shared with the output head)" if m.tie_embeddings else "")),
        ("layers / hidden / heads / kv heads", f"{m.layers} / {m.hidden} / {m.heads} / {m.kv_heads}"),
        ("feed-forward", f"{m.activation} ({'gelu_new, tanh' if m.arch == 'gpt2' else 'silu'}), width {m.ffn_hidden}"),
        ("norm", f"{m.norm}, eps {m.norm_eps:g}"),
        ("positions", positions),
        ("context (training sequence length)", str(m.seq_len)),
        ("vocabulary", f"{m.vocab_size}{tok}"),
    ]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _training(src: CheckpointSource) -> list[str]:
    cfg, step = src.config, src.meta.get("step")
    if src.consumed_samples is None:
        return ["- not trained by megatron-lite: weights imported, see lineage"]
    tokens = src.consumed_samples * cfg.model.seq_len
    lines = [
        f"- steps: {step} (global batch {cfg.train.global_batch_size} sequences)",
        f"- tokens: {tokens:,} = {src.consumed_samples:,} consumed samples x {cfg.model.seq_len} sequence length",
    ]
    data, workdir = cfg.data, recorded_workdir(src.meta.get("lineage"))
    if data.path:
        weights = data.weights or ["proportional to size"] * len(data.path)
        shown = [_as_recorded(p, workdir) for p in data.path]
        lines += ["- datasets (prefix: weight):", *(f"  - {p}: {w}" for p, w in zip(shown, weights))]
    else:
        lines.append("- dataset: megatron-lite's embedded corpus (the Python standard library's source)")
    lines.append(f"- seed {cfg.train.seed}, dtype {cfg.train.dtype}, peak lr {cfg.optim.lr:g}")
    return lines


def _as_recorded(path: Any, workdir: str | None) -> str:
    """``path`` as the run recorded it; a relative one with the directory it is relative to."""
    if Path(str(path)).is_absolute():
        return f"`{path}`"
    return f"`{path}` (relative to `{workdir}`)" if workdir else f"`{path}` (relative to an unrecorded directory)"


def _run_lineage(lineage: Any, indent: str = "") -> list[str]:
    """What produced the weights, as ``lineage`` (a checkpoint's, as saved) records it; nothing when it
    is no record (an HF import has none; an edited file may hold anything)."""
    if not isinstance(lineage, dict):
        return []
    commit = lineage.get("git_commit")
    code = (
        f"commit `{commit}`" + (" with uncommitted changes" if lineage.get("git_dirty") else "")
        if commit
        else "no git commit recorded"
    )
    workdir = recorded_workdir(lineage)
    lines = [f"- code: megatron-lite {code}; Python {lineage.get('python') or 'unrecorded'}"]
    lines.append(f"- run started in `{workdir}`" if workdir else "- run's working directory not recorded")
    for d in recorded_datasets(lineage) or []:
        lines.append(
            f"- dataset {_as_recorded(d.get('prefix'), workdir)}: .idx sha256 `{d.get('idx_sha256')}`, .bin "
            f"{d.get('bin_bytes')} bytes; {d.get('consumed_samples')} samples consumed (weight {d.get('weight')})"
        )
    tok = lineage.get("tokenizer")
    if isinstance(tok, dict):
        lines.append(f"- tokenizer {_as_recorded(tok.get('path'), workdir)}: sha256 `{tok.get('sha256')}`")
    return [f"{indent}{line}" for line in lines]


def _lineage(src: CheckpointSource) -> list[str]:
    lines = [f"- exported from megatron-lite checkpoint `{src.path}` (step {src.meta.get('step')})"]
    lines += _run_lineage(src.meta.get("lineage"))
    resume = src.config.checkpoint.resume
    if resume not in ("auto", "none"):
        lines.append(f"- that run started from checkpoint `{resume}`")
    if src.origin:
        o = src.origin
        lines.append(f"- weights imported from Hugging Face `{o.get('path')}` ({o.get('model_type')})")
        ran = o.get("exported_from")  # an export of megatron-lite's: the run that trained the weights
        if isinstance(ran, dict):
            lines.append(
                f"  - exported by megatron-lite from checkpoint `{ran.get('checkpoint')}` (step {ran.get('step')})"
            )
            lines += _run_lineage(ran.get("lineage"), "    ")
    return lines


def model_card(
    src: CheckpointSource,
    hf_class: str,
    n_params: int,
    tokenizer_vocab: int | None,
    check: VerifyResult | None,
) -> str:
    """Markdown with a YAML header the Hugging Face Hub reads."""
    m = src.config.model
    checked = f"passed: {check.summary()}" if check else "skipped (`--no-verify`)"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [megatron-lite, {m.arch}]",
        "---",
        f"# {src.path.parent.parent.name or 'model'} (megatron-lite, step {src.meta.get('step')})",
        "",
        "## Architecture",
        *_architecture(src, hf_class, n_params, tokenizer_vocab),
        "",
        "## Training",
        *_training(src),
        "",
        "## Lineage",
        *_lineage(src),
        "",
        "## Tokenizer",
        "Sentencepiece BPE with byte fallback, converted to a `tokenizers` BPE that yields the same ids. "
        "Pretraining saw documents as `text </s>` without BOS, so the tokenizer adds no special tokens "
        "(`add_bos_token: false`); append `eos_token` between documents when fine-tuning.",
        "",
        "## Conversion check",
        f"Every tensor compared with the checkpoint's, and the same tokens through megatron-lite and "
        f"`transformers` (fp32): {checked}.",
        "",
        "## Usage",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",  # ruff-formatted: an export inside a checkout (hf/...) passes `ruff format --check .`
        'tok = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        "```",
        "",
    ]
    return "\n".join(lines)
