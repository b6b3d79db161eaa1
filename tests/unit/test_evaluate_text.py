"""``megatron-lite eval`` scores the text exactly as ``preprocess`` would have tokenized it."""

import gzip
import json
import random
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.checkpoint.writer import save_weights
from megatron_lite.cli import main
from megatron_lite.config import fill_defaults, load_config
from megatron_lite.data import preprocess
from megatron_lite.data.corpus import default_corpus_files
from megatron_lite.data.tokenizer import Tokenizer, train_tokenizer
from megatron_lite.errors import UserError
from megatron_lite.models.transformer import build_model
from megatron_lite.training import evaluate


def _scoring(scored: list) -> object:
    """A stand-in for sum_next_token_loss that appends the ids it is given, as one list, to ``scored``."""

    def score(model, pieces, seq_len):
        scored.append([i for piece in pieces for i in piece])
        return 0.0, len(scored[-1])

    return score


def test_eval_reads_the_file_bytes_as_they_are(tmp_path, monkeypatch):
    """Text-mode reading turned CRLF line ends into LF: the model was scored on other text than
    the file holds (and than a dataset preprocessed from the same file)."""
    seen = []

    class Tok:
        def encode(self, text: str, eos: bool = False) -> list[int]:
            seen.append(text)
            return list(range(len(text)))

    model = SimpleNamespace(cfg=SimpleNamespace(seq_len=4))
    monkeypatch.setattr(evaluate, "load_model", lambda path, device: (model, Tok()))
    monkeypatch.setattr(evaluate, "sum_next_token_loss", _scoring([]))
    raw = "def café():\r\n    return 1\r\nlone\rcarriage return\n".encode()
    (tmp_path / "crlf.txt").write_bytes(raw)
    result = evaluate.evaluate_text(tmp_path / "ckpt", tmp_path / "crlf.txt", device="cpu")
    assert seen == [raw.decode()] and result["tokens"] == len(raw.decode())


class _Tok:
    eos_id = 2

    def encode(self, text: str, eos: bool = False) -> list[int]:
        return [ord(c) for c in text] + ([self.eos_id] if eos else [])


@pytest.mark.parametrize("name, pack", [("held_out.jsonl", bytes), ("held_out.jsonl.gz", gzip.compress)])
def test_eval_of_json_lines_scores_the_documents_not_the_json(tmp_path, monkeypatch, name, pack):
    """A held-out .jsonl was scored on its JSON syntax (braces, keys, escapes), not on its text."""
    scored = []
    model = SimpleNamespace(cfg=SimpleNamespace(seq_len=4))
    monkeypatch.setattr(evaluate, "load_model", lambda path, device: (model, _Tok()))
    monkeypatch.setattr(evaluate, "sum_next_token_loss", _scoring(scored))
    docs = ["first \u00e9\n", "", 'second "quoted"']
    raw = "".join(json.dumps({"body": d}) + "\n" for d in docs).encode() + b"\n"
    (tmp_path / name).write_bytes(pack(raw))
    result = evaluate.evaluate_text(tmp_path / "ckpt", tmp_path / name, device="cpu", json_key="body")
    assert scored == [[i for d in docs for i in [*map(ord, d), _Tok.eos_id]]]
    assert result["tokens"] == sum(len(d) + 1 for d in docs)
    with pytest.raises(UserError, match="no key 'text'"):
        evaluate.evaluate_text(tmp_path / "ckpt", tmp_path / name, device="cpu")


def test_eval_of_json_lines_with_a_tokenizer_without_eos_adds_none(tmp_path, monkeypatch):
    class NoEos(_Tok):
        eos_id = -1  # a foreign sentencepiece model (eos_id=-1): -1 would index the embedding

    scored = []
    model = SimpleNamespace(cfg=SimpleNamespace(seq_len=4))
    monkeypatch.setattr(evaluate, "load_model", lambda path, device: (model, NoEos()))
    monkeypatch.setattr(evaluate, "sum_next_token_loss", _scoring(scored))
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "ab"}) + "\n" + json.dumps({"text": "cd"}) + "\n")
    evaluate.evaluate_text(tmp_path / "ckpt", tmp_path / "a.jsonl", device="cpu")
    assert scored == [[ord(c) for c in "abcd"]]


@pytest.mark.parametrize("text, tokens", [("", "0 tokens"), ("a", "1 token")])
def test_a_text_of_fewer_than_two_tokens_is_one_error_asking_for_more_text(text, tokens, tmp_path, monkeypatch, capsys):
    model = SimpleNamespace(cfg=SimpleNamespace(seq_len=4))
    monkeypatch.setattr(evaluate, "load_model", lambda path, device: (model, _Tok()))
    (tmp_path / "short.txt").write_text(text)
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--text", str(tmp_path / "short.txt"), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: text file {str(tmp_path / 'short.txt')!r} has {tokens}, and a score needs at least 2 (one "
        "to predict the next from): give --text a file with more text\n"
    ), err


def test_a_dataset_prefix_given_as_text_is_named_for_what_it_is(tmp_path, capsys):
    for ext in (".bin", ".idx"):
        (tmp_path / f"data{ext}").write_bytes(b"")
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--text", str(tmp_path / "data"), "--device", "cpu"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"error: text file {str(tmp_path / 'data')!r} does not exist; it is a preprocessed dataset's prefix, and "
        "--text reads text (--held-out scores a run's held-out split)\n"
    )


def test_a_glob_given_as_text_is_told_that_text_takes_one_file(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x = 1\n")
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--text", str(tmp_path / "*.txt"), "--device", "cpu"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"error: text file {str(tmp_path / '*.txt')!r} does not exist; --text takes one file, not a glob "
        "(concatenate the files into one)\n"
    )


def test_a_text_that_is_not_utf8_is_one_error_saying_how_to_convert_it(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin1"))
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--text", str(tmp_path / "latin1.txt"), "--device", "cpu"]
    assert main(args) == 2  # refused before the checkpoint is opened
    err = capsys.readouterr().err
    assert err == (
        f"error: text file {str(tmp_path / 'latin1.txt')!r} is not UTF-8 ('utf-8' codec can't decode byte 0xe9 in "
        "position 3: invalid continuation byte); convert it to UTF-8 first (iconv -f ITS_ENCODING -t UTF-8 FILE > "
        "NEW_FILE)\n"
    ), err


def _strict_json(line: str) -> dict:
    """json.loads as a strict parser (jq, JSON.parse) reads it: NaN and Infinity are no JSON."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize(
    "weight, cause", [(float("nan"), "its weights hold NaN or infinite values (in head.weight)"), (3e38, "overflowed")]
)
def test_a_non_finite_loss_is_json_null_naming_the_cause_and_exits_2(weight, cause, tmp_path, monkeypatch, capsys):
    """`eval --json` printed `{"loss": NaN, ...}` (not JSON) with exit status 0 for a diverged checkpoint."""
    tiny = ["model.layers=1", "model.hidden=32", "model.heads=4", "model.seq_len=8"]
    cfg = fill_defaults(load_config(None, tiny), vocab_size=256)
    model = build_model(cfg.model, seed=0)
    with torch.no_grad():
        model.head.weight.fill_(weight)  # 3e38: finite, but the logits overflow float32
    monkeypatch.setattr(evaluate, "load_model", lambda path, device: (model.eval(), _Tok()))
    (tmp_path / "t.txt").write_text("some text to score")
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--text", str(tmp_path / "t.txt"), "--device", "cpu"]
    assert main([*args, "--json"]) == 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    result = _strict_json(out[0])
    assert result["loss"] is None and result["tokens"] == len("some text to score"), result
    assert cause in result["error"] and "evaluate an earlier one" in result["error"], result
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the loss of checkpoint ") and cause in err and len(err.strip().splitlines()) == 1, err


def test_a_checkpoint_whose_saved_config_is_not_its_models_is_one_error_naming_it(tmp_path):
    """eval builds the model from the config saved in metadata.json: one edited (or saved by another
    version with a key this one lacks) is one error naming the checkpoint, not a load_state_dict
    traceback or an 'unknown config key' that reads like the user's own config."""
    cfg = fill_defaults(load_config(None, ["model.hidden=64", "model.heads=4", "model.layers=1"]), vocab_size=100)
    step = save_weights(tmp_path / "c", 0, build_model(cfg.model, 0, "cpu").state_dict(), cfg.to_dict(), files={})
    meta_path = Path(step) / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for edit, why in [
        ({"hidden": 128}, r"embed.weight is stored with shape \(100, 64\), but its model config makes it \(100, 128\)"),
        ({"layrs": 2}, r"the config in its metadata.json cannot be read: unknown config key 'model.layrs'"),
    ]:
        meta_path.write_text(
            json.dumps({**meta, "config": {**meta["config"], "model": {**cfg.to_dict()["model"], **edit}}})
        )
        with pytest.raises(UserError, match=f"^checkpoint {step}: {why}"):
            evaluate.load_model(step, torch.device("cpu"))


def test_a_checkpoint_pruned_while_it_is_evaluated_is_one_error(tmp_path, monkeypatch):
    """eval of a live run's checkpoint directory: the run prunes the step (checkpoint.keep) while eval
    reads it: one error saying so and what to do, not a FileNotFoundError traceback."""
    import shutil

    from megatron_lite.checkpoint.reader import CheckpointReader

    cfg = fill_defaults(load_config(None, ["model.hidden=64", "model.heads=4", "model.layers=1"]), vocab_size=100)
    step = save_weights(tmp_path / "c", 0, build_model(cfg.model, 0, "cpu").state_dict(), cfg.to_dict(), files={})
    real = CheckpointReader.model_state

    def pruned_first(self):
        shutil.rmtree(step)
        return real(self)

    monkeypatch.setattr(CheckpointReader, "model_state", pruned_first)
    with pytest.raises(
        UserError, match=f"^checkpoint {step} was removed or replaced while it was being evaluated"
    ) as e:
        evaluate.load_model(tmp_path / "c", torch.device("cpu"))
    assert "copy the step directory out of the run's checkpoint.dir and evaluate the copy" in str(e.value)


def _tiny_model(vocab: int, seq_len: int):
    tiny = ["model.layers=1", "model.hidden=32", "model.heads=4", f"model.seq_len={seq_len}"]
    return build_model(fill_defaults(load_config(None, tiny), vocab_size=vocab).model, seed=0).eval()


@torch.no_grad()
def _whole_list_loss(model, ids: list[int], seq_len: int, batch: int = 8) -> float:
    """The summed loss as computed on the whole file's ids at once: full windows ``batch`` at a time,
    then the short one."""
    windows = [ids[s : s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]
    full = [w for w in windows if len(w) == seq_len + 1]
    groups = [full[i : i + batch] for i in range(0, len(full), batch)] + [[w] for w in windows if w not in full]
    total = 0.0
    for group in groups:
        x = torch.tensor(group, dtype=torch.long)
        total += F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
    return total


def test_streamed_windows_give_exactly_the_whole_list_loss():
    """Scored piece by piece, the summed loss is bit for bit the whole file's, whatever the cuts:
    lengths around whole groups (8 windows of 4) and single windows."""
    model, rng = _tiny_model(vocab=50, seq_len=4), random.Random(0)
    for n in (0, 1, 2, 3, 5, 6, 32, 33, 34, 40, 65, 66, 67, 101):
        ids = [rng.randrange(50) for _ in range(n)]
        cuts = sorted(rng.sample(range(n + 1), min(n + 1, 5)))
        pieces = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
        assert evaluate.sum_next_token_loss(model, iter(pieces), 4) == (_whole_list_loss(model, ids, 4), n), n


@pytest.fixture(scope="module")
def code_tok(tmp_path_factory):
    """A 400-piece tokenizer trained on a few files of Python's own source, and that source."""
    code = "".join(p.read_text() for p in [p for p in default_corpus_files() if 2_000 < p.stat().st_size < 12_000][:6])
    root = tmp_path_factory.mktemp("tok")
    (root / "a.txt").write_text(code)
    return code, Tokenizer(train_tokenizer([root / "a.txt"], root / "tok", 400, progress=False))


def test_a_long_text_is_scored_in_bounded_memory(code_tok, tmp_path, monkeypatch):
    """A 600 KB single-line file: read whole, its ids as one Python list and its windows as lists took
    ~17 MB of Python memory here (ids above 256 are ~36 bytes each); tokenized in 64 KB pieces and scored
    a group of windows at a time, Python memory stays near a few pieces' worth (~4 MB), and the loss
    is the whole list's."""
    code, tok = code_tok
    model = _tiny_model(vocab=tok.vocab_size, seq_len=256)
    monkeypatch.setattr(evaluate, "load_model", lambda path, device: (model, tok))
    monkeypatch.setattr(preprocess, "_PIECE_CHARS", 1 << 16)
    monkeypatch.setattr(evaluate, "_READ_BYTES", 1 << 16, raising=False)  # raising: fail on memory, not a name
    text = (code.replace("\n", " ") + " ") * (600_000 // (len(code) + 1))
    (tmp_path / "long.txt").write_text(text)
    tracemalloc.start()
    try:
        result = evaluate.evaluate_text(tmp_path / "ckpt", tmp_path / "long.txt", device="cpu")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ids = tok.encode(text)
    assert result["tokens"] == len(ids) > 300_000
    assert peak < 8_000_000, f"peak {peak / 1e6:.0f} MB of Python memory for a {len(text) / 1e6:.1f} MB text"
    assert result["loss"] == _whole_list_loss(model, ids, 256) / (len(ids) - 1)


def test_a_text_that_is_not_utf8_past_the_first_block_names_the_files_offset(tmp_path, monkeypatch, capsys):
    """Read in blocks, the error names the offset in the file, a sequence cut by a block's end included."""
    monkeypatch.setattr(evaluate, "_READ_BYTES", 4)
    (tmp_path / "t.txt").write_bytes("abcdé".encode() + b"\xe2\x82x")
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--text", str(tmp_path / "t.txt"), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 ('utf-8' codec can't decode bytes in position 6-7: invalid continuation byte)" in err, err
