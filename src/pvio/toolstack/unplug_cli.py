"""`pvio unplug NAME DEVICE`: take a device away from a running lguest guest.

The guest's Launcher takes requests on a UNIX socket named in its rendezvous file
(``control_socket`` in ``<state_dir>/lguest/<NAME>.launcher.json``, see
`pvio.domains.lguest_launcher`): one JSON line ``{"unplug": DEVICE}``, answered by one JSON line
once the guest has acknowledged (REMOVED_ACK) or the Launcher gave up waiting.  Exit 0
when the device is gone, 1 with the Launcher's reason when it is not.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import click

from pvio.toolstack.console_cli import launcher_socket

DEVICES = ("console", "block", "net")


def control_socket_of(state_dir: Path, name: str) -> str:
    sock = launcher_socket(state_dir, name, "control_socket")
    if not sock:
        raise click.ClickException(f"guest {name!r}'s Launcher takes no requests")
    return sock


def request(sock_path: str, message: dict[str, object], timeout: float) -> dict[str, object]:
    """One request to a Launcher's control socket and its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(sock_path)
            sock.sendall(json.dumps(message).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except OSError as exc:
            raise click.ClickException(f"cannot reach the Launcher at {sock_path}: {exc}") from exc
    try:
        answer = json.loads(reply)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"the Launcher answered {reply[:200]!r}") from exc
    if not isinstance(answer, dict):
        raise click.ClickException(f"the Launcher answered {answer!r}")
    return answer


@click.command("unplug")
@click.argument("name")
@click.argument("device", type=click.Choice(DEVICES))
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="pvio up's state directory (default: $XDG_STATE_HOME/pvio or ~/.local/state/pvio).")
def unplug(name: str, device: str, state_dir: Path | None) -> None:
    """Unplug DEVICE (console, block or net) from lguest guest NAME.

    The Launcher marks it REMOVED; the guest stops using it (its TAP interface, NBD
    export or shell goes) and answers REMOVED_ACK; then the Launcher stops serving it.
    """
    from pvio.toolstack.paths import default_state_dir

    sock = control_socket_of(state_dir or default_state_dir(), name)
    answer = request(sock, {"unplug": device}, timeout=30.0)
    if not answer.get("ok"):
        raise click.ClickException(str(answer.get("error", answer)))
    click.echo(f"{name}: {device} device (index {answer.get('index')}) removed")
