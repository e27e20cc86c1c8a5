"""io/ring.h: the shared ring header and the ring-size computation.

From /usr/include/xen/io/ring.h, DEFINE_RING_TYPES(name, req_t, rsp_t)::

    union __name##_sring_entry {
        __req_t req;
        __rsp_t rsp;
    };

    struct __name##_sring {
        RING_IDX req_prod, req_event;
        RING_IDX rsp_prod, rsp_event;
        union {
            struct {
                uint8_t smartpoll_active;
            } netif;
            struct {
                uint8_t msg;
            } tapif_user;
            uint8_t pvt_pad[4];
        } pvt;
        uint8_t __pad[44];
        union __name##_sring_entry ring[1]; /* variable-length */
    };

    typedef unsigned int RING_IDX;

    #define __RD2(_x)  (((_x) & 0x00000002) ? 0x2                  : ((_x) & 0x1))
    ...
    #define __RD32(_x) (((_x) & 0xffff0000) ? __RD16((_x)>>16)<<16 : __RD16(_x))

    #define __CONST_RING_SIZE(_s, _sz) \\
        (__RD32(((_sz) - offsetof(struct _s##_sring, ring)) / \\
                sizeof(((struct _s##_sring *)0)->ring[0])))
"""

from __future__ import annotations

from pvio.abi.layout import Layout

# T:110 The shared ring page
# Every Xen split driver talks through one shape of shared memory: a 64-byte header of
# four free-running 32-bit indices, then an array of slots, each big enough for either a
# request or a response (a C union).  The frontend produces requests (req_prod) and
# consumes responses; the backend does the reverse.  The two *_event fields say "wake me
# when the producer passes this index", which is how both ends avoid needless
# notifications.  The number of slots is the largest power of two that fits the page(s),
# so that an index is turned into a slot with a mask.  pvio.ring builds the logic on top.
# :T

XEN_PAGE_SHIFT = 12
XEN_PAGE_SIZE = 1 << XEN_PAGE_SHIFT

#: RING_IDX is an unsigned int: indices run free and wrap at 2**32.
RING_IDX_MASK = 0xFFFF_FFFF

#: Multi-page rings (blkif.h "max-ring-page-order"): orders 0..4, 1..16 pages.
MAX_RING_PAGE_ORDER = 4

SRING_HEADER = Layout(
    "sring_header",
    (
        ("req_prod", "I"),
        ("req_event", "I"),
        ("rsp_prod", "I"),
        ("rsp_event", "I"),
        ("pvt", "4s"),
        ("", "44x"),
    ),
    c_type="struct blkif_sring",
    c_sizeof="offsetof(struct blkif_sring, ring)",
)

SRING_REQ_PROD = SRING_HEADER.offset("req_prod")
SRING_REQ_EVENT = SRING_HEADER.offset("req_event")
SRING_RSP_PROD = SRING_HEADER.offset("rsp_prod")
SRING_RSP_EVENT = SRING_HEADER.offset("rsp_event")
#: offsetof(struct name##_sring, ring): where slot 0 begins.
SRING_RING_OFFSET = SRING_HEADER.size


def rd32(x: int) -> int:
    """__RD32: round down to a power of two (0 stays 0)."""
    if x <= 0:
        return 0
    return 1 << (x.bit_length() - 1)


def const_ring_size(entry_size: int, ring_bytes: int) -> int:
    """__CONST_RING_SIZE for a ring of `ring_bytes` whose union entry is `entry_size` bytes."""
    if entry_size <= 0:
        raise ValueError("ring entry size must be positive")
    return rd32((ring_bytes - SRING_RING_OFFSET) // entry_size)


def ring_size_for_order(entry_size: int, order: int) -> int:
    """Slots in a ring of 2**order pages (order 0..MAX_RING_PAGE_ORDER)."""
    if not 0 <= order <= MAX_RING_PAGE_ORDER:
        raise ValueError(f"ring page order {order} is outside 0..{MAX_RING_PAGE_ORDER}")
    return const_ring_size(entry_size, XEN_PAGE_SIZE << order)
