"""`pvio trace`'s flows through a vbd with several rings and indirect requests: every
blkif request an NBD command is split into is a flow of its own, started by the command
and finished by its reply, with its hops in blkfront and blkback in between — both
ends naming it alike on whichever ring it took."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from blk.pair import asynctest, make_image
from blk.test_xenbus import world
from pvio.domains.xen_guest import attach_disk, detach_disk, export_disk
from pvio.nbd.client_asyncio import NbdClient
from pvio.trace import TRACE, chrome_trace
from trace_check import unpaired_steps, valid

MIB = 1 << 20


@asynctest
async def test_large_requests_on_several_rings_pair_up(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 16 * MIB, fill=False)
    async with world(tmp_path, img) as w:
        d = await attach_disk(w.gdom, w.gxs, "xvda", 51712, queues=3, ring_order=0)
        assert len(d.front.queues) == 3 and d.front.max_request_bytes < MIB  # 1 MiB: several requests
        await export_disk(d, str(tmp_path / "nbd.sock"))
        assert not TRACE.on
        TRACE.begin("test")
        try:
            async with await NbdClient.connect(d.nbd_uri) as c:
                blocks = [os.urandom(MIB) for _ in range(8)]  # more requests than one ring holds
                await asyncio.gather(*(c.write(i * MIB, b) for i, b in enumerate(blocks)),
                                     c.write(12 * MIB + 4096, b"s" * 4096))  # and a small one among them
                got = await asyncio.gather(*(c.read(i * MIB, MIB) for i in range(8)))
                assert got == blocks
        finally:
            events = TRACE.end()
        await detach_disk(d)
    trace = chrome_trace([{"name": "guest and driver", "pid": 1, "events": events}])
    valid(trace)
    lost, checked = unpaired_steps(trace, margin_us=0)
    assert not lost and checked, (lost[:5], checked)
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    starts: dict[float, list[int]] = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "s":
            starts.setdefault(e["ts"], []).append(e["id"])
    per_request = d.front.max_request_bytes
    for cmd in (e for e in slices if e["name"] in ("nbd NBD_CMD_WRITE", "nbd NBD_CMD_READ")):
        # one flow per blkif request the command became, all started at the command
        assert len(starts[cmd["ts"]]) == -(-cmd["args"]["length"] // per_request), cmd
    def key(e: dict[str, object]) -> tuple[str, object]:  # "blkfront BLKIF_OP_READ", "blkback read"
        return str(e["name"]).split()[-1].removeprefix("BLKIF_OP_").lower(), e["args"]["sector"]  # type: ignore[index]

    front = {key(e): e for e in slices if e["name"].startswith("blkfront")}
    back = [e for e in slices if e["name"].startswith("blkback")]
    assert len(front) == len(back) == 2 * 8 * (MIB // per_request) + 1
    assert max(e["args"]["bytes"] for e in front.values()) > 11 * 4096  # indirect requests
    assert len({e["args"]["queue"] for e in front.values()}) > 1  # on more than one ring
    flow_of = {(e["pid"], e["ts"]): e["id"] for e in trace["traceEvents"] if e["ph"] == "t"}
    for b in back:  # blkback's hop is on the flow blkfront started for the same request
        f = front[key(b)]
        assert flow_of[(b["pid"], b["ts"])] == flow_of[(f["pid"], f["ts"])], (b, f)
