/* /dev/xen/evtchn: event channels as Linux's evtchn driver presents them.
 *
 * Each open is an epoll fd (the program's descriptor, pollable as the kernel's), with
 * one entry per bound port: the port's eventfd from the hypervisor, registered
 * EPOLLIN|EPOLLONESHOT.  The one-shot is Linux's mask-on-delivery: once read() has
 * returned a port, the entry stays disarmed until the program writes the port back
 * (unmask), which re-arms it; an event that came meanwhile is then delivered at once,
 * as a pending bit would be.  read() drains the eventfds it reports.
 *
 * Semantics kept from drivers/xen/evtchn.c: read and write take whole 32-bit ports,
 * at most a page of them; read blocks unless O_NONBLOCK (then EAGAIN); write ignores
 * ports that are not ours or not masked; UNBIND/NOTIFY of a port this open does not
 * hold is ENOTCONN (EINVAL past the port range); RESET forgets delivered-but-unread
 * events (their ports stay masked); RESTRICT_DOMID limits later binds (EACCES);
 * closing unbinds every port; an unknown ioctl is ENOSYS.  The event-channel errors
 * themselves (EINVAL for a port not unbound for us, ESRCH for no such domain, ENOSPC)
 * come from the hypervisor unchanged.
 *
 * NOTIFY writes the peer port's eventfd when the hypervisor has given it (at bind, or
 * by a PORT_BOUND push for a port we allocated), else it is EVTCHNOP_send.
 *
 * VIRQs: a VIRQ port is a port number reserved from the hypervisor (an unbound port
 * for ourselves).  VIRQ_DOM_EXC fires when the hypervisor tells us a domain died: it
 * tells the control domain and every domain that maps the dead one's grants, which is
 * where Xen's C xenstored needs it (it maps every domain's XenStore page, and on the
 * VIRQ asks the hypervisor which domains are gone, privcmd.c).  A daemon sleeping in
 * poll() on this device must wake for it, so binding VIRQ_DOM_EXC starts a thread that
 * waits on the hypervisor connection and handles pushes as they come.  The other VIRQs
 * never fire.
 */
#define _GNU_SOURCE
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <errno.h>
#include <stdint.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <xen/xen.h>
#include <xen/event_channel.h>
#include <xen/sys/evtchn.h>

#include "pvio_xen.h"

#define NR_PORTS 4096
#define UNRESTRICTED 0xFFFFu

struct port {
    uint32_t port;
    int rx_fd, tx_fd;
    int enabled; /* not masked */
    int virq;    /* -1, or the VIRQ this port stands for */
    struct evtchn *owner;
};

struct evtchn {
    int epfd;
    uint32_t restrict_domid;
};

static struct port *ports[NR_PORTS];
static uint32_t virqs_bound; /* bit per VIRQ bound in this domain */
static struct port *virq_ports[NR_VIRQS];
static pid_t push_watcher; /* the process whose push thread runs, or 0 */

int evtchn_open(struct dev *d)
{
    struct evtchn *e = calloc(1, sizeof *e);
    if (!e)
        return -ENOMEM;
    int fd = epoll_create1((d->flags & O_CLOEXEC) ? EPOLL_CLOEXEC : 0);
    if (fd < 0) {
        free(e);
        return -errno;
    }
    if (d->flags & O_NONBLOCK)
        fcntl(fd, F_SETFL, O_NONBLOCK);
    e->epfd = fd;
    e->restrict_domid = UNRESTRICTED;
    d->fd = fd;
    d->priv = e;
    return 0;
}

static int arm(struct port *p, int op)
{
    struct epoll_event ev = { .events = EPOLLIN | EPOLLONESHOT, .data.u32 = p->port };
    return epoll_ctl(p->owner->epfd, op, p->rx_fd, &ev) ? -errno : 0;
}

static void drop_port(struct port *p)
{
    if (p->rx_fd >= 0) {
        epoll_ctl(p->owner->epfd, EPOLL_CTL_DEL, p->rx_fd, NULL);
        real.close(p->rx_fd);
    }
    if (p->tx_fd >= 0)
        real.close(p->tx_fd);
    if (p->virq >= 0) {
        virqs_bound &= ~(1u << p->virq);
        virq_ports[p->virq] = NULL;
    }
    ports[p->port] = NULL;
    free(p);
}

/* A new port for `e`: registered and enabled; on failure the port is closed again. */
static int add_port(struct evtchn *e, uint32_t port, int rx_fd, int tx_fd, int virq)
{
    struct port *p = port < NR_PORTS && !ports[port] ? calloc(1, sizeof *p) : NULL;
    int rc = -ENOMEM;
    if (p) {
        *p = (struct port){ port, rx_fd, tx_fd, 1, virq, e };
        fcntl(rx_fd, F_SETFL, O_NONBLOCK);
        ports[port] = p;
        rc = arm(p, EPOLL_CTL_ADD);
        if (!rc) {
            if (virq >= 0) {
                virqs_bound |= 1u << virq;
                virq_ports[virq] = p;
            }
            return (int)port;
        }
        ports[port] = NULL;
        free(p);
    } else if (port < NR_PORTS && ports[port]) {
        rc = -EEXIST; /* the hypervisor gave a port we hold: cannot happen */
    }
    if (rx_fd >= 0)
        real.close(rx_fd);
    if (tx_fd >= 0)
        real.close(tx_fd);
    evtchn_close_t cl = { .port = port };
    struct hc_op op = { HYPERVISOR_event_channel_op, EVTCHNOP_close, 1, &cl, sizeof cl, 0, NULL, 0, 0 };
    pvio_call(&op, 1);
    return rc;
}

static int alloc_unbound(struct evtchn *e, uint16_t remote, int virq)
{
    evtchn_alloc_unbound_t a = { .dom = DOMID_SELF, .remote_dom = remote };
    int fds[1] = { -1 };
    struct hc_op op = { HYPERVISOR_event_channel_op, EVTCHNOP_alloc_unbound, 1, &a, sizeof a, 0, fds, 1, 0 };
    int rc = pvio_call1(&op);
    if (rc)
        return rc;
    if (op.nr_fds != 1)
        return -EPROTO;
    return add_port(e, a.port, fds[0], -1, virq);
}

static int bind_interdomain(struct evtchn *e, uint32_t remote_dom, uint32_t remote_port)
{
    if (remote_dom >= DOMID_FIRST_RESERVED && remote_dom != DOMID_SELF)
        return -ESRCH;
    evtchn_bind_interdomain_t b = { .remote_dom = (domid_t)remote_dom, .remote_port = remote_port };
    int fds[2] = { -1, -1 };
    struct hc_op op = { HYPERVISOR_event_channel_op, EVTCHNOP_bind_interdomain, 1, &b, sizeof b, 0, fds, 2, 0 };
    int rc = pvio_call1(&op);
    if (rc)
        return rc;
    if (op.nr_fds != 2) {
        for (int i = 0; i < op.nr_fds; i++)
            real.close(fds[i]);
        return -EPROTO;
    }
    return add_port(e, b.local_port, fds[0], fds[1], -1);
}

static struct port *ours(struct evtchn *e, uint32_t port, int *rc)
{
    if (port >= NR_PORTS) {
        *rc = -EINVAL;
        return NULL;
    }
    struct port *p = ports[port];
    if (!p || p->owner != e) {
        *rc = -ENOTCONN;
        return NULL;
    }
    return p;
}

static void unbind(struct port *p)
{
    evtchn_close_t cl = { .port = p->port };
    struct hc_op op = { HYPERVISOR_event_channel_op, EVTCHNOP_close, 1, &cl, sizeof cl, 0, NULL, 0, 0 };
    pvio_call(&op, 1);
    drop_port(p);
}

static void notify(struct port *p)
{
    if (p->virq >= 0)
        return; /* Xen refuses a send on a VIRQ port; Linux ignores that */
    if (p->tx_fd < 0)
        pvio_poll_pushes(); /* has the peer bound since? */
    if (p->tx_fd >= 0) {
        uint64_t one = 1;
        if (real.write(p->tx_fd, &one, sizeof one) == sizeof one)
            return;
    }
    evtchn_send_t s = { .port = p->port };
    struct hc_op op = { HYPERVISOR_event_channel_op, EVTCHNOP_send, 1, &s, sizeof s, 0, NULL, 0, 0 };
    pvio_call(&op, 1);
}

/* Delivered-but-unread events are forgotten; their ports stay masked. */
static void reset(struct evtchn *e)
{
    struct epoll_event ev[64];
    int n;
    while ((n = epoll_wait(e->epfd, ev, 64, 0)) > 0)
        for (int i = 0; i < n; i++) {
            struct port *p = ev[i].data.u32 < NR_PORTS ? ports[ev[i].data.u32] : NULL;
            if (p && p->owner == e) {
                uint64_t v;
                if (real.read(p->rx_fd, &v, sizeof v) < 0) { /* nothing pending */ }
                p->enabled = 0;
            }
        }
}

/* The push thread: pushes are otherwise handled only when a call meets them, and a
 * daemon idle in poll() makes no call.  A reply in flight wakes it too; it then waits
 * for the lock, which the caller holds until it has read its reply, and finds nothing. */
static void *watch_pushes(void *unused)
{
    (void)unused;
    int sock = pvio_dom.sock;
    for (;;) {
        struct pollfd pfd = { .fd = sock, .events = POLLIN };
        if (poll(&pfd, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (pfd.revents & (POLLHUP | POLLERR | POLLNVAL))
            break;
        pthread_mutex_lock(&pvio_lock);
        int same = pvio_dom.sock == sock;
        if (same)
            pvio_poll_pushes();
        pthread_mutex_unlock(&pvio_lock);
        if (!same)
            break;
    }
    return NULL;
}

static int start_push_watcher(void)
{
    if (push_watcher == getpid())
        return 0;
    pthread_t t;
    pthread_attr_t attr;
    sigset_t all, old;
    sigfillset(&all);
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the program's signals stay its threads' */
    int rc = pthread_create(&t, &attr, watch_pushes, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc)
        return -rc;
    push_watcher = getpid();
    return 0;
}

void evtchn_domain_dead(uint16_t domid)
{
    (void)domid; /* VIRQ_DOM_EXC says only "some domain": the daemon asks which */
    struct port *p = virq_ports[VIRQ_DOM_EXC];
    uint64_t one = 1;
    if (p && real.write(p->rx_fd, &one, sizeof one) < 0) { /* the counter is full: pending anyway */ }
}

int evtchn_ioctl(struct dev *d, unsigned long req, void *arg)
{
    struct evtchn *e = d->priv;
    int rc = 0;
    struct port *p;
    switch (req) {
    case IOCTL_EVTCHN_BIND_VIRQ: {
        struct ioctl_evtchn_bind_virq *a = arg;
        if (e->restrict_domid != UNRESTRICTED)
            return -EACCES;
        if (a->virq >= NR_VIRQS)
            return -EINVAL;
        if (virqs_bound & (1u << a->virq))
            return -EEXIST;
        if (a->virq == VIRQ_DOM_EXC && (rc = start_push_watcher()))
            return rc;
        return alloc_unbound(e, DOMID_SELF, (int)a->virq);
    }
    case IOCTL_EVTCHN_BIND_INTERDOMAIN: {
        struct ioctl_evtchn_bind_interdomain *a = arg;
        if (e->restrict_domid != UNRESTRICTED && e->restrict_domid != a->remote_domain)
            return -EACCES;
        return bind_interdomain(e, a->remote_domain, a->remote_port);
    }
    case IOCTL_EVTCHN_BIND_UNBOUND_PORT: {
        struct ioctl_evtchn_bind_unbound_port *a = arg;
        if (e->restrict_domid != UNRESTRICTED)
            return -EACCES;
        if (a->remote_domain >= DOMID_FIRST_RESERVED && a->remote_domain != DOMID_SELF)
            return -ESRCH;
        return alloc_unbound(e, (uint16_t)a->remote_domain, -1);
    }
    case IOCTL_EVTCHN_UNBIND:
        if (!(p = ours(e, ((struct ioctl_evtchn_unbind *)arg)->port, &rc)))
            return rc;
        unbind(p);
        return 0;
    case IOCTL_EVTCHN_NOTIFY:
        if (!(p = ours(e, ((struct ioctl_evtchn_notify *)arg)->port, &rc)))
            return rc;
        notify(p);
        return 0;
    case IOCTL_EVTCHN_RESET:
        reset(e);
        return 0;
    case IOCTL_EVTCHN_RESTRICT_DOMID: {
        struct ioctl_evtchn_restrict_domid *a = arg;
        if (e->restrict_domid != UNRESTRICTED)
            return -EACCES;
        if (a->domid == 0 || a->domid >= DOMID_FIRST_RESERVED)
            return -EINVAL;
        e->restrict_domid = a->domid;
        return 0;
    }
    default:
        return -ENOSYS;
    }
}

ssize_t evtchn_read(struct dev *d, void *buf, size_t count)
{
    struct evtchn *e = d->priv;
    count &= ~(size_t)3;
    if (!count)
        return 0;
    if (count > PAGE_SIZE)
        count = PAGE_SIZE;
    struct epoll_event ev[PAGE_SIZE / 4];
    int max = (int)(count / 4);
    int nonblock = fcntl(e->epfd, F_GETFL) & O_NONBLOCK;
    for (;;) {
        /* Waits without the lock: other threads bind, notify and unmask meanwhile. */
        pthread_mutex_unlock(&pvio_lock);
        int n = epoll_wait(e->epfd, ev, max, nonblock ? 0 : -1);
        int err = errno;
        pthread_mutex_lock(&pvio_lock);
        if (n < 0)
            return -err;
        if (n == 0)
            return -EAGAIN;
        uint32_t out[PAGE_SIZE / 4];
        int k = 0;
        for (int i = 0; i < n; i++) {
            uint32_t port = ev[i].data.u32;
            struct port *p = port < NR_PORTS ? ports[port] : NULL;
            if (!p || p->owner != e)
                continue; /* unbound meanwhile */
            uint64_t v;
            if (real.read(p->rx_fd, &v, sizeof v) < 0) { /* already drained */ }
            p->enabled = 0;
            out[k++] = port;
        }
        if (k) {
            memcpy(buf, out, (size_t)k * 4);
            return (ssize_t)k * 4;
        }
    }
}

ssize_t evtchn_write(struct dev *d, const void *buf, size_t count)
{
    struct evtchn *e = d->priv;
    count &= ~(size_t)3;
    if (!count)
        return 0;
    if (count > PAGE_SIZE)
        count = PAGE_SIZE;
    uint32_t in[PAGE_SIZE / 4];
    memcpy(in, buf, count);
    for (size_t i = 0; i < count / 4; i++) {
        struct port *p = in[i] < NR_PORTS ? ports[in[i]] : NULL;
        if (p && p->owner == e && !p->enabled) {
            p->enabled = 1;
            arm(p, EPOLL_CTL_MOD);
        }
    }
    return (ssize_t)count;
}

void evtchn_close(struct dev *d)
{
    struct evtchn *e = d->priv;
    for (uint32_t i = 0; i < NR_PORTS; i++)
        if (ports[i] && ports[i]->owner == e)
            unbind(ports[i]);
    real.close(e->epfd);
    free(e);
}

void evtchn_push(uint16_t cmd, const struct pvio_push_port *a, int *fds, int nr_fds)
{
    struct port *p = a->port < NR_PORTS ? ports[a->port] : NULL;
    if (cmd == PVIO_PUSH_port_bound && p && nr_fds == 1) {
        if (p->tx_fd >= 0)
            real.close(p->tx_fd);
        p->tx_fd = fds[0];
        return;
    }
    if (cmd == PVIO_PUSH_port_unbound && p && p->tx_fd >= 0) {
        real.close(p->tx_fd); /* the peer closed: sends are dropped, as Xen's */
        p->tx_fd = -1;
    }
    for (int i = 0; i < nr_fds; i++)
        real.close(fds[i]);
}

int evtchn_port_bound(uint32_t port)
{
    return port < NR_PORTS && ports[port];
}

int evtchn_notify_port(uint32_t port)
{
    if (!evtchn_port_bound(port))
        return -EINVAL;
    notify(ports[port]);
    return 0;
}
