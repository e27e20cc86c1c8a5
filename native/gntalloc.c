/* /dev/xen/gntalloc: granting our own pages to another domain (libxengntshr).
 *
 * ALLOC_GREF takes `count` zeroed pages, grants each to `domid` (read-only unless
 * GNTALLOC_FLAG_WRITABLE) and answers the references and an offset into the device;
 * mmap at that offset maps the pages.  The pages are shareable frames (one memfd each,
 * PVIO_DOMCTL_alloc_shareable), so the peer maps them live in either transport and
 * receives nothing else of ours.  Frames are kept in a pool and reused: the hypervisor
 * gives a domain at most MAX_SHAREABLE_FRAMES of them, which is this device's limit
 * (ENOSPC past it, as Linux's gntalloc limit).
 *
 * A reference lives while the device's offset or a mapping holds it (Linux's `users`):
 * DEALLOC_GREF drops the offset, munmap and close drop the rest.  Then the unmap
 * notification runs (clear the byte, send the event) and access is ended; a reference
 * the peer still maps stays granted and is retried at the next ALLOC, DEALLOC or close,
 * and its page is reused only once the peer has let go.
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
#include <xen/sys/gntalloc.h>

#include "pvio_xen.h"

struct frame {
    uint32_t frame;
    int fd;
    uint8_t *page; /* our own view, for zeroing and CLEAR_BYTE */
};

struct gref {
    uint32_t ref;
    struct frame f;
    int users;
    uint64_t file_index; /* in pages; meaningful while `dev` is set */
    struct gntalloc *dev;
    uint32_t notify_flags, notify_pgoff, notify_port;
    struct gref *next;      /* in the device's list, by file_index */
    struct gref *next_dead; /* in the deferred list */
};

struct gntalloc {
    struct gref *grefs;
    uint64_t index; /* the next offset handed out, in pages */
};

struct amap { /* one mmap of gntalloc pages */
    struct vmap vm;
    uint32_t count;
    struct gref **grefs;
};

static struct frame pool[MAX_SHAREABLE_FRAMES];
static uint32_t pool_free, frames_made;
static uint32_t in_use;
static struct gref *deferred;

int gntalloc_open(struct dev *d)
{
    struct gntalloc *g = calloc(1, sizeof *g);
    if (!g)
        return -ENOMEM;
    d->priv = g;
    return 0;
}

static int get_frames(uint32_t n)
{
    if (pool_free >= n)
        return 0;
    uint32_t want = n - pool_free;
    if (want < 16)
        want = 16;
    if (want > MAX_SHAREABLE_FRAMES - frames_made)
        want = MAX_SHAREABLE_FRAMES - frames_made;
    if (pool_free + want < n)
        return -ENOSPC;
    struct pvio_shareable s = { .nr_frames = want };
    int fds[MAX_SHAREABLE_FRAMES];
    struct hc_op op = { PVIO_HYPERVISOR_domctl, PVIO_DOMCTL_alloc_shareable, 1, &s, sizeof s, 0, fds, (int)want, 0 };
    int rc = pvio_call1(&op);
    if (rc)
        return rc;
    for (int i = 0; i < op.nr_fds; i++) {
        uint8_t *page = real.mmap(NULL, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fds[i], 0);
        frames_made++;
        if (page == MAP_FAILED) {
            real.close(fds[i]);
            continue;
        }
        pool[pool_free++] = (struct frame){ s.first_frame + (uint32_t)i, fds[i], page };
    }
    return pool_free >= n ? 0 : -ENOMEM;
}

/* Try again to end the references a peer still mapped. */
static void cleanup(void)
{
    for (struct gref **pp = &deferred; *pp;) {
        struct gref *r = *pp;
        if (pvio_gref_end(r->ref)) {
            *pp = r->next_dead;
            pvio_gref_free(r->ref);
            pool[pool_free++] = r->f;
            in_use--;
            free(r);
        } else {
            pp = &r->next_dead;
        }
    }
}

static void put_gref(struct gref *r)
{
    if (--r->users > 0)
        return;
    if (r->notify_flags & UNMAP_NOTIFY_CLEAR_BYTE)
        r->f.page[r->notify_pgoff] = 0;
    if (r->notify_flags & UNMAP_NOTIFY_SEND_EVENT)
        evtchn_notify_port(r->notify_port);
    r->next_dead = deferred;
    deferred = r;
    cleanup();
}

static void unlist(struct gntalloc *g, struct gref *r)
{
    for (struct gref **pp = &g->grefs; *pp; pp = &(*pp)->next)
        if (*pp == r) {
            *pp = r->next;
            break;
        }
    r->dev = NULL;
    r->next = NULL;
}

/* The `count` references from offset `index` (bytes), consecutive in the device. */
static struct gref *find_grefs(struct gntalloc *g, uint64_t index, uint32_t count)
{
    for (struct gref *r = g->grefs; r; r = r->next)
        if (r->file_index << PAGE_SHIFT == index) {
            struct gref *first = r;
            for (uint32_t i = 1; i < count; i++) {
                if (!r->next || r->next->file_index != r->file_index + 1)
                    return NULL;
                r = r->next;
            }
            return first;
        }
    return NULL;
}

static int alloc_gref(struct gntalloc *g, struct ioctl_gntalloc_alloc_gref *a)
{
    int rc = pvio_connect();
    if (rc)
        return rc;
    cleanup();
    if (a->domid >= DOMID_FIRST_RESERVED)
        return -EINVAL;
    if (in_use + a->count > MAX_SHAREABLE_FRAMES)
        return -ENOSPC;
    if ((rc = get_frames(a->count)))
        return rc;
    struct gref **tail = &g->grefs;
    while (*tail)
        tail = &(*tail)->next;
    uint32_t done = 0;
    for (; done < a->count; done++) {
        struct gref *r = calloc(1, sizeof *r);
        if (!r || pvio_gref_alloc(&r->ref)) {
            free(r);
            rc = r ? -ENOSPC : -ENOMEM;
            break;
        }
        r->f = pool[--pool_free];
        memset(r->f.page, 0, PAGE_SIZE);
        r->users = 1;
        r->dev = g;
        r->file_index = g->index + done;
        pvio_gref_set(r->ref, a->domid, r->f.frame, !(a->flags & GNTALLOC_FLAG_WRITABLE));
        in_use++;
        a->gref_ids[done] = r->ref;
        *tail = r;
        tail = &r->next;
    }
    if (rc) { /* give back what this call made */
        struct gref *r = find_grefs(g, g->index << PAGE_SHIFT, done);
        while (done--) {
            struct gref *next = r->next;
            unlist(g, r);
            put_gref(r);
            r = next;
        }
        return rc;
    }
    a->index = g->index << PAGE_SHIFT;
    g->index += a->count;
    return 0;
}

static int dealloc_gref(struct gntalloc *g, struct ioctl_gntalloc_dealloc_gref *a)
{
    struct gref *r = find_grefs(g, a->index, a->count);
    int rc = 0;
    if (!r)
        rc = -EINVAL;
    for (uint32_t i = 0; r && i < a->count; i++) {
        struct gref *next = r->next;
        unlist(g, r);
        put_gref(r);
        r = next;
    }
    cleanup();
    return rc;
}

static int set_unmap_notify(struct gntalloc *g, struct ioctl_gntalloc_unmap_notify *a)
{
    struct gref *r = find_grefs(g, a->index & ~(uint64_t)(PAGE_SIZE - 1), 1);
    if (!r)
        return -ENOENT;
    if (a->action & ~(uint32_t)(UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT))
        return -EINVAL;
    if ((a->action & UNMAP_NOTIFY_SEND_EVENT) && !evtchn_port_bound(a->event_channel_port))
        return -EINVAL;
    r->notify_flags = a->action;
    r->notify_pgoff = (uint32_t)(a->index & (PAGE_SIZE - 1));
    r->notify_port = a->event_channel_port;
    return 0;
}

int gntalloc_ioctl(struct dev *d, unsigned long req, void *arg)
{
    switch (req) {
    case IOCTL_GNTALLOC_ALLOC_GREF:
        return alloc_gref(d->priv, arg);
    case IOCTL_GNTALLOC_DEALLOC_GREF:
        return dealloc_gref(d->priv, arg);
    case IOCTL_GNTALLOC_SET_UNMAP_NOTIFY:
        return set_unmap_notify(d->priv, arg);
    default:
        return -ENOTTY;
    }
}

void *gntalloc_mmap(struct dev *d, void *addr, size_t len, int prot, int flags, off_t off)
{
    struct gntalloc *g = d->priv;
    int rc = -EINVAL;
    struct amap *am = NULL;
    if (!(flags & MAP_SHARED) || !len || off < 0 || (off & (PAGE_SIZE - 1)))
        goto fail;
    uint32_t count = (uint32_t)((len + PAGE_SIZE - 1) >> PAGE_SHIFT);
    struct gref *r = find_grefs(g, (uint64_t)off, count);
    if (!r) {
        rc = -ENOENT;
        goto fail;
    }
    am = calloc(1, sizeof *am);
    if (!am || !(am->grefs = calloc(count, sizeof *am->grefs))) {
        rc = -ENOMEM;
        goto fail;
    }
    uint8_t *base = reserve_range(addr, (size_t)count * PAGE_SIZE, flags);
    if (base == MAP_FAILED) {
        rc = -errno;
        goto fail;
    }
    for (uint32_t i = 0; i < count; i++, r = r->next) {
        if (real.mmap(base + (size_t)i * PAGE_SIZE, PAGE_SIZE, prot, MAP_SHARED | MAP_FIXED, r->f.fd, 0) == MAP_FAILED) {
            rc = -errno;
            real.munmap(base, (size_t)count * PAGE_SIZE);
            goto fail;
        }
        am->grefs[i] = r;
    }
    for (uint32_t i = 0; i < count; i++)
        am->grefs[i]->users++;
    am->count = count;
    am->vm = (struct vmap){ (uintptr_t)base, (uintptr_t)base + (size_t)count * PAGE_SIZE, DEV_GNTALLOC, am, NULL };
    vmap_add(&am->vm);
    return base;
fail:
    if (am)
        free(am->grefs);
    free(am);
    errno = -rc;
    return MAP_FAILED;
}

void gntalloc_vm_unmapped(struct vmap *v)
{
    struct amap *am = v->obj;
    vmap_del(v);
    real.munmap((void *)v->start, v->end - v->start);
    for (uint32_t i = 0; i < am->count; i++)
        put_gref(am->grefs[i]);
    free(am->grefs);
    free(am);
}

void gntalloc_close(struct dev *d)
{
    struct gntalloc *g = d->priv;
    while (g->grefs) {
        struct gref *r = g->grefs;
        unlist(g, r);
        put_gref(r);
    }
    cleanup();
    free(g);
}

static void exit_notify_one(struct gref *r)
{
    if (r->notify_flags & UNMAP_NOTIFY_CLEAR_BYTE)
        r->f.page[r->notify_pgoff] = 0;
    if (r->notify_flags & UNMAP_NOTIFY_SEND_EVENT)
        evtchn_notify_port(r->notify_port);
    r->notify_flags = 0;
}

/* The process is exiting with pages still shared: their unmap notifications run now,
 * as Linux's when the exiting process's gntalloc file and mappings go. */
void gntalloc_exit_notify(void)
{
    for (struct vmap *v = pvio_vmaps; v; v = v->next)
        if (v->kind == DEV_GNTALLOC) {
            struct amap *am = v->obj;
            for (uint32_t i = 0; i < am->count; i++)
                exit_notify_one(am->grefs[i]);
        }
    for (int fd = 0; fd < DEV_MAX_FD; fd++) {
        struct dev *d = pvio_devs[fd];
        if (d && d->kind == DEV_GNTALLOC)
            for (struct gref *r = ((struct gntalloc *)d->priv)->grefs; r; r = r->next)
                exit_notify_one(r);
    }
}
