"""Shared fixtures for CLI runs: a small real corpus (a few stdlib modules) built once per session."""

import sysconfig
from pathlib import Path

import pytest

from megatron_lite.data.corpus import prepare_default_corpus

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = [
    STDLIB / n
    for n in (
        "textwrap.py",
        "shlex.py",
        "fractions.py",
        "heapq.py",
        "bisect.py",
        "colorsys.py",
        "glob.py",
        "fnmatch.py",
    )
]


@pytest.fixture(scope="session")
def corpus_files() -> list[Path]:
    """The stdlib files of the small corpus, for a test that builds the embedded corpus from them."""
    return CORPUS_FILES


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> tuple[str, Path]:
    """(dataset prefix, tokenizer path) of ~150 KB of stdlib source with a 512-token vocabulary."""
    cache = tmp_path_factory.mktemp("corpus")
    return prepare_default_corpus(cache, 512, progress=False, files=CORPUS_FILES)


@pytest.fixture
def tiny_args(small_corpus, tmp_path) -> list[str]:
    """Overrides for a ~100k-parameter llama that trains a step in a few milliseconds."""
    prefix, tok = small_corpus
    return [
        f"data.path={prefix}",
        f"data.tokenizer={tok}",
        "model.layers=2",
        "model.hidden=64",
        "model.heads=4",
        "model.kv_heads=2",
        "model.seq_len=32",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "train.steps=6",
        "optim.warmup=2",
        "optim.lr=3e-3",
        "log.every=1",
        "log.progress=false",
        "train.eval_iters=1",
        "data.valid_fraction=0.2",
        f"log.dir={tmp_path / 'run'}",
    ]
