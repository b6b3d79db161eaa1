"""docs/config.md is generated from the dataclasses and must stay current."""

from pathlib import Path

from megatron_lite.config import SECTIONS
from megatron_lite.config_docs import field_docs, render


def test_every_field_has_a_docstring():
    for name, f in SECTIONS.items():
        cls = f.default_factory
        missing = [x.name for x in cls.__dataclass_fields__.values() if x.name not in field_docs(cls)]
        assert not missing, f"{name}: fields without a docstring: {missing}"


def test_docs_config_md_is_current():
    path = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert path.read_text() == render() + "\n", "regenerate: python -m megatron_lite.config_docs > docs/config.md"
