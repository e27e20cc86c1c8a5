"""pvio's hypercall frames: batches of Xen's own op structs over a UNIX socket.

Theory of operation
-------------------
A domain talks to the hypervisor over a SOCK_SEQPACKET UNIX socket: one message is one
frame, so boundaries survive and file descriptors (SCM_RIGHTS) arrive with the frame
they belong to.  A frame is a header and `nr_ops` operations; an operation is a header
naming the hypercall and command (``__HYPERVISOR_grant_table_op``/``GNTTABOP_copy``,
``__HYPERVISOR_event_channel_op``/``EVTCHNOP_send``, or one of pvio's own) followed by
`count` argument structs in Xen's layout.  A request frame is a multicall: every op runs
in order and the reply frame carries each op's rc and its argument structs with the OUT
fields filled, plus the op's descriptors, in op order.  A push frame (seq 0) is the
hypervisor telling a domain something unasked: a port was allocated for it (by the
control domain), bound or unbound, an lguest irq, a domain died.

Parsing is the only thing here, and it trusts nothing: `decode_frame` checks the magic,
the length against what arrived, the op count and every op's length before returning,
and raises `ProtocolError` otherwise.  It is fuzzed by the test suite.

Rejected: a stream socket with length prefixes (fds would have to be matched to frames
by hand, and a torn prefix would desynchronise the connection for good); JSON or
pickle (the point is that the op structs are Xen's bytes).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from pvio.abi import grant_table as gt
from pvio.abi.layout import Layout
from pvio.abi.lguest import LHCALL_BIND_DMA, LHCALL_SEND_DMA
from pvio.hypervisor.errors import ProtocolError

#: xen.h hypercall numbers that pvio serves.
HYPERVISOR_grant_table_op = 20
HYPERVISOR_event_channel_op = 32
#: pvio's own hypercall classes (above anything Xen defines).
PVIO_HYPERVISOR_domctl = 0x7000
PVIO_HYPERVISOR_lguest = 0x7001
PVIO_HYPERVISOR_push = 0x7002

PVIO_DOMCTL_createdomain = 1
PVIO_DOMCTL_memory_fd = 2
PVIO_DOMCTL_alloc_shareable = 3
PVIO_DOMCTL_page_fd = 4
#: Xen's XEN_DOMCTL_getdomaininfo: the first domain whose id is at least the one asked.
PVIO_DOMCTL_getdomaininfo = 5
PVIO_LGUEST_region_create = 1
PVIO_LGUEST_region_attach = 2
#: The region's creator lets domain `peer` attach it.  A region nobody was ever
#: permitted on is open to every domain; after the first permit, only the creator and
#: the permitted domains may attach it (EPERM otherwise).
PVIO_LGUEST_region_permit = 3
#: The region's creator declares that its keys carry frames (PVIO_LGUEST_FRAMES): a
#: SEND_DMA at a key in it must move min_len..max_len bytes, and a sender whose sends
#: there find no free buffer more than `flood` times in a second is flooding.  Either is
#: a violation (see pvio.hypervisor.lguest_dma).  Only the creator may (EPERM).
PVIO_LGUEST_region_frames = 4
PVIO_PUSH_port_bound = 1
PVIO_PUSH_port_unbound = 2
PVIO_PUSH_irq = 3
PVIO_PUSH_domain_dead = 4
PVIO_PUSH_port_alloc = 5

PVIO_CDF_copy_transport = 1 << 0
#: Xen's XEN_DOMCTL_CDF_xs_domain: the XenStore domain, which may ask about other
#: domains (getdomaininfo, as Xen's XSM_XS_PRIV allows it the control domain and it).
PVIO_CDF_xs_domain = 1 << 1
#: A daemon of the control domain run as a domain of its own (Xen runs xenconsoled in
#: dom0): it may ask about other domains as domain 0 may.
PVIO_CDF_control = 1 << 2
#: PVIO_DOMAININFO.flags
PVIO_DOMINF_dying = 1 << 0
PVIO_DOMINF_xs_domain = 1 << 1

PVIO_HC_MAGIC = 0x43485650  # "PVHC"
FRAME_REQUEST = 1
FRAME_REPLY = 2
FRAME_PUSH = 3
FRAME_ERROR = 4
#: Largest frame either side accepts (352 GNTTABOP_copy ops are 14 KiB).
MAX_FRAME = 128 * 1024
MAX_OPS = 4096
#: Most descriptors one frame may carry (the kernel's SCM_MAX_FD is 253).
MAX_FDS = 250

C_PROLOGUE = """
struct pvio_hc_frame { uint32_t magic; uint32_t length; uint32_t seq; uint16_t kind; uint16_t nr_ops; };
struct pvio_hc_op { uint16_t hypercall; uint16_t cmd; uint32_t count; uint32_t length; int16_t rc; uint16_t nr_fds; };
struct pvio_createdomain { uint16_t domid; uint16_t flags; uint32_t nr_pages; uint32_t max_grant_frames; char name[32]; };
struct pvio_memory_fd { uint16_t domid; uint16_t pad; uint32_t nr_pages; };
struct pvio_shareable { uint32_t nr_frames; uint32_t first_frame; };
struct pvio_page_fd { uint16_t domid; int16_t status; uint32_t ref; };
struct pvio_lhcall { uint32_t arg1; uint32_t arg2; uint32_t arg3; uint32_t ret; };
struct pvio_lguest_region { uint32_t region_id; uint32_t nr_pages; uint32_t base; uint32_t peer; };
struct pvio_lguest_frames { uint32_t region_id; uint32_t min_len; uint32_t max_len; uint32_t flood; };
struct pvio_push_port { uint32_t port; uint16_t remote_dom; uint16_t pad; uint32_t remote_port; };
struct pvio_push_irq { uint32_t irq; };
struct pvio_push_domain { uint16_t domid; uint16_t pad; };
struct pvio_domaininfo { uint16_t domid; uint16_t flags; uint32_t nr_pages; };
"""

# T:310 The hypercall frame
# A domain is a process connected to the hypervisor's SOCK_SEQPACKET socket; its first
# op (PVIO_DOMCTL_createdomain) makes it a domain and brings back its memory and grant
# table as memfds.  Every message on the socket is one frame: this header, then `nr_ops`
# operations, each an op header and `count` argument structs of Xen's own layout (a
# batch of 352 gnttab_map_grant_ref is one frame, one round trip).  The reply repeats
# the ops with their OUT fields filled in; descriptors ride along with SCM_RIGHTS.
# :T
#   struct pvio_hc_frame {
#       uint32_t magic;     /* PVIO_HC_MAGIC */
#       uint32_t length;    /* bytes in the frame, header included */
#       uint32_t seq;       /* request id, echoed by the reply; 0 in a push */
#       uint16_t kind;      /* FRAME_REQUEST, _REPLY, _PUSH, _ERROR */
#       uint16_t nr_ops;
#   };
PVIO_HC_FRAME = Layout(
    "pvio_hc_frame",
    (("magic", "I"), ("length", "I"), ("seq", "I"), ("kind", "H"), ("nr_ops", "H")),
    c_type="struct pvio_hc_frame",
    c_prologue=C_PROLOGUE,
)

#   struct pvio_hc_op {
#       uint16_t hypercall; /* __HYPERVISOR_* or PVIO_HYPERVISOR_* */
#       uint16_t cmd;       /* GNTTABOP_*, EVTCHNOP_*, LHCALL_*, PVIO_* */
#       uint32_t count;     /* argument structs that follow */
#       uint32_t length;    /* bytes that follow */
#       int16_t  rc;        /* reply: 0 or -errno for the whole op */
#       uint16_t nr_fds;    /* reply and push: descriptors of this op, in order */
#   };
PVIO_HC_OP = Layout(
    "pvio_hc_op",
    (("hypercall", "H"), ("cmd", "H"), ("count", "I"), ("length", "I"), ("rc", "h"), ("nr_fds", "H")),
    c_type="struct pvio_hc_op",
    c_prologue=C_PROLOGUE,
)

#   struct pvio_createdomain {  /* IN: domid (0 or DOMID_INVALID for any), the rest; OUT: domid */
#       uint16_t domid; uint16_t flags; uint32_t nr_pages; uint32_t max_grant_frames;
#       char name[32];
#   };
PVIO_CREATEDOMAIN = Layout(
    "pvio_createdomain",
    (("domid", "H"), ("flags", "H"), ("nr_pages", "I"), ("max_grant_frames", "I"), ("name", "32s")),
    c_type="struct pvio_createdomain",
    c_prologue=C_PROLOGUE,
)

#   struct pvio_memory_fd { uint16_t domid; uint16_t pad; uint32_t nr_pages; /* OUT */ };
PVIO_MEMORY_FD = Layout(
    "pvio_memory_fd",
    (("domid", "H"), ("", "2x"), ("nr_pages", "I")),
    c_type="struct pvio_memory_fd",
    c_prologue=C_PROLOGUE,
)

#   struct pvio_shareable { uint32_t nr_frames; uint32_t first_frame; /* OUT */ };
# PVIO_DOMCTL_alloc_shareable: nr_frames new one-page memfds, numbered from first_frame;
# the reply carries their fds in order.
PVIO_SHAREABLE = Layout(
    "pvio_shareable",
    (("nr_frames", "I"), ("first_frame", "I")),
    c_type="struct pvio_shareable",
    c_prologue=C_PROLOGUE,
)

#   struct pvio_page_fd { uint16_t domid; int16_t status; /* OUT */ uint32_t ref; };
# PVIO_DOMCTL_page_fd, `count` of them: the fd of the shareable page that the caller's
# current mapping of (domid, ref) maps.  status 0: an fd follows (fds in the order of
# the structs with status 0); else -EINVAL (not mapped, or not a shareable frame).
PVIO_PAGE_FD = Layout(
    "pvio_page_fd",
    (("domid", "H"), ("status", "h"), ("ref", "I")),
    c_type="struct pvio_page_fd",
    c_prologue=C_PROLOGUE,
)

#   struct pvio_domaininfo {  /* PVIO_DOMCTL_getdomaininfo */
#       uint16_t domid;     /* IN: the first domid to look at; OUT: the domain found */
#       uint16_t flags;     /* OUT: PVIO_DOMINF_* */
#       uint32_t nr_pages;  /* OUT: its memory */
#   };
PVIO_DOMAININFO = Layout(
    "pvio_domaininfo",
    (("domid", "H"), ("flags", "H"), ("nr_pages", "I")),
    c_type="struct pvio_domaininfo",
    c_prologue=C_PROLOGUE,
)

#   struct pvio_lhcall { uint32_t arg1, arg2, arg3; uint32_t ret; /* OUT: used_len of SEND_DMA */ };
# BIND_DMA: arg1 key, arg2 dmas, arg3 (count << 8) | irq, as lguest's hcall().
# SEND_DMA: arg1 key, arg2 dma.
PVIO_LHCALL = Layout(
    "pvio_lhcall",
    (("arg1", "I"), ("arg2", "I"), ("arg3", "I"), ("ret", "I")),
    c_type="struct pvio_lhcall",
    c_prologue=C_PROLOGUE,
)

#   struct pvio_lguest_region { uint32_t region_id; uint32_t nr_pages; uint32_t base; uint32_t peer; };
PVIO_LGUEST_REGION = Layout(
    "pvio_lguest_region",
    (("region_id", "I"), ("nr_pages", "I"), ("base", "I"), ("peer", "I")),
    c_type="struct pvio_lguest_region",
    c_prologue=C_PROLOGUE,
)

#   struct pvio_lguest_frames { uint32_t region_id; uint32_t min_len; uint32_t max_len; uint32_t flood; };
# flood: most sends per second from one sender that find no free buffer (0: no limit).
PVIO_LGUEST_FRAMES = Layout(
    "pvio_lguest_frames",
    (("region_id", "I"), ("min_len", "I"), ("max_len", "I"), ("flood", "I")),
    c_type="struct pvio_lguest_frames",
    c_prologue=C_PROLOGUE,
)

#   struct pvio_push_port { uint32_t port; uint16_t remote_dom; uint16_t pad; uint32_t remote_port; };
PVIO_PUSH_PORT = Layout(
    "pvio_push_port",
    (("port", "I"), ("remote_dom", "H"), ("", "2x"), ("remote_port", "I")),
    c_type="struct pvio_push_port",
    c_prologue=C_PROLOGUE,
)
PVIO_PUSH_IRQ = Layout(
    "pvio_push_irq", (("irq", "I"),), c_type="struct pvio_push_irq", c_prologue=C_PROLOGUE
)
PVIO_PUSH_DOMAIN = Layout(
    "pvio_push_domain",
    (("domid", "H"), ("", "2x")),
    c_type="struct pvio_push_domain",
    c_prologue=C_PROLOGUE,
)

_FRAME = PVIO_HC_FRAME.packer
_OP = PVIO_HC_OP.packer


@dataclass
class Op:
    """One operation of a frame: a request, or (with rc and fds) its reply."""

    hypercall: int
    cmd: int
    count: int
    args: bytes
    rc: int = 0
    nr_fds: int = 0
    fds: list[int] = field(default_factory=list)


@dataclass
class Frame:
    kind: int
    seq: int
    ops: list[Op]


def encode_frame(kind: int, seq: int, ops: list[Op]) -> bytes:
    parts = [b""]
    length = PVIO_HC_FRAME.size
    for op in ops:
        parts.append(_OP.pack(op.hypercall, op.cmd, op.count, len(op.args), op.rc, op.nr_fds))
        parts.append(op.args)
        length += PVIO_HC_OP.size + len(op.args)
    if length > MAX_FRAME or len(ops) > MAX_OPS:
        raise ValueError(f"frame of {length} bytes / {len(ops)} ops is too large")
    parts[0] = _FRAME.pack(PVIO_HC_MAGIC, length, seq, kind, len(ops))
    return b"".join(parts)


def decode_frame(buf: bytes | memoryview) -> Frame:
    """Parse one frame; raise ProtocolError for anything malformed."""
    n = len(buf)
    if n < PVIO_HC_FRAME.size:
        raise ProtocolError(f"short frame ({n} bytes)")
    magic, length, seq, kind, nr_ops = _FRAME.unpack_from(buf, 0)
    if magic != PVIO_HC_MAGIC:
        raise ProtocolError(f"bad magic {magic:#x}")
    if length != n:
        raise ProtocolError(f"length {length} != {n} bytes received")
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes is too large", -errno.E2BIG)
    if kind not in (FRAME_REQUEST, FRAME_REPLY, FRAME_PUSH, FRAME_ERROR):
        raise ProtocolError(f"bad frame kind {kind}")
    if nr_ops > MAX_OPS:
        raise ProtocolError(f"{nr_ops} ops is too many", -errno.E2BIG)
    ops: list[Op] = []
    off = PVIO_HC_FRAME.size
    for i in range(nr_ops):
        if off + PVIO_HC_OP.size > n:
            raise ProtocolError(f"op {i} header runs past the frame")
        hypercall, cmd, count, alen, rc, nr_fds = _OP.unpack_from(buf, off)
        off += PVIO_HC_OP.size
        if alen > n - off:
            raise ProtocolError(f"op {i} arguments run past the frame")
        ops.append(Op(hypercall, cmd, count, bytes(buf[off : off + alen]), rc, nr_fds))
        off += alen
    if off != n:
        raise ProtocolError(f"{n - off} trailing bytes")
    return Frame(kind, seq, ops)


_HYPERCALL_NAMES = {HYPERVISOR_grant_table_op: "grant_table_op", HYPERVISOR_event_channel_op:
                    "event_channel_op", PVIO_HYPERVISOR_domctl: "domctl", PVIO_HYPERVISOR_lguest: "lguest"}
_GNTTAB_NAMES = {gt.GNTTABOP_map_grant_ref: "map", gt.GNTTABOP_unmap_grant_ref: "unmap", gt.GNTTABOP_copy: "copy"}
_LGUEST_NAMES = {LHCALL_BIND_DMA: "BIND_DMA", LHCALL_SEND_DMA: "SEND_DMA", PVIO_LGUEST_region_create: "region",
                 PVIO_LGUEST_region_attach: "region", PVIO_LGUEST_region_permit: "region",
                 PVIO_LGUEST_region_frames: "region"}


def op_name(op: Op) -> str:
    """A hypercall's name for a trace ("grant copy", "event_channel_op", "lguest SEND_DMA")."""
    if op.hypercall == HYPERVISOR_grant_table_op and op.cmd in _GNTTAB_NAMES:
        return f"grant {_GNTTAB_NAMES[op.cmd]}"
    if op.hypercall == PVIO_HYPERVISOR_lguest and op.cmd in _LGUEST_NAMES:
        return f"lguest {_LGUEST_NAMES[op.cmd]}"
    return _HYPERCALL_NAMES.get(op.hypercall, str(op.hypercall))
