"""The machine a run happened on, and the external tools it used (with their versions).

Absolute figures mean little without the machine beside them: results.json records the
cores, memory, CPU model, kernel and Python, whether pvio ran compiled (pvio.compiled),
and the first line of each tool's version.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pvio import __version__, compiled


def _first_match(path: str, pattern: str) -> str | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    m = re.search(pattern, text, re.MULTILINE)
    return m.group(1).strip() if m else None


def machine_facts() -> dict[str, Any]:
    mem_kib = _first_match("/proc/meminfo", r"^MemTotal:\s+(\d+) kB")
    return {
        "cores": os.cpu_count() or 0,
        "memory_bytes": int(mem_kib) * 1024 if mem_kib else 0,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": _first_match("/proc/cpuinfo", r"^model name\s*:\s*(.*)$")
        or platform.processor() or "unknown",
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "os": _first_match("/etc/os-release", r'^PRETTY_NAME="?([^"\n]*)"?') or platform.system(),
        "pvio": __version__,
        # pvio's processes inherit this one's environment, so they run the same build
        "pvio_build": compiled.status().describe(),
    }


#: External tools whose version goes into results.json when present, and how to ask.
TOOLS: dict[str, list[str]] = {
    "fio": ["fio", "--version"],
    "qemu-nbd": ["qemu-nbd", "--version"],
    "nbdinfo": ["nbdinfo", "--version"],
    "iperf3": ["iperf3", "--version"],
    "ping": ["ping", "-V"],
    "ip": ["ip", "-V"],
    "gcc": ["gcc", "--version"],
    "py-spy": ["py-spy", "--version"],
}


def find_tool(name: str) -> str | None:
    """A program on PATH, or next to this Python (the virtual environment's bin/)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def tool_versions() -> dict[str, str]:
    """The first line of each present tool's version output; absent tools are left out."""
    out: dict[str, str] = {}
    for name, argv in TOOLS.items():
        path = find_tool(argv[0])
        if path is None:
            continue
        try:
            proc = subprocess.run([path, *argv[1:]], capture_output=True, text=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        text = (proc.stdout or proc.stderr).strip()
        out[name] = text.splitlines()[0] if text else "unknown"
    try:
        import matplotlib

        out["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return out
