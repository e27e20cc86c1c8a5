"""The processes `pvio up` starts: each a `Child` with its log file, started in its own
session (a Ctrl-C on the terminal reaches pvio up only), stopped with SIGTERM and, past a
timeout, SIGKILL.

A stack dies with its toolstack: every child is started with PR_SET_PDEATHSIG = SIGKILL,
so if pvio up itself is killed (SIGKILL, a crash), the kernel kills the hypervisor,
xenstored, every domain and every qemu-nbd it started.  Nothing acknowledged is lost that
way: a domain acknowledges a write only once it is in the image (the page cache)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pvio.abi.native import set_parent_death_signal


class UpError(RuntimeError):
    """pvio up cannot go on; the message says why and what to do."""


def _die_with_parent(parent: int) -> Callable[[], None]:
    def preexec() -> None:  # in the child, between fork and exec
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent:  # pvio up died before the line above: follow it now
            os._exit(1)

    return preexec


@dataclass
class Child:
    """One process pvio up started."""

    name: str
    argv: list[str]
    log_path: Path
    pass_fds: tuple[int, ...] = ()
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    log_file: TextIO | None = None

    async def start(self) -> None:
        self.log_file = open(self.log_path, "a", buffering=1)  # noqa: SIM115 - closed in stop
        self.log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(self.argv)}\n")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=asyncio.subprocess.STDOUT,
            pass_fds=self.pass_fds,
            start_new_session=True,  # a Ctrl-C on the terminal reaches pvio up only
            preexec_fn=_die_with_parent(os.getpid()),
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self.log_file:
            self.log_file.close()
            self.log_file = None
        return self.proc.returncode


def python_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


async def wait_socket(path: Path, child: Child, kind: int = socket.SOCK_STREAM, timeout: float = 15.0) -> None:
    """Wait until `child` accepts connections on `path` (an UpError if it exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.running:
            raise UpError(f"{child.name} exited at start; see {child.log_path}")
        if path.exists():
            with socket.socket(socket.AF_UNIX, kind) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        await asyncio.sleep(0.05)
    raise UpError(f"{child.name} did not open {path} within {timeout:.0f}s; see {child.log_path}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
