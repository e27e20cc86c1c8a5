"""The hypervisor sits below the protocol packages: it imports only the rooms before it
(abi, ring, storage) and itself, never lguest, blk or the toolstack above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pvio.hypervisor

BELOW = {"abi", "ring", "storage", "hypervisor"}


def _imports(path: Path) -> set[str]:
    """The pvio packages `path` imports, anywhere in the module (lazy imports too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "pvio" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_the_hypervisor_imports_nothing_above_it() -> None:
    root = Path(pvio.hypervisor.__file__).parent
    modules = sorted(root.rglob("*.py"))
    assert len(modules) > 10
    above = {str(p.relative_to(root)): sorted(_imports(p) - BELOW) for p in modules}
    assert {k: v for k, v in above.items() if v} == {}
    assert "hypervisor" in _imports(root / "lguest_dma.py")  # the check sees imports
