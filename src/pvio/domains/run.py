"""`python -m pvio.domains.run SPEC.json`: run one domain process (see `spec`).

The role's entry point is imported only here, so each role's code stays in its own
package: `pvio.domains.xen_driver.main` (role "driver"), `pvio.domains.xen_guest.main` ("guest"),
`pvio.domains.lguest_guest.guest_main` / `pvio.domains.lguest_launcher.launcher_main` ("lguest-guest", "lguest-launcher").
Each is ``async def main(spec: DomainSpec) -> None`` and returns after an orderly
shutdown when the task is cancelled (SIGTERM/SIGINT cancel it).  Domains run on uvloop,
as the hypervisor does (`pvio.hypervisor.aio.run`): they spend their lives waking for
hypercall replies, pushes, TAP frames and NBD requests.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys
from collections.abc import Awaitable, Callable

from pvio.domains.spec import DomainSpec
from pvio.hypervisor import aio

ENTRY_POINTS = {
    "driver": "pvio.domains.xen_driver:main",
    "guest": "pvio.domains.xen_guest:main",
    "lguest-guest": "pvio.domains.lguest_guest:guest_main",
    "lguest-launcher": "pvio.domains.lguest_launcher:launcher_main",
}


def entry_point(role: str) -> Callable[[DomainSpec], Awaitable[None]]:
    module_name, attr = ENTRY_POINTS[role].split(":")
    fn: Callable[[DomainSpec], Awaitable[None]] = getattr(importlib.import_module(module_name), attr)
    return fn


async def run(spec: DomainSpec) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await entry_point(spec.role)(spec)
    except asyncio.CancelledError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pvio.domains.run SPEC.json", file=sys.stderr)
        return 2
    spec = DomainSpec.load(args[0])
    aio.run(run(spec))  # on uvloop, as the hypervisor
    return 0


if __name__ == "__main__":
    sys.exit(main())
