"""NBD's layouts against golden bytes written out by hand from the protocol document."""

from __future__ import annotations

import pytest

from pvio.abi.layout import layouts
from pvio.nbd import wire as w


def test_sizes_are_the_protocols() -> None:
    assert w.NEW_HANDSHAKE.size == 18  # 64 + 64 + 16 bits
    assert w.CLIENT_FLAGS.size == 4
    assert w.NEW_OPTION.size == 16
    assert w.FIXED_NEW_OPTION_REPLY.size == 20
    assert w.NEW_HANDSHAKE_FINISH.size == 10
    assert w.INFO_EXPORT.size == 12
    assert w.INFO_BLOCK_SIZE.size == 14
    assert w.REQUEST.size == 28
    assert w.SIMPLE_REPLY.size == 16
    assert w.STRUCTURED_REPLY.size == 20


def test_magic_numbers_spell_their_names() -> None:
    assert w.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert w.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert w.NBD_REP_MAGIC == 0x3E889045565A9
    assert (w.NBD_REQUEST_MAGIC, w.NBD_SIMPLE_REPLY_MAGIC) == (0x25609513, 0x67446698)


def test_greeting_golden() -> None:
    got = w.NEW_HANDSHAKE.pack(nbdmagic=w.NBDMAGIC, version=w.IHAVEOPT, gflags=3)
    assert got == b"NBDMAGICIHAVEOPT\x00\x03"


def test_request_golden_and_back() -> None:
    raw = bytes.fromhex(
        "25609513"  # magic
        "0001"  # flags: FUA
        "0001"  # type: NBD_CMD_WRITE
        "0102030405060708"  # cookie
        "0000000000001000"  # offset 4096
        "00000200"  # length 512
    )
    assert w.REQUEST.unpack(raw) == {
        "magic": w.NBD_REQUEST_MAGIC,
        "flags": w.NBD_CMD_FLAG_FUA,
        "type": w.NBD_CMD_WRITE,
        "cookie": 0x0102030405060708,
        "offset": 4096,
        "count": 512,
    }
    assert w.REQUEST.packer.pack(w.NBD_REQUEST_MAGIC, 1, 1, 0x0102030405060708, 4096, 512) == raw


def test_simple_reply_golden() -> None:
    raw = w.SIMPLE_REPLY.pack(magic=w.NBD_SIMPLE_REPLY_MAGIC, error=w.NBD_EINVAL, cookie=7)
    assert raw == bytes.fromhex("67446698" "00000016" "0000000000000007")


def test_option_reply_and_infos_golden() -> None:
    hdr = w.FIXED_NEW_OPTION_REPLY.pack(
        magic=w.NBD_REP_MAGIC, option=w.NBD_OPT_GO, reply=w.NBD_REP_INFO, replylen=12
    )
    assert hdr == bytes.fromhex("0003e889045565a9" "00000007" "00000003" "0000000c")
    info = w.INFO_EXPORT.pack(info=w.NBD_INFO_EXPORT, exportsize=1 << 30, eflags=0x16D)
    assert info == bytes.fromhex("0000" "0000000040000000" "016d")
    bs = w.INFO_BLOCK_SIZE.pack(info=3, minimum=512, preferred=4096, maximum=1 << 25)
    assert bs == bytes.fromhex("0003" "00000200" "00001000" "02000000")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NBD_REP_ERR_UNSUP", 0x80000001),
        ("NBD_REP_ERR_UNKNOWN", 0x80000006),
        ("NBD_REP_ERR_BLOCK_SIZE_REQD", 0x80000008),
        ("NBD_REP_ERR_TOO_BIG", 0x80000009),
        ("NBD_FLAG_CAN_MULTI_CONN", 0x100),
        ("NBD_FLAG_SEND_WRITE_ZEROES", 0x40),
        ("NBD_OPT_GO", 7),
        ("NBD_OPT_EXTENDED_HEADERS", 11),
        ("NBD_CMD_WRITE_ZEROES", 6),
        ("NBD_ESHUTDOWN", 108),
    ],
)
def test_constants(name: str, value: int) -> None:
    assert getattr(w, name) == value


def test_nbd_layouts_are_kept_out_of_the_xen_probe() -> None:
    nbd = layouts(w.NBD)
    assert w.REQUEST in nbd and all(lay.byte_order == ">" for lay in nbd)
    assert w.REQUEST not in layouts("x86_64")
