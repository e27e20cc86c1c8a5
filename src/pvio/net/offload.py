"""Checksum and segmentation offload between netif's flags and a TAP's virtio_net_hdr.  Sans-IO.

Theory of operation
-------------------
A frame on the Xen rings says only "checksum blank" (NETTXF_csum_blank /
NETRXF_csum_blank) and, for a GSO frame, the segment size and TCPv4/TCPv6.  The kernel's
TAP (IFF_VNET_HDR) wants more: where the checksum starts and where it goes
(csum_start, csum_offset), and for GSO the length of the headers.  Linux's netback finds
them by parsing the frame's IP and TCP/UDP headers (xenvif's checksum_setup); so does
`l4_offsets` here, for IPv4 and for IPv6 without extension headers.  A blank checksum on
anything else cannot be finished by anyone: `vnet_header` says so (None) and the frame
is dropped, as xen-netback drops it.

`vnet_parts` does the same for a frame in pieces (the slots of a ring, written to the TAP
with one `writev`): it copies the frame's first HEAD_COPY bytes and reads the offsets
from that copy, so the header the kernel gets always describes the bytes it gets, however
the other end changes its pages meanwhile -- Linux's netback likewise copies the first
XEN_NETBACK_TX_COPY_LEN (128) bytes and leaves the rest in the granted pages.

`parse_vnet_header` reads the other way: a TAP's frame becomes netif's gso/csum_blank.
"""

from __future__ import annotations

from pvio.abi import linux_if as lif
from pvio.abi import netif as n
from pvio.net.slots import FrameParts, Gso

VNET_HDR_SIZE = lif.VIRTIO_NET_HDR.size
_HDR = lif.VIRTIO_NET_HDR.packer
_PLAIN = _HDR.pack(0, 0, 0, 0, 0, 0)
_VALID = _HDR.pack(lif.VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0)
_TO_VIRTIO = {n.XEN_NETIF_GSO_TYPE_TCPV4: lif.VIRTIO_NET_HDR_GSO_TCPV4,
              n.XEN_NETIF_GSO_TYPE_TCPV6: lif.VIRTIO_NET_HDR_GSO_TCPV6}
_TO_XEN = {v: k for k, v in _TO_VIRTIO.items()}
_TCP, _UDP = 6, 17
#: The bytes of a frame's head copied before its headers are read (XEN_NETBACK_TX_COPY_LEN)
HEAD_COPY = 128


def l4_offsets(frame: bytes | bytearray | memoryview) -> tuple[int, int, int] | None:
    """(csum_start, csum_offset, transport header length) of a TCP or UDP frame over
    IPv4 or IPv6 (no extension headers), or None."""
    if len(frame) < 34:
        return None
    ethertype = (frame[12] << 8) | frame[13]
    if ethertype == 0x0800:
        ihl = (frame[14] & 0x0F) * 4
        if ihl < 20:
            return None
        start, proto = 14 + ihl, frame[23]
    elif ethertype == 0x86DD and len(frame) >= 54:
        start, proto = 54, frame[20]
    else:
        return None
    if proto == _TCP and len(frame) >= start + 20:
        return start, 16, (frame[start + 12] >> 4) * 4
    if proto == _UDP and len(frame) >= start + 8:
        return start, 6, 8
    return None


def vnet_header(frame: bytes | bytearray | memoryview, gso: Gso | None, csum_blank: bool,
                data_validated: bool = False) -> bytes | None:
    """The virtio_net_hdr that writes `frame` to a TAP, or None if its blank checksum
    cannot be located (the frame must be dropped)."""
    if not csum_blank and gso is None:
        return _VALID if data_validated else _PLAIN
    offsets = l4_offsets(frame)
    if offsets is None:
        return None
    start, offset, l4len = offsets
    if gso is None:
        return _HDR.pack(lif.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, start, offset)
    gso_type = _TO_VIRTIO.get(gso.type)
    if gso_type is None or offset != 16:  # GSO is TCP only
        return None
    return _HDR.pack(lif.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, start + l4len, gso.size, start, offset)


def vnet_parts(parts: FrameParts, gso: Gso | None, csum_blank: bool,
               data_validated: bool = False) -> list[bytes | bytearray | memoryview] | None:
    """The buffers of one `writev` of a frame in pieces to a TAP: its virtio_net_hdr, then
    the frame, its head copied (see the module notes); None if its blank checksum cannot
    be located (the frame must be dropped)."""
    if not csum_blank and gso is None:  # nothing is read from the frame: no copy
        return [_VALID if data_validated else _PLAIN, *parts]
    head = bytearray()
    rest: list[bytes | bytearray | memoryview] = []
    for part in parts:
        need = HEAD_COPY - len(head)
        if need <= 0:
            rest.append(part)
            continue
        view = memoryview(part)
        head += view[:need]
        if len(view) > need:
            rest.append(view[need:])
    hdr = vnet_header(head, gso, csum_blank, data_validated)
    if hdr is None:
        return None
    return [hdr, head, *rest]


def parse_vnet_header(raw: bytes | memoryview) -> tuple[Gso | None, bool]:
    """netif's (gso, csum_blank) for a frame read from a TAP with its virtio_net_hdr.

    Raises ValueError for a GSO type netif has no name for (UDP fragmentation offload:
    the TAP is never asked for it)."""
    flags, gso_type, _hdr_len, gso_size, _start, _offset = _HDR.unpack_from(raw)
    csum_blank = bool(flags & lif.VIRTIO_NET_HDR_F_NEEDS_CSUM)
    base = gso_type & ~lif.VIRTIO_NET_HDR_GSO_ECN
    if base == lif.VIRTIO_NET_HDR_GSO_NONE:
        return None, csum_blank
    xen = _TO_XEN.get(base)
    if xen is None:
        raise ValueError(f"virtio GSO type {gso_type} has no netif equivalent")
    return Gso(gso_size, xen), True


__all__ = ["HEAD_COPY", "VNET_HDR_SIZE", "l4_offsets", "parse_vnet_header", "vnet_header", "vnet_parts"]
