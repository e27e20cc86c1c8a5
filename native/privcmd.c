/* /dev/xen/privcmd: opens, and answers as a kernel and hypervisor would a pvio domain.
 *
 * Xen's libraries open privcmd at start (libxencall, libxenforeignmemory,
 * libxendevicemodel) and probe it: IOCTL_PRIVCMD_UNIMPLEMENTED must fail, and the
 * errno it fails with is remembered as "not implemented".  Every privcmd ioctl but
 * HYPERCALL is answered ENOTTY, as by a kernel without that feature: DM_OP, RESTRICT,
 * MMAP_RESOURCE, and the foreign mappings (MMAPBATCH, MMAPBATCH_V2), which a pvio
 * domain cannot make (another domain's memory is reached through grants only).
 *
 * HYPERCALL is decoded from its argument buffer, which is the caller's memory:
 *   - __HYPERVISOR_domctl: a wrong interface_version is EACCES (Xen's check comes
 *     first); XEN_DOMCTL_getdomaininfo, and every other domctl, is EPERM, which is what
 *     Xen answers a domain that is neither the control domain nor the XenStore domain
 *     (dummy XSM: XSM_XS_PRIV and XSM_PRIV);
 *   - anything else: ENOSYS.
 */
#define _GNU_SOURCE
#define __XEN_TOOLS__ 1
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <xen/xen.h>
#include <xen/domctl.h>
#include <linux/types.h>
#include <xen/sys/privcmd.h>

#include "pvio_xen.h"

int privcmd_ioctl(struct dev *d, unsigned long req, void *arg)
{
    (void)d;
    if (req != IOCTL_PRIVCMD_HYPERCALL)
        return -ENOTTY;
    privcmd_hypercall_t *h = arg;
    if (h->op == __HYPERVISOR_domctl) {
        struct xen_domctl dc;
        memcpy(&dc, (void *)(uintptr_t)h->arg[0], offsetof(struct xen_domctl, u));
        if (dc.interface_version != XEN_DOMCTL_INTERFACE_VERSION)
            return -EACCES;
        return -EPERM;
    }
    return -ENOSYS;
}
