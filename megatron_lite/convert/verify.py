"""Run the same tokens through our model and the ``transformers`` one; compare logits and losses.

First every HF tensor is compared with the checkpoint's tensor the name map gives it
(``convert/compare.py``): sampled inputs cannot reach every weight (an embedding row no sampled id
selects), so a tampered or mis-copied tensor fails here, by name, and the logits are not compared.
The logits then check what equal tensors cannot: that the name map and the transforms compute the
same model.

Both models run in fp32 on CPU (bf16 weights are upcast). The tolerance is
``max |logits_ours - logits_hf| <= 1e-4 * max(1, max |logits_ours|)``. Why: the two implementations
compute the same function in a different order (one fused qkv matmul vs three, SDPA vs HF's
attention, different norm kernels), so each op differs by a few fp32 ulps (eps 1.2e-7) and the
difference grows with depth and width: measured 1e-7 to 2e-7 on the 2-layer test models and 3e-6
of the logit scale on 12-layer, 512-wide Llama and GPT-2 models (34M and 38M parameters), so 1e-4
leaves ~30x headroom for bigger ones. Scaling by the largest logit keeps the bound relative, as
trained models' logits reach tens. A conversion bug is far above it: reversing the k rows of one
layer of the 2-layer test model moves the logits by 7e-3, 70x the tolerance.

Memory: both models are held at once in fp32 (about 8 bytes per parameter); ``to-hf --no-verify``
skips this for models larger than the converting machine's RAM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_lite.checkpoint.hf import Adapter, import_config
from megatron_lite.checkpoint.storage import commit_stamp, kept_while_read
from megatron_lite.convert.compare import compare_tensors, refuse_config_mismatch, refuse_other_task
from megatron_lite.convert.io import (
    CheckpointSource,
    hf_load_error,
    open_checkpoint,
    read_export_record,
    read_hf_config,
)
from megatron_lite.errors import UserError, refuse_blank

RELATIVE_TOLERANCE = 1e-4
SAMPLE_TEXT = (
    "def greet(name: str) -> str:\n\treturn f'Hello, {name}!'  # say hi\r\n\n"
    "Café naïve Привет мир 漢字かな 😀 — the end.\n    indented    line\n"
)


@dataclass
class VerifyResult:
    """Outcome of one comparison; ``passed`` decides ``to-hf``'s exit code."""

    max_abs_diff: float
    tolerance: float
    loss_ours: float
    loss_hf: float
    tokens: int
    tokenizer_equal: bool | None
    """HF tokenizer ids == ours on the sample text (None: not compared)."""
    tokenizer_required: bool
    """The HF directory is our export, so its tokenizer must match ours exactly."""
    tensors_equal: int = 0
    """HF tensors equal to the checkpoint's (``convert/compare.py``)."""
    tensor_problem: str | None = None
    """The first HF tensor that is not; then the logits were not compared (their fields are NaN)."""

    @property
    def passed(self) -> bool:
        ids_ok = self.tokenizer_equal is not False or not self.tokenizer_required
        return self.tensor_problem is None and self.max_abs_diff <= self.tolerance and ids_ok

    def summary(self) -> str:
        if self.tensor_problem:
            return f"tensor {self.tensor_problem} ({self.tensors_equal} tensors before it equal; logits not compared)"
        ids = {None: "not compared", True: "equal", False: "DIFFERENT"}[self.tokenizer_equal]
        return (
            f"max |logits diff| {self.max_abs_diff:.3e} (tolerance {self.tolerance:.3e}) over {self.tokens} tokens; "
            f"sample-text loss ours {self.loss_ours:.6f}, transformers {self.loss_hf:.6f}; tokenizer ids {ids}; "
            f"{self.tensors_equal} tensors equal to the checkpoint's"
        )


def _our_model(src: CheckpointSource) -> torch.nn.Module:
    from megatron_lite.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(src.config.model)
    vocab = src.config.model.vocab_size
    # rows past vocab_size are padding a parallel layout may add; the single-device model has none
    state = {name: (t[:vocab] if name in ("embed.weight", "head.weight") else t).float() for name, t in src.tensors()}
    model.load_state_dict(state, assign=True)  # assign: the meta parameters become these tensors
    return model.eval()


def _sample_ids(src: CheckpointSource, hf_dir: Path, length: int) -> tuple[list[int], bool | None]:
    """Token ids of the sample text by our tokenizer, and whether the HF tokenizer agrees."""
    from megatron_lite.data.tokenizer import Tokenizer

    has_hf_tok = (hf_dir / "tokenizer.json").is_file() or (hf_dir / "tokenizer_config.json").is_file()
    if src.tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, src.config.model.vocab_size, (length,), generator=g).tolist(), None
    ids = Tokenizer(src.tokenizer).encode(SAMPLE_TEXT)
    equal = None
    if has_hf_tok:
        from transformers import AutoTokenizer

        try:
            hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
        except Exception as e:  # a damaged tokenizer.json: tokenizers raises a bare Exception
            raise hf_load_error("tokenizer", hf_dir, e) from None
        equal = hf_tok(SAMPLE_TEXT, verbose=False)["input_ids"] == ids
    return (ids * (length // max(len(ids), 1) + 1))[:length], equal


def _tokenizer_converted_by_us(hf_dir: Path) -> bool:
    """True for our exports: their tokenizer was converted from ours, so it must give our ids."""
    return bool(read_export_record(hf_dir).get("tokenizer_converted"))


def _check_hf_dir(hf_dir: Path) -> Adapter:
    """Refuse, before any work, a directory whose config or weights are missing or damaged, whose config.json
    names a model that predicts no tokens, or does not describe its weights (transformers would print its load
    report first); its adapter."""
    raw, adapter, hf_config, weights = read_hf_config(hf_dir)
    try:
        m = import_config(hf_config, quiet=True)
    except UserError as e:
        raise UserError(
            f"{hf_dir / 'config.json'} describes a model megatron-lite does not compute, so no checkpoint of "
            f"ours can match it ({e})"
        ) from None
    refuse_other_task(hf_dir, raw, adapter, m, weights)
    refuse_config_mismatch(hf_dir, adapter, m, weights)
    return adapter


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' loading bars on stderr would come before a CLI ``error: ...`` line."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@torch.no_grad()
def verify(checkpoint: str | Path, hf_dir: str | Path, step: int | None = None) -> VerifyResult:
    """Compare the checkpoint's model with the HF directory's on a sample text and random ids."""
    from transformers import AutoModelForCausalLM

    refuse_blank("--checkpoint", checkpoint, "read")
    refuse_blank("--hf", hf_dir, "read")
    hf_dir = Path(hf_dir)
    adapter = _check_hf_dir(hf_dir)
    src = open_checkpoint(checkpoint, step)
    stamp = commit_stamp(src.path)  # a run saving into its directory may prune it while it is read
    m = src.config.model
    length = min(m.seq_len, 96)
    with kept_while_read(src.path, stamp, "verified", "verify the copy"):
        text_ids, tok_equal = _sample_ids(src, hf_dir, length)
        tok_required = _tokenizer_converted_by_us(hf_dir)
        n_equal, problem = compare_tensors(src, hf_dir, adapter)
        if problem:
            nan = float("nan")
            return VerifyResult(nan, nan, nan, nan, 0, tok_equal, tok_required, n_equal, problem)
        g = torch.Generator().manual_seed(1)
        random_ids = torch.randint(0, m.vocab_size, (length,), generator=g)  # reaches rows the text never uses
        batch = torch.stack([torch.tensor(text_ids), random_ids])  # (2, T)
        ours = _our_model(src)(batch)  # the model is freed here, before the HF one is loaded
    with _no_progress_bars():
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        except Exception as e:  # the config and the weights' headers were checked: what is left is theirs
            raise hf_load_error("model", hf_dir, e) from None
    theirs = hf_model(input_ids=batch).logits.float()
    if theirs.shape != ours.shape:
        raise UserError(f"logit shapes differ: ours {tuple(ours.shape)}, transformers {tuple(theirs.shape)}")

    def loss(logits: torch.Tensor) -> float:
        return F.cross_entropy(logits[0, :-1], batch[0, 1:]).item()

    return VerifyResult(
        max_abs_diff=(ours - theirs).abs().max().item(),
        tolerance=RELATIVE_TOLERANCE * max(1.0, ours.abs().max().item()),
        loss_ours=loss(ours),
        loss_hf=loss(theirs),
        tokens=batch.numel(),
        tokenizer_equal=tok_equal,
        tokenizer_required=tok_required,
        tensors_equal=n_equal,
    )
