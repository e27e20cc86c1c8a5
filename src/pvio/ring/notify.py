"""The notify decision of io/ring.h, as a pure function."""

from __future__ import annotations

RING_IDX_MASK = 0xFFFF_FFFF


# T:230 The notify decision
# After publishing, the producer asks: did my push carry the index the consumer asked to
# be woken at?  The consumer wrote that index into *_event ("wake me when the producer
# passes this"); the push moved the producer index from `old` to `new`.  The event was
# crossed exactly when it lies in the half-open interval (old, new], which in free-running
# 32-bit arithmetic is one comparison: (new - event) < (new - old), both mod 2**32.  An
# event of old+1 (the consumer went to sleep having seen everything) means "notify on the
# very next entry"; an event far ahead means "I am busy, I will look anyway".  Batching a
# push of many entries therefore costs at most one notification.
# :T
def notify_needed(old: int, new: int, event: int) -> bool:
    """True when a push from `old` to `new` passed `event`: (new-event) < (new-old) mod 2**32.

    The C expression in RING_PUSH_{REQUESTS,RESPONSES}_AND_CHECK_NOTIFY::

        (_notify) = ((RING_IDX)(__new - (_r)->sring->req_event) <
                     (RING_IDX)(__new - __old));
    """
    return ((new - event) & RING_IDX_MASK) < ((new - old) & RING_IDX_MASK)
