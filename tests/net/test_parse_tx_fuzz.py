"""`parse_tx` fuzzed against a reference: netback's reading of the transmit ring, written
slot by slot as xen-netback's xenvif_count_requests reads it (the form `parse_tx` had
before it was made to unpack a batch at once).  Random and nearly-right request
sequences must give the same frames, answers, drops and fatal errors from both."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pvio.abi import netif as n
from pvio.abi.ring import XEN_PAGE_SIZE
from pvio.net.slots import (
    FATAL_SLOTS,
    MAX_SLOTS,
    Gso,
    NetifFatal,
    TxRequests,
    error_responses,
    parse_tx,
)

_TXREQ = n.TX_REQUEST.packer
_EXTRA = n.EXTRA_GSO.packer
_TXRSP = n.TX_RESPONSE.packer


def _reference(raws: list[bytes], max_slots: int = MAX_SLOTS, fatal_slots: int = FATAL_SLOTS) -> dict[str, Any]:
    frames: list[dict[str, Any]] = []
    immediate: list[bytes] = []
    dropped = consumed = 0
    fatal = None
    i, total = 0, len(raws)
    try:
        while i < total:
            gref, offset, flags, req_id, size = _TXREQ.unpack_from(raws[i])
            answers = [(req_id, n.NETIF_RSP_OKAY)]
            gso, mcast = None, []
            i += 1
            more_extra = bool(flags & n.NETTXF_extra_info)
            while more_extra:
                if i >= total:
                    raise NetifFatal("Missing extra info", "flags")
                etype, eflags, esize, gso_type, _pad, _f = _EXTRA.unpack_from(raws[i])
                if not n.XEN_NETIF_EXTRA_TYPE_NONE < etype < n.XEN_NETIF_EXTRA_TYPE_MAX:
                    raise NetifFatal(f"Invalid extra type: {etype}", "type")
                if etype == n.XEN_NETIF_EXTRA_TYPE_GSO:
                    if esize == 0:
                        raise NetifFatal("GSO size must not be zero", "u.gso.size")
                    if gso_type not in (n.XEN_NETIF_GSO_TYPE_TCPV4, n.XEN_NETIF_GSO_TYPE_TCPV6):
                        raise NetifFatal(f"Bad GSO type {gso_type}", "u.gso.type")
                    gso = Gso(esize, gso_type)
                elif etype in (n.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, n.XEN_NETIF_EXTRA_TYPE_MCAST_DEL):
                    mcast.append((etype, n.EXTRA_MCAST.unpack(raws[i])["addr"]))
                answers.append((_TXREQ.unpack_from(raws[i])[3], n.NETIF_RSP_NULL))
                more_extra = bool(eflags & n.XEN_NETIF_EXTRA_FLAG_MORE)
                i += 1
            first_size, rest, drop = size, [], ""
            more = bool(flags & n.NETTXF_more_data)
            while more:
                if len(rest) + 1 >= fatal_slots:
                    raise NetifFatal(f"Too many slots ({len(rest) + 1}) exceeding limit ({fatal_slots})")
                if i >= total:
                    raise NetifFatal(f"Asked for {len(rest) + 2} slots but exceeds this limit", "flags")
                g2, o2, f2, id2, s2 = _TXREQ.unpack_from(raws[i])
                i += 1
                if not drop and len(rest) + 1 >= max_slots:
                    drop = f"Too many slots ({len(rest) + 1}) exceeding limit ({max_slots})"
                if not drop and s2 > first_size:
                    drop = f"Invalid tx request, slot size {s2} > remaining size {first_size}"
                first_size -= min(s2, first_size)
                if o2 + s2 > XEN_PAGE_SIZE:
                    raise NetifFatal(f"Cross page boundary, txp offset: {o2}, size: {s2}", "offset")
                rest.append((g2, o2, s2))
                answers.append((id2, n.NETIF_RSP_OKAY))
                more = bool(f2 & n.NETTXF_more_data)
            if not drop and first_size < n.ETH_HLEN and not (mcast and size == 0):
                drop = f"Bad packet size: {first_size}"
            if offset + first_size > XEN_PAGE_SIZE:
                raise NetifFatal(f"Cross page boundary, txp offset: {offset}, size: {first_size}", "offset")
            consumed = i
            if drop:
                dropped += 1
                immediate.extend(error_responses(answers))
                continue
            slots = [] if mcast and size == 0 else [(gref, offset, first_size), *rest]
            frames.append({"slots": slots, "flags": flags, "gso": gso, "mcast": mcast, "answers": answers})
    except NetifFatal as e:
        fatal = (e.reason, e.field)
    return {"frames": frames, "immediate": immediate, "dropped": dropped, "fatal": fatal, "consumed": consumed}


def _seen(out: TxRequests) -> dict[str, Any]:
    return {
        "frames": [{"slots": [(g, o, s) for g, o, _f, _i, s in f.slots], "flags": f.flags, "gso": f.gso,
                    "mcast": f.mcast, "answers": f.answers} for f in out.frames],
        "immediate": out.immediate,
        "dropped": out.dropped,
        "fatal": None if out.fatal is None else (out.fatal.reason, out.fatal.field),
        "consumed": out.consumed,
    }


def _req(gref: int, offset: int, flags: int, req_id: int, size: int) -> bytes:
    return _TXREQ.pack(gref, offset, flags, req_id, size)


def _extra(etype: int, more: bool, size: int, gso_type: int) -> bytes:
    raw = _EXTRA.pack(etype, n.XEN_NETIF_EXTRA_FLAG_MORE if more else 0, size, gso_type, 0, 0)
    return raw + bytes(n.TX_REQUEST.size - len(raw))


SIZES = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 13, 14, 60, 1514, 4095, 4096, 4097, 65535]))
FLAGS = st.integers(0, 15)


@st.composite
def frames(draw: st.DrawFn) -> list[bytes]:
    """One frame's requests, usually nearly right: a first slot, extras, later slots;
    now and then a field that is wrong (an offset past its page, a size that does not
    add up, flags that disagree with what follows, a bad extra)."""
    wrong = draw(st.integers(0, 3)) == 0

    def offset(size: int) -> int:
        if wrong and draw(st.booleans()):
            return draw(st.one_of(st.sampled_from([4095, 4096]), st.integers(0, 0xFFFF)))
        return draw(st.integers(0, max(0, XEN_PAGE_SIZE - size)))

    nslots = draw(st.one_of(st.integers(0, 4), st.integers(15, 22)))
    sizes = [draw(st.sampled_from([4096, 4096, 1, 2048])) for _ in range(nslots)]
    own = draw(st.sampled_from([0, 13, 14, 60, 1514, 4096]))
    total = draw(SIZES) if wrong else min(sum(sizes) + own, 0xFFFF)
    extras = draw(st.lists(st.tuples(st.sampled_from([1, 1, 2, 3, 4, 5, 0, 9] if wrong else [1, 2, 3]),
                                     st.sampled_from([1448, 0, 2000] if wrong else [1448]),
                                     st.sampled_from([1, 2, 0, 7] if wrong else [1, 2])), max_size=2))
    flags = draw(FLAGS) & ~(n.NETTXF_more_data | n.NETTXF_extra_info)
    flags |= (n.NETTXF_more_data if nslots else 0) | (n.NETTXF_extra_info if extras else 0)
    if wrong and draw(st.booleans()):
        flags = draw(FLAGS)  # flags that disagree with what follows
    out = [_req(draw(st.integers(0, 300)), offset(own), flags, draw(st.integers(0, 300)), total)]
    for k, (etype, size, gso_type) in enumerate(extras):
        out.append(_extra(etype, k < len(extras) - 1, size, gso_type))
    for k, size in enumerate(sizes):
        more = n.NETTXF_more_data if k < nslots - 1 else 0
        out.append(_req(draw(st.integers(0, 300)), offset(size), more, draw(st.integers(0, 300)), size))
    return out


BATCHES = st.lists(frames(), max_size=4).map(lambda fs: [r for f in fs for r in f])
RANDOM = st.lists(st.binary(min_size=12, max_size=12), max_size=40)


@settings(max_examples=1000, deadline=None)
@given(BATCHES)
@example([_req(1, 0, n.NETTXF_more_data, 0, 5000), _req(2, 0, 0, 1, 4096 - 14)])
def test_nearly_right_batches_parse_as_the_reference_does(raws: list[bytes]) -> None:
    assert _seen(parse_tx(raws)) == _reference(raws)


@settings(max_examples=400, deadline=None)
@given(RANDOM, st.integers(1, 20), st.integers(1, 24))
def test_random_requests_parse_as_the_reference_does(raws: list[bytes], max_slots: int, fatal_slots: int) -> None:
    assert _seen(parse_tx(raws, max_slots=max_slots, fatal_slots=fatal_slots)) == \
        _reference(raws, max_slots, fatal_slots)
