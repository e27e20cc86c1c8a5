/* The /dev/xen device layer: what its parts share.
 *
 * libpvio-xen.so is preloaded (LD_PRELOAD) into an unmodified program linked against
 * Xen's own libraries (libxenevtchn, libxengnttab, libxenctrl, ...).  Those libraries
 * talk to Linux through /dev/xen/{evtchn,gntdev,gntalloc,privcmd}; the layer answers
 * those opens, ioctls, reads, writes, mmaps and munmaps with Linux's semantics, by
 * speaking pvio's hypercall frames to `pvio hypervisor` (hc.c).  The process is one
 * pvio domain: PVIO_HYPERVISOR_SOCKET names the hypervisor, PVIO_DOMID the domain,
 * PVIO_TRANSPORT its transport (map or copy); the connection is made at the first
 * device open, so a daemon that forks before opening devices is that domain.
 *
 * Parts: preload.c (the interposed libc calls and the table of device fds), hc.c (the
 * connection, frames, pushes, the domain's own memory and grant table), evtchn.c,
 * gntdev.c, gntalloc.c, privcmd.c (one device each), xsd.c (the XenStore domain's
 * /proc/xen files).
 *
 * Locking: one mutex, `pvio_lock`, guards every table and the connection.  Nothing
 * blocks while holding it except a hypervisor round trip (short: the hypervisor never
 * blocks); a blocking evtchn read waits without it.
 */
#ifndef PVIO_XEN_H
#define PVIO_XEN_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "pvio_wire.h"

#define PAGE_SIZE 4096u
#define PAGE_SHIFT 12
#define DEV_MAX_FD 65536

enum dev_kind { DEV_EVTCHN = 1, DEV_GNTDEV, DEV_GNTALLOC, DEV_PRIVCMD };

/* One open device: `fd` is a real descriptor the program holds (an epoll fd for
 * evtchn, a memfd for the others), so numbers, poll and close behave as the kernel's. */
struct dev {
    enum dev_kind kind;
    int fd;
    int flags; /* open flags */
    void *priv;
};

extern pthread_mutex_t pvio_lock;
extern struct dev *pvio_devs[DEV_MAX_FD];

/* The libc functions the layer wraps, resolved with dlsym(RTLD_NEXT). */
struct real_libc {
    int (*open)(const char *, int, ...);
    int (*close)(int);
    int (*ioctl)(int, unsigned long, ...);
    ssize_t (*read)(int, void *, size_t);
    ssize_t (*write)(int, const void *, size_t);
    void *(*mmap)(void *, size_t, int, int, int, off_t);
    int (*munmap)(void *, size_t);
};
extern struct real_libc real;
void pvio_resolve(void);

/* -- hc.c: the connection and the domain ----------------------------------------------- */

/* One op of a batch: `args` holds `count` structs of `len` bytes in all; the reply's
 * argument structs are copied back over them (at most `len` bytes).  The op's
 * descriptors land in fds[0..nr_fds) (at most max_fds; the rest are closed); the
 * caller owns and closes them. */
struct hc_op {
    uint16_t hypercall, cmd;
    uint32_t count;
    void *args;
    uint32_t len;
    int rc;
    int *fds;
    int max_fds;
    int nr_fds;
};

struct pvio_domain {
    int sock;
    pid_t pid;
    uint16_t domid;
    int copy_transport;
    uint8_t *mem;          /* our own memory: bounce frames for GRANT_COPY */
    uint32_t nr_pages;
    uint8_t *gnttab;       /* our grant table (grant_entry_v1), shared with the hypervisor */
    uint32_t nr_grant_entries;
    uint32_t max_grant_frames;
    uint32_t grant_frames;
};
extern struct pvio_domain pvio_dom;

/* Connect and become the domain if not yet done: 0 or -errno (lock held). */
int pvio_connect(void);
/* Run a batch: 0 (each op's rc in op->rc) or -errno if the connection failed. */
int pvio_call(struct hc_op *ops, int n);
/* Run one op: 0, the connection's -errno, or the op's own rc (a negative errno). */
int pvio_call1(struct hc_op *op);
/* Handle pushes that already arrived, without waiting. */
void pvio_poll_pushes(void);
/* After fork, in the child: forget the parent's domain. */
void pvio_forget(void);

/* Our grant table: a free reference (growing the table as needed), and ending access. */
int pvio_gref_alloc(uint32_t *ref);
void pvio_gref_set(uint32_t ref, uint16_t domid, uint32_t frame, int readonly);
int pvio_gref_end(uint32_t ref);      /* 1 if ended, 0 if still mapped (retry later) */
void pvio_gref_free(uint32_t ref);

/* -- devices -------------------------------------------------------------------------- */

int evtchn_open(struct dev *d);
int evtchn_ioctl(struct dev *d, unsigned long req, void *arg);
ssize_t evtchn_read(struct dev *d, void *buf, size_t count);
ssize_t evtchn_write(struct dev *d, const void *buf, size_t count);
void evtchn_close(struct dev *d);
void evtchn_push(uint16_t cmd, const struct pvio_push_port *a, int *fds, int nr_fds);
/* The hypervisor told us `domid` died: VIRQ_DOM_EXC fires if it is bound. */
void evtchn_domain_dead(uint16_t domid);
/* Notify `port` if one of our evtchn devices has it bound (the unmap notifications). */
int evtchn_notify_port(uint32_t port);
int evtchn_port_bound(uint32_t port);

int gntdev_open(struct dev *d);
int gntdev_ioctl(struct dev *d, unsigned long req, void *arg);
void *gntdev_mmap(struct dev *d, void *addr, size_t len, int prot, int flags, off_t off);
void gntdev_close(struct dev *d);

int gntalloc_open(struct dev *d);
int gntalloc_ioctl(struct dev *d, unsigned long req, void *arg);
void *gntalloc_mmap(struct dev *d, void *addr, size_t len, int prot, int flags, off_t off);
void gntalloc_close(struct dev *d);
/* At exit: the unmap notifications of what is still mapped or shared. */
void gntdev_exit_notify(void);
void gntalloc_exit_notify(void);

int privcmd_ioctl(struct dev *d, unsigned long req, void *arg);

/* xsd.c: /proc/xen/xsd_{port,kva} for the XenStore domain; the fd or -errno. */
int xsd_is_file(const char *path);
int xsd_open(const char *path, int flags);

/* -- mappings the layer made, for munmap ------------------------------------------------ */

struct vmap {
    uintptr_t start, end;
    enum dev_kind kind;
    void *obj;
    struct vmap *next;
};
extern struct vmap *pvio_vmaps;
extern int pvio_nr_vmaps; /* read without the lock by munmap's fast path */
void vmap_add(struct vmap *v);
void vmap_del(struct vmap *v);
void gntdev_vm_unmapped(struct vmap *v);
void gntalloc_vm_unmapped(struct vmap *v);

/* Reserve `len` bytes of address space (at `addr` if MAP_FIXED is in `flags`). */
void *reserve_range(void *addr, size_t len, int flags);

#endif
