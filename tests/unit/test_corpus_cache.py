"""The embedded corpus's cache folder is named by what it is built from: another standard library (a
patch release of the same X.Y) builds beside an existing cache, never over it; the same files share one."""

import logging
import platform
import shutil
from pathlib import Path

import pytest

from megatron_lite.data import corpus
from megatron_lite.data.corpus import locate_default_corpus, prepare_default_corpus
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.data.tokenizer import Tokenizer

VOCAB = 400


@pytest.fixture
def stdlib(tmp_path, monkeypatch) -> list[Path]:
    """This interpreter's standard library, as the corpus reads it: three small copied files."""
    src = tmp_path / "lib"
    src.mkdir()
    small = [p for p in corpus.default_corpus_files() if 2_000 < p.stat().st_size < 12_000][:3]
    files = [Path(shutil.copy(p, src / p.name)) for p in small]
    monkeypatch.setattr(corpus, "default_corpus_files", lambda: sorted(files))
    return files


def test_another_standard_library_builds_beside_the_cache_never_over_it(tmp_path, stdlib, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(platform, "python_version", lambda: "3.12.1")
    prefix, model = prepare_default_corpus(cache, VOCAB, progress=False)
    folder, sha = Path(prefix).parent, Tokenizer(model).sha256
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert folder.name.startswith(f"stdlib-3.12-v{VOCAB}-")
    assert locate_default_corpus(cache, VOCAB) == (folder, True)

    monkeypatch.setattr(platform, "python_version", lambda: "3.12.2")  # a patch release, the same files
    assert prepare_default_corpus(cache, VOCAB, progress=False) == (prefix, model)

    stdlib[0].write_text(stdlib[0].read_text() + "\n# patched\n")  # its standard library differs
    other, ready = locate_default_corpus(cache, VOCAB)
    assert other.parent == cache and other != folder and not ready
    prefix2, model2 = prepare_default_corpus(cache, VOCAB, progress=False)
    assert Path(prefix2).parent == other
    assert Tokenizer(model2).decode(IndexedDataset(prefix2).get(0)[:-1]).endswith("# patched\n")
    # the first corpus is still there, untouched, for a run reading it
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp and Tokenizer(model).sha256 == sha
    assert sorted(p.name for p in cache.iterdir()) == sorted([folder.name, other.name])


def test_a_cache_named_without_the_hash_is_reused_while_it_matches(tmp_path, stdlib, caplog):
    """A cache folder named without the hash (``stdlib-<X.Y>-v<vocab>``) is used as it is, never rebuilt,
    while its manifest matches this standard library; one that does not is left alone and a new one built."""
    cache = tmp_path / "cache"
    prefix, _ = prepare_default_corpus(cache, VOCAB, progress=False)
    hashed = Path(prefix).parent
    version = ".".join(platform.python_version().split(".")[:2])
    plain = hashed.rename(cache / f"stdlib-{version}-v{VOCAB}")
    stamp = (plain / "manifest.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="megatron_lite.data.corpus"):  # where a build says its phases
        assert prepare_default_corpus(cache, VOCAB) == (str(plain / "data"), plain / "tokenizer.model")
    assert not any("training tokenizer" in m for m in caplog.messages) and not hashed.exists()

    stdlib[1].write_text(stdlib[1].read_text() + "\n# patched\n")
    prefix2, _ = prepare_default_corpus(cache, VOCAB, progress=False)
    assert Path(prefix2).parent.name.startswith(f"{plain.name}-")  # built beside it
    assert (plain / "manifest.json").stat().st_mtime_ns == stamp


def test_a_killed_build_of_the_name_without_the_hash_is_removed(tmp_path, stdlib, caplog):
    """The build folder a killed build of ``stdlib-<X.Y>-v<vocab>`` left (its marker unlocked) is removed
    by the next build, as one of the hashed name is."""
    version = ".".join(platform.python_version().split(".")[:2])
    killed = tmp_path / "cache" / f".stdlib-{version}-v{VOCAB}.tmp-1-0123abcd"
    killed.mkdir(parents=True)
    (killed / corpus._BUILDING).touch()
    with caplog.at_level(logging.WARNING, logger=corpus.__name__):
        prepare_default_corpus(tmp_path / "cache", VOCAB, progress=False)
    assert not killed.exists() and f"removing {killed}, the folder of a corpus build" in caplog.text
