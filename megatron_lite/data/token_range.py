"""Before step 1, and in every batch: every dataset's token ids must fit the model's vocabulary.

A dataset tokenized with another, larger tokenizer holds ids >= ``model.vocab_size``. Found when a
batch holding one is read, it stops one rank mid-run while the others wait in their collectives;
found here, at startup, every rank refuses together (the trainer runs this in a ``fail_fast_setup``
block) with one message naming the dataset and the fix.

The largest id of a dataset comes from, cheapest first:

1. its record ``PREFIX.json``, written by ``preprocess``: ``max_token_id``; in a record from before
   that field, the tokenizer's ``vocab_size`` as an upper bound. A record is believed only while its
   ``documents`` and ``tokens`` are the ``.idx``'s: one left beside a pair rebuilt by other means
   describes other data.
2. otherwise a read of the whole memory-mapped ``.bin`` (numpy max: ~15 GB/s from the page cache on
   a 2-core CPU, disk speed when cold), up to ``SCAN_LIMIT_BYTES`` a dataset.
   Every rank reads (the verdict must stand on each without a collective), but a node's ranks share
   the page cache, so 8 GiB costs seconds even from a cold local disk. A larger dataset without a
   record is not read: the caller warns, and the trainer's per-batch check still guards it.

The ``.idx`` has no room for the largest id: its readers refuse another version and a longer file,
so the record stays beside it, and datasets without it (older ones, ones made elsewhere) still open.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_lite import jsontext
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.data.tokenizer import Tokenizer
from megatron_lite.errors import UserError

SCAN_LIMIT_BYTES = 8 << 30


def dataset_record(data: IndexedDataset) -> dict | None:
    """``PREFIX.json`` when it is the record of exactly this ``.bin``/``.idx``, else None."""
    path = Path(data.prefix + ".json")
    try:
        record = jsontext.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or (record.get("documents"), record.get("tokens")) != (len(data), data.num_tokens):
        return None
    return record


def largest_token_id(data: IndexedDataset, below: int, scan_limit: int | None = None) -> tuple[int, str] | None:
    """(the largest id in ``data``, -1 for none; where that comes from), or None when neither its
    record nor a read of at most ``scan_limit`` bytes (default ``SCAN_LIMIT_BYTES``) tells (module
    docstring). An older record's bound is enough when it is under ``below``; otherwise the ``.bin``
    gives the exact value."""
    record = dataset_record(data) or {}
    top = record.get("max_token_id", "absent")
    if top is None or isinstance(top, int):
        return (-1 if top is None else top), f"the largest, recorded in {data.prefix}.json"
    bound = record.get("vocab_size")
    if isinstance(bound, int) and bound <= below:
        return bound - 1, f"at most: {data.prefix}.json records a tokenizer of {bound} tokens"
    if data.bin_path.stat().st_size > (SCAN_LIMIT_BYTES if scan_limit is None else scan_limit):
        return None
    return data.max_token_id(), f"the largest, read from {data.bin_path}"


def check_token_ids(
    datasets: Sequence[IndexedDataset], vocab_size: int, tok: Tokenizer, scan_limit: int | None = None
) -> list[str]:
    """Refuse the first of ``datasets`` that holds an id >= ``vocab_size`` (``tok``: the run's
    tokenizer, named in the fix); returns the prefixes that could not be checked."""
    unchecked = []
    for data in datasets:
        found = largest_token_id(data, vocab_size, scan_limit)
        if found is None:
            unchecked.append(data.prefix)
        elif found[0] >= vocab_size:
            raise UserError(_too_large(data, found, vocab_size, tok))
    return unchecked


def _too_large(data: IndexedDataset, found: tuple[int, str], vocab_size: int, tok: Tokenizer) -> str:
    made_with = (dataset_record(data) or {}).get("tokenizer")
    made = f"; its record names {made_with}" if made_with else ""
    return (
        f"dataset {data.prefix} holds token id {found[0]} but model.vocab_size is {vocab_size} ({found[1]}): it "
        f"was tokenized with a larger vocabulary than this run's tokenizer {tok.path} ({tok.vocab_size} "
        f"tokens){made}; re-run `megatron-lite preprocess --tokenizer {tok.path} --output {data.prefix} "
        "--overwrite ...` on its text, or set data.tokenizer to the tokenizer it was made with"
    )


def check_batch_ids(micro: Sequence, vocab_size: int, where: str, tokenizer: str | Path) -> None:
    """The trainer's per-batch guard (a dataset too large to check here, or damaged since): every id
    of the microbatches ``micro`` (read for ``where``: "step 7", "the evaluation at step 4") is in
    ``[0, vocab_size)``, else one :class:`UserError` (not an IndexError deep inside the embedding).
    One reduction per microbatch and one host read for them all (it runs every step).

    It runs every step even when every dataset passed :func:`check_token_ids` at startup:

    - it costs no device read: the loader's microbatches are CPU tensors it has just assembled from
      the memory map, and one ``aminmax`` over them is of the order of that assembly;
    - the startup verdict can stop holding: the open memory map serves a ``.bin`` rewritten in place
      (``cp`` over it keeps the inode; only a replacement by rename, as ``preprocess`` writes, leaves
      the run its old file), and a record is believed on its document and token counts alone;
    - an id past the vocabulary raises nothing on its own under tensor parallelism: the vocabulary-
      parallel embedding gives an id no rank owns a zero vector (one in the padding, a padding row),
      and the run would train on it silently; on one CUDA device it is a device-side assert that ends
      the process without naming the dataset."""
    bounds = torch.stack([end for b in micro for end in torch.aminmax(b)]).tolist()  # [min0, max0, min1, ...]
    top, low = max(bounds[1::2]), min(bounds[0::2])
    if top >= vocab_size:
        raise UserError(
            f"the data holds token id {top} but model.vocab_size is {vocab_size} ({where}): the dataset was "
            f"tokenized with another tokenizer than {tokenizer}"
        )
    if low < 0:
        raise UserError(
            f"the data holds token id {low} ({where}): token ids are never negative, so the dataset's .bin is "
            "damaged; rebuild it with `megatron-lite preprocess`"
        )
