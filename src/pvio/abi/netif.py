"""io/netif.h: the Xen network protocol's requests, responses, extra info and flags.

A vif has two rings, each one page: the transmit ring (the guest's frames, netif_tx_*)
and the receive ring (buffers the guest posts, filled by the backend, netif_rx_*).  A
frame is one or more slots: the first slot's `size` is the whole frame's length, every
later slot's its own, and NETTXF_more_data / NETRXF_more_data on all but the last.  A
slot flagged NETTXF_extra_info / NETRXF_extra_info is followed by one or more
netif_extra_info slots (GSO, multicast, hash), chained with XEN_NETIF_EXTRA_FLAG_MORE;
each extra slot gets a NETIF_RSP_NULL response on the transmit ring.  The layouts are the
same on x86_32 and x86_64 (no 64-bit member), so there is one declaration each.
"""

from __future__ import annotations

from pvio.abi.layout import Layout
from pvio.abi.ring import ring_size_for_order

# T:125 The network protocol's slots
# A netif request names one grant (one page of the guest's memory), an offset and a size
# within it: a frame of 1514 bytes is one slot, a 64 KiB GSO segment about seventeen.  On
# the transmit ring the first slot carries the whole frame's length and the flags that
# concern the frame (checksum blank, more data, extra info follows); an extra-info slot
# (GSO size and type) is the same 12 bytes read as another struct.  On the receive ring
# the guest posts (id, grant) pairs ahead of time and the backend answers each with the
# bytes it copied into that page, or an error.
# :T

# --- limits ---------------------------------------------------------------------------
#: #define XEN_NETIF_NR_SLOTS_MIN 18: the slots per frame every backend must accept
XEN_NETIF_NR_SLOTS_MIN = 18
#: #define XEN_NETIF_MAX_TX_SIZE 0xFFFF: a frame's length is a uint16_t
XEN_NETIF_MAX_TX_SIZE = 0xFFFF

# --- transmit flags (netif_tx_request.flags) -------------------------------------------
NETTXF_csum_blank = 1 << 0  # the protocol checksum field is blank (offloaded)
NETTXF_data_validated = 1 << 1  # the data has been validated against its checksum
NETTXF_more_data = 1 << 2  # the frame continues in the next slot
NETTXF_extra_info = 1 << 3  # extra-info slot(s) follow

# --- receive flags (netif_rx_response.flags) -------------------------------------------
NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3
NETRXF_gso_prefix = 1 << 4  # deprecated

# --- extra info ------------------------------------------------------------------------
XEN_NETIF_EXTRA_TYPE_NONE = 0  # never used: invalid
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_TYPE_MAX = 5
XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0

XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2

# --- response statuses -----------------------------------------------------------------
NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
NETIF_RSP_NULL = 1  # no response: the slot was an extra-info segment

# --- structures ------------------------------------------------------------------------
#
#   struct netif_tx_request {
#       grant_ref_t gref;
#       uint16_t offset;
#       uint16_t flags;
#       uint16_t id;
#       uint16_t size;
#   };
TX_REQUEST = Layout(
    "netif_tx_request",
    (("gref", "I"), ("offset", "H"), ("flags", "H"), ("id", "H"), ("size", "H")),
    c_type="struct netif_tx_request",
)

#   struct netif_tx_response {
#       uint16_t id;
#       int16_t  status;
#   };
TX_RESPONSE = Layout(
    "netif_tx_response",
    (("id", "H"), ("status", "h")),
    c_type="struct netif_tx_response",
)

#   struct netif_rx_request {
#       uint16_t    id;        /* Echoed in response message.        */
#       uint16_t    pad;
#       grant_ref_t gref;
#   };
RX_REQUEST = Layout(
    "netif_rx_request",
    (("id", "H"), ("pad", "H"), ("gref", "I")),
    c_type="struct netif_rx_request",
)

#   struct netif_rx_response {
#       uint16_t id;
#       uint16_t offset;
#       uint16_t flags;
#       int16_t  status;
#   };
RX_RESPONSE = Layout(
    "netif_rx_response",
    (("id", "H"), ("offset", "H"), ("flags", "H"), ("status", "h")),
    c_type="struct netif_rx_response",
)

#   struct netif_extra_info {
#       uint8_t type;
#       uint8_t flags;
#       union {
#           struct { uint16_t size; uint8_t type; uint8_t pad; uint16_t features; } gso;
#           struct { uint8_t addr[6]; } mcast;
#           struct { uint8_t type; uint8_t algorithm; uint8_t value[4]; } hash;
#           uint16_t pad[3];
#       } u;
#   };
# One declaration per union member: each is the same 8 bytes read another way.
EXTRA_GSO = Layout(
    "netif_extra_info/gso",
    (("type", "B"), ("flags", "B"), ("size", "H"), ("gso_type", "B"), ("pad", "B"), ("features", "H")),
    c_type="struct netif_extra_info",
    c_fields={"size": "u.gso.size", "gso_type": "u.gso.type", "pad": "u.gso.pad",
              "features": "u.gso.features"},
)
EXTRA_MCAST = Layout(
    "netif_extra_info/mcast",
    (("type", "B"), ("flags", "B"), ("addr", "6s")),
    c_type="struct netif_extra_info",
    c_fields={"addr": "u.mcast.addr"},
)
EXTRA_HASH = Layout(
    "netif_extra_info/hash",
    (("type", "B"), ("flags", "B"), ("hash_type", "B"), ("algorithm", "B"), ("value", "4s")),
    c_type="struct netif_extra_info",
    c_fields={"hash_type": "u.hash.type", "algorithm": "u.hash.algorithm", "value": "u.hash.value"},
)
#: Every extra-info slot is read through this one first: its type says which member.
EXTRA_INFO = EXTRA_GSO

#: sizeof(union netif_tx_sring_entry), sizeof(union netif_rx_sring_entry)
TX_ENTRY_SIZE = max(TX_REQUEST.size, TX_RESPONSE.size)
RX_ENTRY_SIZE = max(RX_REQUEST.size, RX_RESPONSE.size)
#: NET_TX_RING_SIZE, NET_RX_RING_SIZE for one page (netif rings are always one page)
NET_TX_RING_SIZE = ring_size_for_order(TX_ENTRY_SIZE, 0)
NET_RX_RING_SIZE = ring_size_for_order(RX_ENTRY_SIZE, 0)

#: ETH_HLEN: a frame's first slot must hold at least an Ethernet header (xen-netback)
ETH_HLEN = 14
