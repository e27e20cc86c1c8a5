/* The connection to `pvio hypervisor`, and the domain it makes of this process.
 *
 * Frames are pvio's (pvio_wire.h; src/pvio/hypervisor/wire.py tells the story): a
 * request is a header and ops, each an op header and Xen's own structs; the reply
 * repeats the ops with OUT fields and rc filled, and descriptors come by SCM_RIGHTS in
 * op order.  A push (seq 0) may arrive between a request and its reply, or at any
 * time: it is handled where it is met (evtchn_push, evtchn_domain_dead) and never lost.
 *
 * The first device open connects and sends, in one frame, PVIO_DOMCTL_createdomain
 * (the domid from PVIO_DOMID; a small memory whose frames bounce GRANT_COPY data) and
 * GNTTABOP_setup_table (our whole grant table at once).  The reply brings the memory
 * and the grant table as memfds, which are mapped here.  PVIO_XS_DOMAIN=1 makes the
 * domain Xen's XenStore domain (PVIO_CDF_xs_domain), PVIO_CONTROL=1 a daemon with the
 * control domain's trust (PVIO_CDF_control): either may ask about other domains.
 *
 * Our grant table is shared memory the hypervisor reads: an entry is granted by
 * writing frame and domid, then the flags (x86-64 keeps stores in order; the compiler
 * is held by a release store), and its access ended by a compare-and-swap of the first
 * word that fails while the hypervisor has GTF_reading/GTF_writing set in it.
 */
#define _GNU_SOURCE
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <xen/xen.h>
#include <xen/grant_table.h>

#include "pvio_xen.h"

struct pvio_domain pvio_dom = { .sock = -1 };

#define NR_PAGES 256           /* bounce frames: 1 MiB */
#define MAX_GRANT_FRAMES 4     /* 2048 references */
#define RESERVED_REFS 8        /* GNTTAB_NR_RESERVED_ENTRIES */

static uint8_t *frame_buf;      /* one frame in or out (MAX_FRAME) */
static uint32_t seq;
static uint32_t *free_refs;    /* a stack of free grant references */
static uint32_t nr_free_refs;

static void say(const char *fmt, const char *what, int err)
{
    fprintf(stderr, fmt, what, strerror(err));
}

static int env_u32(const char *name, uint32_t max, uint32_t *out)
{
    const char *s = getenv(name);
    char *end;
    if (!s || !*s)
        return -1;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *end || v > max)
        return -1;
    *out = (uint32_t)v;
    return 0;
}

static int send_frame(struct hc_op *ops, int n, uint32_t myseq)
{
    size_t off = sizeof(struct pvio_hc_frame);
    for (int i = 0; i < n; i++) {
        size_t need = sizeof(struct pvio_hc_op) + ops[i].len;
        if (off + need > MAX_FRAME)
            return -E2BIG;
        struct pvio_hc_op h = { ops[i].hypercall, ops[i].cmd, ops[i].count, ops[i].len, 0, 0 };
        memcpy(frame_buf + off, &h, sizeof h);
        memcpy(frame_buf + off + sizeof h, ops[i].args, ops[i].len);
        off += need;
    }
    struct pvio_hc_frame f = { PVIO_HC_MAGIC, (uint32_t)off, myseq, FRAME_REQUEST, (uint16_t)n };
    memcpy(frame_buf, &f, sizeof f);
    ssize_t sent;
    do
        sent = send(pvio_dom.sock, frame_buf, off, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent != (ssize_t)off)
        return sent < 0 ? -errno : -EIO;
    return 0;
}

/* Receive one frame into frame_buf and its descriptors into fds; -errno on failure. */
static ssize_t recv_frame(int *fds, int *nr_fds, int flags)
{
    union { char buf[CMSG_SPACE(MAX_FDS * sizeof(int))]; struct cmsghdr align; } c;
    struct iovec iov = { frame_buf, MAX_FRAME };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = c.buf, .msg_controllen = sizeof c.buf };
    ssize_t got;
    do
        got = recvmsg(pvio_dom.sock, &msg, MSG_CMSG_CLOEXEC | flags);
    while (got < 0 && errno == EINTR);
    *nr_fds = 0;
    if (got < 0)
        return -errno;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&msg); h; h = CMSG_NXTHDR(&msg, h)) {
        if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS)
            continue;
        int k = (int)((h->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int j = 0; j < k; j++) {
            int fd;
            memcpy(&fd, CMSG_DATA(h) + j * sizeof(int), sizeof fd);
            if (*nr_fds < MAX_FDS)
                fds[(*nr_fds)++] = fd;
            else
                real.close(fd);
        }
    }
    if (got == 0)
        return -ECONNRESET; /* the hypervisor went away */
    if (msg.msg_flags & MSG_TRUNC)
        return -EPROTO;
    return got;
}

static void close_all(int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            real.close(fds[i]);
}

/* Walk the ops of the frame in frame_buf (`got` bytes): checks every length; for a
 * push, hands each op to its handler; for a reply, fills `ops`.  Descriptors are given
 * to their op or closed. */
static int parse_frame(ssize_t got, int *fds, int nr_fds, struct hc_op *ops, int n)
{
    struct pvio_hc_frame f;
    if ((size_t)got < sizeof f)
        return -EPROTO;
    memcpy(&f, frame_buf, sizeof f);
    if (f.magic != PVIO_HC_MAGIC || f.length != (uint32_t)got)
        return -EPROTO;
    if (f.kind == FRAME_ERROR) {
        struct pvio_hc_op h;
        close_all(fds, nr_fds);
        if ((size_t)got < sizeof f + sizeof h)
            return -EPROTO;
        memcpy(&h, frame_buf + sizeof f, sizeof h);
        return h.rc < 0 ? h.rc : -EPROTO;
    }
    int is_push = f.kind == FRAME_PUSH;
    if (!is_push && (f.kind != FRAME_REPLY || f.nr_ops != n)) {
        close_all(fds, nr_fds);
        return -EPROTO;
    }
    size_t off = sizeof f;
    int used = 0;
    for (int i = 0; i < f.nr_ops; i++) {
        struct pvio_hc_op h;
        if (off + sizeof h > (size_t)got)
            goto bad;
        memcpy(&h, frame_buf + off, sizeof h);
        off += sizeof h;
        if (h.length > (size_t)got - off || h.nr_fds > nr_fds - used)
            goto bad;
        int *opfds = fds + used;
        used += h.nr_fds;
        if (is_push) {
            struct pvio_push_port p;
            if (h.hypercall == PVIO_HYPERVISOR_push && h.length == sizeof p &&
                (h.cmd == PVIO_PUSH_port_bound || h.cmd == PVIO_PUSH_port_unbound)) {
                memcpy(&p, frame_buf + off, sizeof p);
                evtchn_push(h.cmd, &p, opfds, h.nr_fds);
            } else if (h.hypercall == PVIO_HYPERVISOR_push && h.cmd == PVIO_PUSH_domain_dead &&
                       h.length == sizeof(struct pvio_push_domain)) {
                struct pvio_push_domain dd;
                memcpy(&dd, frame_buf + off, sizeof dd);
                close_all(opfds, h.nr_fds);
                evtchn_domain_dead(dd.domid);
            } else {
                close_all(opfds, h.nr_fds);
            }
        } else {
            struct hc_op *o = &ops[i];
            o->rc = h.rc;
            if (o->len)
                memcpy(o->args, frame_buf + off, h.length < o->len ? h.length : o->len);
            o->nr_fds = 0;
            for (int j = 0; j < h.nr_fds; j++) {
                if (o->nr_fds < o->max_fds)
                    o->fds[o->nr_fds++] = opfds[j];
                else
                    real.close(opfds[j]);
            }
        }
        off += h.length;
    }
    if (used != nr_fds || off != (size_t)got)
        goto bad;
    return is_push ? 1 : 0;
bad:
    close_all(fds + used, nr_fds - used);
    return -EPROTO;
}

static int call_raw(struct hc_op *ops, int n)
{
    static int fds[MAX_FDS];
    uint32_t myseq = seq = seq % 0xFFFFFFFFu + 1;
    int rc = send_frame(ops, n, myseq);
    if (rc)
        return rc;
    for (;;) {
        int nr_fds;
        ssize_t got = recv_frame(fds, &nr_fds, 0);
        if (got < 0) {
            close_all(fds, nr_fds);
            return (int)got;
        }
        struct pvio_hc_frame f;
        if ((size_t)got >= sizeof f) {
            memcpy(&f, frame_buf, sizeof f);
            if (f.kind != FRAME_PUSH && f.seq != myseq) {
                close_all(fds, nr_fds); /* a stale reply: not ours */
                continue;
            }
        }
        rc = parse_frame(got, fds, nr_fds, ops, n);
        if (rc <= 0)
            return rc;
    }
}

int pvio_call(struct hc_op *ops, int n)
{
    int rc = pvio_connect();
    if (rc)
        return rc;
    for (int i = 0; i < n; i++)
        ops[i].nr_fds = 0;
    rc = call_raw(ops, n);
    if (rc == -ECONNRESET || rc == -EPIPE)
        fprintf(stderr, "pvio-xen: d%u: the hypervisor closed the connection\n", pvio_dom.domid);
    return rc;
}

void pvio_poll_pushes(void)
{
    static int fds[MAX_FDS];
    if (pvio_dom.sock < 0)
        return;
    for (;;) {
        int nr_fds;
        ssize_t got = recv_frame(fds, &nr_fds, MSG_DONTWAIT);
        if (got < 0) {
            close_all(fds, nr_fds);
            return;
        }
        parse_frame(got, fds, nr_fds, NULL, 0);
    }
}

static void disconnect(void)
{
    if (pvio_dom.mem)
        real.munmap(pvio_dom.mem, (size_t)pvio_dom.nr_pages * PAGE_SIZE);
    if (pvio_dom.gnttab)
        real.munmap(pvio_dom.gnttab, (size_t)pvio_dom.max_grant_frames * PAGE_SIZE);
    if (pvio_dom.sock >= 0)
        real.close(pvio_dom.sock);
    free(free_refs);
    free_refs = NULL;
    nr_free_refs = 0;
    pvio_dom = (struct pvio_domain){ .sock = -1 };
}

int pvio_connect(void)
{
    if (pvio_dom.sock >= 0)
        return 0;
    const char *path = getenv("PVIO_HYPERVISOR_SOCKET");
    uint32_t domid;
    if (!path || !*path)
        return -ENOENT; /* no hypervisor: as a kernel without Xen */
    if (env_u32("PVIO_DOMID", DOMID_FIRST_RESERVED - 1, &domid)) {
        fprintf(stderr, "pvio-xen: PVIO_DOMID must be a domain id below %u\n", DOMID_FIRST_RESERVED);
        return -EINVAL;
    }
    const char *transport = getenv("PVIO_TRANSPORT");
    int copy = transport && strcmp(transport, "copy") == 0;
    if (transport && !copy && strcmp(transport, "map") != 0) {
        fprintf(stderr, "pvio-xen: PVIO_TRANSPORT must be map or copy, not %s\n", transport);
        return -EINVAL;
    }
    if (!frame_buf && !(frame_buf = malloc(MAX_FRAME)))
        return -ENOMEM;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof sa.sun_path)
        return -ENAMETOOLONG;
    strcpy(sa.sun_path, path);
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -errno;
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int e = errno;
        say("pvio-xen: cannot reach the hypervisor at %s: %s\n", path, e);
        real.close(s);
        return -e;
    }
    pvio_dom.sock = s;
    pvio_dom.domid = (uint16_t)domid;

    const char *xs = getenv("PVIO_XS_DOMAIN"), *control = getenv("PVIO_CONTROL");
    uint16_t flags = (copy ? PVIO_CDF_copy_transport : 0) | (xs && !strcmp(xs, "1") ? PVIO_CDF_xs_domain : 0) |
                     (control && !strcmp(control, "1") ? PVIO_CDF_control : 0);
    struct pvio_createdomain cd = { .domid = (uint16_t)domid, .flags = flags,
                                    .nr_pages = NR_PAGES, .max_grant_frames = MAX_GRANT_FRAMES };
    const char *name = getenv("PVIO_NAME");
    snprintf(cd.name, sizeof cd.name, "%s", name && *name ? name : "pvio-run");
    gnttab_setup_table_t st = { .dom = DOMID_SELF, .nr_frames = MAX_GRANT_FRAMES };
    int fds[2];
    struct hc_op ops[2] = {
        { PVIO_HYPERVISOR_domctl, PVIO_DOMCTL_createdomain, 1, &cd, sizeof cd, 0, fds, 2, 0 },
        { HYPERVISOR_grant_table_op, GNTTABOP_setup_table, 1, &st, sizeof st, 0, NULL, 0, 0 },
    };
    int rc = call_raw(ops, 2);
    if (!rc && (ops[0].rc || ops[0].nr_fds != 2))
        rc = ops[0].rc ? ops[0].rc : -EPROTO;
    if (!rc && (ops[1].rc || st.status != GNTST_okay))
        rc = -ENOMEM;
    if (rc) {
        close_all(fds, ops[0].nr_fds);
        fprintf(stderr, "pvio-xen: cannot become domain %u: %s\n", domid, strerror(-rc));
        disconnect();
        return rc;
    }
    pvio_dom.pid = getpid();
    pvio_dom.copy_transport = copy;
    pvio_dom.nr_pages = cd.nr_pages;
    pvio_dom.max_grant_frames = MAX_GRANT_FRAMES;
    pvio_dom.nr_grant_entries = MAX_GRANT_FRAMES * (PAGE_SIZE / sizeof(grant_entry_v1_t));
    pvio_dom.mem = real.mmap(NULL, (size_t)cd.nr_pages * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
    pvio_dom.gnttab = real.mmap(NULL, MAX_GRANT_FRAMES * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fds[1], 0);
    real.close(fds[0]);
    real.close(fds[1]);
    free_refs = malloc(pvio_dom.nr_grant_entries * sizeof *free_refs);
    if (pvio_dom.mem == MAP_FAILED || pvio_dom.gnttab == MAP_FAILED || !free_refs) {
        if (pvio_dom.mem == MAP_FAILED)
            pvio_dom.mem = NULL;
        if (pvio_dom.gnttab == MAP_FAILED)
            pvio_dom.gnttab = NULL;
        disconnect();
        return -ENOMEM;
    }
    for (uint32_t r = pvio_dom.nr_grant_entries; r-- > RESERVED_REFS;)
        free_refs[nr_free_refs++] = r;
    return 0;
}

void pvio_forget(void)
{
    /* The child of a fork: the connection (and every mapping) is the parent's.  Only
     * our copy of the socket is closed; the parent's domain lives on. */
    if (pvio_dom.sock >= 0)
        real.close(pvio_dom.sock);
    free(free_refs);
    free_refs = NULL;
    nr_free_refs = 0;
    pvio_dom = (struct pvio_domain){ .sock = -1 };
}

/* -- our grant table --------------------------------------------------------------------- */

int pvio_gref_alloc(uint32_t *ref)
{
    if (!nr_free_refs)
        return -ENOSPC;
    *ref = free_refs[--nr_free_refs];
    return 0;
}

void pvio_gref_free(uint32_t ref)
{
    free_refs[nr_free_refs++] = ref;
}

void pvio_gref_set(uint32_t ref, uint16_t domid, uint32_t frame, int readonly)
{
    grant_entry_v1_t *e = (grant_entry_v1_t *)pvio_dom.gnttab + ref;
    e->frame = frame;
    e->domid = domid;
    /* The flags last: the hypervisor must not see GTF_permit_access before the frame. */
    __atomic_store_n(&e->flags, (uint16_t)(GTF_permit_access | (readonly ? GTF_readonly : 0)), __ATOMIC_RELEASE);
}

int pvio_gref_end(uint32_t ref)
{
    uint32_t *word = (uint32_t *)((grant_entry_v1_t *)pvio_dom.gnttab + ref);
    uint32_t old = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    for (;;) {
        if (old & (GTF_reading | GTF_writing))
            return 0;
        if (__atomic_compare_exchange_n(word, &old, old & 0xFFFF0000u, 0, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE))
            return 1;
    }
}

int pvio_call1(struct hc_op *op)
{
    int rc = pvio_call(op, 1);
    return rc ? rc : op->rc;
}
