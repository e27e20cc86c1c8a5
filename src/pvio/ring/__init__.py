"""pvio.ring: Xen's shared rings (io/ring.h) and byte rings, sans-IO, over shared memory.

* `SharedRing`, `FrontRing`, `BackRing` — request/response rings with io/ring.h's bytes
  and semantics, generic over the entry (`SharedRing.for_blkif` for blkif), 1..16 pages,
  contiguous or scattered (pvio.ring.sring).
* `notify_needed(old, new, event)` — the notify decision (pvio.ring.notify).
* `ByteRing` and the XenStore/console page ends (pvio.ring.bytering).
* `RingBroken` (the peer published an impossible index) and `RingUsageError`
  (local misuse) (pvio.ring.errors).
* Every shared index access and memory fence lives in pvio.ring.sharedmem.

Nothing here does I/O: the caller owns the event channel and kicks it when told to.

Usage (blkfront and blkback; `pages` are the 2**order granted pages, as memoryviews)::

    from pvio.abi.blkif import ABI_NATIVE
    from pvio.ring import BackRing, FrontRing, SharedRing

    # front end: initialise the ring in its own granted pages
    front = FrontRing.init(SharedRing.for_blkif(pages, ABI_NATIVE))
    front.put_requests([req_bytes_1, req_bytes_2])       # each ABI_NATIVE.request.size
    if front.push_requests_and_check_notify():
        kick_back_end()                                  # e.g. os.eventfd_write(fd, 1)

    # back end: attach to the same pages, mapped from the front's grants
    back = BackRing(SharedRing.for_blkif(mapped_pages, ABI_NATIVE))
    while True:
        for request in back.take_requests(32):            # bytes copied out, validated
            back.put_response(answer(request))            # ABI_NATIVE.response.size
        if back.push_responses_and_check_notify():
            kick_front_end()
        if not back.final_check_for_requests():
            break                                         # sleep until the next kick

    # front end, woken by the back's kick
    for response in front.take_responses():
        complete(response)
    front.final_check_for_responses()                     # True: more arrived, loop

A `RingBroken` from any call means the peer broke the protocol; that ring is unusable
from then on (tear the device down), and the error names the index values involved.
"""

from pvio.ring.bytering import (
    ByteRing,
    ByteRingPair,
    console_backend,
    console_guest,
    mask_xenstore_idx,
    xenstore_guest,
    xenstore_server,
)
from pvio.ring.errors import RingBroken, RingError, RingUsageError
from pvio.ring.notify import notify_needed
from pvio.ring.sring import BackRing, FrontRing, SharedRing

__all__ = [
    "BackRing",
    "ByteRing",
    "ByteRingPair",
    "FrontRing",
    "RingBroken",
    "RingError",
    "RingUsageError",
    "SharedRing",
    "console_backend",
    "console_guest",
    "mask_xenstore_idx",
    "notify_needed",
    "xenstore_guest",
    "xenstore_server",
]
