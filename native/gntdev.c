/* /dev/xen/gntdev: mapping and copying other domains' grants, as Linux's gntdev.
 *
 * MAP_GRANT_REF only records the references and answers an offset (`index`) into the
 * device; nothing is asked of the hypervisor until mmap at that offset, which maps the
 * grants (read-only unless PROT_WRITE, as Linux decides from the VMA) in one
 * GNTTABOP_map_grant_ref batch.  What is mapped is the granter's page itself:
 *
 *   - a shareable frame (where rings and vchan pages live) comes as that one page's
 *     memfd (PVIO_DOMCTL_page_fd), in both transports;
 *   - an ordinary frame, in the map transport only, is the granter's memory fd at the
 *     frame's offset (PVIO_DOMCTL_memory_fd; the hypervisor gives it only to a domain
 *     that maps one of its grants now).  The copy transport never holds another
 *     domain's memory: there, such an mmap fails with EPERM after the hypervisor has
 *     checked the grant (use GRANT_COPY).
 *
 * A grant that the hypervisor refuses (not granted to us, read-only for a writable
 * map, bad reference) fails the whole mmap with EINVAL, as in Linux, and nothing stays
 * mapped.  munmap unmaps the grants (after an UNMAP_NOTIFY_CLEAR_BYTE); UNMAP_GRANT_REF
 * forgets the offset, before or after munmap; the SEND_EVENT notification goes when
 * both are done (or the device is closed), as Linux's last reference to the map.
 *
 * GRANT_COPY: each segment is checked as Linux does (a local-to-local or page-crossing
 * grant side is EINVAL for the whole call), split at page boundaries of its local
 * side, and batched into GNTTABOP_copy ops against bounce frames of our own memory:
 * one hypervisor round trip per 256 ops.  Each segment's status is the first failing
 * op's GNTST_* status (GNTST_okay otherwise).  The hypervisor checks every grant.
 */
#define _GNU_SOURCE
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/sys/gntdev.h>

#include "pvio_xen.h"

#define DEFAULT_LIMIT 65536u
#define COPY_BATCH 256

struct gmap {
    uint64_t index;   /* in pages */
    uint32_t count;
    struct ioctl_gntdev_grant_ref *refs;
    uint32_t *handles;
    int listed;       /* not yet UNMAP_GRANT_REF'd */
    int readonly;
    struct vmap vm;   /* vm.start == 0: not mmapped */
    uint32_t notify_flags, notify_addr, notify_port;
    struct gntdev *dev;
    struct gmap *next;
};

struct gntdev {
    struct gmap *maps; /* listed maps, by index */
    uint32_t limit, live;
};

int gntdev_open(struct dev *d)
{
    struct gntdev *g = calloc(1, sizeof *g);
    if (!g)
        return -ENOMEM;
    g->limit = DEFAULT_LIMIT;
    d->priv = g;
    return 0;
}

static void free_map(struct gmap *m)
{
    if (m->notify_flags & UNMAP_NOTIFY_SEND_EVENT)
        evtchn_notify_port(m->notify_port);
    if (m->dev)
        m->dev->live -= m->count;
    free(m->refs);
    free(m->handles);
    free(m);
}

static void unlist(struct gntdev *g, struct gmap *m)
{
    for (struct gmap **pp = &g->maps; *pp; pp = &(*pp)->next)
        if (*pp == m) {
            *pp = m->next;
            break;
        }
    m->listed = 0;
    m->next = NULL;
}

static int unmap_handles(uint32_t *handles, uint32_t n)
{
    gnttab_unmap_grant_ref_t *u = calloc(n, sizeof *u);
    if (!u)
        return -ENOMEM;
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++)
        if (handles[i] != ~0u)
            u[k++].handle = handles[i];
    int rc = 0;
    if (k) {
        struct hc_op op = { HYPERVISOR_grant_table_op, GNTTABOP_unmap_grant_ref, k, u, k * (uint32_t)sizeof *u, 0, NULL, 0, 0 };
        rc = pvio_call(&op, 1);
    }
    for (uint32_t i = 0; i < n; i++)
        handles[i] = ~0u;
    free(u);
    return rc;
}

static int map_grant_ref(struct gntdev *g, struct ioctl_gntdev_map_grant_ref *a)
{
    if (a->count == 0 || a->count > g->limit)
        return -EINVAL;
    if (g->live + a->count > g->limit)
        return -ENOMEM;
    struct gmap *m = calloc(1, sizeof *m);
    if (!m)
        return -ENOMEM;
    m->refs = malloc(a->count * sizeof *m->refs);
    m->handles = malloc(a->count * sizeof *m->handles);
    if (!m->refs || !m->handles) {
        free(m->refs);
        free(m->handles);
        free(m);
        return -ENOMEM;
    }
    memcpy(m->refs, a->refs, a->count * sizeof *m->refs);
    for (uint32_t i = 0; i < a->count; i++)
        m->handles[i] = ~0u;
    m->count = a->count;
    m->dev = g;
    m->listed = 1;
    /* The lowest free range of offsets, as Linux's add_map. */
    uint64_t index = 0;
    struct gmap **pp = &g->maps;
    for (; *pp; pp = &(*pp)->next) {
        if (index + m->count <= (*pp)->index)
            break;
        index = (*pp)->index + (*pp)->count;
    }
    m->index = index;
    m->next = *pp;
    *pp = m;
    g->live += m->count;
    a->index = index << PAGE_SHIFT;
    return 0;
}

static struct gmap *find_exact(struct gntdev *g, uint64_t index, uint32_t count)
{
    for (struct gmap *m = g->maps; m; m = m->next)
        if (m->index == index && m->count == count)
            return m;
    return NULL;
}

/* Map the grants of `m` into [base, base + count pages): 0 or -errno, all or nothing. */
static int map_pages(struct gmap *m, uint8_t *base, int prot)
{
    uint32_t n = m->count;
    int rc = -ENOMEM;
    gnttab_map_grant_ref_t *mo = calloc(n, sizeof *mo);
    struct pvio_page_fd *pf = calloc(n, sizeof *pf);
    int *fds = malloc(n * sizeof *fds);
    uint32_t *which = malloc(n * sizeof *which);
    if (!mo || !pf || !fds || !which)
        goto out;
    for (uint32_t i = 0; i < n; i++) {
        mo[i].flags = GNTMAP_host_map | (m->readonly ? GNTMAP_readonly : 0);
        mo[i].ref = m->refs[i].ref;
        mo[i].dom = (domid_t)m->refs[i].domid;
    }
    struct hc_op op = { HYPERVISOR_grant_table_op, GNTTABOP_map_grant_ref, n, mo, n * (uint32_t)sizeof *mo, 0, NULL, 0, 0 };
    if ((rc = pvio_call1(&op)))
        goto out;
    rc = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (mo[i].status == GNTST_okay)
            m->handles[i] = mo[i].handle;
        else if (!rc)
            rc = -EINVAL; /* Linux's answer to any refused grant */
    }
    /* Shareable frames: that page's own memfd; ordinary frames: the granter's memory. */
    uint32_t nshare = 0;
    for (uint32_t i = 0; !rc && i < n; i++) {
        uint64_t frame = mo[i].dev_bus_addr >> PAGE_SHIFT;
        if (frame >= SHAREABLE_FRAME_BASE) {
            pf[nshare] = (struct pvio_page_fd){ .domid = mo[i].dom, .ref = mo[i].ref };
            which[nshare++] = i;
        } else if (pvio_dom.copy_transport) {
            rc = -EPERM; /* copy transport: never another domain's memory */
        }
    }
    for (uint32_t done = 0; !rc && done < nshare;) {
        uint32_t k = nshare - done < MAX_FDS ? nshare - done : MAX_FDS;
        struct hc_op po = { PVIO_HYPERVISOR_domctl, PVIO_DOMCTL_page_fd, k, pf + done, k * (uint32_t)sizeof *pf, 0, fds, (int)k, 0 };
        if ((rc = pvio_call(&po, 1)) || (rc = po.rc))
            break;
        int f = 0;
        for (uint32_t j = 0; j < k; j++) {
            int fd = pf[done + j].status == 0 && f < po.nr_fds ? fds[f++] : -1;
            void *at = base + (size_t)which[done + j] * PAGE_SIZE;
            if (fd < 0 || real.mmap(at, PAGE_SIZE, prot, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED)
                rc = rc ? rc : (fd < 0 ? -EINVAL : -errno);
            if (fd >= 0)
                real.close(fd);
        }
        for (; f < po.nr_fds; f++)
            real.close(fds[f]);
        done += k;
    }
    for (uint32_t i = 0; !rc && i < n; i++) {
        uint64_t frame = mo[i].dev_bus_addr >> PAGE_SHIFT;
        if (frame >= SHAREABLE_FRAME_BASE)
            continue;
        struct pvio_memory_fd mf = { .domid = mo[i].dom };
        int fd = -1;
        struct hc_op fo = { PVIO_HYPERVISOR_domctl, PVIO_DOMCTL_memory_fd, 1, &mf, sizeof mf, 0, &fd, 1, 0 };
        if ((rc = pvio_call(&fo, 1)) || (rc = fo.rc))
            break;
        /* Every ordinary frame of this granter, with its one descriptor. */
        for (uint32_t j = i; j < n; j++) {
            uint64_t fj = mo[j].dev_bus_addr >> PAGE_SHIFT;
            if (fj >= SHAREABLE_FRAME_BASE || mo[j].dom != mf.domid || mo[j].status != GNTST_okay)
                continue;
            if (fj >= mf.nr_pages ||
                real.mmap(base + (size_t)j * PAGE_SIZE, PAGE_SIZE, prot, MAP_SHARED | MAP_FIXED, fd, (off_t)(fj << PAGE_SHIFT)) == MAP_FAILED)
                rc = rc ? rc : -EINVAL;
            mo[j].dev_bus_addr = (uint64_t)SHAREABLE_FRAME_BASE << PAGE_SHIFT; /* done */
        }
        real.close(fd);
    }
out:
    if (rc)
        unmap_handles(m->handles, n);
    free(mo);
    free(pf);
    free(fds);
    free(which);
    return rc;
}

void *gntdev_mmap(struct dev *d, void *addr, size_t len, int prot, int flags, off_t off)
{
    struct gntdev *g = d->priv;
    int rc = -EINVAL;
    if (!len || off < 0 || (off & (PAGE_SIZE - 1)) || ((prot & PROT_WRITE) && !(flags & MAP_SHARED)))
        goto fail;
    uint32_t count = (uint32_t)((len + PAGE_SIZE - 1) >> PAGE_SHIFT);
    struct gmap *m = find_exact(g, (uint64_t)off >> PAGE_SHIFT, count);
    if (!m || m->vm.start)
        goto fail;
    uint8_t *base = reserve_range(addr, (size_t)count * PAGE_SIZE, flags);
    if (base == MAP_FAILED) {
        rc = -errno;
        goto fail;
    }
    m->readonly = !(prot & PROT_WRITE);
    rc = map_pages(m, base, prot);
    if (rc) {
        real.munmap(base, (size_t)count * PAGE_SIZE);
        goto fail;
    }
    m->vm = (struct vmap){ (uintptr_t)base, (uintptr_t)base + (size_t)count * PAGE_SIZE, DEV_GNTDEV, m, NULL };
    vmap_add(&m->vm);
    return base;
fail:
    errno = -rc;
    return MAP_FAILED;
}

/* munmap met this map: its grants are unmapped now. */
void gntdev_vm_unmapped(struct vmap *v)
{
    struct gmap *m = v->obj;
    if ((m->notify_flags & UNMAP_NOTIFY_CLEAR_BYTE) && m->notify_addr < m->count * PAGE_SIZE)
        ((volatile uint8_t *)m->vm.start)[m->notify_addr] = 0;
    vmap_del(v);
    real.munmap((void *)m->vm.start, m->vm.end - m->vm.start);
    unmap_handles(m->handles, m->count);
    m->vm.start = m->vm.end = 0;
    if (!m->listed)
        free_map(m);
}

static int set_unmap_notify(struct gntdev *g, struct ioctl_gntdev_unmap_notify *a)
{
    if (a->action & ~(uint32_t)(UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT))
        return -EINVAL;
    if ((a->action & UNMAP_NOTIFY_SEND_EVENT) && !evtchn_port_bound(a->event_channel_port))
        return -EINVAL;
    for (struct gmap *m = g->maps; m; m = m->next) {
        uint64_t begin = m->index << PAGE_SHIFT, end = (m->index + m->count) << PAGE_SHIFT;
        if (a->index >= begin && a->index < end) {
            if ((a->action & UNMAP_NOTIFY_CLEAR_BYTE) && m->readonly && m->vm.start)
                return -EINVAL;
            m->notify_flags = a->action;
            m->notify_addr = (uint32_t)(a->index - begin);
            m->notify_port = a->event_channel_port;
            return 0;
        }
    }
    return -ENOENT;
}

/* -- GRANT_COPY ------------------------------------------------------------------------- */

struct copy_batch {
    gnttab_copy_t ops[COPY_BATCH];
    int16_t *status[COPY_BATCH];  /* the segment each op belongs to */
    uint8_t *virt[COPY_BATCH];    /* its local side, or NULL */
    int to_virt[COPY_BATCH];
    uint32_t n;
};

static int copy_flush(struct copy_batch *b)
{
    if (!b->n)
        return 0;
    for (uint32_t i = 0; i < b->n; i++)
        if (b->virt[i] && !b->to_virt[i]) {
            gnttab_copy_t *o = &b->ops[i];
            memcpy(pvio_dom.mem + (size_t)i * PAGE_SIZE + o->source.offset, b->virt[i], o->len);
        }
    struct hc_op op = { HYPERVISOR_grant_table_op, GNTTABOP_copy, b->n, b->ops, b->n * (uint32_t)sizeof b->ops[0], 0, NULL, 0, 0 };
    int rc = pvio_call1(&op);
    for (uint32_t i = 0; !rc && i < b->n; i++) {
        gnttab_copy_t *o = &b->ops[i];
        if (o->status != GNTST_okay) {
            if (*b->status[i] == GNTST_okay)
                *b->status[i] = o->status;
        } else if (b->virt[i] && b->to_virt[i]) {
            memcpy(b->virt[i], pvio_dom.mem + (size_t)i * PAGE_SIZE + o->dest.offset, o->len);
        }
    }
    b->n = 0;
    return rc;
}

static int grant_copy(struct ioctl_gntdev_grant_copy *a)
{
    int rc = pvio_connect();
    if (rc)
        return rc;
    struct copy_batch *b = calloc(1, sizeof *b);
    if (!b)
        return -ENOMEM;
    uint32_t batch = pvio_dom.nr_pages < COPY_BATCH ? pvio_dom.nr_pages : COPY_BATCH;
    for (unsigned int s = 0; !rc && s < a->count; s++) {
        struct ioctl_gntdev_grant_copy_segment *seg = &a->segments[s];
        int src_ref = seg->flags & GNTCOPY_source_gref, dst_ref = seg->flags & GNTCOPY_dest_gref;
        if (!src_ref && !dst_ref) {
            rc = -EINVAL; /* local to local */
            break;
        }
        if ((src_ref && seg->source.foreign.offset + (uint32_t)seg->len > PAGE_SIZE) ||
            (dst_ref && seg->dest.foreign.offset + (uint32_t)seg->len > PAGE_SIZE)) {
            rc = -EINVAL;
            break;
        }
        seg->status = GNTST_okay;
        for (uint32_t copied = 0; copied < seg->len;) {
            if (b->n == batch && (rc = copy_flush(b)))
                break;
            uint32_t i = b->n, len = seg->len - copied;
            gnttab_copy_t *o = &b->ops[i];
            memset(o, 0, sizeof *o);
            b->virt[i] = NULL;
            if (src_ref) {
                o->source.u.ref = seg->source.foreign.ref;
                o->source.domid = seg->source.foreign.domid;
                o->source.offset = (uint16_t)(seg->source.foreign.offset + copied);
                o->flags |= GNTCOPY_source_gref;
            } else {
                uint8_t *v = (uint8_t *)seg->source.virt + copied;
                uint32_t off = (uintptr_t)v & (PAGE_SIZE - 1);
                len = len < PAGE_SIZE - off ? len : PAGE_SIZE - off;
                o->source.u.gmfn = i;
                o->source.domid = DOMID_SELF;
                o->source.offset = (uint16_t)off;
                b->virt[i] = v;
                b->to_virt[i] = 0;
            }
            if (dst_ref) {
                o->dest.u.ref = seg->dest.foreign.ref;
                o->dest.domid = seg->dest.foreign.domid;
                o->dest.offset = (uint16_t)(seg->dest.foreign.offset + copied);
                o->flags |= GNTCOPY_dest_gref;
            } else {
                uint8_t *v = (uint8_t *)seg->dest.virt + copied;
                uint32_t off = (uintptr_t)v & (PAGE_SIZE - 1);
                len = len < PAGE_SIZE - off ? len : PAGE_SIZE - off;
                o->dest.u.gmfn = i;
                o->dest.domid = DOMID_SELF;
                o->dest.offset = (uint16_t)off;
                b->virt[i] = v;
                b->to_virt[i] = 1;
            }
            o->len = (uint16_t)len;
            b->status[i] = &seg->status;
            b->n++;
            copied += len;
        }
    }
    if (!rc)
        rc = copy_flush(b);
    free(b);
    return rc;
}

int gntdev_ioctl(struct dev *d, unsigned long req, void *arg)
{
    struct gntdev *g = d->priv;
    switch (req) {
    case IOCTL_GNTDEV_MAP_GRANT_REF:
        return map_grant_ref(g, arg);
    case IOCTL_GNTDEV_UNMAP_GRANT_REF: {
        struct ioctl_gntdev_unmap_grant_ref *a = arg;
        struct gmap *m = find_exact(g, a->index >> PAGE_SHIFT, a->count);
        if (!m)
            return -ENOENT;
        unlist(g, m);
        if (!m->vm.start)
            free_map(m);
        return 0;
    }
    case IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR: {
        struct ioctl_gntdev_get_offset_for_vaddr *a = arg;
        for (struct vmap *v = pvio_vmaps; v; v = v->next)
            if (v->kind == DEV_GNTDEV && a->vaddr >= v->start && a->vaddr < v->end) {
                struct gmap *m = v->obj;
                a->offset = m->index << PAGE_SHIFT;
                a->count = m->count;
                return 0;
            }
        return -EINVAL;
    }
    case IOCTL_GNTDEV_SET_MAX_GRANTS: {
        struct ioctl_gntdev_set_max_grants *a = arg;
        if (a->count > DEFAULT_LIMIT)
            return -E2BIG;
        g->limit = a->count;
        return 0;
    }
    case IOCTL_GNTDEV_SET_UNMAP_NOTIFY:
        return set_unmap_notify(g, arg);
    case IOCTL_GNTDEV_GRANT_COPY:
        return grant_copy(arg);
    default:
        return -ENOTTY;
    }
}

void gntdev_close(struct dev *d)
{
    struct gntdev *g = d->priv;
    while (g->maps) {
        struct gmap *m = g->maps;
        unlist(g, m);
        m->dev = NULL; /* a map still mmapped outlives the device, as its VMA in Linux */
        g->live -= m->count;
        if (!m->vm.start)
            free_map(m);
    }
    free(g);
}

/* The process is exiting without having unmapped: run the unmap notifications now, as
 * Linux does when the exiting process's mappings and files go (a peer watching the
 * byte, libxenvchan's `cli_live`, learns that we are gone). */
void gntdev_exit_notify(void)
{
    for (struct vmap *v = pvio_vmaps; v; v = v->next) {
        struct gmap *m = v->obj;
        if (v->kind != DEV_GNTDEV)
            continue;
        if ((m->notify_flags & UNMAP_NOTIFY_CLEAR_BYTE) && !m->readonly && m->notify_addr < m->count * PAGE_SIZE)
            ((volatile uint8_t *)m->vm.start)[m->notify_addr] = 0;
        if (m->notify_flags & UNMAP_NOTIFY_SEND_EVENT)
            evtchn_notify_port(m->notify_port);
        m->notify_flags = 0;
    }
    for (int fd = 0; fd < DEV_MAX_FD; fd++) {
        struct dev *d = pvio_devs[fd];
        if (!d || d->kind != DEV_GNTDEV)
            continue;
        for (struct gmap *m = ((struct gntdev *)d->priv)->maps; m; m = m->next) {
            if (m->notify_flags & UNMAP_NOTIFY_SEND_EVENT)
                evtchn_notify_port(m->notify_port);
            m->notify_flags = 0;
        }
    }
}
