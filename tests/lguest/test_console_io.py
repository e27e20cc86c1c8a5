"""The console's real ends: a shell on a pty behind the guest driver, fds behind the Launcher."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
from collections.abc import Sequence

import pytest

from pvio.domains.console import ConsoleTerminal, GuestShell
from pvio.domains.tap import netns_name, remove_namespace
from pvio.testing.lguest_world import LguestWorld, build_guest


async def _session(argv: Sequence[str], script: bytes, want: re.Pattern[bytes],
                   *, timeout: float = 20) -> bytes:
    rig = build_guest(LguestWorld(), "c")
    assert rig.console is not None and rig.console_device is not None
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    loop = asyncio.get_running_loop()
    shell = GuestShell(rig.console, argv)
    terminal = ConsoleTerminal(rig.console_device, rig.launcher.port, in_r, out_w)

    def guest_sees_input() -> None:
        rig.run_interrupts()  # the console driver reads its buffer and frees it
        shell.feed()

    terminal.on_input = guest_sees_input
    shell.on_output = terminal.flush_output
    got = bytearray()
    try:
        shell.start(loop)
        terminal.start(loop)
        os.write(in_w, script)
        os.set_blocking(out_r, False)
        deadline = loop.time() + timeout
        while not want.search(got):
            assert loop.time() < deadline, bytes(got)
            await asyncio.sleep(0.02)
            try:
                got += os.read(out_r, 65536)
            except BlockingIOError:
                pass
    finally:
        terminal.stop()
        shell.stop()
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
    assert shell.process is not None and shell.process.poll() is not None
    return bytes(got)


def test_a_shell_behind_the_guest_console() -> None:
    out = asyncio.run(_session(["sh"], b"echo pvio-$((6*7))\n", re.compile(rb"pvio-42\r?\n")))
    assert b"pvio-42" in out


def test_input_larger_than_the_guest_buffer_arrives_whole() -> None:
    lines = b"".join(b"x" * 99 + b"\n" for _ in range(10))  # 1000 bytes, > 256
    script = b"head -c 1000 | wc -c\n" + lines
    done = re.compile(rb"(?m)(?:^|# |\$ )\s*1000\r?$")  # wc's answer, after any prompt
    out = asyncio.run(_session(["sh"], script, done))
    assert done.search(out)


@pytest.mark.root
def test_the_shell_runs_in_the_guests_namespace() -> None:
    if os.geteuid() != 0:
        raise AssertionError("namespace tests need root")
    ns = netns_name(f"c-{secrets.token_hex(3)}")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        out = asyncio.run(_session(["ip", "netns", "exec", ns, "sh"],
                                   b"echo NS=$(ip netns identify $$)\n",
                                   re.compile(rb"NS=" + ns.encode())))
        assert f"NS={ns}".encode() in out
    finally:
        remove_namespace(ns)


def test_terminal_raw_mode_is_restored_and_three_ctrl_c_quit() -> None:
    import termios

    rig = build_guest(LguestWorld(), "t")
    assert rig.console_device is not None
    master, slave = os.openpty()
    out_r, out_w = os.pipe()
    before = termios.tcgetattr(slave)
    quits: list[bool] = []

    async def run() -> None:
        assert rig.console_device is not None
        term = ConsoleTerminal(rig.console_device, rig.launcher.port, slave, out_w,
                               on_quit=lambda: quits.append(True))
        term.start(asyncio.get_running_loop())
        try:
            raw = termios.tcgetattr(slave)
            assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
            os.write(master, b"ab\x03")
            deadline = asyncio.get_running_loop().time() + 5
            while rig.console_device.stats.input_bytes < 3:  # one ^C, read and passed on
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            assert not quits
            os.write(master, b"\x03\x03")
            for _ in range(100):
                if quits:
                    break
                await asyncio.sleep(0.01)
            assert quits
        finally:
            term.stop()

    try:
        asyncio.run(asyncio.wait_for(run(), 10))
        assert termios.tcgetattr(slave) == before
        # "ab^C" reached the guest before the quit.
        assert rig.console_device.stats.input_bytes == 3
    finally:
        for fd in (master, slave, out_r, out_w):
            os.close(fd)
