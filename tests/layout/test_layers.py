"""The package order, enforced from the imports: each package of pvio imports only the
packages below it (docs/architecture.md draws the layers), and no source file grows past
the size a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "pvio"

#: Bottom to top.  `testing` (conformance suites and in-process harnesses, shipped for
#: users' tests) may use every layer below the toolstack's users; `bench` uses `testing`.
ORDER = [
    "abi", "ring", "storage", "hypervisor", "xenstore", "xenbus", "nbd", "blk", "net", "lguest",
    "domains", "toolstack", "testing", "bench", "cli",
]
MAX_LINES = 600


def _imports(path: Path) -> set[str]:
    """The pvio packages `path` imports (at module level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "pvio" and len(parts) > 1 and (SRC / parts[1]).is_dir():
                found.add(parts[1])
    return found


def _packages() -> list[str]:
    return sorted(p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def test_every_package_has_a_place_in_the_order() -> None:
    assert sorted(ORDER) == _packages()


@pytest.mark.parametrize("package", ORDER)
def test_a_package_imports_only_packages_below_it(package: str) -> None:
    below = set(ORDER[: ORDER.index(package)])
    wrong = {
        f"{path.relative_to(SRC)} imports pvio.{other}"
        for path in (SRC / package).rglob("*.py")
        for other in _imports(path) - {package}
        if other not in below
    }
    assert not wrong, sorted(wrong)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    # The rule above would catch a violation: an import of a higher package is found
    # whether it sits at module level or inside a function.
    probe = tmp_path / "probe.py"
    probe.write_text("import pvio.abi\n\ndef f():\n    from pvio.toolstack import config\n")
    assert _imports(probe) == {"abi", "toolstack"}


def test_no_source_file_is_too_long() -> None:
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := p.read_text().count("\n")) > MAX_LINES
    }
    assert not long, long


def test_no_two_packages_declare_a_public_class_of_the_same_name() -> None:
    # `Domain` in three packages once meant three different things; one name, one thing.
    where: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where.setdefault(node.name, []).append(str(path.relative_to(SRC)))
    twice = {name: paths for name, paths in where.items() if len({p.split("/")[0] for p in paths}) > 1}
    assert not twice, twice
