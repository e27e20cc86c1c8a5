"""The guest's console end: a shell on a pty behind the guest driver.  (The user's end,
`pvio console` with raw mode and three ^C, is tested against real processes in
test_lguest_processes.py.)"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
from collections.abc import Sequence

import pytest

from pvio.domains.console import PtyShell
from pvio.domains.tap import netns_name, remove_namespace
from pvio.lguest.console import CONSOLE_BUFFER
from pvio.testing.lguest_world import LguestWorld, build_guest


async def _session(argv: Sequence[str], script: bytes, want: re.Pattern[bytes],
                   *, timeout: float = 20) -> bytes:
    """`script` typed into the guest's console (the Launcher's end: the device's input,
    256 bytes at a time as the guest frees its buffer), the shell's output taken there."""
    rig = build_guest(LguestWorld(), "c")
    assert rig.console is not None and rig.console_device is not None
    device = rig.console_device
    loop = asyncio.get_running_loop()
    console = rig.console
    pending = bytearray(script)
    got = bytearray()

    def type_in() -> None:
        while pending:
            n = device.input(rig.launcher.port, bytes(pending[:CONSOLE_BUFFER]))
            if n == 0:
                break  # the guest's buffer is busy: again once it has read it
            del pending[:n]
            rig.run_interrupts()  # the console driver reads its buffer and frees it
            shell.write(console.take_input())  # what the guest received, to its shell

    def output(data: bytes) -> None:  # the shell's output: sent by the guest's driver
        console.put_chars(data)
        got.extend(device.take_output())

    shell = PtyShell(argv, output)
    try:
        shell.start(loop)
        deadline = loop.time() + timeout
        while not want.search(got):
            assert loop.time() < deadline, bytes(got)
            type_in()
            await asyncio.sleep(0.02)
    finally:
        shell.stop()
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
