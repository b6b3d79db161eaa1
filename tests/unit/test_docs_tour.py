"""docs/tour.md names every module of the library and the kernels, and every path it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOUR = (ROOT / "docs" / "tour.md").read_text()


def test_every_module_is_findable_in_the_tour():
    modules = [p for d in ("megatron_lite", "kernels") for p in (ROOT / d).rglob("*.py") if p.name != "__init__.py"]
    missing = [str(p.relative_to(ROOT)) for p in modules if p.name not in TOUR]
    assert not missing, f"docs/tour.md does not name: {missing}"


def test_every_path_the_tour_names_exists():
    named = {m for m in re.findall(r"`([\w./-]+\.(?:py|sh|sbatch|md))`", TOUR) if "/" in m}
    roots = [ROOT, ROOT / "megatron_lite", ROOT / "kernels"]
    missing = sorted(m for m in named if not any((r / m).exists() for r in roots))
    assert not missing, f"docs/tour.md names paths that do not exist: {missing}"
