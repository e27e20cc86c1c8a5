"""Where `pvio up` keeps its state (sockets, status files, images with relative paths)."""

from __future__ import annotations

import os
from pathlib import Path


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/pvio``, else ``~/.local/state/pvio`` (the XDG default)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "pvio"
