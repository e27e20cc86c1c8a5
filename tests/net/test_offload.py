"""netif's checksum and GSO flags to a TAP's virtio_net_hdr and back."""

from __future__ import annotations

import struct

import pytest

from pvio.abi import linux_if as lif
from pvio.abi import netif as n
from pvio.net.offload import HEAD_COPY, l4_offsets, parse_vnet_header, vnet_header, vnet_parts
from pvio.net.slots import Gso

ETH4 = bytes(12) + b"\x08\x00"
ETH6 = bytes(12) + b"\x86\xdd"


def ipv4(proto: int, ihl: int = 5) -> bytes:
    return bytes([0x40 | ihl, 0]) + struct.pack("!H", 60) + bytes(5) + bytes([proto]) + bytes(10) + bytes(4 * (ihl - 5))


def tcp(doff: int = 8) -> bytes:
    return bytes(12) + bytes([doff << 4]) + bytes(7) + bytes(4 * doff - 20)


def test_offsets_of_tcp_and_udp_over_ipv4_and_ipv6() -> None:
    assert l4_offsets(ETH4 + ipv4(6) + tcp()) == (34, 16, 32)
    assert l4_offsets(ETH4 + ipv4(6, ihl=6) + tcp(5)) == (38, 16, 20)
    assert l4_offsets(ETH4 + ipv4(17) + bytes(8)) == (34, 6, 8)
    v6 = bytes(6) + bytes([6]) + bytes(33)
    assert l4_offsets(ETH6 + v6 + tcp(5)) == (54, 16, 20)
    assert l4_offsets(ETH4 + ipv4(1) + bytes(8)) is None  # ICMP: no offload
    assert l4_offsets(bytes(12) + b"\x08\x06" + bytes(28)) is None  # ARP


def test_vnet_header_round_trip() -> None:
    frame = ETH4 + ipv4(6) + tcp() + bytes(3000)
    hdr = vnet_header(frame, Gso(1448, n.XEN_NETIF_GSO_TYPE_TCPV4), True)
    assert hdr is not None
    flags, gso_type, hdr_len, gso_size, start, offset = lif.VIRTIO_NET_HDR.packer.unpack(hdr)
    assert (flags, gso_type, hdr_len, gso_size, start, offset) == (
        lif.VIRTIO_NET_HDR_F_NEEDS_CSUM, lif.VIRTIO_NET_HDR_GSO_TCPV4, 66, 1448, 34, 16)
    assert parse_vnet_header(hdr) == (Gso(1448, n.XEN_NETIF_GSO_TYPE_TCPV4), True)
    plain = vnet_header(frame, None, False)
    assert plain is not None and parse_vnet_header(plain) == (None, False)
    assert vnet_header(ETH4 + ipv4(1) + bytes(30), None, True) is None  # a blank checksum on ICMP
    udp_gso = lif.VIRTIO_NET_HDR.pack(flags=1, gso_type=lif.VIRTIO_NET_HDR_GSO_UDP, gso_size=1400)
    with pytest.raises(ValueError):
        parse_vnet_header(udp_gso)


def test_a_frame_in_pieces_gets_the_header_of_its_copied_head() -> None:
    """The pieces of a GSO frame become header + head copy + the rest as it lies; the
    header's offsets are read from the copy, so a page changed after the call cannot
    make them disagree with the bytes written."""
    frame = ETH4 + ipv4(6) + tcp() + bytes(range(256)) * 40
    pages = [bytearray(frame[i : i + 4096]) for i in range(0, len(frame), 4096)]
    # the headers split over two slots, as a frontend may lay them out
    pieces = [memoryview(pages[0])[:40], memoryview(pages[0])[40:], *(memoryview(p) for p in pages[1:])]
    gso = Gso(1448, n.XEN_NETIF_GSO_TYPE_TCPV4)
    parts = vnet_parts(pieces, gso, True)
    assert parts is not None
    assert parts[0] == vnet_header(frame, gso, True)
    assert bytes(parts[1]) == frame[:HEAD_COPY]
    assert b"".join(parts[1:]) == frame
    pages[0][23] = 17  # the other end turns the TCP frame into UDP, too late
    assert bytes(parts[1]) == frame[:HEAD_COPY]  # the written head is the copy read
    assert isinstance(parts[-1], memoryview)  # the payload is not copied


def test_a_frame_without_offloads_is_written_as_it_lies() -> None:
    pieces = [memoryview(bytearray(ETH4 + bytes(100))), b"tail"]
    parts = vnet_parts(pieces, None, False, data_validated=True)
    assert parts is not None and parts[1:] == pieces
    assert parse_vnet_header(parts[0]) == (None, False)
    assert vnet_parts([ETH4 + ipv4(1) + bytes(30)], None, True) is None  # no checksum to locate
