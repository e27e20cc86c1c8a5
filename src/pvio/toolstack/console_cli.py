"""`pvio console NAME`: attach the terminal to a guest's console, lguest or Xen-style.

The guest's Launcher serves the host end of its console on a UNIX socket and names it
in its rendezvous file (``<state_dir>/lguest/<NAME>.launcher.json``, see
`pvio.domains.lguest_launcher`).  On a terminal the session is raw (no ISIG, ICANON or ECHO, as
lguest's Launcher set it, restored on exit) and three ^C within a second quit; with
stdin not a terminal, input passes through as it is, and after the end of input the
command keeps printing the guest's output until it has been quiet for ``--linger``
seconds, so scripts can drive a guest's console through a pipe.

A Xen-style guest's console is a pty served by `pvio xenconsoled`, named in XenStore at
``/local/domain/<domid>/console/tty`` (where `xl console` finds it); the guest's domid
and xenstored's socket come from pvio up's status.  The session is the same.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import termios
import time
from pathlib import Path

import click

from pvio.domains.lguest_settings import launcher_file

CTRL_C = 0x03


def launcher_socket(state_dir: Path, name: str, key: str) -> str:
    """A socket guest `name`'s Launcher names in its rendezvous file (`key`), or ""."""
    path = launcher_file(state_dir, name)
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"no running lguest guest {name!r} under {state_dir} ({path})") from exc
    return str(data.get(key, "")) if isinstance(data, dict) else ""


def console_socket(state_dir: Path, name: str) -> str:
    """The console socket of guest `name`, from its Launcher's rendezvous file."""
    sock = launcher_socket(state_dir, name, "console_socket")
    if not sock:
        raise click.ClickException(f"guest {name!r} has no console")
    if not os.path.exists(sock):
        raise click.ClickException(f"guest {name!r}'s console was unplugged")
    return sock


class PtyConsole:
    """A console pty's slave, with the calls `run_console` makes on a socket."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        except OSError as exc:
            raise click.ClickException(f"cannot open the console at {path}: {exc}") from exc

    def fileno(self) -> int:
        return self.fd

    def recv(self, n: int) -> bytes:
        try:
            return os.read(self.fd, n)
        except OSError:  # EIO: the daemon closed the master (the guest is gone)
            return b""

    def sendall(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        os.close(self.fd)


def xen_console_tty(state_dir: Path, name: str) -> str:
    """The pty of Xen-style guest `name`, from XenStore (pvio up's status says where)."""
    from pvio.toolstack.paths import StatePaths
    from pvio.toolstack.status import load_up_status
    from pvio.xenstore.client import Client

    status = load_up_status(StatePaths(state_dir)) or {}
    domid = next((d.get("domid") for d in status.get("domains", []) if d.get("name") == name), None)
    if domid is None or not status.get("xenstored_path"):
        raise click.ClickException(f"no running guest {name!r} under {state_dir}")
    try:
        with Client(str(status["xenstored_path"]), timeout=5) as xs:
            tty = xs.read(f"/local/domain/{domid}/console/tty").decode()
    except OSError as exc:
        raise click.ClickException(f"guest {name!r} has no console ({exc})") from exc
    if not tty:
        raise click.ClickException(f"guest {name!r}'s console is not served yet")
    return tty


def run_console(sock_path: str, fd_in: int, fd_out: int, *, linger: float = 1.0,
                max_wait: float = 30.0) -> int:
    """Join `fd_in`/`fd_out` to the console socket until quit or end of input."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sock_path)
    except OSError as exc:
        raise click.ClickException(f"cannot reach the console at {sock_path}: {exc}") from exc
    return relay(sock, fd_in, fd_out, linger=linger, max_wait=max_wait)


def relay(sock: socket.socket | PtyConsole, fd_in: int, fd_out: int, *, linger: float = 1.0,
          max_wait: float = 30.0) -> int:
    """Join `fd_in`/`fd_out` to a console (socket or pty) until quit or end of input."""
    tty = os.isatty(fd_in)
    saved = None
    if tty:
        saved = termios.tcgetattr(fd_in)
        raw = termios.tcgetattr(fd_in)
        raw[3] &= ~(termios.ISIG | termios.ICANON | termios.ECHO)
        termios.tcsetattr(fd_in, termios.TCSANOW, raw)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(fd_in, selectors.EVENT_READ, "in")
    ctrl_c: list[float] = []
    eof_at: float | None = None
    last_output = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if eof_at is not None and (now - last_output >= linger or now - eof_at >= max_wait):
                return 0
            for key, _ in sel.select(0.1):
                if key.data == "sock":
                    data = sock.recv(65536)
                    if not data:
                        return 0  # the guest's Launcher went away
                    os.write(fd_out, data)
                    last_output = time.monotonic()
                else:
                    data = os.read(fd_in, 4096)
                    if not data:
                        sel.unregister(fd_in)
                        eof_at = time.monotonic()
                        last_output = eof_at
                        continue
                    if tty:
                        now = time.monotonic()
                        ctrl_c = [t for t in ctrl_c if now - t < 1.0] + [now] * data.count(CTRL_C)
                        if len(ctrl_c) >= 3:
                            return 0
                    sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(fd_in, termios.TCSANOW, saved)
        sel.close()
        sock.close()


@click.command("console")
@click.argument("name")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="pvio up's state directory (default: $XDG_STATE_HOME/pvio or ~/.local/state/pvio).")
@click.option("--linger", type=float, default=1.0, show_default=True,
              help="Without a terminal: after the end of input, exit once output is quiet this long.")
def console(name: str, state_dir: Path | None, linger: float) -> None:
    """Attach the terminal to guest NAME's console, lguest or Xen-style (three ^C quit)."""
    from pvio.toolstack.paths import default_state_dir

    root = state_dir or default_state_dir()
    if not launcher_file(root, name).exists():  # not an lguest guest: a Xen-style one
        pty = PtyConsole(xen_console_tty(root, name))
        sys.exit(relay(pty, sys.stdin.fileno(), sys.stdout.fileno(), linger=linger))
    path = console_socket(root, name)
    sys.exit(run_console(path, sys.stdin.fileno(), sys.stdout.fileno(), linger=linger))
