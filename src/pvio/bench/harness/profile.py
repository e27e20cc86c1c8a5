"""`pvio bench --profile`: where the time goes in pvio's processes while the suite runs.

Theory of operation
-------------------
The benchmarks run pvio in several processes: the suite's own (ring, the in-process
parts of every layer) and the daemons and domains it starts (`pvio hypervisor`,
`pvio xenstored`, `pvio nbd serve`, pong domains...).  A profiler inside the suite's
process would miss the daemons, so the first choice is **py-spy**, a sampling profiler
that reads another process's Python stacks from outside: for each benchmark,
``py-spy record --pid <the suite> --subprocesses --nonblocking --format speedscope``
attaches before the benchmark starts and follows every process the benchmark forks;
SIGINT at the end makes it write ``profile/<benchmark>.speedscope.json``, with one
profile per process and thread (open it at speedscope.app or with ``speedscope``), and
this module writes ``profile/<benchmark>.txt``: per process, its command line and the
functions with the most samples on top of the stack (self) and anywhere on it (total).

py-spy needs ptrace rights on the processes it reads: as root (the suite's usual user,
since the lguest benchmark needs namespaces) it has them.  ``--nonblocking`` reads the
stacks without stopping the process, so the benchmark's own figures move little (a
sample is a few process_vm_readv calls, 100 times a second); figures from a profiled run
are still marked as such in results.json and should not be quoted.

When py-spy is not installed (it comes with ``pip install 'pvio[bench]'``) or cannot
attach, the fallback is the standard library's **cProfile** in the suite's process only:
``profile/<benchmark>.pstats`` (for ``python -m pstats`` or snakeviz) and the top of it
by cumulative time in ``profile/<benchmark>.txt``.  pyinstrument was considered: it is
in-process too, so it would add a dependency without seeing the daemons.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvio import compiled
from pvio.bench.harness.figures import Figure
from pvio.bench.harness.machine import find_tool

TOP = 15

#: Frames of the suite's own machinery (always on the stack): left out of "total".
HARNESS = re.compile(r"/pvio/bench/harness/(runner|profile|report)\.py$|/pvio/bench/cli\.py$|/pvio/cli/|/click/|"
                     r"^<frozen runpy>$|/bin/pvio$")
RATE = 100  # samples per second


class Profiler:
    """Wraps each benchmark's run; `name` goes into results.json."""

    name = "none"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.notes: list[str] = []

    def wrap(self, bench: str, thunk: Callable[[], list[Figure]]) -> tuple[list[Figure], list[str]]:
        raise NotImplementedError


class CProfiler(Profiler):
    name = "cProfile"

    def wrap(self, bench: str, thunk: Callable[[], list[Figure]]) -> tuple[list[Figure], list[str]]:
        self.directory.mkdir(parents=True, exist_ok=True)
        prof = cProfile.Profile()
        prof.enable()
        try:
            figures = thunk()
        finally:
            prof.disable()
            stats_path = self.directory / f"{bench}.pstats"
            prof.dump_stats(stats_path)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
            summary = self.directory / f"{bench}.txt"
            summary.write_text(f"cProfile of the suite's process only (pid {os.getpid()})\n"
                               + text.getvalue())
        return figures, [str(stats_path), str(summary)]


class PySpyProfiler(Profiler):
    name = "py-spy"

    def __init__(self, directory: Path, py_spy: str) -> None:
        super().__init__(directory)
        self.py_spy = py_spy
        self.fallback = CProfiler(directory)

    def command(self, out: Path) -> list[str]:
        return [self.py_spy, "record", "--pid", str(os.getpid()), "--subprocesses",
                "--nonblocking", "--rate", str(RATE), "--format", "speedscope",
                "--output", str(out)]

    def wrap(self, bench: str, thunk: Callable[[], list[Figure]]) -> tuple[list[Figure], list[str]]:
        self.directory.mkdir(parents=True, exist_ok=True)
        out = self.directory / f"{bench}.speedscope.json"
        log = self.directory / f"{bench}.py-spy.log"
        with open(log, "wb") as log_file:
            spy = subprocess.Popen(self.command(out), stdout=log_file, stderr=subprocess.STDOUT)
        time.sleep(0.5)  # let it attach before the first measurement
        if spy.poll() is not None:
            self.notes.append(f"{bench}: py-spy could not attach ({log.read_text()[-200:]!r}); "
                              "cProfile of the suite's process instead")
            return self.fallback.wrap(bench, thunk)
        try:
            figures = thunk()
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        files = [str(log)]
        if out.exists():
            summary = self.directory / f"{bench}.txt"
            summary.write_text(summarise_speedscope(json.loads(out.read_text())))
            files = [str(out), str(summary), str(log)]
        else:
            self.notes.append(f"{bench}: py-spy wrote no profile (see {log})")
        return figures, files


def summarise_speedscope(doc: dict[str, Any], top: int = TOP) -> str:
    """Per process: its command line, then the busiest functions by self and total samples."""
    frames = doc["shared"]["frames"]

    def label(i: int) -> str:
        f = frames[i]
        where = f"{f['file']}:{f['line']}" if f.get("file") else ""
        return f"{f['name']}  {where}".rstrip()

    lines: list[str] = []
    by_process: dict[str, list[dict[str, Any]]] = {}
    for prof in doc["profiles"]:
        by_process.setdefault(prof["name"].split(" Thread")[0], []).append(prof)
    for process, profs in by_process.items():
        self_count: Counter[int] = Counter()
        total_count: Counter[int] = Counter()
        command, samples = process, 0
        for prof in profs:
            for stack in prof["samples"]:
                if not stack:
                    continue
                samples += 1
                # py-spy roots each stack in "process PID:cmdline" frames, the
                # parent's first for a child process: the innermost one names it.
                skip = 0
                while skip < len(stack) and frames[stack[skip]]["name"].startswith("process "):
                    command = frames[stack[skip]]["name"]
                    skip += 1
                stack = stack[skip:]
                if not stack:
                    continue
                self_count[stack[-1]] += 1
                total_count.update(i for i in set(stack)
                                   if not HARNESS.search(frames[i].get("file") or ""))
        lines.append(f"== {command}  ({samples} samples at {RATE}/s, "
                     f"{len(profs)} thread(s))")
        lines.append("  self:")
        lines += [f"    {n:6d}  {label(i)}" for i, n in self_count.most_common(top)]
        lines.append("  total (the suite's own frames left out):")
        lines += [f"    {n:6d}  {label(i)}" for i, n in total_count.most_common(top)]
        lines.append("")
    return "\n".join(lines) + "\n"


def choose(directory: Path) -> Profiler:
    """py-spy when it is installed, else cProfile."""
    py_spy = find_tool("py-spy")
    profiler: Profiler = CProfiler(directory) if py_spy is None else PySpyProfiler(directory, py_spy)
    if py_spy is None:
        profiler.notes.append("py-spy is not installed (pip install 'pvio[bench]'): cProfile "
                              "of the suite's process only, daemons not profiled")
    if compiled.status().active:
        profiler.notes.append("pvio ran its compiled build: a profile shows each compiled module's "
                              "time as its callers' (no Python frames); PVIO_PURE=1 profiles the sources")
    return profiler
