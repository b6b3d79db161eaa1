"""Our sentencepiece tokenizer as a Hugging Face ``tokenizers`` BPE with byte fallback, id for id.

Sentencepiece BPE encodes by repeatedly merging the adjacent pair whose merged piece has the best
score (earliest learned); ``tokenizers``' BPE merges the pair of lowest rank. Listing, for every
learned piece in id order, each split of it into two learned pieces gives merges whose ranks follow
the same order, so both produce the same pieces. Where two different splits of one piece compete,
sentencepiece prefers the leftmost and we rank by the halves' ids; the two agreed on whole stdlib
source files and mixed-script text (``tests/unit/test_hf_tokenizer.py``).

Three details make the ids equal to :meth:`megatron_lite.data.tokenizer.Tokenizer.encode` on any
text, with no normaliser and no pre-tokenizer:

- Vocabulary pieces spell sentencepiece's whitespace marker U+2581 as a real space. Text spaces
  then match pieces directly, and a literal U+2581 in the text is not in the vocabulary, so it
  falls back to its three UTF-8 byte tokens, exactly as our ``Tokenizer.encode`` spells it.
- ``"\\n"`` (a user-defined symbol: never merged, matched anywhere) is a non-special added token.
- ``<pad>``, ``<s>``, ``</s>`` are special tokens with ``split_special_tokens=true``: the text
  ``"<s>"`` is encoded as characters, as sentencepiece does, never as the BOS id.

``add_bos_token`` and ``add_eos_token`` are false: pretraining saw documents as ``text </s>``
without BOS (``preprocess`` appends EOS only), so ``tok(text).input_ids == Tokenizer.encode(text)``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from megatron_lite.checkpoint.format import sha256_file
from megatron_lite.data.tokenizer import is_tokenizer_record
from megatron_lite.errors import UserError

log = logging.getLogger(__name__)

_SP_SPACE = "\u2581"
# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
REQUIRED_SENTENCEPIECE = "BPE, byte_fallback, identity normalisation, no dummy prefix, no whitespace collapsing"


def _parse(sp_model: Path) -> Any:
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(sp_model.read_bytes())
    except DecodeError as e:
        raise UserError(f"{sp_model} is not a sentencepiece model ({e}); copy or download it again") from None
    return proto


def _space_clash(proto: Any) -> str | None:
    """Two pieces that differ only by ' ' vs U+2581 (both are one string, so one id, in the HF vocabulary)."""
    first: dict[str, str] = {}  # vocabulary spelling -> the first piece spelt so
    for p in proto.pieces:
        seen = first.setdefault(_piece(p.piece), p.piece)
        if seen != p.piece:
            return f"pieces {seen!r} and {p.piece!r}, which differ only by ' ' vs U+2581"
    return None


def _inexact(proto: Any) -> list[str]:
    """The settings of a sentencepiece model that the ``tokenizers`` BPE here does not reproduce."""
    from sentencepiece import sentencepiece_model_pb2

    t, n, spec = proto.trainer_spec, proto.normalizer_spec, sentencepiece_model_pb2.TrainerSpec
    found = [
        (t.model_type != spec.BPE, f"model type {spec.ModelType.Name(t.model_type).lower()} (not BPE)"),
        (not t.byte_fallback, "no byte fallback"),
        (n.name != "identity", f"normaliser {n.name!r}"),
        (n.add_dummy_prefix, "a dummy prefix"),
        (n.remove_extra_whitespaces, "whitespace collapsing"),
        (not n.escape_whitespaces, "unescaped whitespace"),
    ]
    clash = _space_clash(proto)
    return [what for bad, what in found if bad] + ([clash] if clash else [])


def unexportable(sp_model: Path) -> str | None:
    """Why ``convert to-hf`` cannot convert ``sp_model`` exactly (e.g. Llama 2's dummy prefix), or None."""
    problems = _inexact(_parse(sp_model))
    return ", ".join(problems) if problems else None


def piece_count(sp_model: Path) -> int:
    """The number of pieces (the vocabulary size) of the sentencepiece model ``sp_model``."""
    return len(_parse(sp_model).pieces)


def _load_proto(sp_model: Path) -> Any:
    proto = _parse(sp_model)
    problems = _inexact(proto)
    if problems:
        raise UserError(
            f"tokenizer {sp_model} cannot be converted exactly ({', '.join(problems)}); supported: "
            f"sentencepiece {REQUIRED_SENTENCEPIECE}"
        )
    return proto


def _piece(text: str) -> str:
    return text.replace(_SP_SPACE, " ")


def build_hf_tokenizer(sp_model: Path) -> Any:
    """A ``tokenizers.Tokenizer`` giving the same ids as our :class:`Tokenizer` on ``sp_model``."""
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE

    proto = _load_proto(sp_model)
    vocab = {_piece(p.piece): i for i, p in enumerate(proto.pieces)}  # one-to-one: _load_proto refuses clashes
    learned = {_piece(p.piece): i for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    merges = []
    for piece in learned:  # id order = score order: sentencepiece's merge priority
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in learned and b in learned]
        merges += sorted(splits, key=lambda ab: (learned[ab[0]], learned[ab[1]]))
    unk = next(_piece(p.piece) for p in proto.pieces if p.type == _UNKNOWN)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=False))
    user = [AddedToken(p.piece, normalized=False, special=False) for p in proto.pieces if p.type == _USER_DEFINED]
    tok.add_tokens(user)
    control = [p.piece for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)]
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in control])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tok


def special_ids(sp_model: Path) -> dict[str, int | None]:
    """bos/eos/pad token ids of a sentencepiece model (None where it has none)."""
    proto = _load_proto(sp_model)
    t = proto.trainer_spec
    return {
        f"{k}_token_id": (v if v >= 0 else None) for k, v in (("bos", t.bos_id), ("eos", t.eos_id), ("pad", t.pad_id))
    }


def write_hf_tokenizer(sp_model: Path, out: Path, max_length: int) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and the sentencepiece model itself into ``out``."""
    # written by Python, not tokenizers' save(): a failed write (disk full) must be an OSError
    (out / "tokenizer.json").write_text(build_hf_tokenizer(sp_model).to_str(pretty=True), encoding="utf-8")
    proto = _load_proto(sp_model)
    name = {i: p.piece for i, p in enumerate(proto.pieces)}
    t = proto.trainer_spec
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name.get(t.bos_id),
        "eos_token": name.get(t.eos_id),
        "pad_token": name.get(t.pad_id),
        "unk_token": name[t.unk_id],
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # the original model, for `convert from-hf` and for tools that read sentencepiece files
    shutil.copyfile(sp_model, out / "tokenizer.model")


def find_sentencepiece(hf_dir: Path) -> Path | None:
    """The sentencepiece model of an HF directory, or None when its tokenizer is not sentencepiece.

    Llama 1/2 and Mistral ship one as ``tokenizer.model`` (so do our exports); GPT-2 and Llama 3
    ship byte-level BPE (``tokenizer.json`` only), which sentencepiece cannot express, so those
    imports keep the HF tokenizer's path instead and data must be tokenized outside megatron-lite.
    """
    sp = hf_dir / "tokenizer.model"
    if sp.is_file():
        return sp
    if (hf_dir / "tokenizer.json").is_file() or (hf_dir / "vocab.json").is_file():
        return None
    raise UserError(
        f"no tokenizer in {hf_dir}: expected tokenizer.model (sentencepiece; copied into the checkpoint) "
        "or tokenizer.json / vocab.json (Hugging Face; its path is recorded): copy the model's tokenizer files "
        "from its source into it"
    )


def record_of_model(record: Any, where: Path, model: Path | None) -> Any:
    """``record`` (read from ``where``: a checkpoint's ``tokenizer.json``, an export's ``megatron_lite.json``)
    when it is the tokenizer record of the sentencepiece ``model`` beside it (its sha256), else None, with
    a warning naming both files where it is none: an export or import carries no record of another tokenizer."""
    if record is None or model is None:
        return None
    if is_tokenizer_record(record) and record.get("sha256") == sha256_file(model):
        return record
    why = (
        f"records sha256 {str(record.get('sha256'))[:12]}..., {model} is {sha256_file(model)[:12]}..."
        if is_tokenizer_record(record)
        else "is not a tokenizer record of `megatron-lite tokenizer train`"
    )
    log.warning("the tokenizer record in %s is not the record of %s (it %s): it is left out", where, model, why)
    return None
