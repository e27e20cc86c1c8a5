"""Status files: one JSON object, replaced atomically (a temporary file renamed over it),
so a reader never sees half of one.  Every pvio process that reports how it is doing
(domains, the hypervisor, xenstored, `pvio up`) writes one; `pvio list` and `pvio top`
read them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Atomically replace `path` with `data` as one line of JSON."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
    os.replace(tmp, p)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The object in `path`, or None if there is none (missing, or not an object)."""
    try:
        data = json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
