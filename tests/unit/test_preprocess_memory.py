"""Preprocessing a long document works in pieces (bounded memory) yet gives exactly the whole-document ids."""

import io
import json
import tracemalloc

import numpy as np
import pytest
import sentencepiece as spm

from megatron_lite.data import preprocess as pp
from megatron_lite.data.corpus import default_corpus_files
from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megatron_lite.data.tokenizer import Tokenizer, train_tokenizer

VOCAB = 400

MIXED = (
    "def f(x):\n\tif x:\n\t\treturn  x  *  2\n\n\n    pass\n"
    "unicode: héllo wörld, 世界, emoji 🙂, math ∑∫\n"
    "sentencepiece marker \u2581 and ▁▁ twice, specials <s> </s> <pad> <unk> <0x0A>\n"
    "windows\r\nline\r\nends\r\n    \n\t\n  trailing spaces   \n"
    "numbers 1234567890 3.14159e-10 0xFF aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n"
)


@pytest.fixture(scope="module")
def code() -> str:
    files = [p for p in default_corpus_files() if 2_000 < p.stat().st_size < 12_000][:6]
    return "".join(p.read_text() for p in files)


@pytest.fixture(scope="module")
def tok(code, tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "a.txt").write_text(code + MIXED)
    return Tokenizer(train_tokenizer([root / "a.txt"], root / "tok", VOCAB, progress=False))


def _ids(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds.get(i).tolist() for i in range(len(ds))]


def _texts(code: str) -> dict[str, str]:
    return {
        "many_lines": (code + MIXED) * 3,
        "one_line": (code + MIXED).replace("\n", " ") * 2,  # no newline at all
        "crlf_one_line": (code + MIXED).replace("\n", "\r\t") + "\n",
        "repeated_char": "x" * 3000 + " end",  # no safe cut inside the run: encoded whole
        "empty": "",
    }


@pytest.mark.parametrize("name", ["many_lines", "one_line", "crlf_one_line", "repeated_char", "empty"])
def test_pieces_give_the_whole_document_ids(tok, code, tmp_path, monkeypatch, name):
    """Tiny pieces and read blocks (cutting UTF-8 sequences) must not change a single id."""
    text = _texts(code)[name]
    monkeypatch.setattr(pp, "_PIECE_CHARS", 97)
    monkeypatch.setattr(pp, "_READ_BYTES", 7)
    pieces = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda t, **kw: pieces.append(t) or encode(t, **kw))
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    (tmp_path / "next.txt").write_text("x = 1\n")  # a lone empty input is refused: not what this tests
    stats = pp.preprocess([tmp_path / "doc.txt", tmp_path / "next.txt"], tok, tmp_path / "out", progress=False)
    monkeypatch.undo()
    assert "".join(pieces[:-1]) == text and pieces[-1] == "x = 1\n"
    if name in ("many_lines", "one_line", "crlf_one_line"):
        assert len(pieces) > len(text) // 500  # really cut into many pieces
        assert max(map(len, pieces)) < 97 + 100  # so sentencepiece never sees much text at once
    assert _ids(tmp_path / "out") == [tok.encode(text, eos=True), tok.encode("x = 1\n", eos=True)]
    assert stats["documents"] == 2 and stats["tokens"] == len(tok.encode(text)) + len(tok.encode("x = 1\n")) + 2


def test_json_documents_and_invalid_utf8(tok, code, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "_PIECE_CHARS", 101)
    monkeypatch.setattr(pp, "_READ_BYTES", 5)
    texts = [code, MIXED * 4, ""]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    raw = code.encode()[:3000] + b"\xe2\x82\n\xff tail \xf0\x9f"  # broken sequences, one at the very end
    (tmp_path / "bad.txt").write_bytes(raw)
    stats = pp.preprocess([tmp_path / "d.jsonl", tmp_path / "bad.txt"], tok, tmp_path / "out", progress=False)
    expected = [*texts, raw.decode("utf-8", errors="replace")]
    assert _ids(tmp_path / "out") == [tok.encode(t, eos=True) for t in expected]
    assert stats["decode_errors"] == 1 and stats["documents"] == 4


def test_no_eos(tok, code, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "_PIECE_CHARS", 50)
    (tmp_path / "doc.txt").write_text(MIXED)
    pp.preprocess([tmp_path / "doc.txt"], tok, tmp_path / "out", append_eos=False, progress=False)
    assert _ids(tmp_path / "out") == [tok.encode(MIXED)]


def test_long_document_memory_is_bounded(tok, code, tmp_path, monkeypatch):
    """A 1.5 MB single-line document. Whole, its ids as a Python list alone take ~40 bytes a token
    (~30 MB here, besides sentencepiece's own ~50 bytes a character, which tracemalloc does not see);
    in 64 KB pieces, Python memory stays near a few pieces' worth."""
    monkeypatch.setattr(pp, "_PIECE_CHARS", 1 << 16, raising=False)  # raising: fail on memory, not a name
    monkeypatch.setattr(pp, "_READ_BYTES", 1 << 16, raising=False)
    text = (code.replace("\n", " ") + " ") * (1_500_000 // (len(code) + 1))
    (tmp_path / "doc.txt").write_text(text)
    tracemalloc.start()
    try:
        pp.preprocess([tmp_path / "doc.txt"], tok, tmp_path / "out", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ds = IndexedDataset(tmp_path / "out")
    assert ds.sizes[0] > 500_000
    assert peak < 8_000_000, f"peak {peak / 1e6:.0f} MB of Python memory for a {len(text) / 1e6:.1f} MB document"


def test_builder_documents_in_pieces(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "d", np.uint16) as b:
        b.add_tokens([1, 2])
        b.add_tokens(np.array([3], np.int64))
        b.add_tokens([])
        b.end_document()
        b.end_document()  # empty document
        b.add_document([4, 5])
        b.add_tokens([6])
        with pytest.raises(ValueError, match="end_document"):
            b.add_document([7])
        b.end_document()
    assert _ids(tmp_path / "d") == [[1, 2, 3], [], [4, 5], [6]]


def test_builder_refuses_an_unclosed_document(tmp_path):
    with pytest.raises(ValueError, match="never closed"), IndexedDatasetBuilder(tmp_path / "d") as b:
        b.add_tokens([1])
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


def test_output_record_never_replaces_an_input(tok, tmp_path):
    """`--input corpus.json --output corpus` would write the dataset record over the corpus itself."""
    src = tmp_path / "corpus.json"
    src.write_text(json.dumps({"text": "hello world"}) + "\n")
    before = src.read_bytes()
    with pytest.raises(pp.UserError, match="choose another --output"):
        pp.preprocess([src], tok, tmp_path / "corpus", progress=False)
    assert src.read_bytes() == before
    assert not (tmp_path / "corpus.bin").exists() and not (tmp_path / "corpus.idx").exists()


def test_output_record_never_replaces_a_tokenizer_record(tok, tmp_path):
    """A tokenizer and a dataset under one prefix share PREFIX.json: preprocess must not take it over."""
    model = train_tokenizer([tok.path.with_name("a.txt")], tmp_path / "my", VOCAB, progress=False)
    record = model.with_suffix(".json").read_bytes()
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "hello world"}) + "\n")
    with pytest.raises(
        pp.UserError, match=r"my.json exists and is the record of the tokenizer .*: choose another --output"
    ):
        pp.preprocess([src], model, tmp_path / "my", progress=False)
    assert model.with_suffix(".json").read_bytes() == record
    pp.preprocess([src], model, tmp_path / "data", progress=False)  # another prefix is fine
    pp.preprocess([src], model, tmp_path / "data", progress=False, overwrite=True)  # and so is rebuilding it


def test_an_existing_dataset_is_replaced_only_when_asked(tok, tmp_path):
    """A second preprocess to the same --output would swap the data under runs that train on it."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello world\n")
    b.write_text("something else entirely\n")
    pp.preprocess([a], tok, tmp_path / "d", progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("d.*")}
    with pytest.raises(pp.UserError, match="--overwrite") as err:
        pp.preprocess([b], tok, tmp_path / "d", progress=False)
    assert "d.bin" in str(err.value) and "d.idx" in str(err.value)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("d.*")} == before
    (tmp_path / "d.json").unlink()  # a pair without its record (made elsewhere, or a lost record) as well
    with pytest.raises(pp.UserError, match="--overwrite"):
        pp.preprocess([b], tok, tmp_path / "d", progress=False)
    pp.preprocess([b], tok, tmp_path / "d", progress=False, overwrite=True)
    assert _ids(tmp_path / "d") == [tok.encode("something else entirely\n") + [tok.eos_id]]


def test_a_rebuild_that_dies_before_its_record_leaves_no_stale_record(tok, tmp_path, monkeypatch):
    """The old PREFIX.json (another tokenizer, other inputs) must not outlive the data it described."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello world\n")
    b.write_text("something else entirely\n")
    pp.preprocess([a], tok, tmp_path / "d", progress=False)
    assert json.loads((tmp_path / "d.json").read_text())["inputs"] == [str(a)]

    def die(path, data):
        raise OSError("killed before the record was written")

    monkeypatch.setattr(pp, "write_atomic", die)
    with pytest.raises(OSError, match="killed"):
        pp.preprocess([b], tok, tmp_path / "d", progress=False, overwrite=True)
    assert not (tmp_path / "d.json").exists()
    assert _ids(tmp_path / "d") == [tok.encode("something else entirely\n") + [tok.eos_id]]


def test_a_rebuild_that_fails_before_installing_keeps_the_old_dataset_whole(tok, tmp_path, monkeypatch):
    """A failure while the new index is written (disk full) must not leave the old pair without its record."""
    from megatron_lite.data import indexed

    src = tmp_path / "a.txt"
    src.write_text("hello world\n")
    pp.preprocess([src], tok, tmp_path / "d", progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("d.*")}

    class DiskFull:
        def pack(self, *args):
            raise OSError("no space left on device")

    monkeypatch.setattr(indexed, "_HEADER", DiskFull())
    with pytest.raises(OSError, match="no space"):
        pp.preprocess([src], tok, tmp_path / "d", progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("d.*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d.bin", "d.idx", "d.json"]


def test_output_that_names_a_directory_is_refused(tok, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(pp.UserError, match="--output"):
        pp.preprocess([src], tok, str(out) + "/", progress=False)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (json.dumps([{"text": "a"}, {"text": "b"}]), "one JSON object per line"),
        ("[", "one JSON object per line"),
        (json.dumps({"content": "a"}), "--json-key"),
    ],
)
def test_json_errors_name_the_fix(tok, tmp_path, line, match):
    src = tmp_path / "a.json"
    src.write_text(line + "\n")
    with pytest.raises(pp.UserError, match=match):
        pp.preprocess([src], tok, tmp_path / "out", progress=False)


def test_json_line_with_a_byte_order_mark(tok, tmp_path):
    """Editors on Windows start a UTF-8 file with a BOM; it is not part of the first document."""
    src = tmp_path / "a.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "hello"}).encode() + b"\n")
    pp.preprocess([src], tok, tmp_path / "out", append_eos=False, progress=False)
    assert _ids(tmp_path / "out") == [tok.encode("hello")]


def test_a_tokenizer_without_eos_is_refused_unless_no_eos(tmp_path):
    """A foreign sentencepiece model with eos_id=-1 would write -1 as every document's end (a ValueError traceback)."""
    model = io.BytesIO()
    lines = iter(["hello world foo bar"] * 50)
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, vocab_size=14, eos_id=-1, minloglevel=2)
    (tmp_path / "noeos.model").write_bytes(model.getvalue())
    (tmp_path / "a.txt").write_text("hello world")
    with pytest.raises(pp.UserError, match="no EOS token.*pass --no-eos"):
        pp.preprocess([tmp_path / "a.txt"], tmp_path / "noeos.model", tmp_path / "d", progress=False)
    assert not list(tmp_path.glob("d.*"))
    pp.preprocess([tmp_path / "a.txt"], tmp_path / "noeos.model", tmp_path / "d", append_eos=False, progress=False)
    assert len(IndexedDataset(tmp_path / "d")) == 1


@pytest.mark.parametrize("option", ["add_dummy_prefix", "remove_extra_whitespaces"])
def test_a_tokenizer_whose_normalizer_joins_characters_encodes_each_document_whole(tok, tmp_path, monkeypatch, option):
    """A BPE model that adds a leading space or collapses spaces encodes a piece differently from the
    same text inside the document: such a model is never cut into pieces."""
    model = io.BytesIO()
    flags = {"add_dummy_prefix": False, "remove_extra_whitespaces": False, option: True}
    lines = iter(["def f(x):  return x  + 1"] * 50)
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=30, model_type="bpe",
        normalization_rule_name="identity", minloglevel=2, **flags,
    )  # fmt: skip
    (tmp_path / "foreign.model").write_bytes(model.getvalue())
    foreign = Tokenizer(tmp_path / "foreign.model")
    assert pp.Splitter(foreign).pairs is None and pp.Splitter(tok).pairs is not None
    text = "def f(x):  return x  + 1\n" * 40
    (tmp_path / "doc.txt").write_text(text)
    monkeypatch.setattr(pp, "_PIECE_CHARS", 20)
    pp.preprocess([tmp_path / "doc.txt"], foreign, tmp_path / "out", progress=False)
    assert _ids(tmp_path / "out") == [foreign.encode(text, eos=True)]
