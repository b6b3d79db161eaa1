"""Fixtures the preprocess tests share: a small tokenizer trained on code, and room for 2 workers."""

import pytest

from megatron_lite.data import preprocess_pool
from megatron_lite.data.tokenizer import Tokenizer, train_tokenizer

CODE = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """A 300-token tokenizer trained on :data:`CODE` (once per test module; a module may define its own)."""
    root = tmp_path_factory.mktemp("tok")
    (root / "a.txt").write_text(CODE)
    return Tokenizer(train_tokenizer([root / "a.txt"], root / "tok", 300, progress=False))


@pytest.fixture
def enough_cpus(monkeypatch):
    """In-process runs with 2 workers pass on a one-CPU machine too (the refusal is tested alone)."""
    real = preprocess_pool.usable_cpus()
    monkeypatch.setattr(preprocess_pool, "usable_cpus", lambda: max(real, 2))


@pytest.fixture
def one(tmp_path):
    """A dataset of 40 documents whose every token is unique (``unique_tokens.make_dataset``)."""
    from unique_tokens import make_dataset

    return make_dataset(tmp_path / "a")
