/* The interposed libc calls: which descriptors are devices, and who answers them.
 *
 * open/open64/__open_2/openat... of /dev/xen/{evtchn,gntdev,gntalloc,privcmd} make a
 * device (after connecting to the hypervisor: a failure there is the open's errno);
 * any other /dev/xen or /proc/xen path is ENOENT, as on a host without Xen
 * (/dev/xen/hypercall, /dev/xen/xenbus, /proc/xen/privcmd: the libraries fall back
 * or go on), but for the XenStore domain's /proc/xen/xsd_{port,kva} (xsd.c).  Without PVIO_HYPERVISOR_SOCKET in the environment nothing is faked.
 *
 * ioctl/read/write/close on a device fd go to its part; on any other fd straight to
 * libc, after one table lookup.  mmap on a gntdev or gntalloc fd is theirs; munmap
 * looks for the layer's mappings only when there are any.
 *
 * After fork the child forgets the parent's domain (pthread_atfork): the connection,
 * devices and mappings are the parent's, and the child's copies of the descriptors
 * behave as plain epoll fds and memfds (an ioctl fails as the kernel fails it on them),
 * never as a second user of the parent's connection.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "pvio_xen.h"

#define EXPORT __attribute__((visibility("default")))

pthread_mutex_t pvio_lock = PTHREAD_MUTEX_INITIALIZER;
struct dev *pvio_devs[DEV_MAX_FD];
struct real_libc real;
struct vmap *pvio_vmaps;
int pvio_nr_vmaps;

static void forget_in_child(void)
{
    pthread_mutex_init(&pvio_lock, NULL);
    pvio_forget();
    memset(pvio_devs, 0, sizeof pvio_devs);
    pvio_vmaps = NULL;
    __atomic_store_n(&pvio_nr_vmaps, 0, __ATOMIC_RELAXED);
}

void pvio_resolve(void)
{
    if (real.open)
        return;
    real.close = dlsym(RTLD_NEXT, "close");
    real.ioctl = dlsym(RTLD_NEXT, "ioctl");
    real.read = dlsym(RTLD_NEXT, "read");
    real.write = dlsym(RTLD_NEXT, "write");
    real.mmap = dlsym(RTLD_NEXT, "mmap");
    real.munmap = dlsym(RTLD_NEXT, "munmap");
    __atomic_store_n(&real.open, (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open"), __ATOMIC_RELEASE);
}

__attribute__((constructor)) static void init(void)
{
    pvio_resolve();
    pthread_atfork(NULL, NULL, forget_in_child);
}

/* exit() with grants still mapped or shared: their unmap notifications go now, as when
 * Linux tears down an exiting process's mappings and files.  (A process killed by a
 * signal cannot do this; the hypervisor still closes its ports, which signals peers.)
 * A thread that holds the lock at exit keeps it: then nothing is done. */
__attribute__((destructor)) static void fini(void)
{
    if (pvio_dom.sock < 0 || pvio_dom.pid != getpid() || pthread_mutex_trylock(&pvio_lock))
        return;
    gntdev_exit_notify();
    gntalloc_exit_notify();
    pthread_mutex_unlock(&pvio_lock);
}

void vmap_add(struct vmap *v)
{
    v->next = pvio_vmaps;
    pvio_vmaps = v;
    __atomic_store_n(&pvio_nr_vmaps, pvio_nr_vmaps + 1, __ATOMIC_RELAXED);
}

void vmap_del(struct vmap *v)
{
    for (struct vmap **pp = &pvio_vmaps; *pp; pp = &(*pp)->next)
        if (*pp == v) {
            *pp = v->next;
            __atomic_store_n(&pvio_nr_vmaps, pvio_nr_vmaps - 1, __ATOMIC_RELAXED);
            return;
        }
}

void *reserve_range(void *addr, size_t len, int flags)
{
    return real.mmap(addr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (flags & MAP_FIXED), -1, 0);
}

static struct dev *dev_of(int fd)
{
    if (fd < 0 || fd >= DEV_MAX_FD)
        return NULL;
    return __atomic_load_n(&pvio_devs[fd], __ATOMIC_ACQUIRE);
}

/* -- open --------------------------------------------------------------------------------- */

static int kind_of(const char *path)
{
    if (!path || !getenv("PVIO_HYPERVISOR_SOCKET"))
        return 0;
    if (!strcmp(path, "/dev/xen/evtchn"))
        return DEV_EVTCHN;
    if (!strcmp(path, "/dev/xen/gntdev"))
        return DEV_GNTDEV;
    if (!strcmp(path, "/dev/xen/gntalloc"))
        return DEV_GNTALLOC;
    if (!strcmp(path, "/dev/xen/privcmd"))
        return DEV_PRIVCMD;
    if (!strncmp(path, "/dev/xen/", 9) || !strncmp(path, "/proc/xen/", 10) || !strcmp(path, "/dev/xen") ||
        !strcmp(path, "/proc/xen"))
        return -1;
    return 0;
}

static int open_dev(const char *path, int kind, int flags)
{
    if (kind < 0 && xsd_is_file(path)) {
        pvio_resolve();
        int fd = xsd_open(path, flags);
        if (fd >= 0)
            return fd;
        errno = -fd;
        return -1;
    }
    if (kind < 0) {
        errno = ENOENT;
        return -1;
    }
    pvio_resolve();
    pthread_mutex_lock(&pvio_lock);
    struct dev *d = calloc(1, sizeof *d);
    int rc = d ? pvio_connect() : -ENOMEM;
    if (!rc) {
        d->kind = (enum dev_kind)kind;
        d->flags = flags;
        if (kind == DEV_EVTCHN) {
            rc = evtchn_open(d);
        } else {
            d->fd = memfd_create(kind == DEV_GNTDEV ? "pvio-gntdev" : kind == DEV_GNTALLOC ? "pvio-gntalloc" : "pvio-privcmd",
                                 (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0);
            rc = d->fd < 0 ? -errno : 0;
            if (!rc && kind == DEV_GNTDEV && (rc = gntdev_open(d)))
                real.close(d->fd);
            if (!rc && kind == DEV_GNTALLOC && (rc = gntalloc_open(d)))
                real.close(d->fd);
        }
    }
    if (!rc && d->fd >= DEV_MAX_FD) {
        if (kind == DEV_EVTCHN)
            evtchn_close(d);
        else if (kind == DEV_GNTDEV)
            gntdev_close(d);
        else if (kind == DEV_GNTALLOC)
            gntalloc_close(d);
        if (kind != DEV_EVTCHN)
            real.close(d->fd);
        rc = -EMFILE;
    }
    if (rc) {
        free(d);
        pthread_mutex_unlock(&pvio_lock);
        errno = -rc;
        return -1;
    }
    __atomic_store_n(&pvio_devs[d->fd], d, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&pvio_lock);
    return d->fd;
}

static mode_t mode_arg(int flags, va_list ap)
{
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

EXPORT int open(const char *path, int flags, ...)
{
    int kind = kind_of(path);
    if (kind)
        return open_dev(path, kind, flags);
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    pvio_resolve();
    return real.open(path, flags, mode);
}

EXPORT int open64(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return open(path, flags | O_LARGEFILE, mode);
}

EXPORT int __open_2(const char *path, int flags)
{
    return open(path, flags);
}

EXPORT int __open64_2(const char *path, int flags)
{
    return open(path, flags | O_LARGEFILE);
}

EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    if (path[0] == '/' && kind_of(path))
        return open_dev(path, kind_of(path), flags);
    static int (*real_openat)(int, const char *, int, ...);
    if (!real_openat)
        real_openat = dlsym(RTLD_NEXT, "openat");
    return real_openat(dirfd, path, flags, mode);
}

EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return openat(dirfd, path, flags | O_LARGEFILE, mode);
}

EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
    return openat(dirfd, path, flags);
}

/* -- the rest ----------------------------------------------------------------------------- */

EXPORT int close(int fd)
{
    struct dev *d = dev_of(fd);
    pvio_resolve();
    if (!d)
        return real.close(fd);
    pthread_mutex_lock(&pvio_lock);
    if (pvio_devs[fd] != d) { /* closed by another thread meanwhile */
        pthread_mutex_unlock(&pvio_lock);
        errno = EBADF;
        return -1;
    }
    __atomic_store_n(&pvio_devs[fd], NULL, __ATOMIC_RELEASE);
    switch (d->kind) {
    case DEV_EVTCHN:
        evtchn_close(d); /* closes the epoll fd */
        break;
    case DEV_GNTDEV:
        gntdev_close(d);
        real.close(fd);
        break;
    case DEV_GNTALLOC:
        gntalloc_close(d);
        real.close(fd);
        break;
    case DEV_PRIVCMD:
        real.close(fd);
        break;
    }
    free(d);
    pthread_mutex_unlock(&pvio_lock);
    return 0;
}

EXPORT int ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    struct dev *d = dev_of(fd);
    pvio_resolve();
    if (!d)
        return real.ioctl(fd, req, arg);
    int rc;
    pthread_mutex_lock(&pvio_lock);
    if (pvio_devs[fd] != d) {
        rc = -EBADF;
    } else if ((req >> _IOC_NRBITS >> _IOC_TYPEBITS & ((1u << _IOC_SIZEBITS) - 1)) && !arg) {
        rc = -EFAULT;
    } else {
        switch (d->kind) {
        case DEV_EVTCHN: rc = evtchn_ioctl(d, req, arg); break;
        case DEV_GNTDEV: rc = gntdev_ioctl(d, req, arg); break;
        case DEV_GNTALLOC: rc = gntalloc_ioctl(d, req, arg); break;
        default: rc = privcmd_ioctl(d, req, arg); break;
        }
    }
    pthread_mutex_unlock(&pvio_lock);
    if (rc < 0) {
        errno = -rc;
        return -1;
    }
    return rc;
}

EXPORT ssize_t read(int fd, void *buf, size_t count)
{
    struct dev *d = dev_of(fd);
    pvio_resolve();
    if (!d || d->kind != DEV_EVTCHN)
        return d ? (errno = EINVAL, -1) : real.read(fd, buf, count);
    pthread_mutex_lock(&pvio_lock);
    ssize_t rc = pvio_devs[fd] == d ? evtchn_read(d, buf, count) : -EBADF;
    pthread_mutex_unlock(&pvio_lock);
    if (rc < 0) {
        errno = (int)-rc;
        return -1;
    }
    return rc;
}

EXPORT ssize_t write(int fd, const void *buf, size_t count)
{
    struct dev *d = dev_of(fd);
    pvio_resolve();
    if (!d || d->kind != DEV_EVTCHN)
        return d ? (errno = EINVAL, -1) : real.write(fd, buf, count);
    pthread_mutex_lock(&pvio_lock);
    ssize_t rc = pvio_devs[fd] == d ? evtchn_write(d, buf, count) : -EBADF;
    pthread_mutex_unlock(&pvio_lock);
    if (rc < 0) {
        errno = (int)-rc;
        return -1;
    }
    return rc;
}

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    struct dev *d = dev_of(fd);
    pvio_resolve();
    if (!d)
        return real.mmap(addr, len, prot, flags, fd, off);
    void *r;
    pthread_mutex_lock(&pvio_lock);
    if (pvio_devs[fd] != d) {
        errno = EBADF;
        r = MAP_FAILED;
    } else if (d->kind == DEV_GNTDEV) {
        r = gntdev_mmap(d, addr, len, prot, flags, off);
    } else if (d->kind == DEV_GNTALLOC) {
        r = gntalloc_mmap(d, addr, len, prot, flags, off);
    } else {
        errno = ENODEV; /* privcmd's foreign mappings and evtchn: none */
        r = MAP_FAILED;
    }
    pthread_mutex_unlock(&pvio_lock);
    return r;
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    return mmap(addr, len, prot, flags, fd, off);
}

EXPORT int munmap(void *addr, size_t len)
{
    pvio_resolve();
    if (!__atomic_load_n(&pvio_nr_vmaps, __ATOMIC_RELAXED))
        return real.munmap(addr, len);
    uintptr_t start = (uintptr_t)addr, end = start + len;
    pthread_mutex_lock(&pvio_lock);
    for (struct vmap *v = pvio_vmaps, *next; v; v = next) {
        next = v->next;
        if (v->start < end && start < v->end) {
            if (v->kind == DEV_GNTDEV)
                gntdev_vm_unmapped(v);
            else
                gntalloc_vm_unmapped(v);
            next = pvio_vmaps; /* the list changed */
        }
    }
    pthread_mutex_unlock(&pvio_lock);
    return real.munmap(addr, len);
}
