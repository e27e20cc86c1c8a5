"""What the hypervisor holds, domain by domain, for `pvio top` (xentop's view of Xen):
memory pages, grants each domain offers and maps, event channels, lguest DMA bindings,
descriptors.  Sans-IO: `census(hv)` reads the core's records and returns plain data; the
daemon writes it to its status file once a second (`pvio hypervisor --status FILE`).

Grants offered are counted from the domain's own grant table (entries whose type is
GTF_permit_access), as Xen's debug keys count them: the table is the granter's memory,
read here once, never trusted for anything else.
"""

from __future__ import annotations

import struct
from typing import Any

from pvio.abi.grant_table import (
    GRANT_ENTRY_V1,
    GRANT_ENTRY_V1_FLAGS,
    GREFS_PER_GRANT_FRAME,
    GTF_permit_access,
    GTF_type_mask,
)
from pvio.hypervisor.core import Hypervisor
from pvio.hypervisor.domain import DomainRecord

_FLAGS = struct.Struct("<H")


def grants_offered(d: DomainRecord) -> int:
    """Entries of `d`'s grant table that permit access now."""
    entries = d.nr_grant_frames * GREFS_PER_GRANT_FRAME
    table = bytes(d.gnttab[: entries * GRANT_ENTRY_V1.size])  # one copy, then counted
    step = GRANT_ENTRY_V1.size
    return sum(1 for i in range(GRANT_ENTRY_V1_FLAGS, len(table), step)
               if _FLAGS.unpack_from(table, i)[0] & GTF_type_mask == GTF_permit_access)


def census(hv: Hypervisor) -> dict[str, Any]:
    """Every domain the hypervisor knows, and the host's totals."""
    domains = []
    for d in sorted(hv.domains.values(), key=lambda d: d.domid):
        domains.append({
            "domid": d.domid,
            "name": d.name,
            "dying": d.dying,
            "pages": d.nr_pages,
            "grants_offered": grants_offered(d),
            "grants_mapped": len(d.maptrack),  # this domain's mappings of others' grants
            "mapped_by_others": d.foreign_maps,
            "event_channels": len(d.ports),
            "dma_bindings": len(d.dma),
            "fds_held": d.fds_held,
            "hypercall_frames": d.hypercall_frames,  # round trips
            "hypercall_ops": d.hypercall_ops,
        })
    return {"domains": domains}
