"""io/netif.h's layouts on recorded bytes: each struct built and parsed both ways.

(Sizes and offsets are checked against gcc in tests/abi/test_layout_probe.py.)"""

from __future__ import annotations

from pvio.abi import netif


def test_tx_request_golden_bytes() -> None:
    raw = bytes.fromhex("0a000000" "2a00" "0500" "0700" "ea05")
    req = netif.TX_REQUEST.unpack(raw)
    assert req == {"gref": 10, "offset": 42, "flags": netif.NETTXF_csum_blank | netif.NETTXF_more_data,
                   "id": 7, "size": 1514}
    assert netif.TX_REQUEST.pack(**req) == raw


def test_tx_response_golden_bytes() -> None:
    raw = bytes.fromhex("0700" "ffff")
    assert netif.TX_RESPONSE.unpack(raw) == {"id": 7, "status": netif.NETIF_RSP_ERROR}
    assert netif.TX_RESPONSE.pack(id=7, status=-1) == raw


def test_rx_request_and_response_golden_bytes() -> None:
    raw = bytes.fromhex("0300" "0000" "44332211")
    assert netif.RX_REQUEST.unpack(raw) == {"id": 3, "pad": 0, "gref": 0x11223344}
    assert netif.RX_REQUEST.pack(id=3, gref=0x11223344) == raw
    rsp = bytes.fromhex("0300" "0000" "0c00" "0010")
    assert netif.RX_RESPONSE.unpack(rsp) == {
        "id": 3, "offset": 0, "flags": netif.NETRXF_more_data | netif.NETRXF_extra_info, "status": 4096}
    assert netif.RX_RESPONSE.pack(id=3, flags=12, status=4096) == rsp


def test_extra_info_variants_share_eight_bytes() -> None:
    gso = netif.EXTRA_GSO.pack(type=netif.XEN_NETIF_EXTRA_TYPE_GSO, flags=netif.XEN_NETIF_EXTRA_FLAG_MORE,
                               size=1448, gso_type=netif.XEN_NETIF_GSO_TYPE_TCPV4)
    assert gso == bytes.fromhex("01" "01" "a805" "01" "00" "0000")
    mcast = netif.EXTRA_MCAST.pack(type=netif.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, addr=bytes.fromhex("01005e000001"))
    assert mcast == bytes.fromhex("0200" "01005e000001")
    h = netif.EXTRA_HASH.pack(type=netif.XEN_NETIF_EXTRA_TYPE_HASH, hash_type=1, algorithm=1, value=b"\1\2\3\4")
    assert h == bytes.fromhex("0400" "01" "01" "01020304")
    assert {lay.size for lay in (netif.EXTRA_GSO, netif.EXTRA_MCAST, netif.EXTRA_HASH)} == {8}
    # an extra-info slot is a tx request slot (12 bytes) or an rx response slot (8) read another way
    assert netif.EXTRA_INFO.size <= min(netif.TX_REQUEST.size, netif.RX_RESPONSE.size)


def test_ring_geometry() -> None:
    assert (netif.TX_ENTRY_SIZE, netif.RX_ENTRY_SIZE) == (12, 8)
    assert netif.NET_TX_RING_SIZE == netif.NET_RX_RING_SIZE == 256
