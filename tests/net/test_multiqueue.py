"""Multi-queue vifs, both ends in one process through XenStore, as Linux's xen-netfront and
xen-netback do them: netback offers multi-queue-max-queues; a frontend that wants several
queues writes multi-queue-num-queues and each queue's ring keys under queue-<i>/; frames
cross on every queue both ways; and a frontend asking for 0 queues or more than offered,
or breaking the protocol on one queue, fails its own vif only."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from blk.pair import asynctest
from net.pair import wait_for
from net.test_xenbus import BE1, FE1, World, attach, world
from pvio.abi import netif as n
from pvio.abi.xenbus import XenbusState as S
from pvio.net.keys import KeyValueError, frontend_keys, parse_frontend_rings, parse_num_queues
from pvio.net.multiqueue import flow_key, select_queue
from pvio.net.slots import NetifFatal
from pvio.net.xenbus_frontend import detach_vif

ERR1 = "/local/domain/0/error/backend/vif/1/0/error"


def tcp_frame(sport: int, dport: int = 5201, payload: bytes = b"") -> bytes:
    """An Ethernet + IPv4 + TCP frame of one flow (10.0.0.1:sport -> 10.0.0.2:dport)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0x4000, 64, 6, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, 0x10, 65535, 0, 0)
    return bytes.fromhex("00163e0000020016" "3e0000010800") + ip + tcp + payload


def test_flow_key_and_queue_choice() -> None:
    a, b = tcp_frame(40000, payload=b"x" * 100), tcp_frame(40000, payload=b"y" * 900)
    assert flow_key(a) == flow_key(b) and select_queue(a, 4) == select_queue(b, 4)  # a flow keeps its queue
    assert {select_queue(tcp_frame(p), 2) for p in range(40000, 40032)} == {0, 1}  # flows spread
    assert select_queue(tcp_frame(40000), 1) == 0
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    assert flow_key(arp) == b"" and flow_key(b"short") == b""


def test_keys_of_one_and_of_several_queues() -> None:
    q = [{"tx-ring-ref": str(8 + 2 * i), "rx-ring-ref": str(9 + 2 * i), "event-channel-tx": str(3 + 2 * i),
          "event-channel-rx": str(4 + 2 * i), "request-rx-copy": "1", "feature-sg": "1"} for i in range(2)]
    assert frontend_keys(q[:1]) == q[0]  # one queue: the top-level keys, no count
    keys = frontend_keys(q)
    assert keys["multi-queue-num-queues"] == "2" and "tx-ring-ref" not in keys
    assert keys["queue-1/rx-ring-ref"] == "11" and keys["request-rx-copy"] == "1"
    top = {k: v for k, v in keys.items() if "/" not in k}
    assert parse_num_queues(top) == 2
    rings = [parse_frontend_rings(top, {k.split("/")[1]: v for k, v in keys.items() if k.startswith(f"queue-{i}/")})
             for i in range(2)]
    assert [(r.tx_ring_ref, r.event_channel, r.event_channel_rx, r.sg) for r in rings] == [
        (8, 3, 4, True), (10, 5, 6, True)]
    for bad in ("0", "5", "4294967295", "x"):
        with pytest.raises(KeyValueError, match="multi-queue-num-queues"):
            parse_num_queues({"multi-queue-num-queues": bad})


@pytest.mark.parametrize("want", [2, 4, 6])
@asynctest
async def test_frames_cross_on_every_queue(tmp_path: os.PathLike[str], want: int) -> None:
    async with world(tmp_path) as w:  # type: ignore[arg-type]
        got1: list[bytes] = []
        got2: list[bytes] = []
        v1 = await attach(w, 1, got1, queues=want)
        v2 = await attach(w, 2, got2)  # a single-queue neighbour on the same driver domain
        nq = min(want, 4)
        assert len(v1.fronts) == nq and [f.queue_id for f in v1.fronts] == list(range(nq))
        assert await w.read(f"{FE1}/multi-queue-num-queues") == str(nq)
        assert await w.read(f"{FE1}/tx-ring-ref") is None  # the rings are per queue now
        for i in range(nq):
            for key in ("tx-ring-ref", "rx-ring-ref", "event-channel-tx", "event-channel-rx"):
                assert await w.read(f"{FE1}/queue-{i}/{key}") is not None, (i, key)
        assert await w.read(f"{FE1}/request-rx-copy") == "1"  # features stay at the top
        driver = w.service.devices[BE1].driver
        assert len(driver.queues) == nq and len(w.hosts["vif1.0"].queues) == nq
        # guest 1 -> host -> guest 2, on each of guest 1's queues
        sent = []
        for i, front in enumerate(v1.fronts):
            frame = tcp_frame(41000 + i, payload=os.urandom(3000))
            assert front.send(frame)
            sent.append(frame)
        await wait_for(lambda: len(got2) == nq)
        assert sorted(got2) == sorted(sent)
        assert sorted(w.hosts["vif1.0"].got_queue) == list(range(nq))
        assert [q.stats.tx_frames for q in driver.queues] == [1] * nq
        # guest 2 -> host -> guest 1: flows spread over guest 1's queues, each received
        # on the queue its flow hashed to
        flows = [tcp_frame(42000 + p, payload=os.urandom(1400)) for p in range(32)]
        for frame in flows:
            assert v2.send(frame)
            await asyncio.sleep(0)
        await wait_for(lambda: len(got1) == len(flows))
        assert sorted(got1) == sorted(flows)
        per_queue = [f.stats.rx_frames for f in v1.fronts]
        assert all(per_queue) and sum(per_queue) == len(flows), per_queue
        assert [q.stats.rx_frames for q in driver.queues] == per_queue
        # a big GSO-sized frame on a non-first queue
        big = tcp_frame(41001, payload=os.urandom(30000))
        assert v1.fronts[1].send(big)
        await wait_for(lambda: big in got2)
        await detach_vif(v1)
        await detach_vif(v2)


@asynctest
async def test_reconnection_keeps_the_queues(tmp_path: os.PathLike[str]) -> None:
    async with world(tmp_path) as w:  # type: ignore[arg-type]
        got1: list[bytes] = []
        got2: list[bytes] = []
        v1 = await attach(w, 1, got1, queues=2)
        v2 = await attach(w, 2, got2)
        old = w.service  # the driver domain's netback restarts: netfront renegotiates
        await old.stop()
        from pvio.net.xenbus_backend import NetbackService

        w.service = NetbackService(old.domain, old.xs, old.open_host)
        await w.service.start()
        await wait_for(lambda: v1.driver.connections == 2 and v2.driver.connections == 2)
        assert len(v1.fronts) == 2 and len(w.service.devices[BE1].driver.queues) == 2
        for i, front in enumerate(v1.fronts):
            assert front.send(tcp_frame(43000 + i))
        await wait_for(lambda: len(got2) == 2)
        await detach_vif(v1)
        await detach_vif(v2)


# -- a hostile frontend: its own vif fails, the driver domain's others carry on ----------


async def _until(w: World, path: str, value: str) -> None:
    for _ in range(500):
        if await w.read(path) == value:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{path} never became {value!r}")


async def _publish_by_hand(w: World, asked: str) -> None:
    """Frontend 1 publishes ring keys by hand, asking for `asked` queues."""
    _dom, xs = w.guests[1]
    await _until(w, f"{BE1}/state", str(int(S.InitWait)))  # netback has probed

    async def publish(tx: int) -> None:
        await xs.write(f"{FE1}/multi-queue-num-queues", asked, tx)
        await xs.write(f"{FE1}/request-rx-copy", "1", tx)
        for i in range(2):
            for key, value in (("tx-ring-ref", "8"), ("rx-ring-ref", "9"), ("event-channel", "1")):
                await xs.write(f"{FE1}/queue-{i}/{key}", value, tx)
        await xs.write(f"{FE1}/state", str(int(S.Initialised)), tx)

    await xs.transact(publish)


async def _neighbour_carries_on(w: World) -> None:
    got2: list[bytes] = []
    v2 = await attach(w, 2, got2, queues=2)
    assert len(v2.fronts) == 2 and v2.driver.connected.is_set()
    assert v2.fronts[1].send(tcp_frame(44000))
    await wait_for(lambda: w.hosts["vif2.0"].got_queue == [1])
    await detach_vif(v2)


@pytest.mark.parametrize("asked", ["0", "5", "4294967295"])
@asynctest
async def test_zero_or_too_many_queues_are_refused(tmp_path: os.PathLike[str], asked: str) -> None:
    async with world(tmp_path) as w:  # type: ignore[arg-type]
        await _publish_by_hand(w, asked)
        await _until(w, f"{BE1}/state", str(int(S.Closing)))  # the device failed
        err = await w.read(ERR1)
        assert err is not None and f"guest requested {asked} queues, but valid range is 1 - 4" in err, err
        assert not w.service.devices[BE1].driver.queues
        await _neighbour_carries_on(w)


@asynctest
async def test_a_fatal_frame_on_one_queue_disables_the_whole_vif(tmp_path: os.PathLike[str]) -> None:
    async with world(tmp_path) as w:  # type: ignore[arg-type]
        v1 = await attach(w, 1, [], queues=2)
        driver = w.service.devices[BE1].driver
        front = v1.fronts[1]  # the second queue sends a slot crossing its page
        i = front._tx_free.pop()
        front._tx_busy.add(i)
        assert front._tx is not None
        front._tx.put_requests([n.TX_REQUEST.pack(gref=front._tx_refs[i], offset=4000, flags=0, id=i, size=200)])
        front._push()
        await wait_for(lambda: all(q.disabled is not None for q in driver.queues))
        assert isinstance(driver.queues[1].disabled, NetifFatal)
        assert not any(q.carrier for q in driver.queues)
        await _until(w, f"{BE1}/state", str(int(S.Closing)))
        err = await w.read(ERR1)
        assert err is not None and "vif disabled" in err, err
        await _neighbour_carries_on(w)
