"""A benchmark as the harness sees it: a `Benchmark` to run, a `Context` to run it in,
and the `Result` it leaves.

A layer's module defines ``SUITE = Benchmark(...)``: a name, a title, a ``quick`` and a
``full`` parameter set, and a run function that takes one of those parameter sets and a
`Context` and returns `Figure`\\ s.  `Benchmark.missing` says why it cannot run on this
machine (a tool absent, or root needed and not had): the runner then records it as
*skipped* with that reason.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pvio.bench.harness.figures import Figure
from pvio.bench.harness.jsondoc import Fields
from pvio.bench.harness.machine import find_tool

Params = Mapping[str, Any]
Mode = Literal["quick", "full"]
Status = Literal["ok", "skipped", "failed"]
MODES: tuple[str, ...] = get_args(Mode)
STATUSES: tuple[str, ...] = get_args(Status)


@dataclass
class Context:
    """What a running benchmark may use: a scratch directory (absolute, removed after the
    run), a place for the exact commands it ran, a progress callback and free-form extra
    results."""

    workdir: Path
    on_progress: Callable[[str], None] = lambda message: None
    commands: list[list[str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def command(self, argv: Sequence[str]) -> list[str]:
        """Record an external command about to run; returns it as a list for subprocess."""
        cmd = [str(a) for a in argv]
        self.commands.append(cmd)
        return cmd

    def progress(self, message: str) -> None:
        self.on_progress(message)


RunFn = Callable[[Params, Context], list[Figure]]


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    run: RunFn
    quick: Params
    full: Params
    tools: tuple[str, ...] = ()  # external programs it runs; a missing one skips it
    needs_root: bool = False

    def params(self, mode: Mode) -> Params:
        return self.quick if mode == "quick" else self.full

    def missing(self) -> str | None:
        """Why this benchmark cannot run here, or None."""
        for tool in self.tools:
            if find_tool(tool) is None:
                return f"{tool} is not installed (tools/install.sh installs it)"
        if self.needs_root and os.geteuid() != 0:
            return "needs root (namespaces, TAP devices)"
        return None


@dataclass
class Result:
    name: str
    title: str
    status: Status
    reason: str = ""
    mode: Mode = "quick"
    params: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    figures: list[Figure] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    plot: str | None = None
    profile: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "status": self.status,
                "reason": self.reason, "mode": self.mode, "params": jsonable(self.params),
                "duration_s": self.duration_s,
                "figures": [f.to_json() for f in self.figures],
                "commands": self.commands, "extra": jsonable(self.extra),
                "plot": self.plot, "profile": self.profile}

    @classmethod
    def from_json(cls, f: Fields) -> Result:
        return cls(
            f.string("name"), f.string("title"), f.choice("status", STATUSES),  # type: ignore[arg-type]
            f.string("reason"), f.choice("mode", MODES),  # type: ignore[arg-type]
            f.mapping("params"), f.number("duration_s"),
            [Figure.from_json(x) for x in f.items("figures")],
            [c.as_strings() for c in f.items("commands")], f.mapping("extra"),
            f.optional_string("plot"), f.strings("profile"))


def jsonable(value: Any) -> Any:
    """Plain JSON values (dataclasses, tuples, paths and non-finite floats made safe)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
