"""Disks at run time between real processes: `pvio block-*` against a running `pvio up`.

pvio up runs its hypervisor, xenstored, driver domain and guest; the commands run as
separate processes, write XenStore as libxl does, and the guest and the driver domain
react: a disk appears with its NBD export, grows, is refused removal while a client
uses it, and goes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvio.nbd.client_asyncio import NbdClient
from pvioup import PvioUp

MiB = 1 << 20


def pvio(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pvio", *args, "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60)


def listed_vbds(state: Path) -> dict[str, str | None]:
    """vdev -> how it came (None: with pvio up) of the guest's vbds in `pvio list --json`."""
    r = pvio(state, "list", "--json")
    assert r.returncode == 0, r.stderr
    guest = next(d for d in json.loads(r.stdout)["domains"] if d["name"] == "guest1")
    return {dev["vdev"]: dev.get("attached") for dev in guest["devices"] if dev["type"] == "vbd"}


@pytest.fixture
def up(tmp_path: Path) -> Iterator[PvioUp]:
    p = PvioUp(tmp_path / "state", "--disk", f"format=raw, vdev=xvda, access=rw, size=16M, target={tmp_path / 'a.img'}")
    with p.serving():
        yield p


def test_attach_resize_detach(up: PvioUp, tmp_path: Path) -> None:
    state = up.state_dir
    img = tmp_path / "b.img"
    r = pvio(state, "block-attach", "guest1", f"format=raw, vdev=xvdb, access=rw, size=8M, sector-size=4096, target={img}")
    assert r.returncode == 0, r.stderr + up.output()
    uri = r.stdout.strip().rsplit(" ", 1)[-1]
    assert uri.startswith("nbd+unix://") and img.stat().st_size == 8 * MiB
    again = pvio(state, "block-attach", "guest1", f"vdev=xvdb, target={img}")
    assert again.returncode != 0 and "already has" in again.stderr

    listed = pvio(state, "block-list", "guest1")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[1]: line for line in listed.stdout.splitlines()[1:]}
    assert set(rows) == {"xvda", "xvdb"} and " 4096 " in rows["xvdb"] and uri in rows["xvdb"]
    assert listed_vbds(state) == {"xvda": None, "xvdb": "run time"}  # pvio list shows it too
    assert uri in pvio(state, "list").stdout

    data = os.urandom(3 * MiB)

    async def use() -> None:
        c = await NbdClient.connect(uri)
        try:
            assert c.info.size == 8 * MiB and c.info.min_block == 4096
            await c.write(MiB + 4096, data)
            await c.flush()
            # grow it while this client is connected
            grown = await asyncio.to_thread(pvio, state, "block-resize", "guest1", "xvdb", "16M")
            assert grown.returncode == 0, grown.stderr + up.output()
            c2 = await NbdClient.connect(uri)  # a new connection is told the new size
            assert c2.info.size == 16 * MiB
            await c2.write(15 * MiB, b"\x77" * 4096)
            await c2.close()
            # in use: the removal is refused, the disk goes on working
            refused = await asyncio.to_thread(pvio, state, "block-detach", "guest1", "xvdb")
            assert refused.returncode != 0 and "in use" in refused.stderr, refused.stderr
            assert await c.read(MiB + 4096, len(data)) == data
        finally:
            await c.close()

    asyncio.run(asyncio.wait_for(use(), 120))
    gone = pvio(state, "block-detach", "guest1", "xvdb")
    assert gone.returncode == 0, gone.stderr + up.output()
    listed = pvio(state, "block-list")
    assert "xvdb" not in listed.stdout and "xvda" in listed.stdout
    deadline = time.monotonic() + 10  # the guest's status file is rewritten once a second
    while "xvdb" in listed_vbds(state):
        assert time.monotonic() < deadline, "pvio list still shows the detached disk"
        time.sleep(0.1)
    assert pvio(state, "block-detach", "guest1", "xvdb").returncode != 0
    raw = img.read_bytes()
    assert len(raw) == 16 * MiB and raw[MiB + 4096 : MiB + 4096 + len(data)] == data
    assert raw[15 * MiB : 15 * MiB + 4096] == b"\x77" * 4096
    # attached again, it is served again
    back = pvio(state, "block-attach", "guest1", f"format=raw, vdev=xvdb, access=ro, target={img}")
    assert back.returncode == 0, back.stderr + up.output()
