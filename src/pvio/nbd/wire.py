"""The NBD wire protocol: magic numbers, flags, option and command codes, and layouts.

Everything here is from the NBD protocol document (``doc/proto.md`` of the
NetworkBlockDevice/nbd project); the structure names follow libnbd's
``nbd-protocol.h``, which describes the same bytes as packed C structs.  NBD is big-endian
("network byte order") throughout, so every layout says ``byte_order=">"``.  These are
pvio's own wire format, not Xen layouts: they are tagged ``abi="nbd"`` so that the gcc
layout probe (which checks Xen's headers) leaves them alone; tests/nbd/test_wire.py
checks them against golden bytes instead.

This module only declares; the handshake and transmission logic lives in
`pvio.nbd.server` (server) and `pvio.nbd.client` (client).
"""

from __future__ import annotations

from pvio.abi.layout import Layout

# T:710 NBD on the wire
# NBD (the Network Block Device protocol) is how pvio's disks leave pvio: qemu-img,
# qemu-io, nbdinfo, nbdcopy, fio and, through nbdfuse and a loop device, the Linux kernel
# all speak it.  It has two phases.  In the *handshake* the server greets with two magic
# numbers and its handshake flags; the client answers with its flags, then sends options
# (IHAVEOPT, option code, length, data) and the server answers each with one or more
# option replies (a reply magic, the option, a reply type, length, data).  NBD_OPT_GO
# names the export and ends the handshake.  In *transmission* the client sends 28-byte
# requests (magic, flags, type, a cookie of its own choosing, offset, length, then the
# payload for a write) and the server answers each with a 16-byte simple reply carrying
# the cookie and an errno-like error, followed by the data for a successful read.  Replies
# may come in any order: the cookie pairs them with requests.  Every number is big-endian.
# :T

NBD = "nbd"  #: the `Layout.abi` tag of NBD's layouts: not a C ABI, never probed by gcc
BE = ">"

# --- magic numbers ------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  #: "NBDMAGIC", also known as INIT_PASSWD
IHAVEOPT = 0x49484156454F5054  #: "IHAVEOPT": newstyle negotiation, and every option
NBD_OLD_VERSION = 0x00420281861253  #: cliserv_magic of the oldstyle handshake (not served)
NBD_REP_MAGIC = 0x0003E889045565A9  #: option replies
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF  #: only after NBD_OPT_STRUCTURED_REPLY (not served)

# --- handshake flags (server, 16 bits) and client flags (32 bits) --------------------------
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = NBD_FLAG_FIXED_NEWSTYLE
NBD_FLAG_C_NO_ZEROES = NBD_FLAG_NO_ZEROES

# --- transmission flags (16 bits, per export) ---------------------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11
NBD_FLAG_BLOCK_STAT_PAYLOAD = 1 << 12

# --- options --------------------------------------------------------------------------------
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4  # withdrawn
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

NBD_OPT_NAMES = {
    value: name for name, value in globals().items() if name.startswith("NBD_OPT_")
}

# --- option reply types ---------------------------------------------------------------------
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9
NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR | 10

NBD_REP_NAMES = {
    value: name for name, value in globals().items() if name.startswith("NBD_REP_") and name not in ("NBD_REP_MAGIC", "NBD_REP_FLAG_ERROR")
}

# --- NBD_REP_INFO types -----------------------------------------------------------------------
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# --- commands and command flags --------------------------------------------------------------
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8

NBD_CMD_NAMES = {
    value: name for name, value in globals().items() if name.startswith("NBD_CMD_")
}

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4
NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5

# --- errors carried in replies (the protocol's own numbers, equal to Linux errno values) ------
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

NBD_ERROR_NAMES = {
    NBD_EPERM: "EPERM",
    NBD_EIO: "EIO",
    NBD_ENOMEM: "ENOMEM",
    NBD_EINVAL: "EINVAL",
    NBD_ENOSPC: "ENOSPC",
    NBD_EOVERFLOW: "EOVERFLOW",
    NBD_ENOTSUP: "ENOTSUP",
    NBD_ESHUTDOWN: "ESHUTDOWN",
}

# --- limits ------------------------------------------------------------------------------------
#: "MUST be no longer than 4096 bytes" (export names, descriptions, error strings).
NBD_MAX_STRING = 4096
#: A read or write payload below 2^25 bytes "SHOULD NOT be considered a denial of service".
NBD_MAX_PAYLOAD_PORTABLE = 1 << 25
#: The 124 reserved bytes after NBD_OPT_EXPORT_NAME's reply unless NO_ZEROES was agreed.
NBD_EXPORT_NAME_ZEROES = 124

# --- layouts -------------------------------------------------------------------------------------
#
#   struct nbd_new_handshake {      /* S: greeting of the newstyle handshake */
#     uint64_t nbdmagic;            /* NBDMAGIC */
#     uint64_t version;             /* IHAVEOPT */
#     uint16_t gflags;              /* NBD_FLAG_FIXED_NEWSTYLE etc. */
#   } NBD_ATTRIBUTE_PACKED;
NEW_HANDSHAKE = Layout(
    "nbd_new_handshake",
    (("nbdmagic", "Q"), ("version", "Q"), ("gflags", "H")),
    c_type="struct nbd_new_handshake",
    abi=NBD,
    byte_order=BE,
)

#   C: uint32_t client flags (NBD_FLAG_C_FIXED_NEWSTYLE etc.)
CLIENT_FLAGS = Layout("nbd_client_flags", (("cflags", "I"),), c_type="uint32_t", abi=NBD, byte_order=BE)

#   struct nbd_new_option {         /* C: one option during haggling */
#     uint64_t version;             /* IHAVEOPT */
#     uint32_t option;              /* NBD_OPT_* */
#     uint32_t optlen;              /* length of the data that follows */
#   } NBD_ATTRIBUTE_PACKED;
NEW_OPTION = Layout(
    "nbd_new_option",
    (("version", "Q"), ("option", "I"), ("optlen", "I")),
    c_type="struct nbd_new_option",
    abi=NBD,
    byte_order=BE,
)

#   struct nbd_fixed_new_option_reply {  /* S: one reply to an option */
#     uint64_t magic;               /* NBD_REP_MAGIC */
#     uint32_t option;              /* the option being answered */
#     uint32_t reply;               /* NBD_REP_* */
#     uint32_t replylen;            /* length of the data that follows */
#   } NBD_ATTRIBUTE_PACKED;
FIXED_NEW_OPTION_REPLY = Layout(
    "nbd_fixed_new_option_reply",
    (("magic", "Q"), ("option", "I"), ("reply", "I"), ("replylen", "I")),
    c_type="struct nbd_fixed_new_option_reply",
    abi=NBD,
    byte_order=BE,
)

#   struct nbd_new_handshake_finish {  /* S: answer to NBD_OPT_EXPORT_NAME */
#     uint64_t exportsize;
#     uint16_t eflags;              /* transmission flags */
#     uint8_t zeroes[124];          /* omitted if NBD_FLAG_C_NO_ZEROES */
#   } NBD_ATTRIBUTE_PACKED;
# Declared without the zeroes: they are appended (or not) as the flags say.
NEW_HANDSHAKE_FINISH = Layout(
    "nbd_new_handshake_finish",
    (("exportsize", "Q"), ("eflags", "H")),
    c_type="struct nbd_new_handshake_finish",
    abi=NBD,
    byte_order=BE,
)

#   /* Data of NBD_OPT_INFO and NBD_OPT_GO: the export name, then info requests. */
#   uint32_t namelen; char name[namelen]; uint16_t nrinfos; uint16_t info[nrinfos];
OPT_GO_NAMELEN = Layout("nbd_opt_go_namelen", (("namelen", "I"),), c_type="uint32_t", abi=NBD, byte_order=BE)
OPT_GO_NRINFOS = Layout("nbd_opt_go_nrinfos", (("nrinfos", "H"),), c_type="uint16_t", abi=NBD, byte_order=BE)

#   struct nbd_fixed_new_option_reply_info_export {  /* NBD_REP_INFO, NBD_INFO_EXPORT */
#     uint16_t info;                /* NBD_INFO_EXPORT */
#     uint64_t exportsize;
#     uint16_t eflags;              /* transmission flags */
#   } NBD_ATTRIBUTE_PACKED;
INFO_EXPORT = Layout(
    "nbd_fixed_new_option_reply_info_export",
    (("info", "H"), ("exportsize", "Q"), ("eflags", "H")),
    c_type="struct nbd_fixed_new_option_reply_info_export",
    abi=NBD,
    byte_order=BE,
)

#   struct nbd_fixed_new_option_reply_info_name_or_desc {  /* NBD_INFO_NAME/DESCRIPTION */
#     uint16_t info;
#     /* followed by the string, its length implied by replylen */
#   } NBD_ATTRIBUTE_PACKED;
INFO_NAME_OR_DESC = Layout(
    "nbd_fixed_new_option_reply_info_name_or_desc",
    (("info", "H"),),
    c_type="struct nbd_fixed_new_option_reply_info_name_or_desc",
    abi=NBD,
    byte_order=BE,
)

#   struct nbd_fixed_new_option_reply_info_block_size {  /* NBD_INFO_BLOCK_SIZE */
#     uint16_t info;                /* NBD_INFO_BLOCK_SIZE */
#     uint32_t minimum;             /* power of 2, 1 .. 64 KiB */
#     uint32_t preferred;           /* power of 2, >= max(minimum, 512) */
#     uint32_t maximum;             /* multiple of minimum, or 0xffffffff */
#   } NBD_ATTRIBUTE_PACKED;
INFO_BLOCK_SIZE = Layout(
    "nbd_fixed_new_option_reply_info_block_size",
    (("info", "H"), ("minimum", "I"), ("preferred", "I"), ("maximum", "I")),
    c_type="struct nbd_fixed_new_option_reply_info_block_size",
    abi=NBD,
    byte_order=BE,
)

#   /* NBD_REP_SERVER data: the name's length and the name, then a description */
#   uint32_t namelen; char name[namelen]; char description[replylen - 4 - namelen];
REP_SERVER_NAMELEN = Layout("nbd_rep_server_namelen", (("namelen", "I"),), c_type="uint32_t", abi=NBD, byte_order=BE)

#   struct nbd_request {            /* C: one transmission request (28 bytes) */
#     uint32_t magic;               /* NBD_REQUEST_MAGIC */
#     uint16_t flags;               /* NBD_CMD_FLAG_* */
#     uint16_t type;                /* NBD_CMD_* */
#     uint64_t handle;              /* the cookie: opaque, echoed in the reply */
#     uint64_t offset;
#     uint32_t count;               /* length */
#   } NBD_ATTRIBUTE_PACKED;
REQUEST = Layout(
    "nbd_request",
    (("magic", "I"), ("flags", "H"), ("type", "H"), ("cookie", "Q"), ("offset", "Q"), ("count", "I")),
    c_type="struct nbd_request",
    abi=NBD,
    byte_order=BE,
    c_fields={"cookie": "handle"},
)

#   struct nbd_simple_reply {       /* S: one reply (16 bytes), then a read's data */
#     uint32_t magic;               /* NBD_SIMPLE_REPLY_MAGIC */
#     uint32_t error;               /* 0 or NBD_E* */
#     uint64_t handle;              /* the request's cookie */
#   } NBD_ATTRIBUTE_PACKED;
SIMPLE_REPLY = Layout(
    "nbd_simple_reply",
    (("magic", "I"), ("error", "I"), ("cookie", "Q")),
    c_type="struct nbd_simple_reply",
    abi=NBD,
    byte_order=BE,
    c_fields={"cookie": "handle"},
)

#   struct nbd_structured_reply {   /* S: a structured reply chunk header (20 bytes) */
#     uint32_t magic;               /* NBD_STRUCTURED_REPLY_MAGIC */
#     uint16_t flags;
#     uint16_t type;
#     uint64_t handle;
#     uint32_t length;
#   } NBD_ATTRIBUTE_PACKED;
# pvio neither asks for nor sends structured replies; the layout is here so that a client
# can recognise (and refuse) one that arrives unasked.
STRUCTURED_REPLY = Layout(
    "nbd_structured_reply",
    (("magic", "I"), ("flags", "H"), ("type", "H"), ("cookie", "Q"), ("length", "I")),
    c_type="struct nbd_structured_reply",
    abi=NBD,
    byte_order=BE,
    c_fields={"cookie": "handle"},
)


def nbd_error_name(error: int) -> str:
    """"EINVAL" for NBD_EINVAL; the number itself for an error the protocol does not name."""
    return NBD_ERROR_NAMES.get(error, str(error))
