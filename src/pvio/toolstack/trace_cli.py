"""`pvio trace`: record what a running `pvio up` does for a few seconds, in every process,
as one Chrome/Perfetto trace (`pvio.trace`), with a summary per hop and, if asked, a
picture of one request's life across the processes.

It writes the session file every process of the stack watches (``<state>/trace/
session.json``), waits, removes it, and gathers the events each process then writes.  A
process notices within its status interval (a second), so each track starts and ends
within a second of the others.  Nothing needs restarting; with no session, tracing is
off and costs one attribute test per trace point.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import click

from pvio.jsonfile import read_json, write_json
from pvio.toolstack.paths import StatePaths, default_state_dir
from pvio.trace import SESSION_FILE, TRACE_DIR, chrome_trace

#: How long processes may take to notice the session's end and write their events.
GATHER_TIMEOUT = 10.0
#: How long a process may take to notice a session (its status interval, a second).
NOTICE = 1.0


def expected(up: dict[str, Any]) -> set[str]:
    """The processes that take part: every domain and the two services."""
    names = {d["name"] for d in up.get("domains", []) if d.get("state") == "running"}
    return names | {s["name"] for s in up.get("services", []) if s["name"] in ("hypervisor", "xenstored")}


def begin(paths: StatePaths) -> tuple[str, dict[str, Any]]:
    """Open a session on the stack at `paths`: its name, and the stack's status then.
    Each process switches on within its status interval (`NOTICE`)."""
    up = read_json(paths.up_status)
    if up is None:
        raise click.ClickException(f"no pvio up is running with state directory {paths.root}")
    session = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    write_json(paths.root / TRACE_DIR / SESSION_FILE, {"session": session})
    return session, up


def end(paths: StatePaths, session: str, up: dict[str, Any]) -> tuple[list[dict[str, Any]], set[str]]:
    """Close the session: the processes' dumps, and the names that never wrote one."""
    trace_dir = paths.root / TRACE_DIR
    (trace_dir / SESSION_FILE).unlink(missing_ok=True)
    want = expected(up)
    out = trace_dir / session
    deadline = time.monotonic() + GATHER_TIMEOUT
    while True:
        dumps = _dumps(out)
        missing = want - {d["name"] for d in dumps}
        if not missing or time.monotonic() > deadline:
            return dumps, missing
        time.sleep(0.1)


def _dumps(out: Path) -> list[dict[str, Any]]:
    """The dumps written so far: not the hidden files a process is still writing (it
    renames each into place when it is whole)."""
    if not out.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if not p.name.startswith(".")]


def record(paths: StatePaths, seconds: float) -> tuple[list[dict[str, Any]], set[str]]:
    """Run one session; the processes' dumps, and the names that never wrote one."""
    session, up = begin(paths)
    try:
        time.sleep(seconds + NOTICE)  # + the time each process may take to notice
    except BaseException:
        (paths.root / TRACE_DIR / SESSION_FILE).unlink(missing_ok=True)  # off, without waiting
        raise
    return end(paths, session, up)


def summary(trace: dict[str, Any]) -> list[str]:
    """Per hop (a slice's name): count, median and p99 duration in microseconds."""
    durations: dict[str, list[float]] = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            durations.setdefault(e["name"], []).append(e["dur"])
    lines = [f"{'hop':<44} {'count':>8} {'median µs':>10} {'p99 µs':>10}"]
    for name, ds in sorted(durations.items(), key=lambda kv: -len(kv[1])):
        ds.sort()
        p99 = ds[min(len(ds) - 1, int(len(ds) * 0.99))]
        lines.append(f"{name[:44]:<44} {len(ds):>8} {statistics.median(ds):>10.1f} {p99:>10.1f}")
    return lines


def one_request(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The hops of a typical request (of those that cross the most processes, the one of
    median length): a flow from its start
    (``s``) to its finish (``f``), each hop the slice its flow event is bound to.  Ids are
    reused by later requests (a ring's request ids are), so a flow is cut at each start."""
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    slices = {(e["pid"], e["ts"]): e for e in trace["traceEvents"] if e["ph"] == "X"}
    by_id: dict[int, list[dict[str, Any]]] = {}
    for e in trace["traceEvents"]:
        if e.get("cat") == "flow":
            by_id.setdefault(e["id"], []).append(e)
    requests: list[list[dict[str, Any]]] = []
    for events in by_id.values():
        current: list[dict[str, Any]] | None = None
        for e in sorted(events, key=lambda e: e["ts"]):
            if e["ph"] == "s":
                current = []
                requests.append(current)
            if current is not None and (e["pid"], e["ts"]) in slices:
                current.append({**slices[(e["pid"], e["ts"])], "process": names.get(e["pid"])})
            if e["ph"] == "f":
                current = None
    requests = [r for r in requests if r]
    if not requests:
        return []

    def reach(hops: list[dict[str, Any]]) -> tuple[int, int]:
        return len({h["pid"] for h in hops}), len(hops)

    widest = max(reach(r) for r in requests)

    def length(hops: list[dict[str, Any]]) -> float:
        return float(max(h["ts"] + h["dur"] for h in hops) - min(h["ts"] for h in hops))

    typical = sorted((r for r in requests if reach(r) == widest), key=length)  # the median one
    return sorted(typical[len(typical) // 2], key=lambda h: h["ts"])


def plot(hops: list[dict[str, Any]], path: Path) -> None:
    """One request's life as a timeline: a row per process, a bar per hop."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException("--plot needs matplotlib (pip install 'pvio[bench]')") from None
    t0 = hops[0]["ts"]
    rows = list(dict.fromkeys(h["process"] for h in hops))
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(rows)))
    for h in hops:
        y = rows.index(h["process"])
        ax.barh(y, max(h["dur"], 0.5), left=h["ts"] - t0, height=0.5)
        ax.text(h["ts"] - t0, y - 0.3 + 0.25 * (hops.index(h) % 3), f"{h['name']} ({h['dur']:.0f} µs)",
                fontsize=8)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlabel("µs since the request arrived")
    total = max(h["ts"] + h["dur"] for h in hops) - t0
    ax.set_title(f"one request's life across pvio's processes ({total:.0f} µs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command("trace")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="pvio up's state directory (default: $XDG_STATE_HOME/pvio or ~/.local/state/pvio).")
@click.option("--seconds", type=click.FloatRange(0.1, 600), default=5.0, show_default=True,
              help="How long to record.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("trace.json"),
              show_default=True, help="The Chrome/Perfetto trace-event file (open it at ui.perfetto.dev).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw one request's life across the processes as a PNG.")
def trace(state_dir: Path | None, seconds: float, output: Path, plot_path: Path | None) -> None:
    """Record every process of a running pvio up for SECONDS: rings, grants, notifies,
    XenBus, NBD; write a Chrome/Perfetto trace and print the time per hop."""
    paths = StatePaths((state_dir or default_state_dir()).resolve())
    dumps, missing = record(paths, seconds)
    result = chrome_trace(dumps)
    output.write_text(json.dumps(result))
    events = sum(len(d["events"]) for d in dumps)
    click.echo(f"{output}: {events} events from {len(dumps)} processes"
               + (f" (no events from: {', '.join(sorted(missing))})" if missing else ""))
    click.echo("\n".join(summary(result)))
    if plot_path is not None:
        hops = one_request(result)
        if not hops:
            raise click.ClickException("no request crossed the processes while recording (is anything doing I/O?)")
        plot(hops, plot_path)
        click.echo(f"{plot_path}: one request, {len(hops)} hops in {len({h['pid'] for h in hops})} processes")
