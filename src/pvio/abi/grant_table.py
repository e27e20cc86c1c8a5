"""grant_table.h: grant_entry_v1, its flags, the grant operations and their status codes.

The hypervisor-side operation structs (gnttab_map_grant_ref and friends) are declared by
the hypervisor's wire layer next to their use; this module holds what both a granting
domain and the hypervisor read: the entry in shared memory and the numbers.
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
