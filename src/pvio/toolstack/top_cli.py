"""`pvio top`: xentop's job for a running `pvio up` — every domain and device, live.

A disk's RING column is its ring occupancy at the refresh: slots holding a request that
has no response yet, of the ring's slots (all rings of a multi-queue disk together).

Interactive on a terminal: the screen is redrawn every `--delay` seconds; ``q`` quits,
``s`` sorts by the next column, ``r`` reverses the order (xentop's keys are letters too).
`--batch` prints each refresh as lines, as ``xentop -b`` does, `--iterations N` stops
after N; `--once --json` prints one sample (rates over one `--delay`) for scripts.
The data is `pvio.toolstack.top`'s.
"""

from __future__ import annotations

import json
import os
import select
import sys
import termios
import time
import tty
from pathlib import Path
from typing import Any

import click

from pvio.toolstack.paths import StatePaths, default_state_dir
from pvio.toolstack.top import Sample, rates, sample

#: Columns the domains table can be sorted by (the `s` key cycles through them).
SORT_KEYS = ("name", "cpu_percent", "rss", "pages", "grants_offered", "grants_mapped", "event_channels")

_DOMAIN_COLUMNS = (("NAME", "name", -14), ("ID", "domid", 4), ("ROLE", "role", -15), ("STATE", "state", -9),
                   ("CPU(%)", "cpu_percent", 7), ("MEM(MiB)", "rss", 9), ("PAGES", "pages", 7),
                   ("GRANTS", "grants_offered", 7), ("MAPPED", "grants_mapped", 7),
                   ("EVTCHN", "event_channels", 7))
_DISK_COLUMNS = (("RD_REQ/s", "rd_req"), ("WR_REQ/s", "wr_req"), ("RD_SECT/s", "rd_sect"),
                 ("WR_SECT/s", "wr_sect"), ("ERR/s", "err_req"))
_NET_COLUMNS = (("RX_PKT/s", "rx_packets"), ("TX_PKT/s", "tx_packets"), ("RX_B/s", "rx_bytes"),
                ("TX_B/s", "tx_bytes"), ("DROP/s", "dropped"))
#: The kinds of device shown in the disks' table (the others, but XenStore's, are networks).
DISK_KINDS = ("vbd", "blkfront", "lguest-blk")


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "rss":
        return f"{value / (1 << 20):.1f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def render(view: dict[str, Any], sort: str = "name", reverse: bool = False, width: int = 120) -> list[str]:
    """The tables of one view, as lines."""
    domains = sorted(view["domains"], key=lambda d: (d.get(sort) is None, d.get(sort) or 0)
                     if sort != "name" else str(d["name"]), reverse=reverse)
    lines = [f"pvio top - {time.strftime('%H:%M:%S', time.localtime(view['time']))}  "
             f"{len(view['domains'])} processes, {len(view['devices'])} devices, "
             f"interval {view['interval']:.1f} s, sorted by {sort}{' (reversed)' if reverse else ''}", ""]
    def row(cells: list[str]) -> str:  # a negative width: left-aligned text
        return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, _, w) in zip(cells, _DOMAIN_COLUMNS, strict=True))

    lines.append(row([t for t, _, _ in _DOMAIN_COLUMNS]))
    for d in domains:
        lines.append(row([_cell(k, d.get(k)) for _, k, _ in _DOMAIN_COLUMNS]))
    disks = [v for v in view["devices"] if v["kind"] in DISK_KINDS]
    if disks:
        lines += ["", f"{'DEVICE':<18} {'KIND':<10} {'REQ/s':>8} " + " ".join(f"{t:>9}" for t, _ in _DISK_COLUMNS)
                  + f" {'REQ/BATCH':>9} {'NOTIFY/REQ':>10} {'RING':>9}"]
        for v in disks:
            ps = v["per_second"]
            cells = [ps.get(k, 0.0) if v["kind"] != "blkfront" else None for _, k in _DISK_COLUMNS]
            batch = v.get("requests_per_batch")
            ring = f"{v['ring_in_use']}/{v['ring_slots']}" if "ring_slots" in v else "-"
            lines.append(f"{v['domain'] + ' ' + v['device']:<18} {v['kind']:<10} {v.get('requests', 0.0):>8.1f} "
                         + " ".join(f"{_cell('', x):>9}" for x in cells)
                         + f" {'-' if batch is None else f'{batch:.2f}':>9} {v.get('notify_per_request', 0.0):>10.3f}"
                         + f" {ring:>9}")
    nets = [v for v in view["devices"] if v["kind"] not in DISK_KINDS]
    if nets:
        lines += ["", f"{'DEVICE':<18} {'KIND':<10} " + " ".join(f"{t:>10}" for t, _ in _NET_COLUMNS)]
        for v in nets:
            lines.append(f"{v['domain'] + ' ' + v['device']:<18} {v['kind']:<10} "
                         + " ".join(f"{_cell('', v['per_second'].get(k, 0.0)):>10}" for _, k in _NET_COLUMNS))
    if view["xenstore"]:
        lines += ["", f"{'XENSTORE CONN':<14} {'DOMID':>5} {'REQ/s':>8} {'WATCHES':>8} {'TX':>4}"]
        for c in sorted(view["xenstore"], key=lambda c: (c["domid"], c["conn"])):
            lines.append(f"{c['conn']:<14} {c['domid']:>5} {c['requests_per_second']:>8.1f} "
                         f"{c['watches']:>8} {c['transactions']:>4}")
    return [line[:width] for line in lines]


def _take(paths: StatePaths) -> Sample:
    try:
        return sample(paths)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None


def _interactive(paths: StatePaths, delay: float, sort: str, iterations: int) -> None:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    reverse = False
    before = _take(paths)
    view: dict[str, Any] | None = None
    shown = 0
    try:
        deadline = time.monotonic() + delay
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                key = os.read(fd, 1).lower()
                if key == b"q":
                    return
                if key == b"s":
                    sort = SORT_KEYS[(SORT_KEYS.index(sort) + 1) % len(SORT_KEYS)]
                elif key == b"r":
                    reverse = not reverse
                else:
                    continue
                if view is None:
                    continue  # nothing to draw before the first refresh
            else:
                after = _take(paths)
                view, before = rates(before, after), after
                deadline = time.monotonic() + delay
                shown += 1
            cols = os.get_terminal_size(sys.stdout.fileno()).columns or 120  # a new pty says 0
            sys.stdout.write("\x1b[H\x1b[2J" + "\r\n".join(render(view, sort, reverse, cols)) + "\r\n"
                             "\r\nq quit   s sort   r reverse\r\n")
            sys.stdout.flush()
            if iterations and shown >= iterations:
                return
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@click.command("top")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="pvio up's state directory (default: $XDG_STATE_HOME/pvio or ~/.local/state/pvio).")
@click.option("-d", "--delay", type=click.FloatRange(0.1), default=1.0, show_default=True,
              help="Seconds between refreshes (and the interval rates are measured over).")
@click.option("-b", "--batch", is_flag=True, help="Print each refresh as lines, as xentop -b does.")
@click.option("-i", "--iterations", type=click.IntRange(0), default=0, help="Stop after this many refreshes (0: never).")
@click.option("--once", is_flag=True, help="One sample (rates over one --delay), then exit.")
@click.option("--json", "as_json", is_flag=True, help="With --once or --batch: JSON, one object per refresh.")
@click.option("--sort", type=click.Choice(SORT_KEYS), default="name", show_default=True, help="Sort domains by.")
def top(state_dir: Path | None, delay: float, batch: bool, iterations: int, once: bool, as_json: bool,
        sort: str) -> None:
    """Show a running pvio up's domains and devices live, as xentop shows Xen's."""
    paths = StatePaths((state_dir or default_state_dir()).resolve())
    if once:
        batch, iterations = True, 1
    if not batch and not sys.stdin.isatty():
        raise click.ClickException("not a terminal: use --batch (or --once --json)")
    if not batch:
        _interactive(paths, delay, sort, iterations)
        return
    before = _take(paths)
    shown = 0
    while not iterations or shown < iterations:
        time.sleep(delay)
        after = _take(paths)
        view, before = rates(before, after), after
        shown += 1
        if as_json:
            click.echo(json.dumps(view))
        else:
            click.echo("\n".join(render(view, sort)) + "\n")
