"""io/xs_wire.h: the XenStore wire protocol.

Every XenStore message, request or reply, on a socket or on the shared page, is a 16-byte
header followed by `len` bytes of payload, usually NUL-terminated strings.  Errors travel
as XS_ERROR carrying an errno *name* ("ENOENT"), looked up in the table below.
"""

from __future__ import annotations

import enum

from pvio.abi.layout import Layout

# T:150 XenStore messages
# XenStore is a tree of small strings that every domain reads and writes to find its
# devices.  Its protocol is as simple as protocols get: a header (type, req_id echoed in
# the reply, tx_id naming a transaction or 0, and the payload length), then the payload.
# Replies carry the request's type, or XS_ERROR with an errno name; watch events arrive
# unasked as XS_WATCH_EVENT.  A domain's connection is a pair of 1 KiB byte rings in one
# shared page (xenstore_domain_interface); tools connect over a UNIX socket instead.
# :T


class XsdSockmsgType(enum.IntEnum):
    """enum xsd_sockmsg_type."""

    XS_CONTROL = 0
    XS_DIRECTORY = 1
    XS_READ = 2
    XS_GET_PERMS = 3
    XS_WATCH = 4
    XS_UNWATCH = 5
    XS_TRANSACTION_START = 6
    XS_TRANSACTION_END = 7
    XS_INTRODUCE = 8
    XS_RELEASE = 9
    XS_GET_DOMAIN_PATH = 10
    XS_WRITE = 11
    XS_MKDIR = 12
    XS_RM = 13
    XS_SET_PERMS = 14
    XS_WATCH_EVENT = 15
    XS_ERROR = 16
    XS_IS_DOMAIN_INTRODUCED = 17
    XS_RESUME = 18
    XS_SET_TARGET = 19
    # XS_RESTRICT (20) has been removed
    XS_RESET_WATCHES = 21  # XS_SET_TARGET + 2
    XS_DIRECTORY_PART = 22
    XS_TYPE_COUNT = 23  # Number of valid types.
    XS_INVALID = 0xFFFF  # Guaranteed to remain an invalid type


XS_DEBUG = XsdSockmsgType.XS_CONTROL

XS_WRITE_NONE = "NONE"
XS_WRITE_CREATE = "CREATE"
XS_WRITE_CREATE_EXCL = "CREATE|EXCL"

#: static const struct xsd_errors xsd_errors[]: the errno names that may travel in
#: XS_ERROR, in the header's order ("New errors should be added at the end").
XSD_ERRORS = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)

#   struct xsd_sockmsg
#   {
#       uint32_t type;  /* XS_??? */
#       uint32_t req_id;/* Request identifier, echoed in daemon's response.  */
#       uint32_t tx_id; /* Transaction id (0 if not related to a transaction). */
#       uint32_t len;   /* Length of data following this. */
#       /* Generally followed by nul-terminated string(s). */
#   };
XSD_SOCKMSG = Layout(
    "xsd_sockmsg",
    (("type", "I"), ("req_id", "I"), ("tx_id", "I"), ("len", "I")),
    c_type="struct xsd_sockmsg",
)


class XsWatchType(enum.IntEnum):
    """enum xs_watch_type: the fields of an XS_WATCH_EVENT payload."""

    XS_WATCH_PATH = 0
    XS_WATCH_TOKEN = 1


#: #define XENSTORE_RING_SIZE 1024
XENSTORE_RING_SIZE = 1024

#   struct xenstore_domain_interface {
#       char req[XENSTORE_RING_SIZE]; /* Requests to xenstore daemon. */
#       char rsp[XENSTORE_RING_SIZE]; /* Replies and async watch events. */
#       XENSTORE_RING_IDX req_cons, req_prod;
#       XENSTORE_RING_IDX rsp_cons, rsp_prod;
#       uint32_t server_features; /* Bitmap of features supported by the server */
#       uint32_t connection;
#       uint32_t error;
#   };
XENSTORE_DOMAIN_INTERFACE = Layout(
    "xenstore_domain_interface",
    (
        ("req", f"{XENSTORE_RING_SIZE}s"),
        ("rsp", f"{XENSTORE_RING_SIZE}s"),
        ("req_cons", "I"),
        ("req_prod", "I"),
        ("rsp_cons", "I"),
        ("rsp_prod", "I"),
        ("server_features", "I"),
        ("connection", "I"),
        ("error", "I"),
    ),
    c_type="struct xenstore_domain_interface",
)

#: Violating this is very bad.  See docs/misc/xenstore.txt.
XENSTORE_PAYLOAD_MAX = 4096
#: Violating these just gets you an error back
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2

XENSTORE_CONNECTED = 0  # the steady-state
XENSTORE_RECONNECT = 1  # reconnect in progress

XENSTORE_ERROR_NONE = 0  # No error
XENSTORE_ERROR_COMM = 1  # Communication problem
XENSTORE_ERROR_RINGIDX = 2  # Invalid ring index
XENSTORE_ERROR_PROTO = 3  # Protocol violation (payload too long)
