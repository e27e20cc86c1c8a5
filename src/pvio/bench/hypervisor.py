"""`pvio bench hypervisor`: hypercall round trips, batched maps, copies, event latency.

Everything runs against a real `pvio hypervisor` daemon in a child process, with the
domains in this process and (for events) in a second child process.  Each figure is the
median of several runs, and is shown next to its baseline measured in the same run:

- hypercall round trip (GNTTABOP_query_size) — next to a bare SOCK_SEQPACKET echo
  round trip between two Python processes;
- batched map+unmap of 11 and 352 grants (two round trips, whatever N) — per grant;
- GNTTABOP_copy bandwidth at 4 KiB and 64 KiB per call — next to the map transport
  (copying the same bytes out of mapped grants in the mapper itself);
- event-channel notify-to-wake latency between two processes (event loops, handler
  notifies back) — next to a bare eventfd ping-pong between two Python processes
  (blocking read/write), the limit on this machine, and the same ping-pong waiting in
  the same kind of event loop.  Measured with the two processes on two CPUs and on one
  CPU (where no cross-CPU wake-up hides the software path).  Target: within 1.3x.
- the cost of one compare-and-swap through ctypes/libatomic.

`measure` returns every figure's raw per-run samples (`Measure`); the table of the
subcommand (`run_bench`) and the suite's `SUITE` are both made from them, so the suite's
min..max are those of the individual runs.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from pvio.abi import grant_table as gt
from pvio.bench.harness.benchmark import Benchmark, Context, Params
from pvio.bench.harness.figures import Figure, compare
from pvio.hypervisor import aio, wire
from pvio.hypervisor.atomic import AtomicWords
from pvio.hypervisor.client import CopySeg, Domain
from pvio.hypervisor.wire import Op

T = TypeVar("T")
RUNS = 5
#: The event loop the domains run on: "asyncio" or "uvloop" (set by the command).
LOOP = ["uvloop"]


def run_loop(coro: Coroutine[Any, Any, T], loop: str) -> T:
    return aio.run(coro, loop=loop)


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


async def _timed_runs(fn: Callable[[], Awaitable[None]], n: int, runs: int = RUNS) -> list[float]:
    """The mean seconds per call of `fn` (n calls per run), for each of `runs` runs."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        out.append((time.perf_counter() - t0) / n)
    return out


@dataclass
class Measure:
    """One figure's raw samples: pvio's, and each baseline's from the same run."""

    name: str
    unit: str
    ours: list[float]
    baselines: dict[str, list[float]] = field(default_factory=dict)
    higher_is_better: bool = False
    note: str = ""


# -- baselines in child processes --------------------------------------------------------

# Ping-pongs put the two processes on two given CPUs (this process on the first, its peer
# on the second), so that the baseline and pvio are measured with the same placement:
# otherwise the scheduler's choice (same core or not, idle states) swamps the difference.
_CPUS = sorted(os.sched_getaffinity(0))
PING_CPU, PONG_CPU = (_CPUS[0], _CPUS[1]) if len(_CPUS) > 1 else (_CPUS[0], _CPUS[0])


class _Pinned:
    """Pin this process to PING_CPU for the duration (restored afterwards)."""

    def __enter__(self) -> None:
        self._saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {PING_CPU})

    def __exit__(self, *exc: object) -> None:
        os.sched_setaffinity(0, self._saved)


def _bare_eventfd_pingpong(rounds: int, pong_cpu: int = PONG_CPU) -> float:
    """Mean one-way latency (s) of an eventfd ping-pong between two processes."""
    ping = os.eventfd(0)
    pong = os.eventfd(0)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.sched_setaffinity(0, {pong_cpu})
            for _ in range(rounds + 100):
                os.eventfd_read(ping)
                os.eventfd_write(pong, 1)
        finally:
            os._exit(0)
    with _Pinned():
        for _ in range(100):  # warm up
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)
        t0 = time.perf_counter()
        for _ in range(rounds):
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)
        dt = time.perf_counter() - t0
    os.waitpid(pid, 0)
    os.close(ping)
    os.close(pong)
    return dt / rounds / 2


def _asyncio_side(rx: int, tx: int, rounds: int, start: bool) -> float:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[float] = loop.create_future()
        count = 0
        t0 = time.perf_counter()

        def on_readable() -> None:
            nonlocal count
            os.eventfd_read(rx)
            count += 1
            if count < rounds or not start:
                os.eventfd_write(tx, 1)
            if count >= rounds and not done.done():
                done.set_result(time.perf_counter() - t0)

        loop.add_reader(rx, on_readable)
        if start:
            os.eventfd_write(tx, 1)
        try:
            return await asyncio.wait_for(done, 60)
        finally:
            loop.remove_reader(rx)

    return run_loop(main(), LOOP[0])


def _asyncio_eventfd_pingpong(rounds: int) -> float:
    """The same ping-pong with both processes waiting in asyncio loops (add_reader)."""
    ping = os.eventfd(0, os.EFD_NONBLOCK)
    pong = os.eventfd(0, os.EFD_NONBLOCK)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.sched_setaffinity(0, {PONG_CPU})
            _asyncio_side(ping, pong, rounds, False)
        finally:
            os._exit(0)
    with _Pinned():
        dt = _asyncio_side(pong, ping, rounds, True)
    os.waitpid(pid, 0)
    os.close(ping)
    os.close(pong)
    return dt / rounds / 2


def _bare_seqpacket_rtt(rounds: int) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            a.close()
            while True:
                data = b.recv(65536)
                if not data:
                    break
                b.send(data)
        finally:
            os._exit(0)
    b.close()
    msg = bytes(64)
    for _ in range(100):
        a.send(msg)
        a.recv(65536)
    t0 = time.perf_counter()
    for _ in range(rounds):
        a.send(msg)
        a.recv(65536)
    dt = time.perf_counter() - t0
    a.close()
    os.waitpid(pid, 0)
    return dt / rounds


# -- the pong domain (a child process) ------------------------------------------------------


async def _pong_domain(path: str, peer: int) -> None:
    d = await aio.connect(path, "bench-pong", 16)
    port = await d.alloc_unbound(peer)
    d.set_handler(port, d.notify)
    print(json.dumps({"domid": d.domid, "port": port}), flush=True)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), finish)
    await done
    await d.close()


def pong_main() -> None:  # pragma: no cover - run in a child process
    run_loop(_pong_domain(sys.argv[1], int(sys.argv[2])), sys.argv[3])


async def _ping_pong(d: Domain, port: int, rounds: int) -> float:
    """Seconds for `rounds` notify/answer round trips, driven from the event handler."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    count = 0
    t0 = time.perf_counter()

    def on_event(p: int) -> None:
        nonlocal count
        count += 1
        if count < rounds:
            d.notify(p)
        elif not done.done():
            done.set_result(time.perf_counter() - t0)

    d.set_handler(port, on_event)
    t0 = time.perf_counter()
    d.notify(port)
    return await asyncio.wait_for(done, 60)


async def _notify_to_wake(
    d: Domain, path: str, rounds: int, bare: list[float], pong_cpu: int = PONG_CPU
) -> list[float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from pvio.bench.hypervisor import pong_main; pong_main()",
        path,
        str(d.domid),
        LOOP[0],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        info = json.loads(await proc.stdout.readline())
        os.sched_setaffinity(proc.pid, {pong_cpu})
        port = await d.bind_interdomain(info["domid"], info["port"])
        await d.wait_event(port)  # the event binding raises
        results = []
        for _ in range(RUNS):
            # Interleaved: the blocking baseline runs right before each of our runs.
            bare.append(_bare_eventfd_pingpong(rounds, pong_cpu))
            with _Pinned():
                results.append(await _ping_pong(d, port, rounds) / rounds / 2)
            await asyncio.sleep(0.01)
        d.set_handler(port, None)
        await d.close_port(port)
        proc.stdin.write(b"x\n")
        await proc.stdin.drain()
        await asyncio.wait_for(proc.wait(), 10)
        return results
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- the benchmark ----------------------------------------------------------------------------


async def _run(path: str, quick: bool, baselines: list[float]) -> list[Measure]:
    scale = 10 if quick else 1
    out: list[Measure] = []
    a = await aio.connect(path, "bench-granter", 4096)
    b = await aio.connect(path, "bench-mapper", 4096)
    c = await aio.connect(path, "bench-copier", 4096, transport="copy")
    try:
        # Hypercall round trip.
        q = [Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_query_size, 1, gt.GNTTAB_QUERY_SIZE.pack(dom=gt.DOMID_SELF))]

        async def query() -> None:
            await b.hypercall(q)

        rtt = await _timed_runs(query, 2000 // scale)
        echo = [_bare_seqpacket_rtt(20000 // scale // RUNS) for _ in range(RUNS)]
        out.append(Measure("hypercall round trip", "µs", _us(rtt), {ECHO: _us(echo)}))

        # Batched map + unmap.
        frames = a.alloc_pages(352)
        refs_b = await a.grant_access(b.domid, frames)
        refs_c = await a.grant_access(c.domid, frames)
        for n in (11, 352):
            for dom, refs, label in ((b, refs_b, "map"), (c, refs_c, "copy")):
                before = dom.round_trips

                async def map_unmap(dom: Domain = dom, refs: list[int] = refs, n: int = n) -> None:
                    maps = await dom.map_grants(a.domid, refs[:n])
                    await dom.unmap_grants(maps)

                t = await _timed_runs(map_unmap, max(5, 400 // n // scale))
                trips = (dom.round_trips - before) / (RUNS * max(5, 400 // n // scale))
                out.append(Measure(f"map+unmap {n} grants ({label} transport)", "µs", _us(t),
                                   note=f"{n} grants; {trips:.0f} round trips"))

        # Copy bandwidth: GNTTABOP_copy vs copying out of mapped grants.
        local = c.alloc_pages(16)
        local_b = b.alloc_pages(16)
        for size in (4096, 65536):
            npages = size // 4096
            segs = [CopySeg.from_grant(a.domid, refs_c[i], local[i]) for i in range(npages)]

            async def do_copy(segs: list[CopySeg] = segs) -> None:
                await c.copy(segs)

            t_copy = await _timed_runs(do_copy, 2000 // scale // npages)
            maps = await b.map_grants(a.domid, refs_b[:npages], readonly=True)

            async def do_map_copy(maps: list = maps, npages: int = npages) -> None:  # type: ignore[type-arg]
                for i in range(npages):
                    b.frame(local_b[i])[:] = maps[i].view

            t_map = await _timed_runs(do_map_copy, 2000 // scale // npages)
            await b.unmap_grants(maps)
            out.append(Measure(f"GNTTABOP_copy {size // 1024} KiB per call", "MB/s",
                               [size / t / 1e6 for t in t_copy],
                               {MAP_MEMCPY: [size / t / 1e6 for t in t_map]},
                               higher_is_better=True))
        a.end_access(refs_b + refs_c)

        # Notify-to-wake between two processes vs a bare eventfd ping-pong.
        rounds = 4000 // scale
        # The same-loop baseline ran before the loop started (a fork inside a running
        # loop cannot start another); the blocking one is interleaved with our runs.
        bare: list[float] = []
        ours = await _notify_to_wake(a, path, rounds, bare)
        out.append(Measure("event notify-to-wake (one way), two CPUs", "µs", _us(ours),
                           {PINGPONG: _us(bare), PINGPONG_LOOP: _us(baselines)}))
        # Both processes on one CPU: no cross-CPU wake-up, so this shows the software
        # path alone (a context switch per hop).
        bare1: list[float] = []
        ours1 = await _notify_to_wake(a, path, rounds, bare1, pong_cpu=PING_CPU)
        out.append(Measure("event notify-to-wake (one way), one CPU", "µs", _us(ours1),
                           {PINGPONG: _us(bare1)}))
    finally:
        for d in (a, b, c):
            await d.close()

    mm = mmap.mmap(-1, 4096)
    atomic = AtomicWords(mm)
    n = 100000 // scale // RUNS
    cas = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        for _ in range(n):
            atomic.cmpxchg32(0, 0, 0)
        cas.append((time.perf_counter() - t0) / n * 1e9)
    atomic.release()
    mm.close()
    out.append(Measure("compare-and-swap (ctypes + libatomic)", "ns", cas))
    return out


ECHO = "bare SEQPACKET echo"
MAP_MEMCPY = "map transport memcpy"
PINGPONG = "bare eventfd ping-pong, blocking read"
PINGPONG_LOOP = "bare eventfd ping-pong, add_reader, same loop"


def _us(seconds: list[float]) -> list[float]:
    return [t * 1e6 for t in seconds]


def rows(measures: list[Measure]) -> list[tuple[str, str, str, str]]:
    """The subcommand's table: measure, pvio, baseline (same run), ratio — medians."""
    out: list[tuple[str, str, str, str]] = []
    for m in measures:
        ours = _median(m.ours)
        if m.name.startswith("hypercall"):
            echo = _median(m.baselines[ECHO])
            out.append((m.name, f"{ours:.1f} µs", f"{echo:.1f} µs ({ECHO})", f"{ours / echo:.2f}x"))
        elif m.name.startswith("map+unmap"):
            n = int(m.name.split()[1])
            out.append((m.name, f"{ours:.0f} µs", f"{ours / n:.1f} µs/grant",
                        m.note.split("; ")[1]))
        elif m.name.startswith("GNTTABOP_copy"):
            theirs = _median(m.baselines[MAP_MEMCPY])
            out.append((m.name, f"{ours:.0f} MB/s", f"{theirs:.0f} MB/s ({MAP_MEMCPY})",
                        f"{theirs / ours:.1f}x slower"))
        elif m.name.startswith("event"):
            bare = _median(m.baselines[PINGPONG])
            out.append((m.name, f"{ours:.1f} µs", f"{bare:.1f} µs ({PINGPONG})", f"{ours / bare:.2f}x"))
            if PINGPONG_LOOP in m.baselines:
                loop = _median(m.baselines[PINGPONG_LOOP])
                out.append(("  same, baseline on the same event loop", f"{ours:.1f} µs",
                            f"{loop:.1f} µs ({PINGPONG_LOOP})", f"{ours / loop:.2f}x"))
        else:
            out.append((m.name, f"{ours:.0f} {m.unit}", "", ""))
    return out


def measure(quick: bool = False) -> list[Measure]:
    """Every figure's raw samples, against a `pvio hypervisor` daemon of our own."""
    rounds = 4000 // (10 if quick else 1)
    # A fork inside a running loop cannot run another loop: this baseline runs first.
    bare_aio = [_asyncio_eventfd_pingpong(rounds) for _ in range(RUNS)]
    with tempfile.TemporaryDirectory(prefix="pvio-bench-hv-") as tmp:
        path = str(Path(tmp) / "hv.sock")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "pvio", "hypervisor", "--socket", path], stdout=subprocess.PIPE, text=True
        )
        try:
            assert daemon.stdout is not None
            daemon.stdout.readline()
            return run_loop(_run(path, quick, bare_aio), LOOP[0])
        finally:
            daemon.terminate()
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def run_bench(quick: bool = False) -> list[tuple[str, str, str, str]]:
    return rows(measure(quick))


def _suite(params: Params, ctx: Context) -> list[Figure]:
    ctx.command([sys.executable, "-m", "pvio", "hypervisor", "--socket", "<tmp>/hv.sock"])
    ctx.progress(f"{RUNS} runs of each measure")
    return [compare(m.name, m.unit, {"pvio": m.ours, **m.baselines},
                    higher_is_better=m.higher_is_better, note=m.note)
            for m in measure(bool(params["quick"]))]


SUITE = Benchmark(
    name="hypervisor",
    title="Hypercalls, grant map/copy, notify-to-wake, vs bare sockets and eventfds",
    run=_suite,
    quick={"quick": True},
    full={"quick": False},
)


@click.command("hypervisor")
@click.option("--quick", is_flag=True, help="Fewer iterations (a smoke run).")
@click.option(
    "--loop",
    type=click.Choice(["asyncio", "uvloop"]),
    default="uvloop",
    help="The domains' event loop (pvio's default is uvloop).",
)
def hypervisor(quick: bool, loop: str) -> None:
    """Hypercalls, batched grant maps, GNTTABOP_copy and event channels, with baselines."""
    LOOP[0] = loop
    from rich.console import Console
    from rich.table import Table

    rows = run_bench(quick)
    table = Table(title=f"pvio bench hypervisor (medians of {RUNS} runs, domains on {loop})")
    for col in ("measure", "pvio", "baseline (same run)", "ratio"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
