"""`Acceptor`: a listener whose accept() fails for want of descriptors backs off, logs
once, and accepts the waiting connection when there is room again."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
from pathlib import Path

import pytest

from pvio.hypervisor.listener import MAX_DELAY, Acceptor


def _lowest_free_fd() -> int:
    fd = os.dup(0)  # the kernel gives the lowest free number
    os.close(fd)
    return fd


def test_accept_out_of_descriptors_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="test.listener")
    log = logging.getLogger("test.listener")

    async def body() -> None:
        accepted: list[socket.socket] = []
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = str(tmp_path / "l.sock")
        listener.bind(path)
        listener.listen(4)
        acceptor = Acceptor(listener, accepted.append, log, "test")
        acceptor.start()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))
            client.connect(path)  # waits in the backlog; accept() has no descriptor for it
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while acceptor.failures < 5:  # it did fail, and retried, with back-off
                assert loop.time() < deadline, "accept() never failed"
                await asyncio.sleep(0.01)
            assert not accepted
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        try:
            deadline = asyncio.get_running_loop().time() + MAX_DELAY + 5
            while not accepted:
                assert asyncio.get_running_loop().time() < deadline, "not accepted once there was room"
                await asyncio.sleep(0.01)
            assert acceptor.failures == 0
        finally:
            acceptor.stop()
            for s in (*accepted, client, listener):
                s.close()

    asyncio.run(body())
    lines = [r.getMessage() for r in caplog.records if r.name == "test.listener"]
    assert len(lines) == 2, lines
    assert "Too many open files" in lines[0] and "accepting again" in lines[1]
