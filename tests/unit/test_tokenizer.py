"""The tokenizer round-trips code exactly, keeps fixed special ids and trains deterministically."""

import hashlib
import json
import logging
import re

import pytest

from megatron_lite.amounts import byte_size
from megatron_lite.data.tokenizer import Tokenizer, train_tokenizer
from megatron_lite.data.tokenizer_train import _line_pieces
from megatron_lite.errors import UserError

VOCAB = 400

SAMPLES = [
    "def f(x):\n\tif x:\n\t\treturn  x  *  2\n\n\n    pass\n",
    "    \n\t\n  trailing spaces   \nno final newline",
    "\n\nleading blank lines and a final one\n",
    "unicode: héllo wörld, 世界, emoji 🙂, math ∑∫, rtl שלום\n",
    "sentencepiece marker \u2581 and ▁▁ twice, specials <s> </s> <pad> <unk> <0x0A>\n",
    "windows\r\nline\r\nends\r\n",
    "numbers 1234567890 3.14159e-10 0xFF\n",
    "",
    " ",
    "\n",
    "\x00\x01\x7f control bytes\n",
]


def _code_text(n: int = 300) -> str:
    lines = []
    for i in range(n):
        lines.append(f"def function_{i}(alpha, beta={i}):")
        lines.append(f'    """Return the {i}th value."""')
        lines.append(f"    if alpha > beta:\n        return alpha * {i} + beta\n    return beta  # done\n")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    paths = [root / "a.py", root / "b.txt"]
    paths[0].write_text(_code_text())
    paths[1].write_text("Plain prose, with punctuation; and Ünïcödé.\n" * 200)
    return paths


@pytest.fixture(scope="module")
def model_path(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tok"
    return train_tokenizer(corpus, out, VOCAB, progress=False)


@pytest.fixture(scope="module")
def tok(model_path):
    return Tokenizer(model_path)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_exact(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_real_code(tok, corpus):
    text = corpus[0].read_text()
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_and_newline_token(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == VOCAB
    assert tok.encode("\n") == [4]
    ids = tok.encode("x = 1\n", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "x = 1\n"
    assert tok.decode([tok.pad_id, *tok.encode("ab"), tok.eos_id]) == "ab"


def test_training_compresses(tok, corpus):
    text = corpus[0].read_text()
    assert len(tok.encode(text)) < len(text.encode()) / 2  # learned merges, not just bytes


def test_metadata_json(model_path, tok):
    meta = json.loads(model_path.with_suffix(".json").read_text())
    assert meta["vocab_size"] == VOCAB
    assert (meta["pad_id"], meta["bos_id"], meta["eos_id"], meta["unk_id"]) == (0, 1, 2, 3)
    assert meta["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest() == tok.sha256
    assert meta["training"]["byte_fallback"] is True
    assert not list(model_path.parent.glob(".*tmp*"))  # atomic writes leave no temp files


def test_training_is_deterministic(corpus, model_path, tmp_path):
    again = train_tokenizer(corpus, tmp_path / "again", VOCAB, progress=False)
    assert again.read_bytes() == model_path.read_bytes()


def test_bounded_sample_still_trains(corpus, tmp_path):
    path = train_tokenizer(corpus, tmp_path / "small", VOCAB, max_bytes=20_000, progress=False)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["training"]["max_bytes"] == 20_000
    assert Tokenizer(path).decode(Tokenizer(path).encode(SAMPLES[0])) == SAMPLES[0]


def test_training_logs_a_line_before_and_after_sentencepiece_trains_where_progress_is_on(corpus, tmp_path, caplog):
    """Sentencepiece trains silently after the sample is read: a line names what it trains on, one
    its time; neither where progress is off (``--quiet``)."""
    caplog.set_level(logging.INFO, logger="megatron_lite.data.tokenizer_train")
    lines = [line for path in corpus for line in path.read_text().split("\n") if line]
    size = byte_size(sum(len(line.encode()) for line in lines))
    train_tokenizer(corpus, tmp_path / "tok", VOCAB, progress=True)
    before, after = caplog.messages
    assert before == f"training a {VOCAB}-piece BPE on {size} of sample lines ({len(lines):,} lines)..."
    assert re.fullmatch(rf"trained the {VOCAB}-piece tokenizer in \d+\.\d s", after), after
    caplog.clear()
    train_tokenizer(corpus, tmp_path / "quiet", VOCAB, progress=False)
    assert caplog.messages == []


def test_missing_model_names_path_and_fix(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(UserError, match="megatron-lite tokenizer train") as err:
        Tokenizer(missing)
    assert str(missing) in str(err.value)


def test_garbage_model_is_user_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(UserError, match="not a valid sentencepiece model") as err:
        Tokenizer(bad)
    assert str(bad) in str(err.value)


def test_bad_training_inputs(corpus, tmp_path):
    with pytest.raises(UserError, match=r"^vocab_size 100 is too small: .* needs 262; give --vocab-size 262 or more$"):
        train_tokenizer(corpus, tmp_path / "t", 100, progress=False)
    with pytest.raises(UserError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "t", VOCAB, progress=False)
    with pytest.raises(UserError, match=rf"sentencepiece could not train a 50000-token model on {len(corpus)} files: "):
        train_tokenizer(corpus, tmp_path / "t", 50_000, progress=False)


def test_cli_tokenizer_train_expands_quoted_globs(corpus, tmp_path):
    from megatron_lite.cli import main

    out = tmp_path / "globbed"
    pattern = str(corpus[0].parent / "*.*")  # as `--input '/dir/*.*'` arrives, unexpanded by a shell
    assert (
        main(["tokenizer", "train", "--input", pattern, "--output", str(out), "--vocab-size", str(VOCAB), "--quiet"])
        == 0
    )
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["training"]["inputs"] == [str(p) for p in sorted(corpus)]


def test_outputs_never_replace_an_input(corpus, tmp_path):
    """`--input corpus.json --output corpus` would write the tokenizer's record over the corpus."""
    src = tmp_path / "corpus.json"
    src.write_text(corpus[1].read_text())
    before = src.read_bytes()
    with pytest.raises(UserError, match="choose another --output"):
        train_tokenizer([src], tmp_path / "corpus", VOCAB, progress=False)
    assert src.read_bytes() == before and not (tmp_path / "corpus.model").exists()


def test_outputs_never_replace_a_dataset_record(corpus, model_path, tmp_path):
    """A dataset's PREFIX.json records its tokenizer; a tokenizer trained to PREFIX must not erase it."""
    from megatron_lite.data.preprocess import preprocess

    preprocess([corpus[1]], model_path, tmp_path / "my", progress=False)
    record = (tmp_path / "my.json").read_bytes()
    with pytest.raises(
        UserError, match=r"my.json exists and is the record of the dataset .*: choose another --output prefix"
    ):
        train_tokenizer(corpus, tmp_path / "my", VOCAB, progress=False)
    assert (tmp_path / "my.json").read_bytes() == record and not (tmp_path / "my.model").exists()
    train_tokenizer(corpus, tmp_path / "tok", VOCAB, progress=False)
    train_tokenizer(corpus, tmp_path / "tok", VOCAB, progress=False, overwrite=True)  # retraining when asked


def test_an_existing_tokenizer_is_replaced_only_when_asked(corpus, tmp_path):
    """Retraining over tok/my.model would orphan every dataset made with it (their records hold its hash)."""
    model = train_tokenizer(corpus, tmp_path / "my", VOCAB - 20, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match="--overwrite"):
        train_tokenizer(corpus, tmp_path / "my", VOCAB, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    model.with_suffix(".json").unlink()  # a .model alone is refused as well
    with pytest.raises(UserError, match="my.model"):
        train_tokenizer(corpus, tmp_path / "my", VOCAB, progress=False)
    assert train_tokenizer(corpus, tmp_path / "my", VOCAB, progress=False, overwrite=True) == model
    assert model.read_bytes() != before["my.model"] and model.with_suffix(".json").is_file()


def test_a_retrain_that_dies_before_its_record_leaves_no_stale_record(corpus, tmp_path, monkeypatch):
    """The old PREFIX.json (sha256, vocab_size) must not outlive the model it described."""
    from megatron_lite.data import tokenizer_train as training

    model = train_tokenizer(corpus, tmp_path / "my", VOCAB - 20, progress=False)
    real = training.write_atomic

    def die_on_the_record(path, data):
        if path.suffix == ".json":
            raise OSError("killed before the record was written")
        real(path, data)

    monkeypatch.setattr(training, "write_atomic", die_on_the_record)
    with pytest.raises(OSError, match="killed"):
        train_tokenizer(corpus, tmp_path / "my", VOCAB, progress=False, overwrite=True)
    assert Tokenizer(model).vocab_size == VOCAB and not model.with_suffix(".json").exists()


def test_output_that_names_a_directory_is_refused(corpus, tmp_path):
    with pytest.raises(UserError) as err:
        train_tokenizer(corpus, str(tmp_path) + "/", VOCAB, progress=False)
    assert str(err.value) == (
        f"--output {tmp_path}/ names a directory, not a file prefix; give a name inside it, e.g. --output "
        f"{tmp_path}/NAME (writes NAME.model and NAME.json)"
    )
    assert list(tmp_path.iterdir()) == []


def test_long_lines_are_trained_on_not_skipped(tmp_path):
    """sentencepiece drops lines over 4192 bytes: a corpus of long lines trained on nothing."""
    one_line = tmp_path / "one_line.txt"
    one_line.write_text(_code_text().replace("\n", " "))  # ~60 KB, no newline
    tok = Tokenizer(train_tokenizer([one_line], tmp_path / "t", VOCAB, progress=False))
    assert len(tok.encode("    return alpha * ")) <= 6  # 19 characters: learned the words of the long line


def test_a_long_line_is_cut_before_a_space_and_never_inside_a_character():
    words = "alpha beta gamma delta"
    assert list(_line_pieces(words, limit=10)) == ["alpha beta", " gamma", " delta"]  # words keep their space
    accents = "\u00e9" * 9  # 18 bytes, two each, no space: cut at a character's first byte
    assert list(_line_pieces(accents, limit=5)) == [
        "\u00e9\u00e9",
        "\u00e9\u00e9",
        "\u00e9\u00e9",
        "\u00e9\u00e9",
        "\u00e9",
    ]
    assert list(_line_pieces(words, limit=len(words))) == [words]  # a line that fits is left whole


def test_no_text_to_train_on_is_named(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    with pytest.raises(
        UserError,
        match=r"^no text to train a tokenizer on in \S*empty.txt \(only empty lines, .*; give files with text in them$",
    ):
        train_tokenizer([empty], tmp_path / "t", VOCAB, progress=False)


def test_jsonl_inputs_train_on_their_text_not_their_json(tmp_path):
    """The documents of a JSON Lines file give the same model as the same text in a plain file."""
    from megatron_lite.cli import main

    docs = [_code_text(40), "x = 1\nprint(x)\n", _code_text(60)]
    plain = tmp_path / "docs.txt"
    plain.write_text("\n".join(docs))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    from_text = train_tokenizer([plain], tmp_path / "a", VOCAB, progress=False)
    assert main(["tokenizer", "train", "--input", str(jsonl), "--output", str(tmp_path / "b"),
                 "--vocab-size", str(VOCAB), "--json-key", "content", "--quiet"]) == 0  # fmt: skip
    assert (tmp_path / "b.model").read_bytes() == from_text.read_bytes()
    with pytest.raises(UserError, match="no key 'text'.*--json-key"):
        train_tokenizer([jsonl], tmp_path / "c", VOCAB, progress=False)


def test_a_tokenizer_prefix_in_place_of_its_model_file_is_named(model_path, tmp_path):
    prefix = model_path.with_suffix("")  # what `tokenizer train --output` was given
    with pytest.raises(UserError, match=rf"did you mean {prefix}\.model\?"):
        Tokenizer(prefix)


def test_a_vocabulary_too_large_for_the_corpus_names_the_flag(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("def f(x):\n    return x\n" * 20)
    with pytest.raises(
        UserError, match=r"on 1 file: .*Vocabulary size too high.*; lower --vocab-size to \d+ or less, or give"
    ):
        train_tokenizer([small], tmp_path / "new" / "deeper" / "t", 4000, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt"]  # no empty folders left behind


def test_a_vocabulary_too_small_for_the_texts_characters_names_the_least_size(tmp_path):
    """Over byte fallback's minimum, yet short of one piece per distinct character: raise it, not lower it."""
    chars = tmp_path / "chars.txt"
    chars.write_text("".join(chr(0x4E00 + k) * 3 + "\n" for k in range(120)))  # 120 distinct CJK characters
    with pytest.raises(UserError) as err:
        train_tokenizer([chars], tmp_path / "t", 300, progress=False)
    need = int(re.search(r"raise --vocab-size to (\d+) or more: each distinct character", str(err.value))[1])
    assert need > 300 and "lower --vocab-size" not in str(err.value), err.value
    train_tokenizer([chars], tmp_path / "t", need, progress=False)  # the size named is enough


def test_a_bad_jsonl_line_is_the_same_clean_error_as_preprocess_gives(tmp_path):
    """sentencepiece wrapped the reading error: "sentencepiece could not train ... INTERNAL: UserError:
    ..." with Python frames in the message."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": _code_text(40)}) + "\n{not json\n")
    with pytest.raises(UserError) as e:
        train_tokenizer([bad], tmp_path / "t", VOCAB, progress=False)
    assert str(e.value).startswith(f"{bad}:2: invalid JSON"), str(e.value)
    assert "sentencepiece" not in str(e.value) and not (tmp_path / "t.model").exists()
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"content": "x = 1\n"}) + "\n")
    with pytest.raises(UserError) as e:
        train_tokenizer([missing], tmp_path / "t", VOCAB, progress=False)
    assert str(e.value).startswith(f"{missing}:1: ") and "INTERNAL" not in str(e.value), str(e.value)


def test_a_vocabulary_beyond_int32_is_refused_before_sentencepiece(tmp_path):
    """--vocab-size 2147483648 was sentencepiece's ValueError "cannot parse ... as int" (a traceback)."""
    small = tmp_path / "small.txt"
    small.write_text("x = 1\n")
    with pytest.raises(UserError, match=r"^vocab_size 2147483648 is too large: .*give a smaller --vocab-size"):
        train_tokenizer([small], tmp_path / "t", 2**31, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt"]
