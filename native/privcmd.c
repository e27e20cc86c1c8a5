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
 *     first); XEN_DOMCTL_getdomaininfo goes to the hypervisor (PVIO_DOMCTL_getdomaininfo:
 *     the first domain at or above the domid asked, as Xen answers it; EPERM unless we
 *     are domain 0, the XenStore domain (Xen's XSM_XS_PRIV) or a daemon with the control
 *     domain's trust (PVIO_CONTROL=1, hc.c); ESRCH past the last domain); every other domctl is EPERM, which is what Xen answers a domain that is
 *     not the control domain;
 *   - __HYPERVISOR_event_channel_op EVTCHNOP_status: the hypervisor's answer;
 *   - anything else: ENOSYS.
 * The buffers are copied in and out with process_vm_readv/writev on ourselves, so a bad
 * pointer is EFAULT, as the kernel's copy_from_user makes it, never a crash.
 */
#define _GNU_SOURCE
#define __XEN_TOOLS__ 1
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>
#include <xen/xen.h>
#include <xen/domctl.h>
#include <xen/event_channel.h>
#include <linux/types.h>
#include <xen/sys/privcmd.h>

#include "pvio_xen.h"

static int getdomaininfo(struct xen_domctl *dc)
{
    struct pvio_domaininfo di = { .domid = dc->domain };
    struct hc_op op = { PVIO_HYPERVISOR_domctl, PVIO_DOMCTL_getdomaininfo, 1, &di, sizeof di, 0, NULL, 0, 0 };
    int rc = pvio_call1(&op);
    if (rc)
        return rc;
    struct xen_domctl_getdomaininfo *info = &dc->u.getdomaininfo;
    memset(info, 0, sizeof *info);
    dc->domain = info->domain = di.domid;
    info->flags = (di.flags & PVIO_DOMINF_dying ? XEN_DOMINF_dying : XEN_DOMINF_running) |
                  (di.flags & PVIO_DOMINF_xs_domain ? XEN_DOMINF_xs_domain : 0);
    info->tot_pages = info->max_pages = di.nr_pages;
    info->nr_online_vcpus = 1;
    return 0;
}

static int evtchn_status(evtchn_status_t *st)
{
    struct hc_op op = { HYPERVISOR_event_channel_op, EVTCHNOP_status, 1, st, sizeof *st, 0, NULL, 0, 0 };
    return pvio_call1(&op);
}

/* copy_from_user / copy_to_user: 0, or -EFAULT for memory we cannot read or write. */
static int copy_user(void *ours, uint64_t theirs, size_t len, int to_user)
{
    struct iovec local = { ours, len }, remote = { (void *)(uintptr_t)theirs, len };
    ssize_t n = to_user ? process_vm_writev(getpid(), &local, 1, &remote, 1, 0)
                        : process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
    return n == (ssize_t)len ? 0 : -EFAULT;
}

int privcmd_ioctl(struct dev *d, unsigned long req, void *arg)
{
    (void)d;
    if (req != IOCTL_PRIVCMD_HYPERCALL)
        return -ENOTTY;
    privcmd_hypercall_t *h = arg;
    if (h->op == __HYPERVISOR_domctl) {
        struct xen_domctl dc;
        if (copy_user(&dc, h->arg[0], sizeof dc, 0))
            return -EFAULT;
        if (dc.interface_version != XEN_DOMCTL_INTERFACE_VERSION)
            return -EACCES;
        if (dc.cmd != XEN_DOMCTL_getdomaininfo)
            return -EPERM;
        int rc = getdomaininfo(&dc);
        return rc ? rc : copy_user(&dc, h->arg[0], sizeof dc, 1);
    }
    if (h->op == __HYPERVISOR_event_channel_op && h->arg[0] == EVTCHNOP_status) {
        evtchn_status_t st;
        if (copy_user(&st, h->arg[1], sizeof st, 0))
            return -EFAULT;
        int rc = evtchn_status(&st);
        return rc ? rc : copy_user(&st, h->arg[1], sizeof st, 1);
    }
    return -ENOSYS;
}
