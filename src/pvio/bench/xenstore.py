"""`pvio bench xenstore`: XenStore request latency next to a bare UNIX-socket echo.

Theory of operation
-------------------
Two server processes are started side by side: `pvio xenstored` and a minimal asyncio
echo server (the floor for any Python server answering on a UNIX socket on this
machine).  One client process then measures, in the same run and interleaved round by
round so that machine noise hits both alike:

* echo: send a 24-byte frame, read 24 bytes back;
* read: XS_READ of a small node through `pvio.xenstore.client.Client`;
* write: XS_WRITE of a small value;
* transaction: TRANSACTION_START, a READ and a WRITE inside it, TRANSACTION_END "T";
* read (and echo) with 1000 idle connections open to the daemon;
* then, with the bench process a domain of a `pvio hypervisor` (xenstored is one too):
  a read and a transaction over the domain's XenStore page and event channel, next to
  the same requests of the same domain over a socket, both through `AsyncClient`
  (`pvio.bench.xenstore_ring`); and in the same run, interleaved with them, the same
  requests to Debian's C xenstored (xen-utils-4.17) serving the same kind of ring as
  `pvio up --xenstored xen` runs it, and over its socket (`pvio.bench.xenstore_servers`
  starts every server).  Where Xen's xenstored cannot run (not installed, the device
  layer not built), those rows are left out and the output says why.

Within a run the measurements alternate in blocks of 50 requests, so that load from
elsewhere on the machine falls on the baseline and on XenStore alike; each run opens
its 1000 idle connections after its plain blocks and closes them at its end.  Each
figure is the median over `--runs` runs of each run's median latency, with the min and
max of those run medians; ratios compare medians.  Targets (issue 4): a read
within 1.5x of the echo; with 1000 idle connections, a read no more than 2x slower.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click

from pvio.bench.harness.benchmark import Benchmark, Context, Params
from pvio.bench.harness.figures import Figure, compare
from pvio.bench.xenstore_ring import REQUESTS, TRANSPORTS, Daemon, measure_ring
from pvio.bench.xenstore_servers import pvio_servers, xen_missing, xen_xenstored
from pvio.toolstack.xen_daemons import xen_binary
from pvio.toolstack.xenpages import XENSTORED_DOMID
from pvio.xenstore.client import Client

#: The ring rows' daemons, as the output names them.
DAEMONS = {"pvio": "pvio", "xen": "C xenstored"}

def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _samples(fn: Callable[[], object], n: int) -> list[float]:
    out: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def _median_ns(fn: Callable[[], object], n: int) -> float:
    return statistics.median(_samples(fn, n))


def measure(tmp: Path, iterations: int, runs: int, idle: int) -> dict[str, list[float]]:
    """Per run, each measurement's median latency (ns); Xen's xenstored's rows only when
    it can run here (`xen_missing`)."""
    raise_nofile()
    with contextlib.ExitStack() as stack:
        hv_path, xs_path, echo_path = stack.enter_context(pvio_servers(tmp))
        daemons = [Daemon("pvio", hv_path, xs_path, xen=False)]
        if xen_missing() is None:
            xen = stack.enter_context(xen_xenstored(tmp / "xen"))
            daemons.append(Daemon("xen", xen.hypervisor_socket, xen.xenstored_socket, xen=True))
        results = _measure_sockets(xs_path, echo_path, iterations, runs, idle)
        return results | measure_ring(daemons, iterations, runs)


def _measure_sockets(xs_path: Path, echo_path: Path, iterations: int, runs: int,
                     idle: int) -> dict[str, list[float]]:
    """The toolstack's requests to pvio's xenstored, next to the echo."""
    echo = socket.socket(socket.AF_UNIX)
    echo.connect(str(echo_path))
    frame = b"x" * 24

    def echo_once() -> None:
        echo.sendall(frame)
        got = 0
        while got < len(frame):
            got += len(echo.recv(4096))

    c = Client(str(xs_path))
    c.write("/bench/node", "value")

    def read() -> None:
        c.read("/bench/node")

    def write() -> None:
        c.write("/bench/node", "value")

    def transaction() -> None:
        tx = c.transaction_start()
        c.read("/bench/node", tx)
        c.write("/bench/node", "value", tx)
        c.transaction_end(tx)

    results: dict[str, list[float]] = {k: [] for k in
                                       ("echo", "read", "write", "transaction",
                                        "read_idle", "echo_idle")}
    for fn in (echo_once, read, write, transaction):  # warm up
        _median_ns(fn, 200)
    block = 50
    for _ in range(runs):
        # Interleaved in small blocks, so that load from elsewhere on the machine
        # falls on the baseline and on XenStore alike.
        samples: dict[str, list[float]] = {k: [] for k in results}
        for _ in range(max(1, iterations // block)):
            samples["echo"].extend(_samples(echo_once, block))
            samples["read"].extend(_samples(read, block))
            samples["write"].extend(_samples(write, block))
            samples["transaction"].extend(_samples(transaction, max(1, block // 4)))
        idle_socks = []
        for _ in range(idle):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(xs_path))
            idle_socks.append(s)
        c.read("/bench/node")
        for _ in range(max(1, iterations // block)):
            samples["echo_idle"].extend(_samples(echo_once, block))
            samples["read_idle"].extend(_samples(read, block))
        for s in idle_socks:
            s.close()
        for k, v in samples.items():
            results[k].append(statistics.median(v))
    c.close()
    echo.close()
    return results


def _ring_figures(us: dict[str, list[float]]) -> list[Figure]:
    """A domain's read and transaction: pvio's ring first, then every other daemon and
    transport measured (ratios: pvio's ring over each)."""
    missing = xen_missing()
    note = "" if missing is None else f"C xenstored not measured: {missing}"
    return [
        compare(f"a domain's {request}: ring and socket", "µs",
                {f"{label} {transport}": us[key] for name, label in DAEMONS.items() for transport in TRANSPORTS
                 if (key := f"{name}_{transport}_{request}") in us},
                higher_is_better=False, note=note)
        for request in REQUESTS
    ]


def _suite(params: Params, ctx: Context) -> list[Figure]:
    """The suite's figures: every run's median latency, in µs, next to the echo's."""
    runs, iterations, idle = int(params["runs"]), int(params["iterations"]), int(params["idle"])
    ctx.progress(f"{runs} runs x {iterations} requests, then {idle} idle connections")
    # The sockets go in a short directory of their own: a UNIX socket's path is limited
    # to 107 bytes, and ctx.workdir is under the user's output folder.
    with tempfile.TemporaryDirectory(prefix="pvio-bench-xs-") as tmp:
        ctx.command(["pvio", "xenstored", "--socket", str(Path(tmp) / "xs.sock")])
        if xen_missing() is None:
            ctx.command([str(xen_binary("xenstored")), "--no-fork", "--master-domid", str(XENSTORED_DOMID)])
        ns = measure(Path(tmp), iterations, runs, idle)
    us = {k: [v / 1000 for v in values] for k, values in ns.items()}
    echo = "asyncio UNIX-socket echo"
    return [
        compare("read", "µs", {"pvio": us["read"], echo: us["echo"]}, higher_is_better=False),
        compare("write", "µs", {"pvio": us["write"], echo: us["echo"]},
                higher_is_better=False),
        compare("transaction (start, read, write, commit)", "µs",
                {"pvio": us["transaction"], echo: us["echo"]}, higher_is_better=False),
        compare(f"read, {idle} idle connections", "µs",
                {"pvio": us["read_idle"], echo: us["echo_idle"]}, higher_is_better=False),
        *_ring_figures(us),
    ]


SUITE = Benchmark(
    name="xenstore",
    title="XenStore request latency vs a bare UNIX-socket echo",
    run=_suite,
    quick={"runs": 3, "iterations": 500, "idle": 200},
    full={"runs": 5, "iterations": 2000, "idle": 1000},
)


def _echo_ring_rows(results: dict[str, list[float]]) -> None:
    """The ring rows: a line per daemon and transport, then the ratios."""
    med = {k: statistics.median(v) for k, v in results.items()}
    heads = "".join(f"{r:>10}".ljust(28) for r in REQUESTS)
    click.echo(f"  {'a domain (AsyncClient), its ring and a socket:':<50}{heads}")
    for name, label in DAEMONS.items():
        for transport in TRANSPORTS:
            keys = [f"{name}_{transport}_{request}" for request in REQUESTS]
            if all(k in med for k in keys):
                cells = "".join(f"{med[k] / 1000:10.1f} us ({min(results[k]) / 1000:.1f}..{max(results[k]) / 1000:.1f})"
                                .ljust(28) for k in keys)
                click.echo(f"  {label + ', ' + transport:<50}{cells}")
    if "xen_ring_read" not in med:
        click.echo(f"  C xenstored: not measured ({xen_missing()})")
    for (a, t), (b, u) in ((("pvio", "ring"), ("pvio", "socket")), (("xen", "ring"), ("xen", "socket")),
                           (("pvio", "ring"), ("xen", "ring")), (("pvio", "socket"), ("xen", "socket"))):
        if f"{b}_{u}_read" in med:
            ratios = ", ".join(f"{r} x{med[f'{a}_{t}_{r}'] / med[f'{b}_{u}_{r}']:.2f}" for r in REQUESTS)
            click.echo(f"  {DAEMONS[a]} {t} / {DAEMONS[b]} {u}: {ratios}")


@click.command("xenstore")
@click.option("--iterations", default=2000, show_default=True, help="Requests per run.")
@click.option("--runs", default=5, show_default=True, help="Runs (medians reported).")
@click.option("--idle", default=1000, show_default=True, help="Idle connections for the idle test.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the figures as JSON here.")
def xenstore(iterations: int, runs: int, idle: int, json_out: str | None) -> None:
    """XenStore read/write/transaction latency vs a UNIX-socket echo, idle connections;
    a domain's requests over its ring and a socket, to pvio's and Xen's C xenstored."""
    with tempfile.TemporaryDirectory(prefix="pvio-bench-xs-") as tmp:
        results = measure(Path(tmp), iterations, runs, idle)
    med = {k: statistics.median(v) for k, v in results.items()}
    click.echo(f"pvio bench xenstore: {runs} runs x {iterations} requests, medians of run "
               f"medians (min..max), one client, {os.cpu_count()} CPUs")
    rows = [("echo (baseline)", "echo"), ("read", "read"), ("write", "write"),
            ("transaction (start, read, write, commit)", "transaction"),
            (f"echo with {idle} idle xenstored conns", "echo_idle"),
            (f"read with {idle} idle connections", "read_idle")]
    for label, key in rows:
        v = results[key]
        click.echo(f"  {label:<44} {med[key] / 1000:8.1f} us  "
                   f"({min(v) / 1000:.1f}..{max(v) / 1000:.1f})  "
                   f"x{med[key] / med['echo']:.2f} echo")
    _echo_ring_rows(results)
    ratio_read = med["read"] / med["echo"]
    ratio_idle = med["read_idle"] / med["read"]
    click.echo(f"  read / echo            = {ratio_read:.2f}  (target <= 1.5)")
    click.echo(f"  read idle / read       = {ratio_idle:.2f}  (target <= 2.0)")
    if json_out:
        Path(json_out).write_text(json.dumps(
            {"runs": runs, "iterations": iterations, "idle": idle, "ns": results,
             "median_ns": med, "read_over_echo": ratio_read,
             "read_idle_over_read": ratio_idle}, indent=2))
