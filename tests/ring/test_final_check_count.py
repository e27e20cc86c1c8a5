"""RING_FINAL_CHECK_FOR_REQUESTS/RESPONSES with a count: an end waiting for N at once."""

from __future__ import annotations

from pvio.ring import BackRing, FrontRing, SharedRing


def _pair() -> tuple[FrontRing, BackRing, SharedRing]:
    sring = SharedRing(bytearray(4096), entry_size=8, req_size=8, rsp_size=8)
    return FrontRing.init(sring), BackRing(sring), sring


def test_need_sets_req_event_that_far_ahead() -> None:
    front, back, sring = _pair()
    assert not back.final_check_for_requests(3)
    assert sring.snapshot()[1] == 3  # req_event = req_cons + 3
    front.put_requests([bytes(8)] * 2)
    assert not front.push_requests_and_check_notify()  # two are not enough: no kick
    assert not back.final_check_for_requests(3)
    front.put_request(bytes(8))
    assert front.push_requests_and_check_notify()  # the third is: kick
    assert back.final_check_for_requests(3)


def test_need_across_the_index_wrap() -> None:
    sring = SharedRing(bytearray(4096), entry_size=8, req_size=8, rsp_size=8)
    start = 0xFFFF_FFFE
    front, back = FrontRing.init(sring, start), BackRing(sring, start)
    assert not back.final_check_for_requests(4)
    assert sring.snapshot()[1] == (start + 4) & 0xFFFF_FFFF
    front.put_requests([bytes(8)] * 4)
    assert front.push_requests_and_check_notify()
    assert back.final_check_for_requests(4)
    assert back.final_check_for_requests()  # the default is one


def test_need_sets_rsp_event_that_far_ahead() -> None:
    front, back, sring = _pair()
    front.put_requests([bytes(8)] * 4)
    front.push_requests_and_check_notify()
    back.take_requests()
    assert not front.final_check_for_responses(3)
    assert sring.snapshot()[3] == 3  # rsp_event = rsp_cons + 3
    back.put_responses([bytes(8)] * 2)
    assert not back.push_responses_and_check_notify()  # two are not enough: no kick
    assert not front.final_check_for_responses(3)
    back.put_response(bytes(8))
    assert back.push_responses_and_check_notify()  # the third is: kick
    assert front.final_check_for_responses(3)
    assert front.final_check_for_responses()  # the default is one
