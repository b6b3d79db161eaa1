"""Compressed inputs (.gz, .bz2, .xz) are read decompressed; damaged or unknown ones are refused by name."""

import bz2
import gzip
import json
import lzma

import pytest

from megatron_lite.data import preprocess_pool
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.data.inputs import MAX_LINE_BYTES, InputReader
from megatron_lite.data.preprocess import preprocess
from megatron_lite.data.tokenizer import Tokenizer, train_tokenizer
from megatron_lite.errors import UserError

VOCAB = 300
DOCS = ["def f(x):\n    return x\n", "unicode: café 漢字 🙂\n", "", "last document"]
TEXT = "".join(DOCS) * 40
COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    (root / "a.txt").write_text(TEXT)
    return Tokenizer(train_tokenizer([root / "a.txt"], root / "tok", VOCAB, progress=False))


def _jsonl() -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()


def _decoded(tok: Tokenizer, prefix) -> list[str]:
    ds = IndexedDataset(prefix)
    return [tok.decode(ds.get(i)) for i in range(len(ds))]


@pytest.mark.parametrize("ext", sorted(COMPRESS))
def test_compressed_jsonl_and_text_give_the_uncompressed_documents(tok, tmp_path, ext):
    (tmp_path / f"docs.jsonl{ext}").write_bytes(COMPRESS[ext](_jsonl()))
    (tmp_path / f"book.txt{ext}").write_bytes(COMPRESS[ext](TEXT.encode()))
    stats = preprocess(
        [tmp_path / f"docs.jsonl{ext}", tmp_path / f"book.txt{ext}"], tok, tmp_path / "d", progress=False
    )
    assert _decoded(tok, tmp_path / "d") == [*DOCS, TEXT]
    assert stats["decode_errors"] == 0 and stats["documents"] == len(DOCS) + 1


def test_tokenizer_trains_on_the_text_inside_a_compressed_jsonl(tmp_path):
    plain, packed = tmp_path / "plain.jsonl", tmp_path / "packed.jsonl.gz"
    plain.write_bytes(_jsonl() * 40)
    packed.write_bytes(gzip.compress(_jsonl() * 40))
    a = train_tokenizer([plain], tmp_path / "a", VOCAB, progress=False)
    b = train_tokenizer([packed], tmp_path / "b", VOCAB, progress=False)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("cut.jsonl.gz", gzip.compress(b'{"text": "hello"}\n' * 100)[:40], "damaged or truncated"),
        ("mislabelled.jsonl.gz", b'{"text": "hello"}\n', "cannot be decompressed as .gz"),
        (
            "data.jsonl.zst",
            b"\x28\xb5\x2f\xfd",
            r"data.jsonl.zst: .zst files cannot be read \(supported compressions: .gz, .bz2, .xz\); decompress or "
            "unpack it first, and give the text files",
        ),
        ("corpus.tar.gz", gzip.compress(b"corpus/a.txt\x00" * 40), ".tar files cannot be read"),
    ],
)
def test_unreadable_compressed_input_is_one_error_and_writes_nothing(tok, tmp_path, name, data, match):
    (tmp_path / "ok.jsonl").write_bytes(_jsonl())
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=match) as err:
        preprocess([tmp_path / "ok.jsonl", tmp_path / name], tok, tmp_path / "out", progress=False)
    assert name in str(err.value)
    assert not list(tmp_path.glob("*out*"))
    with pytest.raises(UserError, match=match):
        train_tokenizer([tmp_path / name], tmp_path / "tok", VOCAB, progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_bytes_counts_the_text_read_after_decompression(tok, tmp_path, monkeypatch, workers):
    """The ``bytes`` stat (returned, printed and in PREFIX.json) of a .gz input is that of the file inside."""
    monkeypatch.setattr(preprocess_pool, "usable_cpus", lambda: 2)
    plain = [tmp_path / "docs.jsonl", tmp_path / "book.txt"]
    plain[0].write_bytes(_jsonl() * 3)
    plain[1].write_bytes(TEXT.encode())
    packed = [p.with_name(p.name + ".gz") for p in plain]
    for src, dst in zip(plain, packed, strict=True):
        dst.write_bytes(gzip.compress(src.read_bytes()))
    a = preprocess(plain, tok, tmp_path / "a", progress=False, workers=workers)
    b = preprocess(packed, tok, tmp_path / "b", progress=False, workers=workers)
    assert a["bytes"] == b["bytes"] == sum(p.stat().st_size for p in plain) != sum(p.stat().st_size for p in packed)
    assert {**a, "seconds": 0} == {**b, "seconds": 0}
    assert json.loads((tmp_path / "b.json").read_text())["bytes"] == a["bytes"]


def test_a_line_past_the_limit_is_refused_naming_it_before_it_fills_memory(tok, tmp_path):
    """A decompression bomb: one JSON line of 64 MiB and more without a newline, a few hundred KiB on disk."""
    bomb = tmp_path / "bomb.jsonl.gz"
    bomb.write_bytes(gzip.compress(_jsonl() + b'{"text": "' + b"a" * MAX_LINE_BYTES + b'"}', compresslevel=1))
    match = rf"input {bomb}:{len(DOCS) + 1}: line {len(DOCS) + 1} is longer than 64 MiB, the most a line is read"
    with pytest.raises(UserError, match=match):
        preprocess([bomb], tok, tmp_path / "out", progress=False)
    assert not list(tmp_path.glob("*out*"))
    with pytest.raises(UserError, match=match):
        train_tokenizer([bomb], tmp_path / "tok", VOCAB, progress=False)
    longest = tmp_path / "longest.txt"  # at the limit, its newline included: read whole
    longest.write_bytes(b"a" * (MAX_LINE_BYTES - 1) + b"\nb")
    with InputReader(longest) as f:
        assert [len(line) for line in f] == [MAX_LINE_BYTES, 1]
