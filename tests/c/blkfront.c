/* A blkif frontend built from Xen's own headers (io/ring.h, io/blkif.h, grant_table.h).
 *
 * It shares a pvio domain's memory and grant table (memfds passed by the Python harness),
 * lays out the shared ring with SHARED_RING_INIT/FRONT_RING_INIT, grants pages by
 * writing grant_entry_v1 entries (frame and domid, then the flags with a release store),
 * writes requests with RING_GET_REQUEST (BLKIF_OP_INDIRECT ones too, their segments in
 * an indirect page, struct blkif_request_indirect), publishes them with
 * RING_PUSH_REQUESTS_AND_CHECK_NOTIFY (kicking the event channel's eventfd only when
 * told to), and consumes responses with RING_FINAL_CHECK_FOR_RESPONSES.
 *
 * usage: blkfront init|io MEMFD NR_PAGES GNTFD BACKEND_DOMID TXFD RXFD REFS FRAMES
 * (REFS and FRAMES comma lists of 17; REFS[0]/FRAMES[0] are the ring, 1..15 data pages,
 * 16 the indirect page.)
 * `init` lays out and grants the ring and prints "ring <ref> <RING_SIZE>"; the harness
 * then connects pvio's blkback to it and runs `io` (with the event channel's eventfds),
 * which does the I/O and prints "ok" or the first failure.  BLKFRONT_BASE (environment) moves
 * every sector by that many, so that one program per queue of a multi-queue device
 * writes its own part of the disk.
 */
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
/* io/ring.h leaves the barriers to the includer. */
#define xen_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)

#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>

#define PAGE 4096
#define MAXP 64

static uint8_t *mem;
static grant_entry_v1_t *gnttab;
static unsigned refs[MAXP], frames[MAXP];
static int nrefs, nframes, txfd, rxfd;
static domid_t backend;
static blkif_front_ring_t fr;
static blkif_sector_t base; /* added to every sector number */

static void grant(unsigned ref, unsigned frame, int readonly) {
    grant_entry_v1_t *e = &gnttab[ref];
    e->frame = frame;
    e->domid = backend;
    __atomic_store_n(&e->flags, GTF_permit_access | (readonly ? GTF_readonly : 0), __ATOMIC_RELEASE);
}

static int end_access(unsigned ref) {
    uint16_t flags = __atomic_load_n(&gnttab[ref].flags, __ATOMIC_ACQUIRE);
    do {
        if (flags & (GTF_reading | GTF_writing)) return 0;
    } while (!__atomic_compare_exchange_n(&gnttab[ref].flags, &flags, 0, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    return 1;
}

static void kick(void) {
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&fr, notify);
    if (notify) {
        uint64_t one = 1;
        if (write(txfd, &one, 8) != 8) { perror("eventfd write"); exit(4); }
    }
}

/* Wait for `count` responses; statuses by id into st[]. */
static uint8_t ops[MAXP];

static int collect(int count, int16_t *st) {
    int got = 0;
    while (got < count) {
        RING_IDX rp = fr.sring->rsp_prod;
        xen_rmb();
        for (RING_IDX i = fr.rsp_cons; i != rp; i++) {
            blkif_response_t *r = RING_GET_RESPONSE(&fr, i);
            if (r->id >= MAXP) { printf("bad id %llu\n", (unsigned long long)r->id); return -1; }
            st[r->id] = r->status;
            ops[r->id] = r->operation;
            got++;
        }
        fr.rsp_cons = rp;
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&fr, more);
        if (more || got >= count) continue;
        struct pollfd p = {rxfd, POLLIN, 0};
        if (poll(&p, 1, 5000) <= 0) { printf("timeout waiting for responses (%d/%d)\n", got, count); return -1; }
        uint64_t v;
        if (read(rxfd, &v, 8) != 8 && errno != EAGAIN) { perror("eventfd read"); return -1; }
    }
    return 0;
}

static blkif_request_t *next_req(uint64_t id, uint8_t op, blkif_sector_t sector, int nseg) {
    blkif_request_t *req = RING_GET_REQUEST(&fr, fr.req_prod_pvt);
    fr.req_prod_pvt++;
    memset(req, 0, sizeof(*req));
    req->operation = op;
    req->nr_segments = nseg;
    req->handle = 0;
    req->id = id;
    req->sector_number = base + sector;
    return req;
}

static int parse_list(const char *s, unsigned *out) {
    int n = 0;
    char *copy = strdup(s), *tok, *save;
    for (tok = strtok_r(copy, ",", &save); tok && n < MAXP; tok = strtok_r(0, ",", &save))
        out[n++] = strtoul(tok, 0, 0);
    free(copy);
    return n;
}

int main(int argc, char **argv) {
    if (argc != 10) { fprintf(stderr, "usage\n"); return 2; }
    if (getenv("BLKFRONT_BASE")) base = strtoull(getenv("BLKFRONT_BASE"), 0, 0);
    int init = !strcmp(argv[1], "init");
    argv++;
    int memfd = atoi(argv[1]);
    size_t nr_pages = strtoul(argv[2], 0, 0);
    int gntfd = atoi(argv[3]);
    backend = (domid_t)atoi(argv[4]);
    txfd = atoi(argv[5]);
    rxfd = atoi(argv[6]);
    nrefs = parse_list(argv[7], refs);
    nframes = parse_list(argv[8], frames);
    if (nrefs != nframes || nrefs < 17) { fprintf(stderr, "need 17 refs and frames\n"); return 2; }
    mem = mmap(0, nr_pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    gnttab = mmap(0, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, gntfd, 0);
    if (mem == MAP_FAILED || gnttab == MAP_FAILED) { perror("mmap"); return 3; }

    blkif_sring_t *sring = (blkif_sring_t *)(mem + (size_t)frames[0] * PAGE);
    if (init) {
        SHARED_RING_INIT(sring);
        FRONT_RING_INIT(&fr, sring, PAGE);
        grant(refs[0], frames[0], 0);
        printf("ring %u %u\n", refs[0], (unsigned)RING_SIZE(&fr));
        return 0;
    }
    FRONT_RING_INIT(&fr, sring, PAGE); /* private indices 0: the ring is fresh */

    int16_t st[MAXP];
    /* 1. Writes: pages 1..4, one segment each (sectors 0..7), at sectors 8*i; then one
     * request of 11 segments (pages 5..15) using sectors 1..6 of each page. */
    for (int i = 1; i <= 4; i++) {
        memset(mem + (size_t)frames[i] * PAGE, 0x10 + i, PAGE);
        grant(refs[i], frames[i], 1);
        blkif_request_t *req = next_req(i, BLKIF_OP_WRITE, 8 * (i - 1), 1);
        req->seg[0].gref = refs[i];
        req->seg[0].first_sect = 0;
        req->seg[0].last_sect = 7;
    }
    blkif_request_t *big = next_req(5, BLKIF_OP_WRITE, 100, 11);
    for (int s = 0; s < 11; s++) {
        int p = 5 + s;
        memset(mem + (size_t)frames[p] * PAGE, 0x40 + s, PAGE);
        grant(refs[p], frames[p], 1);
        big->seg[s].gref = refs[p];
        big->seg[s].first_sect = 1;
        big->seg[s].last_sect = 6;
    }
    /* A bad one in the same batch: READ with no segments. */
    next_req(6, BLKIF_OP_READ, 0, 0);
    kick();
    memset(st, 0x7f, sizeof st);
    if (collect(6, st)) return 6;
    for (int i = 1; i <= 5; i++)
        if (st[i] != BLKIF_RSP_OKAY) { printf("write %d: status %d\n", i, st[i]); return 0; }
    if (st[6] != BLKIF_RSP_ERROR) { printf("bad read answered %d\n", st[6]); return 0; }
    for (int i = 1; i <= 15; i++)
        if (!end_access(refs[i])) { printf("ref %u still mapped after its response\n", refs[i]); return 0; }

    /* 2. Read back sectors 0..31 into pages 1..4 (granted writable), and flush. */
    for (int i = 1; i <= 4; i++) {
        memset(mem + (size_t)frames[i] * PAGE, 0, PAGE);
        grant(refs[i], frames[i], 0);
        blkif_request_t *req = next_req(10 + i, BLKIF_OP_READ, 8 * (i - 1), 1);
        req->seg[0].gref = refs[i];
        req->seg[0].first_sect = 0;
        req->seg[0].last_sect = 7;
    }
    next_req(15, BLKIF_OP_FLUSH_DISKCACHE, 0, 0);
    kick();
    if (collect(5, st)) return 6;
    for (int i = 11; i <= 15; i++)
        if (st[i] != BLKIF_RSP_OKAY) { printf("request %d: status %d\n", i, st[i]); return 0; }
    for (int i = 1; i <= 4; i++) {
        for (int b = 0; b < PAGE; b++)
            if (mem[(size_t)frames[i] * PAGE + b] != 0x10 + i) { printf("read %d: byte %d wrong\n", i, b); return 0; }
        end_access(refs[i]);
    }

    /* 3. Indirect: one WRITE of 40 segments (pages 1..15 in turn, whole pages) at sector
     * 512, its segments in the indirect page (granted read-only); a bad one with 0
     * segments; then an indirect READ of 12 segments back into pages 1..12. */
    struct blkif_request_segment *segs = (struct blkif_request_segment *)(mem + (size_t)frames[16] * PAGE);
    for (int p = 1; p <= 15; p++) {
        memset(mem + (size_t)frames[p] * PAGE, 0x60 + p, PAGE);
        grant(refs[p], frames[p], 1);
    }
    for (int s = 0; s < 40; s++) {
        segs[s].gref = refs[1 + s % 15];
        segs[s].first_sect = 0;
        segs[s].last_sect = 7;
    }
    grant(refs[16], frames[16], 1);
    blkif_request_indirect_t *ind = (blkif_request_indirect_t *)next_req(20, BLKIF_OP_INDIRECT, 0, 0);
    ind->indirect_op = BLKIF_OP_WRITE;
    ind->nr_segments = 40;
    ind->id = 20;
    ind->sector_number = base + 512;
    ind->handle = 0;
    ind->indirect_grefs[0] = refs[16];
    ind = (blkif_request_indirect_t *)next_req(21, BLKIF_OP_INDIRECT, 0, 0);
    ind->indirect_op = BLKIF_OP_WRITE;
    ind->nr_segments = 0;
    ind->id = 21;
    ind->indirect_grefs[0] = refs[16];
    kick();
    if (collect(2, st)) return 6;
    if (st[20] != BLKIF_RSP_OKAY || ops[20] != BLKIF_OP_WRITE) { printf("indirect write: status %d op %d\n", st[20], ops[20]); return 0; }
    if (st[21] != BLKIF_RSP_ERROR) { printf("indirect with 0 segments answered %d\n", st[21]); return 0; }
    for (int p = 1; p <= 12; p++) {
        memset(mem + (size_t)frames[p] * PAGE, 0, PAGE);
        grant(refs[p], frames[p], 0);
    }
    ind = (blkif_request_indirect_t *)next_req(22, BLKIF_OP_INDIRECT, 0, 0);
    ind->indirect_op = BLKIF_OP_READ;
    ind->nr_segments = 12;
    ind->id = 22;
    ind->sector_number = base + 512;
    ind->indirect_grefs[0] = refs[16];
    kick();
    if (collect(1, st)) return 6;
    if (st[22] != BLKIF_RSP_OKAY || ops[22] != BLKIF_OP_READ) { printf("indirect read: status %d op %d\n", st[22], ops[22]); return 0; }
    for (int p = 1; p <= 12; p++)
        for (int b = 0; b < PAGE; b++)
            if (mem[(size_t)frames[p] * PAGE + b] != 0x60 + p) { printf("indirect read %d: byte %d wrong\n", p, b); return 0; }
    for (int p = 1; p <= 16; p++)
        if (!end_access(refs[p])) { printf("ref %u still mapped after its response\n", refs[p]); return 0; }
    printf("ok\n");
    return 0;
}
