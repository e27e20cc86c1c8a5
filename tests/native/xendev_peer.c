/* A program written against Debian's libxenevtchn and libxengnttab (nothing of pvio),
 * run under pvio's /dev/xen device layer as one pvio domain (PVIO_DOMID).
 *
 *   xendev_peer evtchn                  one domain: the evtchn device's semantics
 *   xendev_peer share PEER              grant pages to PEER, allocate a port for it,
 *                                       print "refs R0 R1 ro RO port P", wait for PEER
 *   xendev_peer map GRANTER R0 R1 RO P  map, copy and signal GRANTER's grants
 *   xendev_peer steal GRANTER R0        a third domain: the grants are not for it
 *   xendev_peer fork                    a daemon's forks: the child that opens first is
 *                                       the domain; an inherited device is not its
 *
 * Each check prints "ok NAME"; the first failure prints "FAIL NAME: why" and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xenevtchn.h>
#include <xengnttab.h>
#include <xen/sys/evtchn.h>

#define PAGE 4096

static void ok(const char *name) { printf("ok %s\n", name); fflush(stdout); }

static void fail(const char *name, const char *why)
{
    printf("FAIL %s: %s (errno %d %s)\n", name, why, errno, strerror(errno));
    fflush(stdout);
    exit(1);
}

#define CHECK(name, cond) do { if (!(cond)) fail(name, #cond); } while (0)

static uint32_t mydomid(void) { return (uint32_t)atoi(getenv("PVIO_DOMID")); }

/* The next pending port, waiting at most `ms`; -1 if none came. */
static int wait_port(xenevtchn_handle *xe, int ms)
{
    struct pollfd p = { xenevtchn_fd(xe), POLLIN, 0 };
    if (poll(&p, 1, ms) != 1)
        return -1;
    return xenevtchn_pending(xe);
}

struct later { xenevtchn_handle *xe; evtchn_port_t port; };

static void *notify_later(void *arg)
{
    struct later *l = arg;
    usleep(50 * 1000);
    xenevtchn_notify(l->xe, l->port);
    return NULL;
}

static int evtchn_tests(void)
{
    xenevtchn_handle *xe = xenevtchn_open(NULL, 0);
    CHECK("open", xe);
    int fd = xenevtchn_fd(xe);
    int a = xenevtchn_bind_unbound_port(xe, mydomid());
    CHECK("bind_unbound_port", a > 0);
    int b = xenevtchn_bind_interdomain(xe, mydomid(), (evtchn_port_t)a);
    CHECK("bind_interdomain", b > 0 && b != a);
    ok("bind");
    /* Binding raises one event on the new port (lost notifications, as Xen). */
    int p = wait_port(xe, 2000);
    CHECK("first-event", p == b);
    CHECK("unmask", xenevtchn_unmask(xe, (evtchn_port_t)b) == 0);
    CHECK("no-more", wait_port(xe, 0) == -1);
    /* A notify on one end is pending on the other; the port is masked once delivered. */
    CHECK("notify", xenevtchn_notify(xe, (evtchn_port_t)a) == 0);
    CHECK("delivered", wait_port(xe, 2000) == b);
    CHECK("notify2", xenevtchn_notify(xe, (evtchn_port_t)a) == 0);
    CHECK("masked", wait_port(xe, 100) == -1);
    CHECK("unmask2", xenevtchn_unmask(xe, (evtchn_port_t)b) == 0);
    CHECK("pending-after-unmask", wait_port(xe, 2000) == b);
    xenevtchn_unmask(xe, (evtchn_port_t)b);
    ok("mask-on-delivery");
    /* And the other way round. */
    CHECK("notify-back", xenevtchn_notify(xe, (evtchn_port_t)b) == 0);
    CHECK("delivered-back", wait_port(xe, 2000) == a);
    xenevtchn_unmask(xe, (evtchn_port_t)a);
    ok("both-ways");
    /* read(2) itself: whole ports only, EAGAIN when non-blocking and empty. */
    uint32_t buf[4];
    CHECK("read-short", read(fd, buf, 3) == 0);
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    errno = 0;
    CHECK("read-eagain", read(fd, buf, sizeof buf) == -1 && errno == EAGAIN);
    fcntl(fd, F_SETFL, fl);
    ok("read");
    /* A blocking read waits for the event another thread sends. */
    struct later l = { xe, (evtchn_port_t)a };
    pthread_t t;
    pthread_create(&t, NULL, notify_later, &l);
    CHECK("blocking-read", xenevtchn_pending(xe) == b);
    pthread_join(t, NULL);
    xenevtchn_unmask(xe, (evtchn_port_t)b);
    ok("blocking-read");
    /* RESET forgets delivered events; the port stays masked until written. */
    xenevtchn_notify(xe, (evtchn_port_t)a);
    usleep(20 * 1000);
    CHECK("reset", ioctl(fd, IOCTL_EVTCHN_RESET, NULL) == 0);
    CHECK("reset-empty", wait_port(xe, 50) == -1);
    xenevtchn_unmask(xe, (evtchn_port_t)b);
    ok("reset");
    /* Errors: a port this open does not hold, out of range, unknown ioctls. */
    errno = 0;
    CHECK("unbind-enotconn", xenevtchn_unbind(xe, 4000) == -1 && errno == ENOTCONN);
    errno = 0;
    CHECK("notify-enotconn", xenevtchn_notify(xe, 4000) == -1 && errno == ENOTCONN);
    errno = 0;
    CHECK("notify-einval", xenevtchn_notify(xe, 1u << 20) == -1 && errno == EINVAL);
    errno = 0;
    CHECK("unknown-ioctl", ioctl(fd, _IOC(_IOC_NONE, 'E', 42, 0), NULL) == -1 && errno == ENOSYS);
    errno = 0;
    CHECK("bind-no-domain", xenevtchn_bind_interdomain(xe, 31000, 1) == -1 && errno == ESRCH);
    errno = 0;
    CHECK("bind-not-unbound", xenevtchn_bind_interdomain(xe, mydomid(), (evtchn_port_t)b) == -1 && errno == EINVAL);
    ok("errors");
    /* VIRQ_DOM_EXC binds (a global VIRQ; only the control domain hears it). */
    int v = xenevtchn_bind_virq(xe, 3);
    CHECK("bind-virq", v > 0);
    errno = 0;
    CHECK("bind-virq-twice", xenevtchn_bind_virq(xe, 3) == -1 && errno == EEXIST);
    errno = 0;
    CHECK("bind-virq-range", xenevtchn_bind_virq(xe, 99) == -1 && errno == EINVAL);
    CHECK("unbind-virq", xenevtchn_unbind(xe, (evtchn_port_t)v) == 0);
    ok("virq");
    /* A second open does not see the first one's ports. */
    xenevtchn_handle *xe2 = xenevtchn_open(NULL, 0);
    errno = 0;
    CHECK("other-open", xenevtchn_notify(xe2, (evtchn_port_t)a) == -1 && errno == ENOTCONN);
    xenevtchn_close(xe2);
    /* Restriction: binds to other domains are refused after RESTRICT_DOMID. */
    xenevtchn_handle *xe3 = xenevtchn_open(NULL, 0);
    CHECK("restrict", xenevtchn_restrict(xe3, 7) == 0);
    errno = 0;
    CHECK("restricted", xenevtchn_bind_unbound_port(xe3, 7) == -1 && errno == EACCES);
    xenevtchn_close(xe3);
    ok("per-open");
    CHECK("unbind", xenevtchn_unbind(xe, (evtchn_port_t)a) == 0);
    /* The other end hears of it: its port is signalled. */
    CHECK("peer-closed", wait_port(xe, 2000) == b);
    CHECK("close", xenevtchn_close(xe) == 0);
    ok("unbind");
    return 0;
}

/* Threads copying through one handle at once (QEMU's main thread and iothread do). */
struct copier { xengnttab_handle *xg; uint32_t granter, ref; int id, ok; };

static void *copy_loop(void *arg)
{
    struct copier *c = arg;
    uint8_t mine[64], back[64];
    memset(mine, 0x10 + c->id, sizeof mine);
    c->ok = 1;
    for (int i = 0; i < 200 && c->ok; i++) {
        xengnttab_grant_copy_segment_t seg[2];
        memset(seg, 0, sizeof seg);
        seg[0].source.virt = mine;
        seg[0].dest.foreign.ref = c->ref; seg[0].dest.foreign.domid = (uint16_t)c->granter;
        seg[0].dest.foreign.offset = (uint16_t)(1024 + 64 * c->id);
        seg[0].len = sizeof mine; seg[0].flags = GNTCOPY_dest_gref;
        seg[1].source.foreign = seg[0].dest.foreign;
        seg[1].dest.virt = back; seg[1].len = sizeof back; seg[1].flags = GNTCOPY_source_gref;
        if (xengnttab_grant_copy(c->xg, 2, seg) || seg[0].status || seg[1].status || memcmp(mine, back, sizeof mine))
            c->ok = 0;
    }
    return NULL;
}

static int share(uint32_t peer)
{
    xengntshr_handle *gs = xengntshr_open(NULL, 0);
    CHECK("gntshr-open", gs);
    uint32_t refs[2], ro;
    uint8_t *pages = xengntshr_share_pages(gs, peer, 2, refs, 1);
    CHECK("share", pages);
    uint8_t *rop = xengntshr_share_pages(gs, peer, 1, &ro, 0);
    CHECK("share-ro", rop);
    for (int i = 0; i < 2 * PAGE; i++)
        pages[i] = (uint8_t)(i * 7 + 1);
    memset(rop, 0xab, PAGE);
    xenevtchn_handle *xe = xenevtchn_open(NULL, 0);
    int port = xenevtchn_bind_unbound_port(xe, peer);
    CHECK("port", port > 0);
    printf("refs %u %u ro %u port %d\n", refs[0], refs[1], ro, port);
    fflush(stdout);
    /* The peer writes a marker, then notifies. */
    int p = wait_port(xe, 10000);
    while (p == port && pages[0] != 0x5a) { /* the bind's own event may come first */
        xenevtchn_unmask(xe, (evtchn_port_t)port);
        p = wait_port(xe, 10000);
    }
    CHECK("peer-notified", p == port);
    CHECK("peer-wrote", pages[0] == 0x5a && pages[PAGE] == 0xa5);
    CHECK("peer-copied", pages[100] == 0xc3 && pages[101] == 0xc3);
    CHECK("ro-intact", rop[0] == 0xab);
    xenevtchn_unmask(xe, (evtchn_port_t)port);
    CHECK("notify-peer", xenevtchn_notify(xe, (evtchn_port_t)port) == 0);
    ok("shared");
    /* Wait for the peer to close its end: its port is signalled once more. */
    char line[16];
    if (!fgets(line, sizeof line, stdin)) { /* stdin closed: the test is over */ }
    CHECK("unshare", xengntshr_unshare(gs, pages, 2) == 0 && xengntshr_unshare(gs, rop, 1) == 0);
    xenevtchn_close(xe);
    xengntshr_close(gs);
    ok("done");
    return 0;
}

static int map(uint32_t granter, uint32_t r0, uint32_t r1, uint32_t ro, uint32_t port)
{
    xengnttab_handle *xg = xengnttab_open(NULL, 0);
    CHECK("gnttab-open", xg);
    CHECK("set-max-grants", xengnttab_set_max_grants(xg, 16) == 0);
    uint32_t refs[2] = { r0, r1 };
    uint8_t *m = xengnttab_map_domain_grant_refs(xg, 2, granter, refs, PROT_READ | PROT_WRITE);
    CHECK("map", m);
    for (int i = 0; i < 2 * PAGE; i++)
        if (m[i] != (uint8_t)(i * 7 + 1))
            fail("map-contents", "the granted bytes differ");
    ok("map");
    /* A read-only grant maps read-only, and only read-only. */
    errno = 0;
    CHECK("map-ro-rw", !xengnttab_map_grant_ref(xg, granter, ro, PROT_READ | PROT_WRITE) && errno == EINVAL);
    uint8_t *rom = xengnttab_map_grant_ref(xg, granter, ro, PROT_READ);
    CHECK("map-ro", rom && rom[0] == 0xab);
    ok("readonly");
    /* A reference nobody granted us. */
    errno = 0;
    CHECK("map-ungranted", !xengnttab_map_grant_ref(xg, granter, r1 + 40, PROT_READ) && errno == EINVAL);
    ok("ungranted");
    /* GRANT_COPY, both ways, with per-segment status. */
    uint8_t local[300], back[2];
    memset(local, 0xc3, sizeof local);
    xengnttab_grant_copy_segment_t seg[4];
    memset(seg, 0, sizeof seg);
    seg[0].source.virt = local;
    seg[0].dest.foreign.ref = r0; seg[0].dest.foreign.domid = (uint16_t)granter; seg[0].dest.foreign.offset = 100;
    seg[0].len = 2; seg[0].flags = GNTCOPY_dest_gref;
    seg[1].source.foreign.ref = r1; seg[1].source.foreign.domid = (uint16_t)granter; seg[1].source.foreign.offset = 5;
    seg[1].dest.virt = back; seg[1].len = 2; seg[1].flags = GNTCOPY_source_gref;
    seg[2].source.virt = local;   /* into a read-only grant: refused */
    seg[2].dest.foreign.ref = ro; seg[2].dest.foreign.domid = (uint16_t)granter;
    seg[2].len = 1; seg[2].flags = GNTCOPY_dest_gref;
    seg[3].source.foreign.ref = r1 + 40; seg[3].source.foreign.domid = (uint16_t)granter;  /* not granted */
    seg[3].dest.virt = back; seg[3].len = 1; seg[3].flags = GNTCOPY_source_gref;
    CHECK("grant-copy", xengnttab_grant_copy(xg, 4, seg) == 0);
    CHECK("copy-status", seg[0].status == GNTST_okay && seg[1].status == GNTST_okay);
    CHECK("copy-to", m[100] == 0xc3 && m[101] == 0xc3);
    CHECK("copy-from", back[0] == (uint8_t)((PAGE + 5) * 7 + 1) && back[1] == (uint8_t)((PAGE + 6) * 7 + 1));
    CHECK("copy-ro-refused", seg[2].status == GNTST_general_error);
    CHECK("copy-ungranted", seg[3].status != GNTST_okay);
    /* A segment crossing a page on its grant side fails the call, as Linux. */
    xengnttab_grant_copy_segment_t bad = seg[0];
    bad.dest.foreign.offset = 4095;
    errno = 0;
    CHECK("copy-cross", xengnttab_grant_copy(xg, 1, &bad) == -1 && errno == EINVAL);
    ok("grant-copy");
    /* Four threads at once through the same handle, each its own slice of the page. */
    struct copier cs[4];
    pthread_t ts[4];
    for (int i = 0; i < 4; i++) {
        cs[i] = (struct copier){ xg, granter, r1, i, 0 };
        pthread_create(&ts[i], NULL, copy_loop, &cs[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(ts[i], NULL);
        CHECK("threads", cs[i].ok);
    }
    ok("threads");
    /* Write through the mapping, then signal the granter. */
    m[0] = 0x5a;
    m[PAGE] = 0xa5;
    xenevtchn_handle *xe = xenevtchn_open(NULL, 0);
    int lp = xenevtchn_bind_interdomain(xe, granter, port);
    CHECK("bind", lp > 0);
    CHECK("notify", xenevtchn_notify(xe, (evtchn_port_t)lp) == 0);
    int p = wait_port(xe, 10000);
    CHECK("granter-answered", p == lp);
    ok("events");
    /* Unmap: the mappings go, the offsets are given back. */
    CHECK("unmap", xengnttab_unmap(xg, m, 2) == 0 && xengnttab_unmap(xg, rom, 1) == 0);
    xenevtchn_close(xe);
    xengnttab_close(xg);
    ok("done");
    return 0;
}

static int steal(uint32_t granter, uint32_t ref)
{
    xengnttab_handle *xg = xengnttab_open(NULL, 0);
    errno = 0;
    CHECK("steal-map", !xengnttab_map_grant_ref(xg, granter, ref, PROT_READ) && errno == EINVAL);
    uint8_t buf[8];
    xengnttab_grant_copy_segment_t seg;
    memset(&seg, 0, sizeof seg);
    seg.source.foreign.ref = ref; seg.source.foreign.domid = (uint16_t)granter;
    seg.dest.virt = buf; seg.len = 8; seg.flags = GNTCOPY_source_gref;
    CHECK("steal-copy", xengnttab_grant_copy(xg, 1, &seg) == 0 && seg.status == GNTST_general_error);
    xengnttab_close(xg);
    ok("steal");
    return 0;
}

/* fork before any device is opened: the child connects and is the domain.  Then the
 * child of a process that holds devices: its inherited descriptors are not devices for
 * it (the kernel's error for an epoll fd), and the parent's keep working. */
static int forks(void)
{
    pid_t pid = fork();
    if (pid == 0)
        _exit(evtchn_tests());
    int st;
    waitpid(pid, &st, 0);
    CHECK("child-first", WIFEXITED(st) && WEXITSTATUS(st) == 0);
    ok("child-first");
    /* The child's domain goes when its connection closes; we are the domain after it. */
    xenevtchn_handle *xe = NULL;
    for (int i = 0; i < 200 && !xe; i++)
        if (!(xe = xenevtchn_open(NULL, 0)))
            usleep(10 * 1000);
    CHECK("parent-open", xe);
    int a = xenevtchn_bind_unbound_port(xe, mydomid());
    int b = xenevtchn_bind_interdomain(xe, mydomid(), (evtchn_port_t)a);
    CHECK("parent-bind", a > 0 && b > 0);
    fflush(stdout);
    pid = fork();
    if (pid == 0) {
        errno = 0;
        int r = xenevtchn_notify(xe, (evtchn_port_t)a);
        /* the kernel's answer for an epoll fd, not a second user of our connection */
        _exit(r == -1 && (errno == ENOTTY || errno == EINVAL) ? 0 : 1);
    }
    waitpid(pid, &st, 0);
    CHECK("inherited", WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHECK("parent-still", wait_port(xe, 2000) == b); /* the bind's own event */
    xenevtchn_unmask(xe, (evtchn_port_t)b);
    CHECK("parent-notify", xenevtchn_notify(xe, (evtchn_port_t)a) == 0 && wait_port(xe, 2000) == b);
    xenevtchn_close(xe);
    ok("inherited");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "fork"))
        return forks();
    if (argc >= 2 && !strcmp(argv[1], "evtchn"))
        return evtchn_tests();
    if (argc == 3 && !strcmp(argv[1], "share"))
        return share((uint32_t)atoi(argv[2]));
    if (argc == 7 && !strcmp(argv[1], "map"))
        return map((uint32_t)atoi(argv[2]), (uint32_t)atoi(argv[3]), (uint32_t)atoi(argv[4]),
                   (uint32_t)atoi(argv[5]), (uint32_t)atoi(argv[6]));
    if (argc == 4 && !strcmp(argv[1], "steal"))
        return steal((uint32_t)atoi(argv[2]), (uint32_t)atoi(argv[3]));
    fprintf(stderr, "usage: see the top of xendev_peer.c\n");
    return 2;
}
