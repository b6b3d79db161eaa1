"""``megatron-lite eval``: the mean next-token loss of a checkpoint on a text file, or on its run's
held-out samples (``--held-out``: :func:`evaluate_held_out`, the run's ``eval_loss`` at that step).

The file is tokenized without BOS/EOS and cut into consecutive windows of ``seq_len + 1`` tokens
that overlap by one token (window k covers tokens [k*T, k*T + T]); the last window may be shorter.
Every token after the first is predicted exactly once, so the loss is the mean over
``tokens - 1`` predictions. A JSON Lines file (``.jsonl``/``.json``, as ``preprocess`` reads it)
is scored on its documents' text under ``json_key``, each followed by EOS as ``preprocess``
stores them, not on the JSON syntax around it; ``.gz``/``.bz2``/``.xz`` files are decompressed.

A loss that is not finite (NaN or infinite: non-finite weights, or a forward pass that overflowed)
is no score: :class:`NonFiniteLossError`, which ``eval --json`` prints as ``"loss": null`` with an
``error``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_lite.checkpoint.reader import find_checkpoint
from megatron_lite.checkpoint.shards import check_saved_config
from megatron_lite.checkpoint.storage import commit_stamp, kept_while_read
from megatron_lite.data.gpt_dataset import PretrainingLoader
from megatron_lite.data.inputs import InputReader, check_input
from megatron_lite.data.jsonl import is_jsonl, json_text
from megatron_lite.data.token_range import check_batch_ids
from megatron_lite.data.tokenizer import Tokenizer
from megatron_lite.errors import UserError
from megatron_lite.models.transformer import Transformer, build_model
from megatron_lite.training.build import build_data, resolve_data_paths, resolve_device

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """The loss is NaN or infinite; ``tokens``: the tokens scored."""

    def __init__(self, message: str, tokens: int) -> None:
        super().__init__(message)
        self.tokens = tokens


def _non_finite_why(model: Transformer) -> str:
    """Why a model's loss is not finite: the parameters holding NaN or infinite values, if any."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if not bad:
        return "its weights are finite, but so large that the forward pass overflowed float32"
    names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more tensors" if len(bad) > 3 else "")
    return f"its weights hold NaN or infinite values (in {names})"


def load_model(path: str | Path, device: torch.device) -> tuple[Transformer, Tokenizer]:
    """The trained model (in eval mode) and the tokenizer saved with it."""
    reader = find_checkpoint(path)
    stamp = commit_stamp(reader.path)  # a run saving into its directory may prune it while it is read
    cfg = reader.config
    check_saved_config(reader.location, cfg, reader.shapes("model"))
    model = build_model(cfg.model, cfg.train.seed, device)
    with kept_while_read(reader.path, stamp, "evaluated", "evaluate the copy"):
        model.load_state_dict(reader.model_state())  # assembled from the ranks' boxes, any layout
        tokenizer = reader.local_file("tokenizer.model")
        tok = Tokenizer(tokenizer) if tokenizer is not None else None
    if tok is None:
        raise UserError(
            f"checkpoint {reader.location} has no tokenizer.model, and eval tokenizes the text with the "
            "sentencepiece model saved beside the weights (a model imported from Hugging Face with a tokenizer "
            "that is not sentencepiece, e.g. byte-level BPE, carries none): evaluate it where its own tokenizer runs"
        )
    return model.eval(), tok


@torch.no_grad()
def sum_next_token_loss(model: Transformer, ids: list[int], seq_len: int, batch: int = 8) -> float:
    """Summed next-token loss over windows of ``seq_len + 1`` tokens overlapping by one."""
    windows = [ids[s : s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]
    total = 0.0
    full = [w for w in windows if len(w) == seq_len + 1]
    rest = [w for w in windows if len(w) != seq_len + 1]
    groups = [full[i : i + batch] for i in range(0, len(full), batch)] + [[w] for w in rest]
    for group in groups:
        x = torch.tensor(group, dtype=torch.long, device=next(model.parameters()).device)
        logits = model(x[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
    return total


def _read_text(p: Path, json_key: str) -> list[str]:
    """The file's text, or for JSON Lines its documents' texts (``json_key``), as preprocess reads them."""
    check_input(p)  # an archive is refused by name, a binary file by its NUL bytes
    with InputReader(p) as f:
        if is_jsonl(p):
            return [text for n, raw in enumerate(f, 1) if (text := json_text(raw, p, n, json_key, {})) is not None]
        data = f.read(-1)
    try:
        return [data.decode("utf-8")]  # as preprocess reads it: "\r\n" stays two characters
    except UnicodeDecodeError as e:
        raise UserError(
            f"text file {str(p)!r} is not UTF-8 ({e}); convert it to UTF-8 first "
            "(iconv -f ITS_ENCODING -t UTF-8 FILE > NEW_FILE)"
        ) from None


def evaluate_text(checkpoint: str | Path, text_path: str | Path, device: str = "auto", json_key: str = "text") -> dict:
    """``{"loss", "perplexity", "tokens"}`` of the checkpoint's model on a UTF-8 text file (or the
    documents of a JSON Lines file, their text under ``json_key``); :class:`NonFiniteLossError`
    when the loss is NaN or infinite."""
    p = Path(text_path)
    if p.is_dir():
        raise UserError(f"--text {str(p)!r} is a directory; give one UTF-8 text file")
    if not p.is_file():
        dataset = Path(f"{p}.bin").is_file() and Path(f"{p}.idx").is_file()
        hint = (
            "; it is a preprocessed dataset's prefix, and --text reads text (--held-out scores a run's held-out split)"
        )
        raise UserError(f"text file {str(p)!r} does not exist{hint if dataset else ''}")
    dev = resolve_device(device, option="--device ")  # before reading anything
    texts = _read_text(p, json_key)
    model, tok = load_model(checkpoint, dev)
    documents = is_jsonl(p) and tok.eos_id >= 0  # each document ends with EOS, as preprocess stores it
    ids = [i for text in texts for i in tok.encode(text, eos=documents)]
    if len(ids) < 2:
        raise UserError(
            f"text file {str(p)!r} has {len(ids)} token(s), and a score needs at least 2 (one to predict the "
            "next from): give --text a file with more text"
        )
    loss = sum_next_token_loss(model, ids, model.cfg.seq_len) / (len(ids) - 1)
    return _score(loss, len(ids), model, f"checkpoint {str(checkpoint)!r} on {str(p)!r}")


def _score(loss: float, tokens: int, model: Transformer, what: str) -> dict:
    """The result of a finite loss; :class:`NonFiniteLossError` naming ``what`` and the cause otherwise."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"the loss of {what} is {loss}, no score: {_non_finite_why(model)}; "
            "the run diverged before this checkpoint: evaluate an earlier one",
            tokens,
        )
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def evaluate_held_out(checkpoint: str | Path, device: str = "auto") -> dict:
    """``{"loss", "perplexity", "tokens"}`` of the checkpoint's model on the samples its run evaluates:
    ``train.eval_iters`` global batches of the held-out split, built from the data and settings in
    the checkpoint's config as training builds them, so the loss is the run's ``eval_loss`` at that
    step (to float rounding: one device, fp32, whatever the run's layout and dtype)."""
    dev = resolve_device(device, option="--device ")
    reader = find_checkpoint(checkpoint)
    cfg, where = reader.config, reader.location
    if reader.weights_only:
        raise UserError(
            f"checkpoint {where} holds imported weights, not a run's, so it has no held-out split; use --text"
        )
    if cfg.data.valid_fraction <= 0:
        raise UserError(f"the run of checkpoint {where} held out no documents (data.valid_fraction=0); use --text")
    data = build_data(cfg, *resolve_data_paths(cfg, progress=False))
    if data.valid is None:
        raise UserError(f"the run of checkpoint {where} has no held-out samples: {data.warnings[0]}; use --text")
    for why in data.warnings:  # a dataset left out of the held-out blend, as training said
        log.warning("%s", why)
    model, _ = load_model(checkpoint, dev)
    t = cfg.train
    loader = PretrainingLoader(data.valid, t.micro_batch_size, t.global_batch_size)
    total = 0.0
    with torch.no_grad():
        for _ in range(t.eval_iters):  # as Trainer.evaluate: the mean of each global batch's microbatch mean
            micro = loader.next_step()
            check_batch_ids(micro, cfg.model.vocab_size, "the held-out samples", data.tokenizer_path)
            total += sum(model(b[:, :-1].to(dev), b[:, 1:].to(dev)).float().item() for b in micro) / len(micro)
    tokens = t.eval_iters * t.global_batch_size * cfg.model.seq_len
    return _score(total / t.eval_iters, tokens, model, f"checkpoint {str(checkpoint)!r} on its held-out samples")
