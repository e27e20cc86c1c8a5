/*
 * ring_peer: one end (or both ends) of a blkif ring, built from Xen's own io/ring.h
 * macros and blkif.h's DEFINE_RING_TYPES, over a file mapped MAP_SHARED.  The other end
 * is pvio's Python ring (tests/ringpeer.py), in another process on the same file.
 *
 *   ring_peer solo     FILE ORDER START SCRIPT
 *   ring_peer lockstep front|back FILE ORDER START SCRIPT TOKEN_IN_FD TOKEN_OUT_FD
 *   ring_peer stress   front|back FILE ORDER START COUNT EVTCHN_IN_FD EVTCHN_OUT_FD SEED
 *
 * SCRIPT is a space-separated list of steps.  Front steps: Qn (put up to n requests),
 * P (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY), U (RING_PUSH_REQUESTS), Rn (take up to n
 * responses), F (RING_FINAL_CHECK_FOR_RESPONSES).  Back steps: tn (take up to n
 * requests), sn (put up to n responses), p (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY),
 * u (RING_PUSH_RESPONSES), f (RING_FINAL_CHECK_FOR_REQUESTS).  Each executed step prints
 * "<step> <op> <result>"; in lockstep mode the two processes pass a token through pipes so
 * that steps run in script order.  In stress mode the ends run freely and sleep on
 * eventfds (event channels) only when the final check says so: a wrongly skipped notify
 * leaves one end asleep, and the 10 s timeout turns that into exit status 3.
 *
 * Request and response contents are a function of their sequence number; both ends check
 * every field.  Exit status: 0 ok, 2 usage, 3 timeout (lost wake-up), 4 bad entry,
 * 5 peer broke the ring, 6 system error.
 */
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* io/ring.h leaves the barriers to the includer (interface version >= 0x00030208). */
#define xen_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)

#include <xen/xen.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>

#define WAIT_MS 10000

static void die(int status, const char *what)
{
    fprintf(stderr, "ring_peer: %s\n", what);
    fflush(stdout);
    exit(status);
}

/* ---- contents, as functions of the sequence number (tests/ringpeer.py mirrors these) -- */

static void make_request(uint64_t seq, blkif_request_t *req)
{
    memset(req, 0, sizeof(*req));
    req->operation = (uint8_t)(seq * 7 + 3);
    req->nr_segments = (uint8_t)(seq % 12);
    req->handle = (blkif_vdev_t)(seq * 31);
    req->id = seq * 0x9E3779B97F4A7C15ULL + 1;
    req->sector_number = (seq << 9) ^ 0x0123456789ABCDEFULL;
    for (unsigned i = 0; i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
        req->seg[i].gref = (grant_ref_t)((seq * 11 + i) * 2654435761u);
        req->seg[i].first_sect = (uint8_t)((seq + i) & 7);
        req->seg[i].last_sect = (uint8_t)(7 - ((seq + i) & 3));
    }
}

static void check_request(uint64_t seq, const blkif_request_t *got)
{
    blkif_request_t want;
    make_request(seq, &want);
    int ok = got->operation == want.operation && got->nr_segments == want.nr_segments &&
             got->handle == want.handle && got->id == want.id &&
             got->sector_number == want.sector_number;
    for (unsigned i = 0; ok && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++)
        ok = got->seg[i].gref == want.seg[i].gref &&
             got->seg[i].first_sect == want.seg[i].first_sect &&
             got->seg[i].last_sect == want.seg[i].last_sect;
    if (!ok) {
        printf("BAD request seq=%" PRIu64 " id=%" PRIx64 "\n", seq, (uint64_t)got->id);
        die(4, "bad request");
    }
}

static void make_response(uint64_t seq, const blkif_request_t *req, blkif_response_t *rsp)
{
    memset(rsp, 0, sizeof(*rsp));
    rsp->id = req->id;
    rsp->operation = req->operation;
    rsp->status = (int16_t)((int)(seq % 5) - 2);
}

static void check_response(uint64_t seq, const blkif_response_t *got)
{
    blkif_request_t req;
    blkif_response_t want;
    make_request(seq, &req);
    make_response(seq, &req, &want);
    if (got->id != want.id || got->operation != want.operation || got->status != want.status) {
        printf("BAD response seq=%" PRIu64 " id=%" PRIx64 "\n", seq, (uint64_t)got->id);
        die(4, "bad response");
    }
}

/* ---- the two ends ----------------------------------------------------------------- */

struct front {
    blkif_front_ring_t r;
    uint64_t put_seq, got_seq;
};

struct back {
    blkif_back_ring_t r;
    uint64_t got_seq, put_seq;
};

static blkif_sring_t *map_ring(const char *path, unsigned order, size_t *size)
{
    *size = (size_t)4096 << order;
    int fd = open(path, O_RDWR);
    if (fd < 0)
        die(6, "open ring file");
    void *p = mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED)
        die(6, "mmap ring file");
    return p;
}

static void front_init(struct front *f, blkif_sring_t *s, RING_IDX start, size_t size)
{
    SHARED_RING_INIT(s);
    s->req_prod = s->rsp_prod = start;
    s->req_event = s->rsp_event = start + 1;
    FRONT_RING_ATTACH(&f->r, s, start, size);
    f->put_seq = f->got_seq = 0;
}

static void back_init(struct back *b, blkif_sring_t *s, RING_IDX start, size_t size)
{
    BACK_RING_ATTACH(&b->r, s, start, size);
    b->put_seq = b->got_seq = 0;
}

static unsigned front_put(struct front *f, unsigned n)
{
    unsigned done = 0;
    while (done < n && !RING_FULL(&f->r)) {
        blkif_request_t req;
        make_request(f->put_seq++, &req);
        memcpy(RING_GET_REQUEST(&f->r, f->r.req_prod_pvt), &req, sizeof(req));
        f->r.req_prod_pvt++;
        done++;
    }
    return done;
}

static unsigned front_take(struct front *f, unsigned n)
{
    RING_IDX rp = f->r.sring->rsp_prod;
    xen_rmb();
    if (RING_RESPONSE_PROD_OVERFLOW(&f->r, rp))
        die(5, "RING_RESPONSE_PROD_OVERFLOW");
    unsigned done = 0;
    while (done < n && f->r.rsp_cons != rp) {
        blkif_response_t rsp;
        RING_COPY_RESPONSE(&f->r, f->r.rsp_cons, &rsp);
        check_response(f->got_seq++, &rsp);
        f->r.rsp_cons++;
        done++;
    }
    return done;
}

static unsigned back_take(struct back *b, unsigned n)
{
    RING_IDX rp = b->r.sring->req_prod;
    xen_rmb();
    if (RING_REQUEST_PROD_OVERFLOW(&b->r, rp))
        die(5, "RING_REQUEST_PROD_OVERFLOW");
    unsigned done = 0;
    RING_IDX rc = b->r.req_cons;
    while (done < n && rc != rp && !RING_REQUEST_CONS_OVERFLOW(&b->r, rc)) {
        blkif_request_t req;
        RING_COPY_REQUEST(&b->r, rc, &req);
        check_request(b->got_seq++, &req);
        b->r.req_cons = ++rc;
        done++;
    }
    return done;
}

static unsigned back_put(struct back *b, unsigned n)
{
    unsigned done = 0;
    while (done < n && b->r.rsp_prod_pvt != b->r.req_cons) {
        blkif_request_t req;
        blkif_response_t rsp;
        make_request(b->put_seq, &req);
        make_response(b->put_seq++, &req, &rsp);
        memcpy(RING_GET_RESPONSE(&b->r, b->r.rsp_prod_pvt), &rsp, sizeof(rsp));
        b->r.rsp_prod_pvt++;
        done++;
    }
    return done;
}

/* ---- scripts ------------------------------------------------------------------------- */

#define MAX_STEPS 100000

struct step {
    char op;
    unsigned n;
};

static int parse_script(const char *text, struct step *steps)
{
    int count = 0;
    const char *p = text;
    while (*p) {
        while (*p == ' ')
            p++;
        if (!*p)
            break;
        if (count == MAX_STEPS || !strchr("QPURFtspuf", *p))
            die(2, "bad script");
        steps[count].op = *p++;
        steps[count].n = (unsigned)strtoul(p, (char **)&p, 10);
        count++;
    }
    return count;
}

static int is_front_op(char op)
{
    return op >= 'A' && op <= 'Z';
}

static unsigned run_step(int i, struct step st, struct front *f, struct back *b)
{
    int work, notify;
    unsigned result = 0;
    switch (st.op) {
    case 'Q': result = front_put(f, st.n); break;
    case 'P': RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f->r, notify); result = !!notify; break;
    case 'U': RING_PUSH_REQUESTS(&f->r); break;
    case 'R': result = front_take(f, st.n); break;
    case 'F': RING_FINAL_CHECK_FOR_RESPONSES(&f->r, work); result = !!work; break;
    case 't': result = back_take(b, st.n); break;
    case 's': result = back_put(b, st.n); break;
    case 'p': RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&b->r, notify); result = !!notify; break;
    case 'u': RING_PUSH_RESPONSES(&b->r); break;
    case 'f': RING_FINAL_CHECK_FOR_REQUESTS(&b->r, work); result = !!work; break;
    }
    if (st.op == 'Q' || st.op == 'R' || st.op == 't' || st.op == 's')
        printf("%d %c%u %u\n", i, st.op, st.n, result);
    else
        printf("%d %c %u\n", i, st.op, result);
    return result;
}

static void token_wait(int fd)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    int r = poll(&pfd, 1, WAIT_MS);
    if (r == 0)
        die(3, "timed out waiting for the token");
    char c;
    if (r < 0 || read(fd, &c, 1) != 1)
        die(6, "token read");
}

static void token_pass(int fd)
{
    char c = 't';
    fflush(stdout);
    if (write(fd, &c, 1) != 1)
        die(6, "token write");
}

/* ---- event channels (eventfds) ------------------------------------------------------ */

static void kick(int fd)
{
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) != sizeof(one))
        die(6, "eventfd write");
}

static void wait_event(int fd)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    int r = poll(&pfd, 1, WAIT_MS);
    if (r == 0)
        die(3, "lost wake-up: no notification within the timeout");
    uint64_t value;
    if (r < 0 || read(fd, &value, sizeof(value)) != sizeof(value))
        die(6, "eventfd read");
}

static uint32_t lcg(uint64_t *state)
{
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(*state >> 33);
}

/* Now and then pause, so that the (slower) Python end gets to run dry and sleep too. */
static void dawdle(uint64_t *seed)
{
    if ((lcg(seed) & 3) == 0)
        usleep(200);
}

static void stress_front(struct front *f, uint64_t count, int evin, int evout, uint64_t seed)
{
    unsigned notifies = 0, sleeps = 0;
    while (f->got_seq < count) {
        dawdle(&seed);
        unsigned burst = 1 + lcg(&seed) % RING_SIZE(&f->r);
        uint64_t left = count - f->put_seq;
        unsigned put = front_put(f, left < burst ? (unsigned)left : burst);
        if (put) {
            int notify;
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f->r, notify);
            if (notify) {
                kick(evout);
                notifies++;
            }
        }
        unsigned got = front_take(f, RING_SIZE(&f->r));
        if (f->got_seq == count)
            break;
        if (put || got)
            continue;
        if (f->put_seq < count && !RING_FULL(&f->r))
            continue;
        int work;
        RING_FINAL_CHECK_FOR_RESPONSES(&f->r, work);
        if (work)
            continue;
        sleeps++;
        wait_event(evin);
    }
    printf("front done %" PRIu64 " notifies %u sleeps %u\n", f->got_seq, notifies, sleeps);
}

static void stress_back(struct back *b, uint64_t count, int evin, int evout, uint64_t seed)
{
    unsigned notifies = 0, sleeps = 0;
    /* The back connects when the front says the ring is ready: its first notify. */
    wait_event(evin);
    while (b->put_seq < count) {
        dawdle(&seed);
        unsigned burst = 1 + lcg(&seed) % RING_SIZE(&b->r);
        unsigned got = back_take(b, burst);
        unsigned put = back_put(b, got);
        if (put) {
            int notify;
            RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&b->r, notify);
            if (notify) {
                kick(evout);
                notifies++;
            }
        }
        if (b->put_seq == count)
            break;
        if (got)
            continue;
        int work;
        RING_FINAL_CHECK_FOR_REQUESTS(&b->r, work);
        if (work)
            continue;
        sleeps++;
        wait_event(evin);
    }
    printf("back done %" PRIu64 " notifies %u sleeps %u\n", b->put_seq, notifies, sleeps);
}

int main(int argc, char **argv)
{
    static struct step steps[MAX_STEPS];
    struct front f;
    struct back b;
    size_t size;

    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    if (argc == 6 && !strcmp(argv[1], "solo")) {
        blkif_sring_t *s = map_ring(argv[2], (unsigned)atoi(argv[3]), &size);
        RING_IDX start = (RING_IDX)strtoul(argv[4], NULL, 0);
        int n = parse_script(argv[5], steps);
        front_init(&f, s, start, size);
        back_init(&b, s, start, size);
        for (int i = 0; i < n; i++)
            run_step(i, steps[i], &f, &b);
    } else if (argc == 9 && !strcmp(argv[1], "lockstep")) {
        int front = !strcmp(argv[2], "front");
        blkif_sring_t *s = map_ring(argv[3], (unsigned)atoi(argv[4]), &size);
        RING_IDX start = (RING_IDX)strtoul(argv[5], NULL, 0);
        int n = parse_script(argv[6], steps);
        int tin = atoi(argv[7]), tout = atoi(argv[8]);
        int holding = front; /* the front holds the token first, and initialises the ring */
        if (front)
            front_init(&f, s, start, size);
        else
            back_init(&b, s, start, size);
        if (holding && n > 0 && is_front_op(steps[0].op) != front) {
            token_pass(tout);
            holding = 0;
        }
        for (int i = 0; i < n; i++) {
            if (is_front_op(steps[i].op) != front)
                continue;
            if (!holding)
                token_wait(tin);
            holding = 1;
            run_step(i, steps[i], &f, &b);
            if (i + 1 < n && is_front_op(steps[i + 1].op) != front) {
                token_pass(tout);
                holding = 0;
            }
        }
    } else if (argc == 10 && !strcmp(argv[1], "stress")) {
        int front = !strcmp(argv[2], "front");
        blkif_sring_t *s = map_ring(argv[3], (unsigned)atoi(argv[4]), &size);
        RING_IDX start = (RING_IDX)strtoul(argv[5], NULL, 0);
        uint64_t count = strtoull(argv[6], NULL, 0);
        int evin = atoi(argv[7]), evout = atoi(argv[8]);
        uint64_t seed = strtoull(argv[9], NULL, 0);
        if (front) {
            front_init(&f, s, start, size);
            stress_front(&f, count, evin, evout, seed);
        } else {
            back_init(&b, s, start, size);
            stress_back(&b, count, evin, evout, seed);
        }
    } else {
        die(2, "usage: see the comment at the top of ring_peer.c");
    }
    fflush(stdout);
    return 0;
}
