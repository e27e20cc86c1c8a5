/* A blkif frontend written against Xen's own libraries only, as a Xen guest's userspace
 * driver would be: libxenstore for the XenBus handshake, libxengntshr (gntalloc) to
 * grant its ring and data page, libxenevtchn for the event channel, io/blkif.h and
 * io/ring.h for the ring.  Run under `pvio run`, it is a pvio domain whose requests
 * pvio's blkback serves, with no pvio code in it: the device layer (libpvio-xen.so)
 * gives the libraries their /dev/xen.
 *
 * usage: xen_blkfront VDEV_NUMBER
 * Waits for its frontend directory device/vbd/VDEV_NUMBER (the toolstack writes it),
 * connects, writes a pattern to the first 4 KiB, reads it back into a zeroed page and
 * compares, flushes, closes, and prints "ok sectors=N" (or "FAIL ..." and exits 1).
 */
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#define xen_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#include <xenstore.h>
#include <xenevtchn.h>
#include <xengnttab.h>
#include <xen/io/blkif.h>
#include <xen/io/xenbus.h>
#include <xen/io/protocols.h>

#define FAIL(...) do { printf("FAIL " __VA_ARGS__); printf("\n"); exit(1); } while (0)

static struct xs_handle *xs;
static char fe[64], be[256];

static char *rd(const char *dir, const char *key)
{
    char path[320];
    snprintf(path, sizeof path, "%s/%s", dir, key);
    return xs_read(xs, XBT_NULL, path, NULL);
}

static void wr(const char *key, const char *fmt, unsigned long v)
{
    char path[320], val[32];
    snprintf(path, sizeof path, "%s/%s", fe, key);
    snprintf(val, sizeof val, fmt, v);
    if (!xs_write(xs, XBT_NULL, path, val, strlen(val)))
        FAIL("write %s: %s", path, strerror(errno));
}

/* Wait (on a watch) until `dir/key` reads as a number >= `want`; returns it. */
static int wait_state(const char *dir, int want)
{
    char path[320];
    snprintf(path, sizeof path, "%s/state", dir);
    if (!xs_watch(xs, path, "st"))
        FAIL("watch %s", path);
    for (int i = 0; i < 1000; i++) {
        char *s = xs_read(xs, XBT_NULL, path, NULL);
        int v = s ? atoi(s) : -1;
        free(s);
        if (v >= want) {
            xs_unwatch(xs, path, "st");
            return v;
        }
        unsigned int n;
        free(xs_read_watch(xs, &n));
    }
    FAIL("%s never reached %d", path, want);
}

int main(int argc, char **argv)
{
    if (argc != 2)
        FAIL("usage: xen_blkfront VDEV_NUMBER");
    setvbuf(stdout, NULL, _IOLBF, 0);
    snprintf(fe, sizeof fe, "device/vbd/%s", argv[1]);
    if (!(xs = xs_open(0)))
        FAIL("xs_open: %s", strerror(errno));
    char *b = NULL;
    for (int i = 0; i < 200 && !(b = rd(fe, "backend")); i++)
        usleep(50000);
    if (!b)
        FAIL("no %s/backend", fe);
    snprintf(be, sizeof be, "%s", b);
    free(b);
    char *bid = rd(fe, "backend-id");
    uint32_t backend = bid ? (uint32_t)atoi(bid) : 0;
    free(bid);

    wait_state(be, XenbusStateInitWait);
    xengntshr_handle *gs = xengntshr_open(NULL, 0);
    xenevtchn_handle *ev = xenevtchn_open(NULL, 0);
    if (!gs || !ev)
        FAIL("open gntshr/evtchn: %s", strerror(errno));
    uint32_t refs[2];
    void *pages = xengntshr_share_pages(gs, backend, 2, refs, 1);
    if (!pages)
        FAIL("share pages: %s", strerror(errno));
    blkif_sring_t *sring = pages;
    uint8_t *data = (uint8_t *)pages + 4096;
    blkif_front_ring_t ring;
    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&ring, sring, 4096);
    xenevtchn_port_or_error_t port = xenevtchn_bind_unbound_port(ev, backend);
    if (port < 0)
        FAIL("unbound port: %s", strerror(errno));
    wr("ring-ref", "%lu", refs[0]);
    wr("event-channel", "%lu", (unsigned long)port);
    char path[320];
    snprintf(path, sizeof path, "%s/protocol", fe);
    xs_write(xs, XBT_NULL, path, XEN_IO_PROTO_ABI_NATIVE, strlen(XEN_IO_PROTO_ABI_NATIVE));
    wr("state", "%lu", XenbusStateInitialised);
    if (wait_state(be, XenbusStateConnected) != XenbusStateConnected)
        FAIL("backend did not connect");
    char *sectors = rd(be, "sectors");
    if (!sectors)
        FAIL("no sectors");
    wr("state", "%lu", XenbusStateConnected);

    /* write the pattern, read it back into the zeroed page, flush */
    uint8_t ops[3] = { BLKIF_OP_WRITE, BLKIF_OP_READ, BLKIF_OP_FLUSH_DISKCACHE };
    for (int i = 0; i < 4096; i++)
        data[i] = (uint8_t)(i * 7 + 1);
    for (unsigned k = 0; k < 3; k++) {
        if (ops[k] == BLKIF_OP_READ)
            memset(data, 0, 4096);
        blkif_request_t *req = RING_GET_REQUEST(&ring, ring.req_prod_pvt);
        memset(req, 0, sizeof *req);
        req->operation = ops[k];
        req->id = k;
        req->handle = (blkif_vdev_t)atoi(argv[1]);
        req->sector_number = 0;
        if (ops[k] != BLKIF_OP_FLUSH_DISKCACHE) {
            req->nr_segments = 1;
            req->seg[0] = (struct blkif_request_segment){ .gref = refs[1], .first_sect = 0, .last_sect = 7 };
        }
        ring.req_prod_pvt++;
        int notify;
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&ring, notify);
        if (notify && xenevtchn_notify(ev, port) < 0)
            FAIL("notify: %s", strerror(errno));
        for (;;) {
            int more;
            RING_FINAL_CHECK_FOR_RESPONSES(&ring, more);
            if (more)
                break;
            struct pollfd pfd = { .fd = xenevtchn_fd(ev), .events = POLLIN };
            if (poll(&pfd, 1, 10000) != 1)
                FAIL("no response to op %u", ops[k]);
            xenevtchn_port_or_error_t p = xenevtchn_pending(ev);
            if (p >= 0)
                xenevtchn_unmask(ev, p);
        }
        blkif_response_t *rsp = RING_GET_RESPONSE(&ring, ring.rsp_cons);
        ring.rsp_cons++;
        if (rsp->id != k || rsp->status != BLKIF_RSP_OKAY)
            FAIL("op %u: id %llu status %d", ops[k], (unsigned long long)rsp->id, rsp->status);
    }
    for (int i = 0; i < 4096; i++)
        if (data[i] != (uint8_t)(i * 7 + 1))
            FAIL("byte %d read back %u", i, data[i]);

    wr("state", "%lu", XenbusStateClosing);
    wait_state(be, XenbusStateClosing);
    wr("state", "%lu", XenbusStateClosed);
    printf("ok sectors=%s\n", sectors);
    free(sectors);
    xengntshr_unshare(gs, pages, 2);
    xenevtchn_close(ev);
    xengntshr_close(gs);
    xs_close(xs);
    return 0;
}
