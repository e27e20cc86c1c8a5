"""The benchmark suite: every layer's benchmark, one run, one table, one JSON file.

Theory of operation
-------------------
Each layer keeps its own benchmark module and `pvio bench <layer>` subcommand (registered
in `pvio.bench.cli.BENCHMARKS`).  To join the suite, the module also defines a module-level
``SUITE = Benchmark(...)``: a name, a title, a ``quick`` and a ``full`` parameter set, and
a run function that takes one of those parameter sets and a `Context` and returns
`Figure`\\ s.  `load_benchmarks` finds them: for every layer of the full matrix (`MATRIX`,
in the order the data flows) it imports the subcommand's module and takes its ``SUITE``;
a layer that is not built yet, or that does not define ``SUITE``, is *skipped* with the
reason, never a crash.  `run_suite` then runs each benchmark in turn, catches whatever it
raises (a failed benchmark is reported as such, with the error, and the suite goes on),
and collects a `SuiteReport` that `SuiteReport.to_json` turns into the document described
by `SCHEMA` (checked by `validate`).  Rendering (the rich table and progress display) is
in `pvio.bench.report`, the PNG plots in `pvio.bench.plots`, profiling in
`pvio.bench.profile`.

A figure is one thing measured on pvio (its *subject*, usually "pvio"; the block layer
has "pvio map" and "pvio copy") as the median of several runs, with the min and max and
every sample, next to zero or more *baselines* measured in the same run, interleaved with
it, so that drift on a shared machine hits both alike.  The ratio is always
pvio median / baseline median, whatever the unit: with ``higher_is_better`` false (a
latency) a ratio above 1 means pvio is slower.  Absolute numbers depend on the machine;
the ratios are what a reader should compare between machines.

How to add a benchmark
----------------------
1. Write ``src/pvio/bench/<layer>.py`` with a click command, and add its line to
   ``BENCHMARKS`` in ``src/pvio/bench/cli.py`` (``pvio bench <layer>`` then works).
2. In the same module, measure with the helpers here and define::

       def _suite(params: Params, ctx: Context) -> list[Figure]:
           samples = interleave(params["runs"], {
               "pvio": lambda: measure_pvio(params["n"]),
               "socket echo": lambda: measure_echo(params["n"]),
           })
           return [compare("read", "µs", samples, higher_is_better=False)]

       SUITE = Benchmark(
           name="<layer>", title="...", run=_suite,
           quick={"runs": 3, "n": 1000}, full={"runs": 5, "n": 20000},
           tools=("fio",),            # external tools it runs: absent -> skipped
           needs_root=False,          # namespaces, TAP... -> skipped when not root
       )

   Record the exact argv of every external program with ``ctx.command(argv)`` (it
   returns the argv, to pass on to subprocess), report sub-steps with
   ``ctx.progress("...")``, put temporary files in ``ctx.workdir`` and anything that is
   not a figure but worth keeping (per-request counters, settings) in ``ctx.extra``.
   ``requires`` (a function returning the reason it cannot run, or None) covers other
   prerequisites; a ``"timeout_s"`` entry in the parameters overrides the time limit
   (`TIMEOUT_S`: 150 s quick, 900 s full), past which the benchmark fails with
   BenchmarkTimeout.  Processes the benchmark leaves running are stopped afterwards and
   listed in its ``extra`` as a defect to fix.
3. The quick parameter set must keep the whole ``pvio bench --quick`` under two minutes
   on two cores: budget about 15 seconds per layer (the block matrix, which runs fio,
   about 30).  The full set should keep the whole run under fifteen minutes.
4. Until the layer's module defines ``SUITE``, an adapter in `pvio.bench.layers` may
   stand in for it; that module's docstring says what each layer still has to add.

Deliberately not here: no figure is ever asserted by a test (tests only check that the
suite runs and writes valid files), no warm-up policy is imposed (each benchmark knows
its own), and benchmarks run one after another, never in parallel, so they do not
compete for the two cores.  Alternatives rejected: pytest-benchmark / asv (they time
functions in one process; pvio's figures need daemons, external tools and baselines run
side by side) and a JSON Schema library (one more dependency for a 40-line check).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pvio import __version__

#: The layers of the full matrix, in the order the data flows.
MATRIX: tuple[str, ...] = ("ring", "hypervisor", "xenstore", "blk", "nbd", "lguest")

#: Time limit of one benchmark, unless its parameters say otherwise ("timeout_s").
TIMEOUT_S: dict[str, float] = {"quick": 150.0, "full": 900.0}

#: Version of the results.json layout; bump when a field changes meaning.
SCHEMA_VERSION = "pvio-bench/1"

Params = Mapping[str, Any]
Mode = Literal["quick", "full"]
Status = Literal["ok", "skipped", "failed"]


# -- figures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Several runs of one measurement: the median with the min and max, and the samples."""

    median: float
    min: float
    max: float
    runs: int
    samples: tuple[float, ...] = ()

    @classmethod
    def of(cls, samples: Iterable[float]) -> Stats:
        values = tuple(float(s) for s in samples)
        if not values:
            raise ValueError("no samples to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values), values)

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "runs": self.runs,
                "samples": list(self.samples)}


def ratio(ours: float, theirs: float) -> float | None:
    """ours / theirs, or None when it means nothing (a zero or non-finite denominator)."""
    if theirs == 0 or not math.isfinite(theirs) or not math.isfinite(ours):
        return None
    return ours / theirs


@dataclass(frozen=True)
class Baseline:
    """What pvio is compared with, measured in the same run; ratio = pvio / this."""

    subject: str
    stats: Stats
    ratio: float | None

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, **self.stats.to_json(), "ratio": self.ratio}


@dataclass(frozen=True)
class Figure:
    name: str  # the scenario: "1 page, batch 32", "4k-randread-qd1"
    unit: str  # "round trips/s", "µs", "IOPS", "MiB/s"
    stats: Stats
    subject: str = "pvio"
    higher_is_better: bool = True
    baselines: tuple[Baseline, ...] = ()
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "subject": self.subject,
                "higher_is_better": self.higher_is_better, **self.stats.to_json(),
                "baselines": [b.to_json() for b in self.baselines], "note": self.note}


def compare(name: str, unit: str, samples: Mapping[str, Sequence[float]], *,
            subject: str | None = None, higher_is_better: bool = True, note: str = "",
            ) -> Figure:
    """A figure from samples keyed by subject: `subject` (default: the first key) is pvio's,
    every other key is a baseline measured in the same run."""
    if not samples:
        raise ValueError("no subjects")
    ours = subject if subject is not None else next(iter(samples))
    mine = Stats.of(samples[ours])
    baselines = tuple(
        Baseline(label, st, ratio(mine.median, st.median))
        for label, st in ((label, Stats.of(v)) for label, v in samples.items() if label != ours)
    )
    return Figure(name, unit, mine, ours, higher_is_better, baselines, note)


def repeat(fn: Callable[[], float], runs: int) -> list[float]:
    """`runs` samples of fn()."""
    return [fn() for _ in range(runs)]


def interleave(runs: int, subjects: Mapping[str, Callable[[], float]]) -> dict[str, list[float]]:
    """`runs` samples of each subject, taken round-robin (pvio, baseline, pvio, ...) so that
    a change in the machine's load during the run affects every subject alike."""
    out: dict[str, list[float]] = {label: [] for label in subjects}
    for _ in range(runs):
        for label, fn in subjects.items():
            out[label].append(fn())
    return out


# -- benchmarks -------------------------------------------------------------------------


@dataclass
class Context:
    """What a running benchmark may use: a scratch directory, a place for the exact
    commands it ran, a progress callback and free-form extra results."""

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
    requires: Callable[[], str | None] = lambda: None  # other prerequisite: reason or None

    def params(self, mode: Mode) -> Params:
        return self.quick if mode == "quick" else self.full

    def missing(self) -> str | None:
        """Why this benchmark cannot run here, or None."""
        reason = self.requires()
        if reason is not None:
            return reason
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
                "reason": self.reason, "mode": self.mode, "params": _jsonable(self.params),
                "duration_s": self.duration_s,
                "figures": [f.to_json() for f in self.figures],
                "commands": self.commands, "extra": _jsonable(self.extra),
                "plot": self.plot, "profile": self.profile}


def _jsonable(value: Any) -> Any:
    """Plain JSON values (dataclasses, tuples, paths and non-finite floats made safe)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# -- the registry ---------------------------------------------------------------------------

#: Benchmarks registered in this process (tests add fakes here); they run after MATRIX.
_REGISTERED: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    _REGISTERED[benchmark.name] = benchmark
    return benchmark


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def known_names() -> list[str]:
    return [*MATRIX, *(n for n in _REGISTERED if n not in MATRIX)]


def load_benchmark(name: str) -> Benchmark | str:
    """The benchmark called `name`, or the reason it cannot be loaded (a skip)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    from pvio.bench import layers
    from pvio.bench.cli import BENCHMARKS

    suite = None
    if name in BENCHMARKS:
        module_name = BENCHMARKS[name][0].split(":")[0]
        module = importlib.import_module(module_name)  # broken module: a failure, not a skip
        suite = getattr(module, "SUITE", None)
    if suite is None:
        suite = layers.ADAPTERS.get(name)  # skips itself while the layer is absent
    if suite is None:
        if name in BENCHMARKS:
            return (f"{module_name} defines no SUITE "
                    "(see pvio.bench.suite: how to add a benchmark)")
        return f"pvio bench {name} is not built yet"
    if not isinstance(suite, Benchmark):
        raise TypeError(f"{module_name}.SUITE is not a pvio.bench.suite.Benchmark")
    return suite


# -- machine facts and tool versions ---------------------------------------------------------


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


# -- running ----------------------------------------------------------------------------------


class Observer:
    """Receives the suite's progress; pvio.bench.report draws it."""

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
        loaded = load_benchmark(name)
    except Exception as exc:
        return Result(name, name, "failed", f"cannot load: {_describe(exc)}", mode)
    if isinstance(loaded, str):
        return Result(name, name, "skipped", loaded, mode)
    bench = loaded
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
        ctx = Context(Path(tmp), lambda message: observer.step(bench.name, message))
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


# -- the JSON document -------------------------------------------------------------------------

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_STR = {"type": "string"}
_STATS_PROPS = {"median": _NUM, "min": _NUM, "max": _NUM, "runs": {"type": "integer"},
                "samples": {"type": "array", "items": _NUM}}

#: results.json, as a JSON Schema (the subset `validate` understands: type, properties,
#: required, items, enum, additionalProperties).
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["schema", "mode", "command", "started", "finished", "duration_s",
                 "machine", "tools", "profiler", "notes", "benchmarks"],
    "properties": {
        "schema": {"type": "string", "enum": [SCHEMA_VERSION]},
        "mode": {"type": "string", "enum": ["quick", "full"]},
        "command": {"type": "array", "items": _STR},
        "started": _STR,
        "finished": _STR,
        "duration_s": _NUM,
        "machine": {
            "type": "object",
            "required": ["cores", "memory_bytes", "kernel", "machine", "cpu_model",
                         "python", "python_implementation", "os", "pvio"],
            "properties": {"cores": {"type": "integer"}, "memory_bytes": {"type": "integer"},
                           "kernel": _STR, "machine": _STR, "cpu_model": _STR,
                           "python": _STR, "python_implementation": _STR, "os": _STR,
                           "pvio": _STR},
        },
        "tools": {"type": "object", "additionalProperties": _STR},
        "profiler": {"type": ["string", "null"]},
        "notes": {"type": "array", "items": _STR},
        "benchmarks": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "title", "status", "reason", "mode", "params",
                             "duration_s", "figures", "commands", "extra", "plot", "profile"],
                "properties": {
                    "name": _STR, "title": _STR,
                    "status": {"type": "string", "enum": ["ok", "skipped", "failed"]},
                    "reason": _STR,
                    "mode": {"type": "string", "enum": ["quick", "full"]},
                    "params": {"type": "object"},
                    "duration_s": _NUM,
                    "commands": {"type": "array", "items": {"type": "array", "items": _STR}},
                    "extra": {"type": "object"},
                    "plot": {"type": ["string", "null"]},
                    "profile": {"type": "array", "items": _STR},
                    "figures": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "unit", "subject", "higher_is_better",
                                         *_STATS_PROPS, "baselines", "note"],
                            "properties": {
                                "name": _STR, "unit": _STR, "subject": _STR,
                                "higher_is_better": {"type": "boolean"}, "note": _STR,
                                **_STATS_PROPS,
                                "baselines": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["subject", *_STATS_PROPS, "ratio"],
                                        "properties": {"subject": _STR, **_STATS_PROPS,
                                                       "ratio": _NUM_OR_NULL},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    and math.isfinite(v),
    "null": lambda v: v is None,
}


def validate(document: Any, schema: Mapping[str, Any] = SCHEMA, where: str = "$") -> list[str]:
    """Every way `document` departs from `schema`, as "path: problem" lines (empty: valid)."""
    problems: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_TYPES[k](document) for k in kinds):
            return [f"{where}: expected {' or '.join(kinds)}, got {type(document).__name__}"]
    if "enum" in schema and document not in schema["enum"]:
        problems.append(f"{where}: {document!r} is not one of {schema['enum']}")
    if isinstance(document, dict):
        for key in schema.get("required", ()):
            if key not in document:
                problems.append(f"{where}: missing {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in document.items():
            if key in props:
                problems += validate(value, props[key], f"{where}.{key}")
            elif isinstance(extra, Mapping):
                problems += validate(value, extra, f"{where}.{key}")
    if isinstance(document, list) and "items" in schema:
        for i, item in enumerate(document):
            problems += validate(item, schema["items"], f"{where}[{i}]")
    return problems
