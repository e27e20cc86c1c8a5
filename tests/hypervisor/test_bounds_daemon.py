"""The hypervisor daemon at its bounds, as a process: a small RLIMIT_NOFILE, a flood of
allocations, an accept() that fails, memory that runs out."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pvio.abi import grant_table as gt
from pvio.hypervisor import aio, wire
from pvio.hypervisor.accounts import HostLimits
from pvio.hypervisor.client import Domain
from pvio.hypervisor.daemon import HypervisorServer
from pvio.hypervisor.errors import HypercallError
from pvio.hypervisor.wire import Op


class Daemon:
    def __init__(self, proc: subprocess.Popen[str], path: str, log: Path) -> None:
        self.proc = proc
        self.path = path
        self.log = log

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@contextlib.contextmanager
def _daemon(tmp_path: Path, *args: str, nofile: int | None = None) -> Iterator[Daemon]:
    """`pvio hypervisor` as a child, its log in a file; with RLIMIT_NOFILE `nofile`
    (soft and hard, so that it cannot raise it)."""
    path = str(tmp_path / "hv.sock")
    log = tmp_path / "hv.log"

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pvio", "hypervisor", "--socket", path, *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            preexec_fn=limit,
        )
    try:
        assert proc.stdout is not None
        assert "listening" in proc.stdout.readline(), log.read_text()
        yield Daemon(proc, path, log)
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)


async def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _flood_ports(d: Domain, most: int) -> tuple[list[int], int]:
    """alloc_unbound until refused (or `most` ports): the ports, and the refusal's rc."""
    ports: list[int] = []
    for _ in range(most):
        try:
            ports.append(await d.alloc_unbound(0))
        except HypercallError as exc:
            return ports, exc.rc
    return ports, 0


def test_the_next_domain_is_served_when_the_host_is_at_its_bound(tmp_path: Path) -> None:
    """Domains that flood event channels are refused at their share (-EMFILE), then at
    the host's bound (-ENFILE); a domain that comes next still connects, is created and
    served, and gets a port as soon as one is closed."""
    with _daemon(tmp_path, nofile=512) as hv:

        async def body() -> None:
            greedy: list[Domain] = []
            try:
                rc = 0
                while rc != -errno.ENFILE:
                    assert len(greedy) < 40, "no host-wide bound"
                    d = await asyncio.wait_for(aio.connect(hv.path, f"greedy{len(greedy)}", 16), 5)
                    greedy.append(d)
                    _, rc = await _flood_ports(d, 600)
                    assert rc in (-errno.EMFILE, -errno.ENFILE), rc
                assert len(greedy) > 2, "one domain took the host's event channels"
                late = await asyncio.wait_for(aio.connect(hv.path, "late", 16), 5)
                greedy.append(late)
                assert len(await late.alloc_shareable_pages(1)) == 1
                with pytest.raises(HypercallError) as refused:
                    await late.alloc_unbound(0)
                assert refused.value.rc == -errno.ENFILE
                await greedy[0].close()
                greedy.pop(0)
                for _ in range(500):  # the close reaches the daemon a moment later
                    try:
                        await late.alloc_unbound(0)
                        break
                    except HypercallError:
                        await asyncio.sleep(0.01)
                else:
                    raise AssertionError("no port after another domain's ports were closed")
            finally:
                for d in greedy:
                    await d.close()

        asyncio.run(body())
        log = hv.log.read_text()
        assert len(log) < 4096, log[:2000]
        assert "refused:" in log and "event channels are in use" in log


def test_a_flood_of_allocations_leaves_fds_and_rss_bounded(tmp_path: Path) -> None:
    """One guest allocating ports and shareable frames until refused: the daemon holds
    at most the guest's share of descriptors, and its RSS grows by less than 32 MiB."""
    with _daemon(tmp_path) as hv:

        async def body() -> None:
            d = await aio.connect(hv.path, "flood", 16)
            try:
                fds0, rss0 = hv.fds(), hv.rss_kib()
                _, rc = await _flood_ports(d, 5000)
                assert rc in (-errno.ENOSPC, -errno.EMFILE), rc
                for _ in range(300):
                    try:
                        await d.alloc_shareable_pages(1)
                    except HypercallError as exc:
                        assert exc.rc in (-errno.ENOSPC, -errno.EMFILE)
                        break
                grown = hv.fds() - fds0
                nofile = int(Path(f"/proc/{hv.proc.pid}/limits").read_text().split("Max open files")[1].split()[0])
                share = (nofile - 64 - min(1024, nofile // 8) - nofile // 8 - 2 * min(1024, nofile // 8)) // 16
                assert grown <= min(share, 1023 + 256) + 8, (grown, share)
                assert hv.rss_kib() - rss0 < 32 * 1024
            finally:
                await d.close()

        asyncio.run(body())


def test_memory_past_max_memory_is_refused_with_enomem(tmp_path: Path) -> None:
    with _daemon(tmp_path, "--max-memory", "64M") as hv:

        async def body() -> None:
            a = await aio.connect(hv.path, "a", 9000)
            try:
                with pytest.raises(HypercallError) as refused:
                    await aio.connect(hv.path, "b", 9000)
                assert refused.value.rc == -errno.ENOMEM and "--max-memory" in str(refused.value)
            finally:
                await a.close()
            # Its pages are given back when it goes.
            for _ in range(100):
                try:
                    b = await aio.connect(hv.path, "b", 9000)
                    break
                except HypercallError:
                    await asyncio.sleep(0.01)
            else:
                raise AssertionError("a's pages were not given back")
            await b.close()

        asyncio.run(body())
        log = hv.log.read_text()
        assert "'b': 9064 pages asked, 7320 of the host's 16384 left to promise" in log
        assert log.count("\n") == 1, log


_QUERY_SIZE = Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_query_size, 1, gt.GNTTAB_QUERY_SIZE.pack(dom=gt.DOMID_SELF))


def _head(log: Path) -> str:
    with log.open() as f:
        return f.read(4096)


def _lowest_free_fd(pid: int) -> int:
    used = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(used) + 1)) - used)


def test_accept_out_of_descriptors_backs_off_and_logs_once(tmp_path: Path) -> None:
    """The daemon's descriptor table is made full from outside (its soft RLIMIT_NOFILE
    lowered to its lowest free descriptor): a new domain's accept() fails with EMFILE on
    a level-triggered listener.  The daemon logs it once, not per attempt; once there is
    room again the waiting domain is accepted and created."""
    with _daemon(tmp_path) as hv:
        soft, hard = resource.prlimit(hv.proc.pid, resource.RLIMIT_NOFILE)

        async def body() -> None:
            first = await aio.connect(hv.path, "first", 16)
            try:
                # One more round trip: the daemon has closed the descriptors it sent.
                await first.hypercall([_QUERY_SIZE])
                resource.prlimit(hv.proc.pid, resource.RLIMIT_NOFILE, (_lowest_free_fd(hv.proc.pid), hard))
                late = asyncio.ensure_future(aio.connect(hv.path, "late", 16))
                await _wait_for(lambda: "accept" in _head(hv.log), "the accept failure to be logged")
                # Half a second of a listener that stays readable: without the back-off
                # this is hundreds of thousands of failed accepts, each logged.
                await asyncio.sleep(0.5)
                assert not late.done()
                size = hv.log.stat().st_size
                resource.prlimit(hv.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
                d = await asyncio.wait_for(late, 5)
                await d.close()
            finally:
                await first.close()
            assert size < 1024, _head(hv.log)

        asyncio.run(body())
        log = hv.log.read_text()
        assert log.count("accept: ") == 1 and "Too many open files" in log, log[:2000]
        assert "accepting again" in log


def test_a_connection_past_the_cap_is_answered_ebusy(tmp_path: Path) -> None:
    async def body() -> None:
        path = str(tmp_path / "hv.sock")
        server = HypervisorServer(path, HostLimits(max_connections=2))
        await server.start()
        domains = [await aio.connect(path, f"d{i}", 16) for i in range(2)]
        try:
            with pytest.raises(HypercallError) as refused:
                await asyncio.wait_for(aio.connect(path, "third", 16), 5)
            assert refused.value.rc == -errno.EBUSY
            await domains.pop().close()
            await _wait_for(lambda: len(server.hv.domains) == 1, "the domain to go")
            domains.append(await aio.connect(path, "third", 16))
        finally:
            for d in domains:
                await d.close()
            await server.stop()

    asyncio.run(body())
