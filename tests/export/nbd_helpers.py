"""Byte builders shared by the NBD tests: what a client sends, parsed server answers."""

from __future__ import annotations

from dataclasses import dataclass

from pvio.export import nbd_wire as w


def option(opt: int, data: bytes = b"") -> bytes:
    return w.NEW_OPTION.pack(version=w.IHAVEOPT, option=opt, optlen=len(data)) + data


def go_data(name: str, infos: tuple[int, ...] = (w.NBD_INFO_BLOCK_SIZE,)) -> bytes:
    raw = name.encode()
    return (
        len(raw).to_bytes(4, "big")
        + raw
        + len(infos).to_bytes(2, "big")
        + b"".join(i.to_bytes(2, "big") for i in infos)
    )


def request(cmd: int, offset: int = 0, length: int = 0, cookie: int = 1, flags: int = 0) -> bytes:
    return w.REQUEST.packer.pack(w.NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def client_flags(flags: int = w.NBD_FLAG_C_FIXED_NEWSTYLE | w.NBD_FLAG_C_NO_ZEROES) -> bytes:
    return w.CLIENT_FLAGS.pack(cflags=flags)


@dataclass
class OptReply:
    option: int
    reply: int
    data: bytes


def parse_option_replies(buf: bytes) -> list[OptReply]:
    out = []
    pos = 0
    while pos < len(buf):
        h = w.FIXED_NEW_OPTION_REPLY.unpack(buf, pos)
        assert h["magic"] == w.NBD_REP_MAGIC
        pos += w.FIXED_NEW_OPTION_REPLY.size
        out.append(OptReply(h["option"], h["reply"], buf[pos : pos + h["replylen"]]))
        pos += h["replylen"]
    assert pos == len(buf)
    return out


def parse_simple_replies(buf: bytes) -> list[tuple[int, int]]:
    """(cookie, error) of each reply; only for replies without data."""
    assert len(buf) % w.SIMPLE_REPLY.size == 0
    out = []
    for pos in range(0, len(buf), w.SIMPLE_REPLY.size):
        magic, error, cookie = w.SIMPLE_REPLY.packer.unpack_from(buf, pos)
        assert magic == w.NBD_SIMPLE_REPLY_MAGIC
        out.append((cookie, error))
    return out
