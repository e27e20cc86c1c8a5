"""pvio's end of the C/Python ring tests: the Python twin of tests/c/ring_peer.c.

Request and response contents are functions of a sequence number, built with pvio's blkif
layouts (the C end builds them with blkif.h's structs): a wrong offset on either side
shows up as a bad entry.  Scripts, lockstep and stress loops mirror ring_peer.c step for
step; see the comment at its top for the script language.

Run as a program for the Python end of a two-process stress test:

    python tests/ringpeer.py stress front|back FILE ORDER START COUNT EVIN EVOUT SEED ABI
"""

from __future__ import annotations

import mmap
import os
import select
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

if __name__ == "__main__":  # pragma: no cover - run as a program
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pvio.abi.blkif import ABI_NATIVE, ABI_X86_32_BLKIF, BLKIF_MAX_SEGMENTS_PER_REQUEST, BlkifABI
from pvio.ring import BackRing, FrontRing, SharedRing

WAIT_S = 10.0
M64 = (1 << 64) - 1
ABIS = {abi.name: abi for abi in (ABI_NATIVE, ABI_X86_32_BLKIF)}


class LostWakeup(AssertionError):
    """An end slept through the timeout: a notification was skipped."""


class BadEntry(AssertionError):
    """An entry arrived that is not the one its sequence number says."""


# ---- contents ------------------------------------------------------------------------


def make_request(abi: BlkifABI, seq: int) -> bytes:
    return _make_request(abi.name, seq)


def make_response(abi: BlkifABI, seq: int) -> bytes:
    return _make_response(abi.name, seq)


@lru_cache(maxsize=8192)
def _make_request(abi_name: str, seq: int) -> bytes:
    abi = ABIS[abi_name]
    segs = b"".join(
        abi.segment.pack(
            gref=((seq * 11 + i) * 2654435761) & 0xFFFF_FFFF,
            first_sect=(seq + i) & 7,
            last_sect=7 - ((seq + i) & 3),
        )
        for i in range(BLKIF_MAX_SEGMENTS_PER_REQUEST)
    )
    return abi.request.pack(
        operation=(seq * 7 + 3) & 0xFF,
        nr_segments=seq % 12,
        handle=(seq * 31) & 0xFFFF,
        id=(seq * 0x9E3779B97F4A7C15 + 1) & M64,
        sector_number=((seq << 9) ^ 0x0123456789ABCDEF) & M64,
        seg=segs,
    )


@lru_cache(maxsize=8192)
def _make_response(abi_name: str, seq: int) -> bytes:
    abi = ABIS[abi_name]
    req = abi.request.unpack(make_request(abi, seq))
    return abi.response.pack(id=req["id"], operation=req["operation"], status=seq % 5 - 2)


def check_request(abi: BlkifABI, seq: int, got: bytes) -> None:
    if got != make_request(abi, seq):
        raise BadEntry(f"request {seq}: {got.hex()} != {make_request(abi, seq).hex()}")


def check_response(abi: BlkifABI, seq: int, got: bytes) -> None:
    if got != make_response(abi, seq):
        raise BadEntry(f"response {seq}: {got.hex()} != {make_response(abi, seq).hex()}")


# ---- memory ---------------------------------------------------------------------------


def map_pages(path: Path, order: int, *, scattered: bool) -> list[memoryview]:
    """The ring file's pages, each in its own mapping (scattered) or one mapping."""
    fd = os.open(path, os.O_RDWR)
    try:
        if not scattered:
            return [memoryview(mmap.mmap(fd, 4096 << order))]
        # Map in reverse so page i+1 is not simply after page i in our address space.
        maps = [mmap.mmap(fd, 4096, offset=i * 4096) for i in reversed(range(1 << order))]
        return [memoryview(m) for m in reversed(maps)]
    finally:
        os.close(fd)


# ---- scripts ---------------------------------------------------------------------------


def parse_script(script: str) -> list[tuple[str, int]]:
    steps = []
    for word in script.split():
        if word[0] not in "QPURFtspuf":
            raise ValueError(f"bad step {word!r}")
        steps.append((word[0], int(word[1:] or "0")))
    return steps


@dataclass
class Ends:
    """The Python end(s) of a ring: the front, the back, or both, with sequence counters."""

    abi: BlkifABI
    front: FrontRing | None = None
    back: BackRing | None = None
    front_put: int = 0
    front_got: int = 0
    back_got: int = 0
    back_put: int = 0
    log: list[str] = field(default_factory=list)

    def run_step(self, i: int, op: str, n: int) -> int:
        f, b, abi = self.front, self.back, self.abi
        result = 0
        if op in "QPURF":
            assert f is not None
            if op == "Q":
                k = min(n, f.free_requests())
                reqs = [make_request(abi, self.front_put + j) for j in range(k)]
                result = f.put_requests(reqs)
                self.front_put += result
            elif op == "P":
                result = int(f.push_requests_and_check_notify())
            elif op == "U":
                f.push_requests()
            elif op == "R":
                for rsp in f.take_responses(n):
                    check_response(abi, self.front_got, rsp)
                    self.front_got += 1
                    result += 1
            else:
                result = int(f.final_check_for_responses())
        else:
            assert b is not None
            if op == "t":
                for req in b.take_requests(n):
                    check_request(abi, self.back_got, req)
                    self.back_got += 1
                    result += 1
            elif op == "s":
                k = min(n, b.pending_responses())
                rsps = [make_response(abi, self.back_put + j) for j in range(k)]
                result = b.put_responses(rsps)
                self.back_put += result
            elif op == "p":
                result = int(b.push_responses_and_check_notify())
            elif op == "u":
                b.push_responses()
            else:
                result = int(b.final_check_for_requests())
        self.log.append(f"{i} {op}{n} {result}" if op in "QRts" else f"{i} {op} {result}")
        return result


def run_solo(sring: SharedRing, abi: BlkifABI, start: int, script: str) -> list[str]:
    """Both ends in this process, in script order."""
    ends = Ends(abi, FrontRing.init(sring, start), BackRing(sring, start))
    for i, (op, n) in enumerate(parse_script(script)):
        ends.run_step(i, op, n)
    return ends.log


def _wait_readable(fd: int, what: str) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(WAIT_S * 1000):
        raise LostWakeup(f"nothing on fd {fd} within {WAIT_S} s ({what})")


def run_lockstep(role: str, sring: SharedRing, abi: BlkifABI, start: int, script: str,
                 token_in: int, token_out: int) -> list[str]:
    """One end, passing a token with the other end's process so steps run in order."""
    steps = parse_script(script)
    front = role == "front"
    ends = Ends(abi)
    if front:
        ends.front = FrontRing.init(sring, start)
    else:
        ends.back = BackRing(sring, start)
    holding = front
    if holding and steps and (steps[0][0] in "QPURF") != front:
        os.write(token_out, b"t")
        holding = False
    for i, (op, n) in enumerate(steps):
        if (op in "QPURF") != front:
            continue
        if not holding:
            _wait_readable(token_in, "token")
            os.read(token_in, 1)
            holding = True
        ends.run_step(i, op, n)
        if i + 1 < len(steps) and (steps[i + 1][0] in "QPURF") != front:
            os.write(token_out, b"t")
            holding = False
    return ends.log


# ---- stress: free-running ends over event channels (eventfds) ------------------------


def _kick(fd: int) -> None:
    os.eventfd_write(fd, 1)


def _wait_event(fd: int) -> None:
    _wait_readable(fd, "event channel: lost wake-up")
    os.eventfd_read(fd)


class _Lcg:
    def __init__(self, seed: int) -> None:
        self.state = seed & M64

    def next(self) -> int:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) & M64
        return self.state >> 33


def stress_front(sring: SharedRing, abi: BlkifABI, start: int, count: int, evin: int,
                 evout: int, seed: int) -> tuple[int, int]:
    """Send `count` requests, check every response; (notifies, sleeps)."""
    f = FrontRing.init(sring, start)
    rng = _Lcg(seed)
    put = got = notifies = sleeps = 0
    while got < count:
        burst = 1 + rng.next() % f.nr_ents
        k = min(count - put, burst, f.free_requests())
        if k:
            f.put_requests([make_request(abi, put + j) for j in range(k)])
            put += k
            if f.push_requests_and_check_notify():
                _kick(evout)
                notifies += 1
        rsps = f.take_responses()
        for rsp in rsps:
            check_response(abi, got, rsp)
            got += 1
        if got == count:
            break
        if k or rsps:
            continue
        if put < count and not f.full():
            continue
        if f.final_check_for_responses():
            continue
        sleeps += 1
        _wait_event(evin)
    return notifies, sleeps


def stress_back(sring: SharedRing, abi: BlkifABI, start: int, count: int, evin: int,
                evout: int, seed: int) -> tuple[int, int]:
    """Answer `count` requests, checking each; (notifies, sleeps)."""
    b = BackRing(sring, start)
    rng = _Lcg(seed)
    got = notifies = sleeps = 0
    _wait_event(evin)  # the back connects when the front says the ring is ready
    while got < count:
        burst = 1 + rng.next() % b.nr_ents
        reqs = b.take_requests(burst)
        for req in reqs:
            check_request(abi, got, req)
            got += 1
        if reqs:
            first = got - len(reqs)
            b.put_responses([make_response(abi, first + j) for j in range(len(reqs))])
            if b.push_responses_and_check_notify():
                _kick(evout)
                notifies += 1
        if got == count:
            break
        if reqs:
            continue
        if b.final_check_for_requests():
            continue
        sleeps += 1
        _wait_event(evin)
    return notifies, sleeps


def main(argv: Sequence[str]) -> int:  # pragma: no cover - exercised via subprocess
    if len(argv) != 10 or argv[0] != "stress":
        print(__doc__, file=sys.stderr)
        return 2
    _, role, path, order, start, count, evin, evout, seed, abi_name = argv
    abi = ABIS[abi_name]
    pages = map_pages(Path(path), int(order), scattered=True)
    sring = SharedRing.for_blkif(pages, abi)
    run = stress_front if role == "front" else stress_back
    notifies, sleeps = run(sring, abi, int(start, 0), int(count), int(evin), int(evout),
                           int(seed))
    print(f"{role} done {count} notifies {notifies} sleeps {sleeps}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
