"""The history rows of an offline W&B run, read back from its ``run-<id>.wandb`` file.

The file is a LevelDB-style log (W&B's ``datastore``): a 7-byte header, then 32 KiB blocks of
records, each ``crc32 (4) | length (2) | type (1) | data``, a record split over blocks as first (2),
middle (3) and last (4) pieces, a whole one typed 1; each record's data is a ``wandb.proto`` Record.
"""

import json
import struct
from pathlib import Path

BLOCK, HEADER, FILE_HEADER = 32 * 1024, 7, 7


def _records(raw: bytes):
    pos, pieces = FILE_HEADER, b""
    while pos + HEADER <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + HEADER])
        data, pos = raw[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        if kind == 1:
            yield data
        elif kind in (2, 3):
            pieces = data if kind == 2 else pieces + data
        elif kind == 4:
            yield pieces + data


def history(path: Path) -> list[dict]:
    """Each ``run.log`` call's values by key, with W&B's ``_step`` (its ``_runtime`` and ``_timestamp`` left out)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for data in _records(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            rows.append({k: v for k, v in items.items() if k not in ("_runtime", "_timestamp")})
    return rows
