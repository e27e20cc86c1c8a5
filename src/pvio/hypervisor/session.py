"""One connection to the hypervisor, sans-IO: frames in, frames (and fds) out.

A connection becomes a domain with its first op, PVIO_DOMCTL_createdomain; every later
op runs as that domain, so a domain's identity is the connection, never a claim in a
frame.  A frame that does not parse gets a FRAME_ERROR reply carrying the rc, and the
connection stays usable (SOCK_SEQPACKET keeps frame boundaries, so one bad frame cannot
desynchronise the next).  Clients never pass descriptors to the hypervisor: any that
arrive are the adapter's to close.
"""

from __future__ import annotations

import errno
import logging

from pvio.abi.grant_table import DOMID_INVALID
from pvio.hypervisor import wire
from pvio.hypervisor.core import Hypervisor, Push
from pvio.hypervisor.errors import HypercallError, ProtocolError
from pvio.hypervisor.wire import Op

log = logging.getLogger("pvio.hypervisor.session")


class Session:
    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.domid: int | None = None
        self.bad_frames = 0

    def handle(self, data: bytes) -> tuple[bytes, list[int]]:
        """One request frame in; the reply frame and the fds to send with it out."""
        try:
            frame = wire.decode_frame(data)
            if frame.kind != wire.FRAME_REQUEST:
                raise ProtocolError(f"frame kind {frame.kind} is not a request")
        except ProtocolError as exc:
            self.bad_frames += 1
            log.info("d%s: bad frame: %s", self.domid, exc)
            seq = int.from_bytes(data[8:12], "little") if len(data) >= 12 else 0
            err = Op(0, 0, 0, b"", rc=exc.rc)
            return wire.encode_frame(wire.FRAME_ERROR, seq, [err]), []
        replies: list[Op] = []
        ops = frame.ops
        if ops and ops[0].hypercall == wire.PVIO_HYPERVISOR_domctl and ops[0].cmd == wire.PVIO_DOMCTL_createdomain:
            replies.append(self._create(ops[0]))
            ops = ops[1:]
        if ops:
            if self.domid is None:
                replies.extend(Op(o.hypercall, o.cmd, o.count, o.args, rc=-errno.ESRCH) for o in ops)
            else:
                for o, r in zip(ops, self.hv.execute(self.domid, ops), strict=True):
                    replies.append(Op(o.hypercall, o.cmd, o.count, r.args, rc=r.rc, nr_fds=len(r.fds), fds=r.fds))
        fds = [fd for r in replies for fd in r.fds]
        size = wire.PVIO_HC_FRAME.size + sum(wire.PVIO_HC_OP.size + len(r.args) for r in replies)
        if size > wire.MAX_FRAME or len(fds) > wire.MAX_FDS:
            # The ops ran, but no frame can carry their answer (setup_table's frame lists,
            # or more descriptors than SCM_RIGHTS passes): our duplicates are given back
            # and the whole frame is answered -E2BIG.
            self.bad_frames += 1
            log.info("d%s: reply of %d bytes / %d fds is too large", self.domid, size, len(fds))
            for fd in fds:
                self.hv.close_dup(fd)
            err = Op(0, 0, 0, b"", rc=-errno.E2BIG)
            return wire.encode_frame(wire.FRAME_ERROR, frame.seq, [err]), []
        return wire.encode_frame(wire.FRAME_REPLY, frame.seq, replies), fds

    def _create(self, op: Op) -> Op:
        lay = wire.PVIO_CREATEDOMAIN
        if self.domid is not None or op.count != 1 or len(op.args) != lay.size:
            return Op(op.hypercall, op.cmd, op.count, op.args, rc=-errno.EINVAL)
        a = lay.unpack(op.args)
        name = a["name"].split(b"\0", 1)[0].decode("utf-8", "replace")
        transport = "copy" if a["flags"] & wire.PVIO_CDF_copy_transport else "map"
        try:
            d = self.hv.create_domain(
                name,
                a["nr_pages"],
                max_grant_frames=a["max_grant_frames"],
                transport=transport,
                domid=None if a["domid"] == DOMID_INVALID else a["domid"],
            )
        except HypercallError as exc:
            return Op(op.hypercall, op.cmd, op.count, op.args, rc=exc.rc)
        fds: list[int] = []
        try:
            fds.append(self.hv.dup(d.mem_fd))
            fds.append(self.hv.dup(d.gnttab_fd))
        except (HypercallError, OSError) as exc:  # no room to send them: no domain
            for fd in fds:
                self.hv.close_dup(fd)
            self.hv.destroy_domain(d.domid)
            rc = exc.rc if isinstance(exc, HypercallError) else -(exc.errno or errno.EIO)
            return Op(op.hypercall, op.cmd, op.count, op.args, rc=rc)
        d.xs_domain = bool(a["flags"] & wire.PVIO_CDF_xs_domain)
        d.control = bool(a["flags"] & wire.PVIO_CDF_control)
        self.domid = d.domid
        a["domid"] = d.domid
        return Op(op.hypercall, op.cmd, 1, lay.pack(**a), nr_fds=2, fds=fds)

    def close(self) -> None:
        if self.domid is not None:
            domid, self.domid = self.domid, None
            self.hv.destroy_domain(domid)


def push_frames(pushes: list[Push]) -> dict[int, tuple[bytes, list[int]]]:
    """Group pushes by domain into one FRAME_PUSH each: domid -> (frame, fds)."""
    by_dom: dict[int, list[Op]] = {}
    for p in pushes:
        by_dom.setdefault(p.domid, []).append(p.op)
    return {
        domid: (wire.encode_frame(wire.FRAME_PUSH, 0, ops), [fd for o in ops for fd in o.fds])
        for domid, ops in by_dom.items()
    }


def createdomain_op(name: str, nr_pages: int, max_grant_frames: int, transport: str, domid: int | None) -> Op:
    args = wire.PVIO_CREATEDOMAIN.pack(
        domid=DOMID_INVALID if domid is None else domid,
        flags=wire.PVIO_CDF_copy_transport if transport == "copy" else 0,
        nr_pages=nr_pages,
        max_grant_frames=max_grant_frames,
        name=name.encode()[:31],
    )
    return Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_createdomain, 1, args)
