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
frontend's domid, the ring's first grant reference, the request's id and its first
sector; for lguest's block device, the guest's domid and the sector), so blkfront and
blkback, in different processes, name the same request the same way.  Within a process
the ids ride back to the NBD command that caused them in `CURRENT_FLOW`: the command
puts a list there, and every ring request made on its behalf appends its id -- also
from the tasks a large I/O is split into, which share the list (a task copies its
parent's context, and the copy holds the same list).  The command then starts each
flow (``s``) and finishes each (``f``) with its reply: one NBD command of 1 MiB is
eight blkif requests, eight flows.
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

#: The flows the current NBD command's ring requests started (a list the command puts
#: here while tracing; blkfront and the lguest disk append to it).
CURRENT_FLOW: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("pvio_trace_flow", default=None)

#: A flow id, or several (a slice on the path of several requests); 0: none.
Flow = int | list[int]
#: ph, name, cat, ts_ns, dur_ns, args, flow id(s), flow phase
Event = tuple[str, str, str, int, int, dict[str, Any] | None, Flow, str]


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
             args: dict[str, Any] | None = None, flow: Flow = 0, flow_phase: str = "t") -> None:
        """A slice from `start_ns` to `end_ns` (now if None), optionally on a flow."""
        end = time.monotonic_ns() if end_ns is None else end_ns
        self.events.append(("X", name, cat, start_ns, max(0, end - start_ns), args, flow, flow_phase))

    def instant(self, name: str, cat: str, args: dict[str, Any] | None = None, flow: Flow = 0,
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
            for fid in flow if isinstance(flow, list) else (flow,) if flow else ():
                f = {"ph": flow_phase, "name": "request", "cat": "flow", "id": fid, "pid": pid, "tid": 0, "ts": us}
                if flow_phase == "f":
                    f["bp"] = "e"  # bind to the enclosing slice
                events.append(f)
    return {"traceEvents": events, "displayTimeUnit": "ms"}
