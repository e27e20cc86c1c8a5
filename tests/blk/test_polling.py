"""The polling window (`pvio.blk.polling`): requests and responses that come while an end
is still looking need no kick; with the window off, every one of them does."""

from __future__ import annotations

import asyncio
from pathlib import Path

from blk.pair import asynctest, blk_pair, make_image
from pvio.blk.polling import POLL_MISSES_TO_REST, POLL_REST, POLL_WINDOW_US, PollWindow, poll_for

MiB = 1 << 20


@asynctest
async def test_a_queue_depth_of_one_needs_no_kicks_while_both_ends_poll(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=True)
    async with blk_pair(img, persistent=True) as p:
        await p.front.read(0, 4096)  # warm: the pool has pages
        # Windows long enough to hold whatever this loop does between two requests.
        p.back.poll_window_us = 50_000
        p.front._window.window_ns = 50_000_000
        front, back = p.front.stats.notify_sent, p.back.stats.notify_sent
        for i in range(20):
            assert len(await p.front.read(i * 4096, 4096)) == 4096
        polled = (p.front.stats.notify_sent - front, p.back.stats.notify_sent - back)
        # Off: each end sleeps as soon as it has nothing, so each request kicks both ways.
        p.back.poll_window_us = 0
        p.front._window.window_ns = 0
        await asyncio.sleep(0.1)  # both ends have armed their events and sleep
        front, back = p.front.stats.notify_sent, p.back.stats.notify_sent
        for i in range(20):
            assert len(await p.front.read(i * 4096, 4096)) == 4096
        unpolled = (p.front.stats.notify_sent - front, p.back.stats.notify_sent - back)
        assert unpolled[0] >= 15 and unpolled[1] >= 15, unpolled
        assert polled[0] <= 2 and polled[1] <= 2, polled


@asynctest
async def test_blkback_polls_in_the_map_transport_only(tmp_path: Path) -> None:
    """In the copy transport every batch waits on the hypervisor, a third process: a
    window there would spin away the CPU that process needs."""
    img = make_image(tmp_path / "d.img", 1 * MiB, fill=True)
    assert POLL_WINDOW_US > 0
    for transport, window in (("map", POLL_WINDOW_US), ("copy", 0)):
        async with blk_pair(img, transport=transport) as p:
            assert p.back.poll_window_us == window, transport
            assert len(await p.front.read(0, 4096)) == 4096


def test_a_window_ends_with_the_final_check_and_starts_only_when_busy() -> None:
    async def main() -> None:
        found = [False, True, False]
        done = asyncio.Event()
        depth = [1]
        w = PollWindow(lambda: found.pop(0) if found else False, lambda: depth[0], done.set, window_us=2000,
                       max_depth=4)
        w.start()
        assert w.active
        await asyncio.wait_for(done.wait(), 5)
        assert not w.active and not found and w.polls >= 3  # a find extended the window
        for n in (0, 5):  # nothing in flight (nothing to poll for), or a deep queue
            depth[0] = n
            w.start()
            assert not w.active
        depth[0] = 1
        done.clear()
        w.start()
        depth[0] = 0  # the last response came: the window stops, not armed
        while w.active:
            await asyncio.sleep(0)
        assert not done.is_set()
        off = PollWindow(lambda: True, lambda: 1, done.set, window_us=0)
        off.start()
        assert not off.active
        assert await poll_for(lambda: True, 1000)
        assert not await poll_for(lambda: False, 1000)
        assert not await poll_for(lambda: True, 0)

    asyncio.run(main())


def test_windows_that_keep_finding_nothing_rest_then_look_again() -> None:
    """Responses slower than a window (the copy transport): after POLL_MISSES_TO_REST
    empty windows the next POLL_REST starts open none, then one looks again; a window
    that finds something starts the count over."""
    async def main() -> None:
        arrivals: list[bool] = []  # what each look finds (nothing, once the list is empty)
        armed = asyncio.Event()
        w = PollWindow(lambda: arrivals.pop(0) if arrivals else False, lambda: 1, armed.set,
                       window_us=300, max_depth=4)

        async def window() -> bool:
            """One start: True if a window opened (and ran to its end, arming)."""
            armed.clear()
            w.start()
            if not w.active:
                return False
            await asyncio.wait_for(armed.wait(), 5)
            return True

        for _ in range(POLL_MISSES_TO_REST - 1):
            assert await window()
        arrivals[:] = [True]  # this window finds a response: the count starts over
        assert await window()
        for _ in range(POLL_MISSES_TO_REST):
            assert await window()
        assert w.rests == 0
        assert [await window() for _ in range(POLL_REST)] == [False] * POLL_REST
        assert w.rests == POLL_REST
        assert await window()  # looks again

    asyncio.run(main())
