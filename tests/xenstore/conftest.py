"""The watch, transaction, quota and advisory suites, and the store's property tests, run
over both transports a domain has: the byte stream of a socket, and its XenStore page
(`xs_harness.Harness`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import xs_harness

#: The suites whose Harness connections run over each transport.
BOTH_TRANSPORTS = {"test_semantics", "test_scenarios", "test_advisories", "test_fuzz"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.path.stem in BOTH_TRANSPORTS:
        metafunc.parametrize("xs_transport", ["socket", "ring"], indirect=True)


@pytest.fixture(autouse=True)
def xs_transport(request: pytest.FixtureRequest) -> Iterator[str]:
    transport = getattr(request, "param", "socket")
    xs_harness.DEFAULT_TRANSPORT[0] = transport
    try:
        yield transport
    finally:
        xs_harness.DEFAULT_TRANSPORT[0] = "socket"
