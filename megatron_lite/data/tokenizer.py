"""SentencePiece BPE tokenizer that round-trips source code exactly.

Stock sentencepiece settings are built for prose: they collapse runs of spaces, add a dummy leading
space and drop characters outside the training alphabet, so ``decode(encode(code)) != code``. We
train with identity normalisation, whitespace-only pieces, split digits and byte fallback (any
unseen character becomes its UTF-8 bytes), and without the dummy prefix. Sentencepiece also trains
line by line, so no learned piece ever contains a newline: ``"\\n"`` is a user-defined symbol, one
token, matched inside the text at encode time. The one character sentencepiece cannot carry is its
own whitespace marker U+2581 ("▁", decoded as a space); ``Tokenizer.encode`` spells it as its three
byte-fallback tokens instead.

Ids are fixed so every model of ours agrees: pad=0, bos=1, eos=2, unk=3, newline=4, then the 256
byte pieces (5..260), then learned pieces. Training (:func:`train_tokenizer`, the settings above,
the model's record ``PREFIX.json`` and :func:`is_tokenizer_record`) lives in ``tokenizer_train.py``
and is re-exported here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megatron_lite import jsontext
from megatron_lite.data.tokenizer_train import is_tokenizer_record, train_tokenizer  # noqa: F401  re-exported
from megatron_lite.errors import UserError

_SP_SPACE = "\u2581"  # sentencepiece's whitespace marker


def tokenizer_record(tok: Tokenizer) -> Path | None:
    """``PREFIX.json`` beside ``tok``'s model when it is that model's record, which a run copies into its
    checkpoints as ``tokenizer.json``; None without one (no file, or another kind of file, e.g. a
    Hugging Face ``tokenizer.json``). A record of another model (its ``sha256`` not this model's) is
    refused: every checkpoint would carry the record of a tokenizer it was not trained with."""
    path = tok.path.with_suffix(".json")
    try:
        meta = jsontext.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not is_tokenizer_record(meta):
        return None
    if meta.get("sha256") != tok.sha256:
        raise UserError(
            f"{path} is the record of another tokenizer than {tok.path} beside it: it records sha256 "
            f"{str(meta.get('sha256'))[:12]}..., the model's is {tok.sha256[:12]}... (one was replaced without the "
            "other), and checkpoints carry the record as the model's; put the model's own record there (`megatron-lite "
            "tokenizer train` writes both), or move the record away"
        )
    return path


class Tokenizer:
    """A trained sentencepiece model with exact round-trip ``encode``/``decode``."""

    def __init__(self, model_path: str | Path, model_bytes: bytes | None = None) -> None:
        """Load ``model_path``; or, given ``model_bytes`` (the contents of that file, e.g. a
        :attr:`model_bytes` sent to another process), load those and read no file."""
        self.path = Path(model_path)
        fix = "train one with `megatron-lite tokenizer train ...` or point data.tokenizer at a .model file"
        if self.path.suffix != ".model" and self.path.with_name(self.path.name + ".model").is_file():
            fix = f"did you mean {self.path}.model? (`tokenizer train --output {self.path}` wrote that file)"
        try:
            data = self.path.read_bytes() if model_bytes is None else model_bytes
        except OSError as e:
            raise UserError(f"tokenizer model {self.path} cannot be read ({e.strerror}); {fix}") from e
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:
            raise UserError(f"tokenizer model {self.path} is not a valid sentencepiece model ({e}); {fix}") from e
        self.sha256 = hashlib.sha256(data).hexdigest()
        # U+2581 decodes as a space, so encode spells it with its byte pieces (present with byte_fallback).
        byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SP_SPACE.encode()]
        self._marker_ids = None if self._sp.unk_id() in byte_ids else byte_ids

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def model_bytes(self) -> bytes:
        """The loaded model, serialized: ``Tokenizer(self.path, self.model_bytes)`` encodes alike."""
        return self._sp.serialized_model_proto()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (newlines included as the newline token), optionally framed by bos/eos."""
        if _SP_SPACE in text and self._marker_ids is not None:
            parts = self._sp.encode(text.split(_SP_SPACE), out_type=int)
            ids = list(parts[0])
            for part in parts[1:]:
                ids += self._marker_ids
                ids += part
        else:
            ids = self._sp.encode(text, out_type=int)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; pad/bos/eos decode to nothing."""
        return self._sp.decode(np.asarray(ids, dtype=np.int64).tolist())

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
