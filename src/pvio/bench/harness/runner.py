"""Running the suite: each benchmark in turn, with a time limit, its processes cleaned up,
every failure recorded, never raised.

`run_suite` loads each named benchmark from the registry and runs it with
`run_benchmark`, which catches whatever the benchmark raises (a failed benchmark is
reported as such, with the error, and the suite goes on), stops the processes it left
running (listed in its ``extra`` as a defect to fix), and collects a `SuiteReport`;
`SuiteReport.to_json` is the document written as results.json, and
`SuiteReport.from_json` reads it back, checking every field's type.  Benchmarks run one
after another, never in parallel, so they do not compete for the cores.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pvio.bench.harness.benchmark import MODES, Context, Mode, Result
from pvio.bench.harness.figures import Figure
from pvio.bench.harness.jsondoc import Fields
from pvio.bench.harness.machine import machine_facts, tool_versions
from pvio.bench.harness.registry import load_benchmark

#: Time limit of one benchmark, unless its parameters say otherwise ("timeout_s").
TIMEOUT_S: dict[str, float] = {"quick": 150.0, "full": 900.0}

#: Version of the results.json layout; bump when a field changes meaning.
SCHEMA_VERSION = "pvio-bench/1"


class Observer:
    """Receives the suite's progress; pvio.bench.harness.report draws it."""

    def started(self, index: int, total: int, name: str) -> None: ...

    def step(self, name: str, message: str) -> None: ...

    def finished(self, result: Result) -> None: ...


@dataclass
class SuiteReport:
    mode: Mode
    argv: list[str]
    started: datetime
    finished: datetime
    machine: dict[str, Any]
    tools: dict[str, str]
    results: list[Result]
    profiler: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "mode": self.mode,
            "command": self.argv,
            "started": self.started.isoformat(timespec="seconds"),
            "finished": self.finished.isoformat(timespec="seconds"),
            "duration_s": (self.finished - self.started).total_seconds(),
            "machine": self.machine,
            "tools": self.tools,
            "profiler": self.profiler,
            "notes": self.notes,
            "benchmarks": [r.to_json() for r in self.results],
        }

    @classmethod
    def from_json(cls, document: Any) -> SuiteReport:
        """A results.json document read back; DocumentError names the first field that is
        not what `to_json` writes."""
        f = Fields(document)
        f.choice("schema", (SCHEMA_VERSION,))
        f.number("duration_s")
        machine = f.get("machine")
        for key in ("cores", "memory_bytes"):
            machine.integer(key)
        for key in ("kernel", "machine", "cpu_model", "python", "python_implementation",
                    "os", "pvio"):
            machine.string(key)
        tools = f.get("tools")
        return cls(
            f.choice("mode", MODES),  # type: ignore[arg-type]
            f.strings("command"),
            f.timestamp("started"),
            f.timestamp("finished"),
            machine.as_mapping(),
            {key: tools.string(key) for key in tools.as_mapping()},
            [Result.from_json(r) for r in f.items("benchmarks")],
            f.optional_string("profiler"),
            f.strings("notes"),
        )


#: Wraps one benchmark's run (profiling); gets the name and a thunk, returns its files.
Wrapper = Callable[[str, Callable[[], list[Figure]]], tuple[list[Figure], list[str]]]


class BenchmarkTimeout(Exception):
    """A benchmark ran past its time limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise BenchmarkTimeout in the main thread after `seconds` (SIGALRM); elsewhere, or
    with seconds <= 0, no limit."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise BenchmarkTimeout(f"timed out after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def children() -> dict[int, str]:
    """This process's live child processes: pid -> command line."""
    out: dict[int, str] = {}
    for task in Path("/proc/self/task").glob("*/children"):
        try:
            pids = [int(p) for p in task.read_text().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            out[pid] = cmd.decode(errors="replace").strip()
    return out


def stop_leftovers(before: Mapping[int, str], grace: float = 3.0) -> list[str]:
    """Terminate (then kill) the children that appeared since `before`; their commands."""
    left = {pid: cmd for pid, cmd in children().items() if pid not in before}
    for pid in left:
        with _quiet():
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pid in left:
        while time.monotonic() < deadline:
            with _quiet():
                if os.waitpid(pid, os.WNOHANG) != (0, 0):
                    break
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)
        else:
            with _quiet():
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    return [f"{pid}: {cmd}" for pid, cmd in left.items()]


@contextmanager
def _quiet() -> Iterator[None]:
    try:
        yield
    except (ProcessLookupError, ChildProcessError):
        pass


def run_benchmark(name: str, mode: Mode, workdir: Path, observer: Observer,
                  wrap: Wrapper | None = None) -> Result:
    """Load and run one benchmark; every failure ends up in the Result, never raised."""
    t0 = time.perf_counter()
    try:
        bench = load_benchmark(name)
    except Exception as exc:
        return Result(name, name, "failed", f"cannot load: {_describe(exc)}", mode)
    result = Result(bench.name, bench.title, "ok", mode=mode, params=dict(bench.params(mode)))
    try:
        reason = bench.missing()
    except Exception as exc:
        reason = f"cannot check its prerequisites: {_describe(exc)}"
    if reason is not None:
        result.status, result.reason = "skipped", reason
        return result
    limit = float(bench.params(mode).get("timeout_s", TIMEOUT_S[mode]))
    before, suite_pid = children(), os.getpid()
    with tempfile.TemporaryDirectory(prefix=f"pvio-bench-{bench.name}-", dir=workdir) as tmp:
        ctx = Context(Path(tmp).resolve(), lambda message: observer.step(bench.name, message))
        try:
            def thunk() -> list[Figure]:
                with time_limit(limit):
                    return bench.run(bench.params(mode), ctx)

            if wrap is None:
                result.figures = thunk()
            else:
                result.figures, result.profile = wrap(bench.name, thunk)
            if not result.figures:
                result.status, result.reason = "failed", "it returned no figures"
        except Exception as exc:
            result.status, result.reason = "failed", _describe(exc)
            result.extra["traceback"] = traceback.format_exc()
        if os.getpid() != suite_pid:  # a child the benchmark forked got out: never run on
            os._exit(1)
        leftovers = stop_leftovers(before)
        if leftovers:  # a benchmark must stop what it starts; say so, and clean up
            result.extra["stopped_leftover_processes"] = leftovers
        result.commands, result.extra = ctx.commands, {**ctx.extra, **result.extra}
    result.duration_s = time.perf_counter() - t0
    return result


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_suite(names: Sequence[str], mode: Mode, workdir: Path, observer: Observer,
              argv: Sequence[str] = (), wrap: Wrapper | None = None) -> SuiteReport:
    started = datetime.now(UTC)
    machine, tools = machine_facts(), tool_versions()
    results = []
    for i, name in enumerate(names):
        observer.started(i, len(names), name)
        result = run_benchmark(name, mode, workdir, observer, wrap)
        observer.finished(result)
        results.append(result)
    return SuiteReport(mode, list(argv), started, datetime.now(UTC), machine, tools, results)
