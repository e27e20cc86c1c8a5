"""Checks of a `pvio trace` output: the trace-event format's required fields, and flow
events that pair up (each request's hops between the start and the finish of its flow)."""

from __future__ import annotations

from typing import Any

#: What every event of Chrome's trace-event format carries (besides ``ts``, which the
#: metadata events may leave out).
REQUIRED = {"ph", "name", "pid", "tid"}


def valid(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The trace-event format's required fields, and no flow finished before it started."""
    events = trace["traceEvents"]
    assert isinstance(events, list) and events
    open_flows: dict[object, int] = {}
    for e in sorted((e for e in events if e["ph"] != "M"), key=lambda e: e["ts"]):
        assert set(e) >= REQUIRED and isinstance(e["ts"], float | int), e
        if e["ph"] == "X":
            assert e["dur"] >= 0, e
        if e["ph"] == "s":
            open_flows[e["id"]] = open_flows.get(e["id"], 0) + 1
        elif e["ph"] == "f":
            assert open_flows.get(e["id"], 0) > 0, f"flow {e['id']} finished before it started"
            open_flows[e["id"]] -= 1
    for e in events:
        if e["ph"] == "M":
            assert e["name"] == "process_name" and e["args"]["name"], e
    return events


def unpaired_steps(trace: dict[str, Any], margin_us: float = 500_000.0) -> tuple[list[dict[str, Any]], int]:
    """The flow steps (``t``) that lie in no start..finish of their flow, and how many
    steps were checked.  Only steps well inside the time every process with flow events
    was recording are checked (`margin_us` from either edge): a request begun before a
    process switched on, or finished after it switched off, is cut by the session."""
    flows = [e for e in trace["traceEvents"] if e.get("cat") == "flow"]
    spans: dict[int, tuple[float, float]] = {}
    for e in flows:
        lo, hi = spans.get(e["pid"], (e["ts"], e["ts"]))
        spans[e["pid"]] = (min(lo, e["ts"]), max(hi, e["ts"]))
    if not spans:
        return [], 0
    start = max(lo for lo, _ in spans.values()) + margin_us
    end = min(hi for _, hi in spans.values()) - margin_us
    intervals: dict[int, list[tuple[float, float]]] = {}
    begun: dict[int, list[float]] = {}
    for e in sorted(flows, key=lambda e: (e["ts"], e["ph"] != "s")):
        if e["ph"] == "s":
            begun.setdefault(e["id"], []).append(e["ts"])
        elif e["ph"] == "f" and begun.get(e["id"]):
            intervals.setdefault(e["id"], []).append((begun[e["id"]].pop(0), e["ts"]))
    checked = [e for e in flows if e["ph"] == "t" and start <= e["ts"] <= end]
    lost = [e for e in checked
            if not any(lo <= e["ts"] <= hi for lo, hi in intervals.get(e["id"], []))]
    return lost, len(checked)
