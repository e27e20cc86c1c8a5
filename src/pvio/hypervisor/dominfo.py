"""PVIO_DOMCTL_getdomaininfo: Xen's XEN_DOMCTL_getdomaininfo, for the daemons that watch
domains come and go.

Theory of operation
-------------------
Xen's C xenstored and xenconsoled learn which domains exist by asking the hypervisor
(libxenctrl's `xc_domain_getinfo`): XEN_DOMCTL_getdomaininfo with a domid answers the
*first* domain whose id is at least that one, so a caller walks every domain by asking
again from the answer plus one, and checks the answer's id to test one domain.  A
domain being torn down (a pvio zombie: dead, but others still map its pages) is
answered with XEN_DOMINF_dying, as Xen answers a dying domain.

Who may ask: Xen's dummy XSM allows getdomaininfo (XSM_XS_PRIV) to the control domain
and the XenStore domain; in pvio domain 0, a domain created with PVIO_CDF_xs_domain, and
one created with PVIO_CDF_control (a dom0 daemon such as xenconsoled, which pvio runs as
a domain of its own).  Anyone else gets -EPERM, as on Xen.  Like a requested domid, the
flags are the creator's claim: the trust boundary is the hypervisor socket, which only
the toolstack's processes reach, and what the privilege gives is another domain's
existence, state and size, never its memory.
"""

from __future__ import annotations

import errno

from pvio.hypervisor import wire
from pvio.hypervisor.domain import DomainRecord


def getdomaininfo(
    caller: DomainRecord,
    domains: dict[int, DomainRecord],
    zombies: dict[int, DomainRecord],
    count: int,
    args: bytes,
) -> tuple[int, bytes]:
    """(rc, the reply's argument struct) for one PVIO_DOMAININFO request."""
    lay = wire.PVIO_DOMAININFO
    if count != 1 or len(args) != lay.size:
        return -errno.EINVAL, args
    if caller.domid != 0 and not caller.xs_domain and not caller.control:
        return -errno.EPERM, args
    a = lay.unpack(args)
    found = [d for d in (*domains.values(), *zombies.values()) if d.domid >= a["domid"]]
    if not found:
        return -errno.ESRCH, args
    d = min(found, key=lambda rec: rec.domid)
    flags = (wire.PVIO_DOMINF_dying if d.dying else 0) | (wire.PVIO_DOMINF_xs_domain if d.xs_domain else 0)
    return 0, lay.pack(domid=d.domid, flags=flags, nr_pages=d.nr_pages)
