"""`pvio bench ring`: request+response round trips per second through a ring pair.

One process holds a FrontRing and a BackRing on the same memory and moves requests and
responses through them as blkfront and blkback would, including every push-and-check-
notify and final check (so every fence is paid), but without event channels: the figure
is the ring's own cost.  Each scenario runs several times; the table shows the median and
the min..max.  The baseline, measured in the same run and interleaved with it, is the
same entries through a UNIX socketpair (the usual way to pass messages between processes
without shared memory), both ends in this process, a batch per send, split into one
bytes object per entry on receipt as the ring's consumer gets them; the ratio is pvio's
rate over the baseline's.  A second table prices the fence pvio uses (libatomic's
atomic_thread_fence through ctypes) next to a system call and a no-op call.

In the suite (`pvio bench`), `SUITE` reports the same figures: one per scenario, with
the socketpair as its baseline, and the fence next to the system call and the no-op.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from pvio.abi.blkif import ABI_NATIVE, ABI_X86_32_BLKIF, BlkifABI
from pvio.bench.harness.benchmark import Benchmark, Context, Params
from pvio.bench.harness.figures import Figure, compare
from pvio.ring import BackRing, FrontRing, SharedRing, sharedmem

FENCE = "full_fence (libatomic atomic_thread_fence)"

#: Round trips per second per core, batched, that pvio.ring aims for.
TARGET = 250_000


@dataclass
class Row:
    scenario: str
    order: int
    abi: str
    batch: int
    median: float
    low: float
    high: float
    baseline: float
    ratio: float
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)


def _pair(order: int, abi: BlkifABI, scattered: bool) -> tuple[FrontRing, BackRing]:
    if scattered:
        mem: bytearray | list[memoryview] = [
            memoryview(bytearray(4096)) for _ in range(1 << order)
        ]
    else:
        mem = bytearray(4096 << order)
    front = FrontRing.init(SharedRing.for_blkif(mem, abi))
    back = BackRing(SharedRing.for_blkif(mem, abi))
    return front, back


def _ring_round_trips(order: int, abi: BlkifABI, batch: int, total: int,
                      scattered: bool) -> float:
    """Round trips per second for `total` requests in batches of `batch`."""
    front, back = _pair(order, abi, scattered)
    req = abi.request.pack(operation=1, nr_segments=1, id=7, sector_number=8)
    rsp = abi.response.pack(id=7, operation=1, status=0)
    reqs = [req] * batch
    rsps = [rsp] * batch
    rounds = max(1, total // batch)
    t0 = time.perf_counter()
    if batch == 1:
        for _ in range(rounds):
            front.put_request(req)
            front.push_requests_and_check_notify()
            got = back.get_request()
            assert got is not None
            back.put_response(rsp)
            back.push_responses_and_check_notify()
            back.final_check_for_requests()
            front.get_response()
            front.final_check_for_responses()
    else:
        for _ in range(rounds):
            front.put_requests(reqs)
            front.push_requests_and_check_notify()
            n = len(back.take_requests(batch))
            back.put_responses(rsps[:n] if n != batch else rsps)
            back.push_responses_and_check_notify()
            back.final_check_for_requests()
            front.take_responses(batch)
            front.final_check_for_responses()
    elapsed = time.perf_counter() - t0
    return rounds * batch / elapsed


def _recv_exactly(sock: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = sock.recv_into(buf[got:])
        if n == 0:
            raise ConnectionError("socketpair closed")
        got += n


def _socketpair_round_trips(abi: BlkifABI, batch: int, total: int) -> float:
    """The same traffic over a UNIX socketpair, both ends in this process: the baseline."""
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for sock in (front, back):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        reqs = bytes(abi.request.size) * batch
        rsps = bytes(abi.response.size) * batch
        req_buf = memoryview(bytearray(len(reqs)))
        rsp_buf = memoryview(bytearray(len(rsps)))
        rounds = max(1, total // batch)
        t0 = time.perf_counter()
        qsize, ssize = abi.request.size, abi.response.size
        for _ in range(rounds):
            front.sendall(reqs)
            _recv_exactly(back, req_buf)
            got = [req_buf[i : i + qsize].tobytes() for i in range(0, len(req_buf), qsize)]
            back.sendall(rsps[: len(got) * ssize])
            _recv_exactly(front, rsp_buf)
            [rsp_buf[i : i + ssize].tobytes() for i in range(0, len(rsp_buf), ssize)]
        elapsed = time.perf_counter() - t0
    finally:
        front.close()
        back.close()
    return rounds * batch / elapsed


def _per_call_ns(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e9


def _k(rate: float) -> str:
    return f"{rate / 1000:.0f}k"


def _nothing() -> None:
    return None


SCENARIOS: list[tuple[str, int, BlkifABI, bool, bool]] = [
    # (name, order, abi, batched, scattered pages)
    ("1 page", 0, ABI_NATIVE, False, False),
    ("1 page", 0, ABI_NATIVE, True, False),
    ("16 pages", 4, ABI_NATIVE, False, False),
    ("16 pages", 4, ABI_NATIVE, True, False),
    ("16 pages, scattered", 4, ABI_X86_32_BLKIF, True, True),
]


def measure(runs: int, total: int, on_step: Callable[[str], None] = lambda s: None,
            ) -> tuple[list[Row], list[dict[str, Any]]]:
    rows = []
    for name, order, abi, batched, scattered in SCENARIOS:
        on_step(f"{name}, {abi.name}, {'batched' if batched else 'one at a time'}")
        nr_ents = abi.ring_size(order)
        batch = nr_ents if batched else 1
        n = total if batched else max(total // 4, 1)
        ours, base = [], []
        for _ in range(runs):  # interleaved, so drift affects both alike
            ours.append(_ring_round_trips(order, abi, batch, n, scattered))
            base.append(_socketpair_round_trips(abi, batch, n))
        median, baseline = statistics.median(ours), statistics.median(base)
        rows.append(Row(name, order, abi.name, batch, median, min(ours), max(ours), baseline,
                        median / baseline, ours, base))
    on_step("cost of one ordering point")
    calls = max(total // 2, 1000)
    fences: list[dict[str, Any]] = []
    for label, fn in (
        (FENCE, sharedmem.full_fence),
        ("os.getppid() system call", os.getppid),
        ("no-op Python call", _nothing),
    ):
        samples = [_per_call_ns(fn, calls) for _ in range(runs)]
        fences.append({"what": label, "median_ns": statistics.median(samples),
                       "min_ns": min(samples), "max_ns": max(samples), "samples": samples})
    return rows, fences


def _suite(params: Params, ctx: Context) -> list[Figure]:
    rows, fences = measure(int(params["runs"]), int(params["round_trips"]), ctx.progress)
    figures = [
        compare(f"{r.scenario}, {r.abi}, batch {r.batch}", "round trips/s",
                {"pvio": r.samples, "UNIX socketpair": r.baseline_samples})
        for r in rows
    ]
    figures.append(compare("one ordering point", "ns per call",
                           {("full_fence (libatomic)" if f["what"] == FENCE else str(f["what"])):
                            f["samples"] for f in fences},
                           higher_is_better=False))
    best = max((r.median for r in rows if r.batch > 1), default=0.0)
    ctx.extra.update(target_round_trips_per_s=TARGET, meets_target=best >= TARGET)
    return figures


SUITE = Benchmark(
    name="ring",
    title="io/ring.h round trips/s, one process, vs a UNIX socketpair",
    run=_suite,
    quick={"runs": 3, "round_trips": 40_000},
    full={"runs": 5, "round_trips": 200_000},
)


@click.command("ring")
@click.option("--runs", default=5, show_default=True, help="Runs per scenario (median).")
@click.option("--round-trips", "total", default=200_000, show_default=True,
              help="Round trips per batched run (unbatched runs do a quarter).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results as JSON to this file.")
def ring(runs: int, total: int, json_path: Path | None) -> None:
    """Round trips per second through an io/ring.h front/back pair in one process."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80
        console = Console(width=max(console.width, 110))
    with console.status("measuring ring round trips..."):
        rows, fences = measure(runs, total)
    table = Table(title=f"pvio.ring round trips/s (median of {runs}; one core, one process)")
    for col in ("ring", "ABI", "batch", "round trips/s", "min..max", "socketpair", "ratio"):
        table.add_column(col, justify="left" if col in ("ring", "ABI") else "right")
    for r in rows:
        table.add_row(r.scenario, r.abi, str(r.batch), f"{r.median:,.0f}",
                      f"{_k(r.low)}..{_k(r.high)}", f"{r.baseline:,.0f}", f"{r.ratio:.2f}")
    console.print(table)
    ftable = Table(title="Cost of one ordering point (ns per call)")
    for col in ("what", "median", "min..max"):
        ftable.add_column(col, justify="left" if col == "what" else "right")
    for f in fences:
        ftable.add_row(str(f["what"]), f"{f['median_ns']:.0f}",
                       f"{f['min_ns']:.0f}..{f['max_ns']:.0f}")
    console.print(ftable)
    best = max((r.median for r in rows if r.batch > 1), default=0.0)
    verdict = "meets" if best >= TARGET else "MISSES"
    console.print(f"batched best {best:,.0f}/s {verdict} the target of {TARGET:,}/s per core")
    if json_path is not None:
        json_path.write_text(json.dumps({
            "benchmark": "ring",
            "runs": runs,
            "round_trips_per_run": total,
            "target": TARGET,
            "meets_target": best >= TARGET,
            "rows": [asdict(r) for r in rows],
            "fences": fences,
        }, indent=2) + "\n")
