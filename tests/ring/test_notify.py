"""notify_needed: io/ring.h's notify expression, on its own."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cprobe import build
from pvio.ring import notify_needed

M = 2**32


@pytest.mark.parametrize(
    ("old", "new", "event", "expected"),
    [
        (0, 1, 1, True),  # SHARED_RING_INIT's event 1: the very first push notifies
        (0, 0, 1, False),  # an empty push never notifies
        (5, 5, 5, False),
        (0, 10, 11, False),  # event just beyond the push
        (0, 10, 10, True),  # event exactly at the new producer index
        (0, 10, 0, False),  # event at the old index: already passed before this push
        (0, 10, 1, True),  # event at old + 1
        (10, 20, 5, False),  # event behind: the consumer is looking anyway
        # wrapping at 2**32
        (M - 2, 2, M - 1, True),
        (M - 2, 2, 0, True),
        (M - 2, 2, 2, True),
        (M - 2, 2, 3, False),
        (M - 2, 2, M - 2, False),
        (M - 1, 0, 0, True),
        (M - 1, 0, 1, False),
        # a push of a whole ring
        (M - 16, 16, 0, True),
    ],
)
def test_edge_cases(old: int, new: int, event: int, expected: bool) -> None:
    assert notify_needed(old, new, event) is expected


@settings(max_examples=200, deadline=None)
@given(
    old=st.integers(0, M - 1),
    pushed=st.integers(0, 1024),
    event_offset=st.integers(-2048, 2048),
)
def test_notify_iff_the_push_passed_the_event(old: int, pushed: int, event_offset: int) -> None:
    """Notify exactly when event lies in (old, new], counting mod 2**32."""
    new = (old + pushed) % M
    event = (old + event_offset) % M
    assert notify_needed(old, new, event) == (0 < event_offset <= pushed)


def test_matches_the_c_expression(tmp_path: Path) -> None:
    """The same triples through RING_PUSH_*'s expression compiled by gcc."""
    rng = random.Random(2)
    triples = []
    for _ in range(3000):
        old = rng.choice([rng.randrange(M), M - rng.randrange(64), rng.randrange(64)])
        new = (old + rng.choice([0, 1, rng.randrange(64), rng.randrange(M)])) % M
        event = (old + rng.choice([0, 1, -1, rng.randrange(-64, 64), rng.randrange(M)])) % M
        triples.append((old, new, event))
    source = """
#include <stdio.h>
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <stdint.h>
#include <xen/io/ring.h>
int main(void) {
    unsigned long o, n, e;
    while (scanf("%lu %lu %lu", &o, &n, &e) == 3) {
        RING_IDX __old = (RING_IDX)o, __new = (RING_IDX)n, ev = (RING_IDX)e;
        int notify = ((RING_IDX)(__new - ev) < (RING_IDX)(__new - __old));
        printf("%d\\n", notify);
    }
    return 0;
}
"""
    exe = build(source, tmp_path, "notify")
    (tmp_path / "in.txt").write_text("".join(f"{o} {n} {e}\n" for o, n, e in triples))
    with (tmp_path / "in.txt").open() as stdin:
        proc = subprocess.run([str(exe)], stdin=stdin, capture_output=True, text=True,
                              timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split()
    assert len(out) == len(triples)
    for (o, n, e), c in zip(triples, out, strict=True):
        assert notify_needed(o, n, e) == (c == "1"), (o, n, e)
    assert {"0", "1"} <= set(out)
