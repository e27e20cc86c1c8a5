/* Two ends of a libxenvchan, each an unmodified program on Xen's libraries (libxenvchan,
 * libxenstore, libxenevtchn, libxengnttab), run as pvio domains by `pvio run`.
 *
 *   vchan_peer server CLIENT_DOMID PATH BYTES [exit]   offers a vchan at PATH (our XenStore dir)
 *   vchan_peer client SERVER_DOMID PATH BYTES [exit]   waits for PATH, connects
 *
 * Both send BYTES of their own pseudo-random stream and receive BYTES of the other's at
 * the same time, checking every byte received, and print "sum SENT RECEIVED" (FNV-1a 64
 * of each direction).  Then the client closes and the server must see it: "ok closed".
 * With "exit", the server instead exits without closing (its unmap notification is all
 * the client gets, as when a process dies on Linux), and the client must see that.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <libxenvchan.h>
#include <xenstore.h>

#define CHUNK 65536

struct stream { uint64_t x, sum; };

static uint8_t next_byte(struct stream *s)
{
    s->x ^= s->x << 13; s->x ^= s->x >> 7; s->x ^= s->x << 17; /* xorshift64 */
    uint8_t b = (uint8_t)(s->x >> 24);
    s->sum = (s->sum ^ b) * 0x100000001b3ull;
    return b;
}

static void die(const char *what)
{
    printf("FAIL %s (errno %d %s)\n", what, errno, strerror(errno));
    fflush(stdout);
    exit(1);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

static int wait_event(struct libxenvchan *v, int ms);

/* Wait up to 10 s for the other end to be gone; "ok closed" or a failure. */
static void see_peer_go(struct libxenvchan *v)
{
    double deadline = now() + 10;
    while (libxenvchan_is_open(v) && now() < deadline)
        wait_event(v, 1000);
    if (libxenvchan_is_open(v))
        die("the other end's close was not seen");
    printf("ok closed\n");
    fflush(stdout);
}

/* Wait (at most `ms`) for the vchan's event channel; 0 on timeout. */
static int wait_event(struct libxenvchan *v, int ms)
{
    struct pollfd p = { libxenvchan_fd_for_select(v), POLLIN, 0 };
    if (poll(&p, 1, ms) != 1)
        return 0;
    if (libxenvchan_wait(v) < 0)
        die("libxenvchan_wait");
    return 1;
}

static void exchange(struct libxenvchan *v, uint64_t bytes, uint64_t my_seed, uint64_t their_seed)
{
    struct stream out = { my_seed, 0xcbf29ce484222325ull }, in = { their_seed, 0xcbf29ce484222325ull };
    struct stream check = in;
    static uint8_t wbuf[CHUNK], rbuf[CHUNK];
    uint64_t sent = 0, recvd = 0;
    size_t pending = 0, pend_off = 0;
    double start = now();
    v->blocking = 0;
    while (sent < bytes || recvd < bytes) {
        int progress = 0;
        if (sent < bytes) {
            if (pending == 0) {
                pending = bytes - sent < CHUNK ? (size_t)(bytes - sent) : CHUNK;
                for (size_t i = 0; i < pending; i++)
                    wbuf[i] = next_byte(&out);
                pend_off = 0;
            }
            int n = libxenvchan_write(v, wbuf + pend_off, pending - pend_off);
            if (n < 0)
                die("libxenvchan_write");
            pend_off += (size_t)n;
            sent += (uint64_t)n;
            if (pend_off == pending)
                pending = 0;
            progress |= n > 0;
        }
        if (recvd < bytes) {
            uint64_t left = bytes - recvd;
            int n = libxenvchan_read(v, rbuf, left < CHUNK ? (size_t)left : CHUNK);
            if (n < 0)
                die("libxenvchan_read");
            for (int i = 0; i < n; i++)
                if (rbuf[i] != next_byte(&check)) {
                    printf("FAIL byte %llu differs\n", (unsigned long long)(recvd + (uint64_t)i));
                    exit(1);
                }
            recvd += (uint64_t)n;
            progress |= n > 0;
        }
        if (!progress && !wait_event(v, 10000))
            die("no progress for 10 s");
    }
    (void)in;
    double secs = now() - start;
    printf("sum %016llx %016llx\n", (unsigned long long)out.sum, (unsigned long long)check.sum);
    printf("rate %.1f MiB/s each way\n", (double)bytes / (1 << 20) / (secs > 0 ? secs : 1e-9));
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc != 5 && argc != 6)
        return 2;
    int server_exits = argc == 6 && !strcmp(argv[5], "exit");
    int peer = atoi(argv[2]);
    const char *path = argv[3];
    uint64_t bytes = strtoull(argv[4], NULL, 10);
    if (!strcmp(argv[1], "server")) {
        struct libxenvchan *v = libxenvchan_server_init(NULL, peer, path, 128 * 1024, 128 * 1024);
        if (!v)
            die("libxenvchan_server_init");
        printf("ready\n");
        fflush(stdout);
        while (libxenvchan_is_open(v) == 2) /* the client has not connected yet */
            if (!wait_event(v, 20000))
                die("no client");
        exchange(v, bytes, 0x1234567, 0x7654321);
        if (server_exits)
            exit(0); /* no libxenvchan_close: the device layer's exit notifications only */
        see_peer_go(v); /* the client closes its end: we must see it */
        libxenvchan_close(v);
        return 0;
    }
    /* client: the server's keys appear in XenStore when it is ready */
    struct xs_handle *xs = xs_open(0);
    char key[256];
    snprintf(key, sizeof key, "%s/event-channel", path);
    for (int i = 0;; i++) {
        void *val = xs_read(xs, XBT_NULL, key, NULL);
        if (val) {
            free(val);
            break;
        }
        if (i == 400)
            die("no server");
        usleep(50 * 1000);
    }
    xs_close(xs);
    struct libxenvchan *v = libxenvchan_client_init(NULL, peer, path);
    if (!v)
        die("libxenvchan_client_init");
    exchange(v, bytes, 0x7654321, 0x1234567);
    if (server_exits)
        see_peer_go(v);
    else
        printf("ok closed\n");
    libxenvchan_close(v);
    return 0;
}
