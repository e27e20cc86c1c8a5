"""`pvio top`'s data: one sample of a running `pvio up`, and the rates between two.

Theory of operation
-------------------
Everything comes from files the stack's processes already rewrite once a second, so
`pvio top` needs no restart and talks to no daemon: ``pvio-up.json`` (the domains and
their devices, as `pvio list` reads it), each domain's status file (blkback's and
blkfront's counters, an lguest guest's network counters), the hypervisor's census
(``--status``: pages, grants offered and mapped, event channels per domain) and
xenstored's (``--status``: connections, watches, transactions, requests), plus
``/proc/<pid>/stat`` for CPU time and resident memory.

A `Sample` holds cumulative counters; `rates(before, after)` turns two samples into
what xentop shows: CPU %, requests and sectors per second, requests per batch,
notifications per request, packets and bytes per second.  Devices the other parts of
pvio add report through the same status files and appear here as they land.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from pvio.jsonfile import read_json
from pvio.toolstack.paths import StatePaths

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_times(pid: int) -> tuple[int, int] | None:
    """(CPU ticks used, resident bytes) of a process, from /proc/<pid>/stat."""
    try:
        raw = open(f"/proc/{pid}/stat", "rb").read()  # noqa: SIM115 - one read
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()  # after "pid (comm) "
    return int(fields[11]) + int(fields[12]), int(fields[21]) * _PAGE


@dataclass
class Sample:
    """Cumulative counters of one moment."""

    time: float
    domains: list[dict[str, Any]] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    xenstore: list[dict[str, Any]] = field(default_factory=list)


def _blkback_devices(status: dict[str, Any], names: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """blkback's counters per vbd (the derived ratios left out: they are recomputed per
    interval), named by the guest and vdev they serve."""
    out = []
    for path, keys in (status.get("statistics") or {}).items():
        counters = {k: float(v) for k, v in keys.items() if not k.endswith("_per_req") and k != "req_per_batch"}
        domain, device = names.get(path, (path, ""))
        out.append({"kind": "vbd", "domain": domain, "device": device, "counters": counters})
    return out


def sample(paths: StatePaths) -> Sample:
    """Read everything once.  Raises FileNotFoundError if no pvio up runs there."""
    up = read_json(paths.up_status)
    if up is None:
        raise FileNotFoundError(f"no pvio up is running with state directory {paths.root}")
    s = Sample(time=time.time())
    census = {d["domid"]: d for d in (read_json(paths.status("hypervisor")) or {}).get("domains", [])}
    disk_owner: dict[str, tuple[str, str]] = {}  # backend path -> (guest, vdev)
    for d in up.get("domains", []):
        for dev in d.get("devices", []):
            if dev.get("type") == "vbd":
                disk_owner[f"/local/domain/0/backend/vbd/{d['domid']}/{dev['devid']}"] = (d["name"], dev["vdev"])
    for d in up.get("domains", []):
        entry: dict[str, Any] = {"name": d["name"], "domid": d["domid"], "role": d["role"],
                                 "pid": d.get("pid"), "state": d.get("state")}
        times = proc_times(d["pid"]) if d.get("pid") else None
        entry["cpu_ticks"], entry["rss"] = times if times else (0, 0)
        held = census.get(d["domid"], {})
        for key in ("pages", "grants_offered", "grants_mapped", "mapped_by_others", "event_channels",
                    "dma_bindings"):
            entry[key] = held.get(key, 0)
        s.domains.append(entry)
        status = read_json(paths.status(d["name"])) or {}
        if d["role"] == "driver":
            s.devices += _blkback_devices(status, disk_owner)
        elif d["role"] == "guest":
            for disk in status.get("disks", []):
                s.devices.append({"kind": "blkfront", "domain": d["name"], "device": disk["vdev"],
                                  "counters": {k: float(v) for k, v in (disk.get("statistics") or {}).items()}})
        elif d["role"] == "lguest-guest":
            net = (status.get("stats") or {}).get("net")
            if net:
                s.devices.append({"kind": "lguest-net", "domain": d["name"], "device": "eth0",
                                  "counters": {k: float(v) for k, v in net.items()}})
    for svc in up.get("services", []):
        times = proc_times(svc["pid"]) if svc.get("pid") else None
        s.domains.append({"name": svc["name"], "domid": None, "role": "service", "pid": svc.get("pid"),
                          "state": "running" if times else "dead",
                          "cpu_ticks": times[0] if times else 0, "rss": times[1] if times else 0})
    xs = read_json(paths.status("xenstored")) or {}
    s.xenstore = list(xs.get("connections", []))
    return s


def _per_second(before: dict[str, float], after: dict[str, float], dt: float) -> dict[str, float]:
    return {k: max(0.0, v - before.get(k, 0.0)) / dt for k, v in after.items()}


def rates(before: Sample, after: Sample) -> dict[str, Any]:
    """What xentop shows, between two samples (per second, and ratios of the deltas)."""
    dt = max(after.time - before.time, 1e-6)
    prev = {(d["role"], d["name"]): d for d in before.domains}
    domains = []
    for d in after.domains:
        p = prev.get((d["role"], d["name"]))
        used = d["cpu_ticks"] - p["cpu_ticks"] if p and p.get("pid") == d.get("pid") else 0
        domains.append({**{k: v for k, v in d.items() if k != "cpu_ticks"},
                        "cpu_percent": round(100.0 * used / _CLK_TCK / dt, 1)})
    prev_dev = {(v["kind"], v["domain"], v["device"]): v["counters"] for v in before.devices}
    devices = []
    for v in after.devices:
        delta = _per_second(prev_dev.get((v["kind"], v["domain"], v["device"]), {}), v["counters"], dt)
        devices.append({"kind": v["kind"], "domain": v["domain"], "device": v["device"],
                        "per_second": {k: round(x, 1) for k, x in delta.items()},
                        **_ratios(v["kind"], delta), "totals": v["counters"]})
    prev_xs = {c["conn"]: c for c in before.xenstore}
    xenstore = []
    for c in after.xenstore:
        p = prev_xs.get(c["conn"], {})
        xenstore.append({**c, "requests_per_second": round(max(0, c["requests"] - p.get("requests", 0)) / dt, 1)})
    return {"time": after.time, "interval": round(dt, 3), "domains": domains, "devices": devices,
            "xenstore": xenstore}


def _ratios(kind: str, d: dict[str, float]) -> dict[str, float]:
    """Per-request ratios of one interval (a disk's batching and notification avoidance)."""
    if kind == "vbd":
        reqs = sum(d.get(k, 0.0) for k in ("rd_req", "wr_req", "f_req", "ds_req", "err_req"))
        return {"requests": round(reqs, 1),
                "requests_per_batch": round(reqs / d["batches"], 2) if d.get("batches") else 0.0,
                "notify_per_request": round(d.get("notify_sent", 0.0) / reqs, 3) if reqs else 0.0}
    if kind == "blkfront":
        reqs = d.get("requests", 0.0)
        return {"requests": round(reqs, 1),
                "notify_per_request": round(d.get("notify_sent", 0.0) / reqs, 3) if reqs else 0.0}
    return {}
