"""grant_table.h: grant_entry_v1, its flags, the grant operations and their status codes.

This module holds what both a granting domain and the hypervisor read: the entry in
shared memory, the numbers, and the x86_64 argument structs of HYPERVISOR_grant_table_op
(pvio's hypercall frames carry them unchanged; see `pvio.hypervisor.wire`).
"""

from __future__ import annotations

from pvio.abi.layout import Layout

# T:130 A grant entry
# A domain lends one of its pages to another by filling in an 8-byte entry of its grant
# table: which frame, to which domain, and flags.  The flags field is the handshake:
# the granter sets GTF_permit_access (last, after frame and domid), and while the page is
# mapped the hypervisor sets GTF_reading/GTF_writing so that the granter can see it is
# still in use and must not take the page back.  The entry's index is the "grant
# reference" that travels in ring requests.
# :T

#: typedef uint16_t domid_t;
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_IDLE = 0x7FFF

#   struct grant_entry_v1 {
#       /* GTF_xxx: various type and flag information.  [XEN,GST] */
#       uint16_t flags;
#       /* The domain being granted foreign privileges. [GST] */
#       domid_t  domid;
#       /* GTF_permit_access: GFN that @domid is allowed to map and access. [GST] ... */
#       uint32_t frame;
#   };
GRANT_ENTRY_V1 = Layout(
    "grant_entry_v1",
    (("flags", "H"), ("domid", "H"), ("frame", "I")),
    c_type="struct grant_entry_v1",
)
GRANT_ENTRY_V1_FLAGS = GRANT_ENTRY_V1.offset("flags")
GRANT_ENTRY_V1_DOMID = GRANT_ENTRY_V1.offset("domid")
GRANT_ENTRY_V1_FRAME = GRANT_ENTRY_V1.offset("frame")
#: Entries in one 4 KiB grant-table frame.
GREFS_PER_GRANT_FRAME = 4096 // GRANT_ENTRY_V1.size

#: #define GNTTAB_NR_RESERVED_ENTRIES 8 (0: console, 1: xenstore)
GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1

# Type of grant entry (flags & GTF_type_mask).
GTF_invalid = 0 << 0
GTF_permit_access = 1 << 0
GTF_accept_transfer = 2 << 0
GTF_transitive = 3 << 0
GTF_type_mask = 3 << 0
# Subflags for GTF_permit_access and GTF_transitive.
GTF_readonly = 1 << 2  # [GST] read-only mappings and accesses only
GTF_reading = 1 << 3  # [XEN] currently mapped for reading
GTF_writing = 1 << 4  # [XEN] currently mapped for writing
GTF_PWT = 1 << 5
GTF_PCD = 1 << 6
GTF_PAT = 1 << 7
GTF_sub_page = 1 << 8
# Subflags for GTF_accept_transfer.
GTF_transfer_committed = 1 << 2
GTF_transfer_completed = 1 << 3

# Operations (the `cmd` of HYPERVISOR_grant_table_op).
GNTTABOP_map_grant_ref = 0
GNTTABOP_unmap_grant_ref = 1
GNTTABOP_setup_table = 2
GNTTABOP_dump_table = 3
GNTTABOP_transfer = 4
GNTTABOP_copy = 5
GNTTABOP_query_size = 6
GNTTABOP_unmap_and_replace = 7
GNTTABOP_set_version = 8
GNTTABOP_get_status_frames = 9
GNTTABOP_get_version = 10
GNTTABOP_swap_grant_ref = 11
GNTTABOP_cache_flush = 12

# gnttab_map_grant_ref.flags
GNTMAP_device_map = 1 << 0
GNTMAP_host_map = 1 << 1
GNTMAP_readonly = 1 << 2
GNTMAP_application_map = 1 << 3
GNTMAP_contains_pte = 1 << 4

# gnttab_copy.flags
GNTCOPY_source_gref = 1 << 0
GNTCOPY_dest_gref = 1 << 1

# enum grant_status
GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_bad_virt_addr = -5
GNTST_bad_dev_addr = -6
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_address_too_big = -11
GNTST_eagain = -12
GNTST_no_space = -13

#: GNTTABOP_error_msgs, indexed by -status.
GNTTABOP_error_msgs = (
    "okay",
    "undefined error",
    "unrecognised domain id",
    "invalid grant reference",
    "invalid mapping handle",
    "invalid virtual address",
    "invalid device address",
    "no spare translation slot in the I/O MMU",
    "permission denied",
    "bad page",
    "copy arguments cross page boundary",
    "page address size too large",
    "operation not done; try again",
    "out of space",
)


def gntst_message(status: int) -> str:
    """The header's message for a GNTST_* status (or a generic one for unknown values)."""
    if 0 >= status > -len(GNTTABOP_error_msgs):
        return GNTTABOP_error_msgs[-status]
    return f"unknown grant status {status}"


# The argument structs of HYPERVISOR_grant_table_op (x86_64, __XEN_INTERFACE_VERSION__
# 0x00040e00).  IN fields are written by the caller, OUT fields by the hypervisor.

#   struct gnttab_map_grant_ref {
#       /* IN parameters. */
#       uint64_t host_addr;
#       uint32_t flags;               /* GNTMAP_* */
#       grant_ref_t ref;
#       domid_t  dom;
#       /* OUT parameters. */
#       int16_t  status;              /* => enum grant_status */
#       grant_handle_t handle;
#       uint64_t dev_bus_addr;
#   };
GNTTAB_MAP_GRANT_REF = Layout(
    "gnttab_map_grant_ref",
    (
        ("host_addr", "Q"),
        ("flags", "I"),
        ("ref", "I"),
        ("dom", "H"),
        ("status", "h"),
        ("handle", "I"),
        ("dev_bus_addr", "Q"),
    ),
    c_type="struct gnttab_map_grant_ref",
)

#   struct gnttab_unmap_grant_ref {
#       /* IN parameters. */
#       uint64_t host_addr;
#       uint64_t dev_bus_addr;
#       grant_handle_t handle;
#       /* OUT parameters. */
#       int16_t  status;              /* => enum grant_status */
#   };
GNTTAB_UNMAP_GRANT_REF = Layout(
    "gnttab_unmap_grant_ref",
    (("host_addr", "Q"), ("dev_bus_addr", "Q"), ("handle", "I"), ("status", "h"), ("", "2x")),
    c_type="struct gnttab_unmap_grant_ref",
)

#   struct gnttab_setup_table {
#       /* IN parameters. */
#       domid_t  dom;
#       uint32_t nr_frames;
#       /* OUT parameters. */
#       int16_t  status;              /* => enum grant_status */
#   #if __XEN_INTERFACE_VERSION__ < 0x00040300
#       XEN_GUEST_HANDLE(ulong) frame_list;
#   #else
#       XEN_GUEST_HANDLE(xen_pfn_t) frame_list;
#   #endif
#   };
# The guest handle is a pointer; in pvio's frames the frame list follows the struct.
GNTTAB_SETUP_TABLE = Layout(
    "gnttab_setup_table",
    (("dom", "H"), ("", "2x"), ("nr_frames", "I"), ("status", "h"), ("", "6x"), ("frame_list", "Q")),
    c_type="struct gnttab_setup_table",
)

#   struct gnttab_dump_table {
#       /* IN parameters. */
#       domid_t dom;
#       /* OUT parameters. */
#       int16_t status;               /* => enum grant_status */
#   };
GNTTAB_DUMP_TABLE = Layout(
    "gnttab_dump_table", (("dom", "H"), ("status", "h")), c_type="struct gnttab_dump_table"
)

#   struct gnttab_transfer {
#       /* IN parameters. */
#       xen_pfn_t     mfn;
#       domid_t       domid;
#       grant_ref_t   ref;
#       /* OUT parameters. */
#       int16_t       status;
#   };
GNTTAB_TRANSFER = Layout(
    "gnttab_transfer",
    (("mfn", "Q"), ("domid", "H"), ("", "2x"), ("ref", "I"), ("status", "h"), ("", "6x")),
    c_type="struct gnttab_transfer",
)

#   struct gnttab_copy {
#       /* IN parameters. */
#       struct gnttab_copy_ptr {
#           union {
#               grant_ref_t ref;
#               xen_pfn_t   gmfn;
#           } u;
#           domid_t  domid;
#           uint16_t offset;
#       } source, dest;
#       uint16_t      len;
#       uint16_t      flags;          /* GNTCOPY_* */
#       /* OUT parameters. */
#       int16_t       status;
#   };
# The union is read as its wider arm (gmfn); a grant reference is its low 32 bits.
GNTTAB_COPY = Layout(
    "gnttab_copy",
    (
        ("source_u", "Q"),
        ("source_domid", "H"),
        ("source_offset", "H"),
        ("", "4x"),
        ("dest_u", "Q"),
        ("dest_domid", "H"),
        ("dest_offset", "H"),
        ("", "4x"),
        ("len", "H"),
        ("flags", "H"),
        ("status", "h"),
        ("", "2x"),
    ),
    c_type="struct gnttab_copy",
    c_fields={
        "source_u": "source.u.gmfn",
        "source_domid": "source.domid",
        "source_offset": "source.offset",
        "dest_u": "dest.u.gmfn",
        "dest_domid": "dest.domid",
        "dest_offset": "dest.offset",
    },
)

#   struct gnttab_query_size {
#       /* IN parameters. */
#       domid_t  dom;
#       /* OUT parameters. */
#       uint32_t nr_frames;
#       uint32_t max_nr_frames;
#       int16_t  status;              /* => enum grant_status */
#   };
GNTTAB_QUERY_SIZE = Layout(
    "gnttab_query_size",
    (("dom", "H"), ("", "2x"), ("nr_frames", "I"), ("max_nr_frames", "I"), ("status", "h"), ("", "2x")),
    c_type="struct gnttab_query_size",
)

#   struct gnttab_unmap_and_replace {
#       /* IN parameters. */
#       uint64_t host_addr;
#       uint64_t new_addr;
#       grant_handle_t handle;
#       /* OUT parameters. */
#       int16_t  status;              /* => enum grant_status */
#   };
GNTTAB_UNMAP_AND_REPLACE = Layout(
    "gnttab_unmap_and_replace",
    (("host_addr", "Q"), ("new_addr", "Q"), ("handle", "I"), ("status", "h"), ("", "2x")),
    c_type="struct gnttab_unmap_and_replace",
)
