"""Tracing what happens on the rings and around them, in every process, switched on and
off while the system runs (`pvio trace`).

Theory of operation
-------------------
Each process has one `TRACE`.  A trace point is guarded by one attribute test::

    if TRACE.on:
        TRACE.span("blkback read", "blk", t0, args={"sector": s}, flow=flow_id(...))

so with tracing off a trace point costs a load and a branch.  On, an event is a tuple
appended to a bounded deque (the oldest go first past `MAX_EVENTS`); nothing is written
until the session ends.  Timestamps are CLOCK_MONOTONIC (`time.monotonic_ns`), one clock
for every process on the host, so events from different processes line up.

A session is a file, ``<trace dir>/session.json``, naming it.  Every process that takes
part calls `follow(trace_dir, name)` from a loop it already runs (the domains' status
loop, the daemons' status loop): a new session switches it on; the file gone, it switches
off and writes its events to ``<trace dir>/<session>/<name>-<pid>.json``, which
`pvio trace` gathers and turns into one Chrome/Perfetto trace-event file (`chrome_trace`).

A request's hops are joined by flow events (Chrome's ``s``/``t``/``f`` phases with one id):
`flow_id` derives the id from what both ends of a ring know of a request (the
frontend's domid, the request's id and its first sector), so blkfront and blkback, in
different processes, name the same request the same way; within a process the id rides
in `CURRENT_FLOW` from blkfront to the NBD command that caused it.
"""

from __future__ import annotations

import contextvars
import json
import os
import time
import zlib
from collections import deque
from pathlib import Path
from typing import Any

#: Events one process keeps per session (about 100 bytes each).
MAX_EVENTS = 500_000
SESSION_FILE = "session.json"
#: Where a stack's processes look for the session: ``<state dir>/trace``.
TRACE_DIR = "trace"

#: The flow the current task's request belongs to (set by blkfront, read by its caller).
CURRENT_FLOW: contextvars.ContextVar[int] = contextvars.ContextVar("pvio_trace_flow", default=0)

#: ph, name, cat, ts_ns, dur_ns, args, flow id, flow phase
Event = tuple[str, str, str, int, int, dict[str, Any] | None, int, str]


def flow_id(*key: object) -> int:
    """A flow id both ends of a ring compute alike from what they both know."""
    return zlib.crc32(repr(key).encode()) or 1


class Tracer:
    """One process's recorder (see the module docstring)."""

    def __init__(self) -> None:
        self.on = False
        self.session = ""
        self.events: deque[Event] = deque(maxlen=MAX_EVENTS)
        self.dropped = 0

    def begin(self, session: str) -> None:
        self.session = session
        self.events.clear()
        self.on = True

    def end(self) -> list[Event]:
        self.on = False
        events, self.events = list(self.events), deque(maxlen=MAX_EVENTS)
        return events

    def span(self, name: str, cat: str, start_ns: int, end_ns: int | None = None,
             args: dict[str, Any] | None = None, flow: int = 0, flow_phase: str = "t") -> None:
        """A slice from `start_ns` to `end_ns` (now if None), optionally on a flow."""
        end = time.monotonic_ns() if end_ns is None else end_ns
        self.events.append(("X", name, cat, start_ns, max(0, end - start_ns), args, flow, flow_phase))

    def instant(self, name: str, cat: str, args: dict[str, Any] | None = None, flow: int = 0,
                flow_phase: str = "t") -> None:
        self.events.append(("i", name, cat, time.monotonic_ns(), 0, args, flow, flow_phase))


TRACE = Tracer()


def follow(trace_dir: str | os.PathLike[str] | None, name: str) -> None:
    """Switch this process's tracing on or off as the session file says; on the way off,
    write the events for `pvio trace` to gather.  Cheap: one stat when nothing changes."""
    if not trace_dir:
        return
    session_file = Path(trace_dir) / SESSION_FILE
    try:
        session = json.loads(session_file.read_text()).get("session", "")
    except (OSError, ValueError):
        session = ""
    if session and not TRACE.on:
        TRACE.begin(str(session))
    elif TRACE.on and session != TRACE.session:
        finished = TRACE.session
        events = TRACE.end()
        out = Path(trace_dir) / finished / f"{name}-{os.getpid()}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name("." + out.name)
        tmp.write_text(json.dumps({"name": name, "pid": os.getpid(), "events": events}))
        os.replace(tmp, out)
        if session:
            TRACE.begin(str(session))


def chrome_trace(dumps: list[dict[str, Any]]) -> dict[str, Any]:
    """Chrome's trace-event format (ui.perfetto.dev and chrome://tracing open it): one
    track per process (named), microseconds, flow events joining a request's hops."""
    events: list[dict[str, Any]] = []
    t0 = min((e[3] for d in dumps for e in d["events"]), default=0)
    for d in dumps:
        pid = d["pid"]
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": d["name"]}})
        for ph, name, cat, ts, dur, args, flow, flow_phase in d["events"]:
            us = (ts - t0) / 1000
            event: dict[str, Any] = {"ph": ph, "name": name, "cat": cat, "pid": pid, "tid": 0, "ts": us}
            if ph == "X":
                event["dur"] = dur / 1000
            else:
                event["s"] = "t"
            if args:
                event["args"] = args
            events.append(event)
            if flow:
                f = {"ph": flow_phase, "name": "request", "cat": "flow", "id": flow, "pid": pid, "tid": 0, "ts": us}
                if flow_phase == "f":
                    f["bp"] = "e"  # bind to the enclosing slice
                events.append(f)
    return {"traceEvents": events, "displayTimeUnit": "ms"}
