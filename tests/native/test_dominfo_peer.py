"""getdomaininfo through Debian's libxenctrl on the device layer: a control daemon
(PVIO_CONTROL=1) walks every domain as xenconsoled does, an ordinary domain is refused
EPERM as on Xen, and a HYPERCALL buffer that is not readable is EFAULT, never a crash
(both builds of the layer)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from native.devlayer import VARIANTS, build_layer, build_peer, domain_env, hypervisor
from pvio.hypervisor.aio import connect

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("variant", VARIANTS)
def test_getdomaininfo_and_a_bad_pointer(tmp_path: Path, variant: str) -> None:
    build_layer()
    exe = build_peer("dominfo_peer", tmp_path, variant, ["-lxenctrl"])
    with hypervisor(tmp_path) as hv:

        async def run(domid: int, control: bool) -> str:
            others = [await connect(str(hv), f"g{d}", 16, domid=d) for d in (0, 5)]
            env = domain_env(hv, domid, variant) | ({"PVIO_CONTROL": "1"} if control else {})
            proc = await asyncio.create_subprocess_exec(str(exe), env=env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            for dom in others:
                await dom.close()
            assert proc.returncode == 0, out.decode() + err.decode()
            return out.decode()

        control = asyncio.run(run(32750, True))
        assert "domains 0 5 32750\n" in control and "bad-pointer errno 14\n" in control, control
        plain = asyncio.run(run(9, False))
        assert "getinfo errno 1\n" in plain and "bad-pointer errno 14\n" in plain, plain
