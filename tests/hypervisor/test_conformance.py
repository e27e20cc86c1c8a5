"""The conformance suite on both implementations (in-process core, daemon over its socket),
on the standard event loop and, for the daemon, on uvloop (pvio's default loop)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from hv_harness import IMPLEMENTATIONS, run_with
from pvio.testing.hypervisor import CHECKS, TRANSPORTS

CASES = [
    pytest.param(name, transport, id=f"{name}-{transport}" if transport else name)
    for name, (_, takes_transport) in CHECKS.items()
    for transport in (TRANSPORTS if takes_transport else (None,))
]


@pytest.mark.parametrize("impl", [*IMPLEMENTATIONS, "daemon-uvloop"])
@pytest.mark.parametrize(("check", "transport"), CASES)
def test_conformance(impl: str, check: str, transport: str | None) -> None:
    fn, _ = CHECKS[check]
    args = (transport,) if transport else ()
    if impl == "daemon-uvloop":
        uvloop.run(run_with("daemon", fn, *args))
    else:
        asyncio.run(run_with(impl, fn, *args))
