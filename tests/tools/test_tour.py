"""tools/tour.py: the tour's checker must catch every kind of break it promises to."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _tour() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pvio_tour", ROOT / "tools" / "tour.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pvio_tour"] = module
    spec.loader.exec_module(module)
    return module


def _tree(tmp_path: Path, code: str, chapters: str = "## T:100 One\n") -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text(code)
    (tmp_path / "TOUR.md").write_text(chapters)
    return tmp_path


def test_the_real_tour_is_whole() -> None:
    assert _tour().check(ROOT) == []


def test_a_whole_tour_passes(tmp_path: Path) -> None:
    root = _tree(tmp_path, "# T:110 A\n# text\n# :T\nx = 1\n# T:120 B\n# :T\n# T:115 C\n# :T\n")
    assert _tour().check(root) == []
    rendered = _tour().render(root)
    assert rendered.index("T:110") < rendered.index("T:115") < rendered.index("T:120")


def test_gap_is_reported(tmp_path: Path) -> None:
    root = _tree(tmp_path, "# T:110 A\n# :T\n# T:130 C\n# :T\n")
    assert any("T:120 is missing" in p for p in _tour().check(root))


def test_duplicate_is_reported(tmp_path: Path) -> None:
    root = _tree(tmp_path, "# T:110 A\n# :T\n# T:110 B\n# :T\n")
    assert any("duplicates" in p for p in _tour().check(root))


def test_unclosed_marker_is_reported(tmp_path: Path) -> None:
    root = _tree(tmp_path, "# T:110 A\n# text\nx = 1\n")
    assert any("not closed" in p for p in _tour().check(root))


def test_stray_close_and_unknown_chapter_are_reported(tmp_path: Path) -> None:
    root = _tree(tmp_path, "# :T\n# T:210 A\n# :T\n")
    problems = _tour().check(root)
    assert any("closes no marker" in p for p in problems)
    assert any("no TOUR.md chapter" in p for p in problems)
    assert any("T:100 has no stops" in p for p in problems)
