"""``megatron-lite eval`` scores the text exactly as ``preprocess`` would have tokenized it."""

from types import SimpleNamespace

from megatron_lite.training import evaluate


def test_eval_reads_the_file_bytes_as_they_are(tmp_path, monkeypatch):
    """Text-mode reading turned CRLF line ends into LF: the model was scored on other text than
    the file holds (and than a dataset preprocessed from the same file)."""
    seen = []

    class Tok:
        def encode(self, text: str) -> list[int]:
            seen.append(text)
            return list(range(len(text)))

    model = SimpleNamespace(cfg=SimpleNamespace(seq_len=4))
    monkeypatch.setattr(evaluate, "load_model", lambda path, device: (model, Tok()))
    monkeypatch.setattr(evaluate, "sum_next_token_loss", lambda m, ids, seq_len: 0.0)
    raw = "def café():\r\n    return 1\r\nlone\rcarriage return\n".encode()
    (tmp_path / "crlf.txt").write_bytes(raw)
    result = evaluate.evaluate_text(tmp_path / "ckpt", tmp_path / "crlf.txt", device="cpu")
    assert seen == [raw.decode()] and result["tokens"] == len(raw.decode())
