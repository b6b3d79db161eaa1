"""The converted Hugging Face tokenizer gives exactly our sentencepiece ids, on any text."""

import os
import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm

from megatron_lite.convert.tokenizer import write_hf_tokenizer
from megatron_lite.data.tokenizer import Tokenizer, train_tokenizer
from megatron_lite.errors import UserError

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CODE_FILES = [STDLIB / n for n in ("textwrap.py", "shlex.py", "fractions.py", "heapq.py")]
MULTILINGUAL = (
    "   leading spaces, then\ttabs\t\tand     runs of spaces\n"
    "\n\n\n"
    "def f(x):\r\n    return x  # a CRLF line\r\n"
    "emoji 😀👍🏽🇫🇷 and CJK 漢字かなカナ한국어 中文字符\n"
    "accented: café naïve Ångström Žluťoučký façade Ørsted\n"
    "Cyrillic: Привет, мир! Ёжик в тумане\n"
    "the marker ▁ itself, ▁▁x, and <s> </s> <pad> <unk> as plain text\n"
    "trailing spaces   \n"
    "\t\n"
    "digits 1234567890 and 3.14159\n"
)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> tuple[Tokenizer, object]:
    """Our tokenizer trained on code plus multilingual text, and the converted HF one."""
    tmp = tmp_path_factory.mktemp("tok")
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(p.read_text() for p in CODE_FILES) + MULTILINGUAL * 20)
    model = train_tokenizer([corpus], tmp / "sp", vocab_size=700, progress=False)
    out = tmp / "hf"
    out.mkdir()
    write_hf_tokenizer(model, out, max_length=2048)
    return Tokenizer(model), transformers.AutoTokenizer.from_pretrained(str(out))


def test_ids_equal_on_multilingual_text_with_whitespace_and_code(tokenizers):
    ours, hf = tokenizers
    for text in (MULTILINGUAL, MULTILINGUAL.strip("\n"), "  x", "\n", "", "▁", " ▁ ", "<s>hi</s>"):
        assert hf(text)["input_ids"] == ours.encode(text), repr(text)
        assert hf.decode(hf(text)["input_ids"]) == text


def test_ids_equal_on_whole_source_files(tokenizers):
    ours, hf = tokenizers
    for path in [*CODE_FILES, STDLIB / "argparse.py"]:  # argparse.py was not in the training text
        text = path.read_text()
        assert hf(text, verbose=False)["input_ids"] == ours.encode(text), path.name


def test_special_ids_match_and_nothing_is_added(tokenizers):
    ours, hf = tokenizers
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (
        ours.bos_id,
        ours.eos_id,
        ours.pad_id,
        ours.unk_id,
    )
    assert hf("hello")["input_ids"] == hf("hello", add_special_tokens=False)["input_ids"]
    assert ours.bos_id not in hf("<s>")["input_ids"]
    assert len(hf) == ours.vocab_size


def test_sentencepiece_models_we_cannot_match_are_refused(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(CODE_FILES[0].read_text())
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "dummy"), vocab_size=300, model_type="bpe", minloglevel=2
    )  # defaults: nmt_nfkc normalisation, dummy prefix, no byte fallback
    with pytest.raises(UserError, match="supported: sentencepiece BPE, byte_fallback"):
        write_hf_tokenizer(tmp_path / "dummy.model", tmp_path, max_length=16)


def test_pieces_that_differ_only_by_space_vs_the_marker_are_refused(tokenizers, tmp_path):
    """HF's vocabulary spells U+2581 as a space: a piece with a real space would take another's id."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizers[0].path).read_bytes())
    marked = next(p.piece for p in proto.pieces if "\u2581" in p.piece)
    proto.pieces.add(
        piece=marked.replace("\u2581", " "),
        score=0.0,
        type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED,
    )
    (tmp_path / "clash.model").write_bytes(proto.SerializeToString())
    with pytest.raises(UserError) as err:
        write_hf_tokenizer(tmp_path / "clash.model", tmp_path, max_length=16)
    spaced = marked.replace("\u2581", " ")
    assert str(err.value) == (
        f"tokenizer {tmp_path / 'clash.model'} cannot be converted exactly (pieces {marked!r} and {spaced!r}, which "
        "differ only by ' ' vs U+2581); supported: sentencepiece BPE, byte_fallback, identity normalisation, no "
        "dummy prefix, no whitespace collapsing"
    )
