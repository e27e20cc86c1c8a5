/* /proc/xen/xsd_port and /proc/xen/xsd_kva, for Xen's C xenstored run as pvio's
 * XenStore domain (PVIO_XS_DOMAIN=1).
 *
 * On Xen, dom0's kernel publishes its own XenStore ring there (the page and the port
 * the domain builder made for dom0), and xenstored, at start, introduces its "master
 * domain" with them before it serves anyone (dom0_init).  pvio has no kernel under the
 * toolstack: every pvio domain, domain 0 included, builds its own page and asks to be
 * introduced (pvio.domains.xen_pages).  So pvio starts xenstored with
 * --master-domid set to the XenStore domain itself, and these files give it a ring of
 * its own: xsd_kva a zeroed page of memory, xsd_port a port unbound for ourselves,
 * which xenstored binds back (a loopback channel, as Xen allows).  Nobody writes to that
 * ring; it is the master domain's formality, and every real domain, domain 0 among
 * them, is introduced by the toolstack as on any Xen host with a XenStore domain.
 *
 * Any other domain opening them gets ENOENT, as on a host without Xen.
 */
#define _GNU_SOURCE
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xen/xen.h>
#include <xen/event_channel.h>

#include "pvio_xen.h"

int xsd_is_file(const char *path)
{
    return !strcmp(path, "/proc/xen/xsd_port") || !strcmp(path, "/proc/xen/xsd_kva");
}

static int port_text(int fd)
{
    evtchn_alloc_unbound_t a = { .dom = DOMID_SELF, .remote_dom = pvio_dom.domid };
    int fds[1] = { -1 };
    struct hc_op op = { HYPERVISOR_event_channel_op, EVTCHNOP_alloc_unbound, 1, &a, sizeof a, 0, fds, 1, 0 };
    int rc = pvio_call1(&op);
    for (int i = 0; i < op.nr_fds; i++)
        real.close(fds[i]); /* the loopback's far end: nobody listens there */
    if (rc)
        return rc;
    char text[16];
    int n = snprintf(text, sizeof text, "%u", a.port);
    if (real.write(fd, text, (size_t)n) != n)
        return -EIO;
    return lseek(fd, 0, SEEK_SET) < 0 ? -errno : 0;
}

int xsd_open(const char *path, int flags)
{
    const char *xs = getenv("PVIO_XS_DOMAIN");
    if (!xs || strcmp(xs, "1"))
        return -ENOENT;
    int kva = !strcmp(path, "/proc/xen/xsd_kva");
    int fd = memfd_create(kva ? "pvio-xsd-kva" : "pvio-xsd-port", (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0);
    if (fd < 0)
        return -errno;
    pthread_mutex_lock(&pvio_lock);
    int rc = pvio_connect();
    if (!rc)
        rc = kva ? (ftruncate(fd, PAGE_SIZE) ? -errno : 0) : port_text(fd);
    pthread_mutex_unlock(&pvio_lock);
    if (rc) {
        real.close(fd);
        return rc;
    }
    return fd;
}
