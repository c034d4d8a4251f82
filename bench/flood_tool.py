"""The small C program ``bench flood`` runs inside the lab, compiled at run time with gcc.

Python's send loop manages ~300k datagrams/s; the flood needs more, and an exact count of what
reached the device. One binary, three modes:

``flood IFNAME POOL COUNT RATE MAXSEC``
    Sends COUNT datagrams from the pool file (records ``u16 nframes, then per frame u16 len +
    bytes``; a datagram is one frame, or several for outer IP fragments), cyclically, on an
    AF_PACKET socket bound to IFNAME: whole Ethernet frames, so outer headers can lie. One
    ``send`` per frame, so each frame's fate is known: sent, or ENOBUFS (the device took it and
    dropped it: counted in the receiving port's rx_dropped), or another error (not sent). RATE
    datagrams/s (0: as fast as it goes). Stops after MAXSEC or on SIGTERM. Prints one JSON line.

``send DST PORT RATE SIZE MAXSEC``
    The legitimate stream: connected UDP, SIZE-byte datagrams carrying a sequence number, paced
    by a token bucket (burst 16, so a SIGSTOP/SIGCONT pause does not turn into a burst). Starts
    stopped (it raises SIGSTOP once its socket is ready); stops on SIGTERM or after MAXSEC; prints
    one JSON line (sent, send errors).

``recv ADDR PORT MAXSEC MAXSEQ [TRACE]``
    Counts the stream's datagrams by sequence number (a bitmap: unique, duplicates, reordered,
    foreign), with an 8 MB receive buffer: the app shares node 2's CPU with the flood, and its
    own lag is not the data plane's loss. Stops on SIGTERM or after MAXSEC; prints one JSON line.
    With TRACE (``bench faults``), writes per unique datagram ``u64 seq, f64 sent, f64 received``
    (CLOCK_MONOTONIC seconds; the sender stamps its send time at bytes 16..23 when SIZE >= 24).
"""
from __future__ import annotations

from .ctool import build_c
from .errors import LabError

SOURCE = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <linux/if_packet.h>
#include <linux/if_ether.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x77656674666c6f6fULL   /* "weftfloo" */

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void handle_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;          /* no SA_RESTART: a blocked recv returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
}

static void nap(double seconds) {
    struct timespec ts;
    if (seconds <= 0) return;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - ts.tv_sec) * 1e9);
    nanosleep(&ts, NULL);
}

/* -- flood --------------------------------------------------------------------------------- */
struct frame { uint16_t len; uint8_t *data; };
struct dgram { uint16_t n; struct frame *f; };

static int load_pool(const char *path, struct dgram **out) {
    FILE *fp = fopen(path, "rb");
    if (!fp) { perror(path); return -1; }
    int cap = 64, n = 0;
    struct dgram *pool = malloc(cap * sizeof *pool);
    uint16_t nf;
    while (fread(&nf, 2, 1, fp) == 1) {
        if (n == cap) { cap *= 2; pool = realloc(pool, cap * sizeof *pool); }
        pool[n].n = nf;
        pool[n].f = calloc(nf ? nf : 1, sizeof(struct frame));
        for (int i = 0; i < nf; i++) {
            uint16_t len;
            if (fread(&len, 2, 1, fp) != 1) { fprintf(stderr, "%s: truncated\n", path); return -1; }
            pool[n].f[i].len = len;
            pool[n].f[i].data = malloc(len ? len : 1);
            if (len && fread(pool[n].f[i].data, len, 1, fp) != 1) {
                fprintf(stderr, "%s: truncated\n", path); return -1;
            }
        }
        n++;
    }
    fclose(fp);
    *out = pool;
    return n;
}

static int flood(int argc, char **argv) {
    if (argc != 7) { fprintf(stderr, "usage: flood IFNAME POOL COUNT RATE MAXSEC\n"); return 2; }
    const char *ifname = argv[2];
    long long count = atoll(argv[4]);
    double rate = atof(argv[5]), maxsec = atof(argv[6]);
    struct dgram *pool;
    int npool = load_pool(argv[3], &pool);
    if (npool <= 0) { fprintf(stderr, "flood: empty pool\n"); return 1; }
    int fd = socket(AF_PACKET, SOCK_RAW, 0);     /* protocol 0: send only, never receive */
    if (fd < 0) { perror("socket(AF_PACKET)"); return 1; }
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof sll);
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = if_nametoindex(ifname);
    if (!sll.sll_ifindex) { perror(ifname); return 1; }
    if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) { perror("bind"); return 1; }
    handle_signals();
    long long done = 0, ok = 0, enobufs = 0, other = 0;
    int last_errno = 0;
    double t0 = now(), deadline = t0 + maxsec;
    while (done < count && !stop) {
        if ((done & 63) == 0) {
            double t = now();
            if (t > deadline) break;
            if (rate > 0) {
                double due = t0 + done / rate;
                if (due > t) nap(due - t);
            }
        }
        struct dgram *d = &pool[done % npool];
        for (int i = 0; i < d->n; i++) {
            for (;;) {
                ssize_t r = send(fd, d->f[i].data, d->f[i].len, 0);
                if (r >= 0) { ok++; break; }
                if (errno == EINTR) { if (stop) break; continue; }
                if (errno == ENOBUFS) { enobufs++; break; }
                other++;
                last_errno = errno;
                break;
            }
        }
        done++;
    }
    double secs = now() - t0;
    printf("{\"datagrams\": %lld, \"frames_ok\": %lld, \"frames_enobufs\": %lld, "
           "\"frames_error\": %lld, \"last_errno\": %d, \"seconds\": %.6f, \"stopped\": %s}\n",
           done, ok, enobufs, other, last_errno, secs,
           stop ? "\"signal\"" : (done < count ? "\"time\"" : "null"));
    return 0;
}

/* -- the legitimate stream ------------------------------------------------------------------ */
/* An IPv4 address and port from the command line; -1 when the address is not one. */
static int udp_addr(struct sockaddr_in *a, const char *ip, const char *port) {
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons(atoi(port));
    return inet_pton(AF_INET, ip, &a->sin_addr) == 1 ? 0 : -1;
}

static int sender(int argc, char **argv) {
    if (argc != 7) { fprintf(stderr, "usage: send DST PORT RATE SIZE MAXSEC\n"); return 2; }
    double rate = atof(argv[4]), maxsec = atof(argv[6]);
    int size = atoi(argv[5]);
    if (size < 16 || size > 9000 || rate <= 0) { fprintf(stderr, "send: bad size or rate\n"); return 2; }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in dst;
    if (udp_addr(&dst, argv[2], argv[3]) < 0) { fprintf(stderr, "send: bad address\n"); return 2; }
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) { perror("connect"); return 1; }
    handle_signals();
    raise(SIGSTOP);            /* sends nothing until the caller has read its counters (SIGCONT) */
    uint8_t *buf = calloc(1, size);
    uint64_t magic = MAGIC;
    memcpy(buf + 8, &magic, 8);
    uint64_t seq = 0, errors = 0;
    double t0 = now(), last = t0, tokens = 1, burst = 16;
    while (!stop) {
        double t = now();
        if (t - t0 > maxsec) break;
        tokens += (t - last) * rate;
        if (tokens > burst) tokens = burst;
        last = t;
        if (tokens < 1) { nap((1 - tokens) / rate); continue; }
        uint64_t be = __builtin_bswap64(seq);
        memcpy(buf, &be, 8);
        if (size >= 24) { double st = now(); memcpy(buf + 16, &st, 8); }   /* send time (bench faults) */
        if (send(fd, buf, size, 0) == size) { seq++; tokens -= 1; }
        else if (errno != EINTR) { errors++; tokens -= 1; }
    }
    printf("{\"sent\": %llu, \"send_errors\": %llu, \"seconds\": %.6f}\n",
           (unsigned long long)seq, (unsigned long long)errors, now() - t0);
    return 0;
}

static int receiver(int argc, char **argv) {
    if (argc != 6 && argc != 7) { fprintf(stderr, "usage: recv ADDR PORT MAXSEC MAXSEQ [TRACE]\n"); return 2; }
    FILE *trace = NULL;        /* bench faults: per unique datagram (u64 seq, f64 sent, f64 received) */
    if (argc == 7 && !(trace = fopen(argv[6], "wb"))) { perror(argv[6]); return 1; }
    double maxsec = atof(argv[4]);
    uint64_t maxseq = strtoull(argv[5], NULL, 10);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a;
    if (udp_addr(&a, argv[2], argv[3]) < 0) { fprintf(stderr, "recv: bad address\n"); return 2; }
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    struct timeval tv = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int rcvbuf = 8 << 20;      /* the app shares node 2's CPU with the flood: let it lag, not lose */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    handle_signals();
    uint8_t *seen = calloc(maxseq / 8 + 1, 1);
    uint8_t buf[9100];
    uint64_t received = 0, unique = 0, dups = 0, reordered = 0, foreign = 0, beyond = 0, highest = 0;
    int any = 0;
    double t0 = now();
    printf("ready\n");
    fflush(stdout);
    while (!stop && now() - t0 < maxsec) {
        ssize_t r = recv(fd, buf, sizeof buf, 0);
        if (r < 0) continue;          /* timeout or EINTR: look at stop and the clock */
        uint64_t magic, be;
        if (r < 16 || (memcpy(&magic, buf + 8, 8), magic != MAGIC)) { foreign++; continue; }
        memcpy(&be, buf, 8);
        uint64_t seq = __builtin_bswap64(be);
        received++;
        if (seq >= maxseq) { beyond++; continue; }
        if (seen[seq >> 3] & (1 << (seq & 7))) { dups++; continue; }
        seen[seq >> 3] |= 1 << (seq & 7);
        unique++;
        if (trace) {
            double rec[2] = {0, now()};
            if (r >= 24) memcpy(&rec[0], buf + 16, 8);
            fwrite(&seq, 8, 1, trace);
            fwrite(rec, 8, 2, trace);
        }
        if (any && seq < highest) reordered++;
        if (!any || seq > highest) highest = seq;
        any = 1;
    }
    if (trace) fclose(trace);
    printf("{\"received\": %llu, \"unique\": %llu, \"duplicates\": %llu, \"reordered\": %llu, "
           "\"foreign\": %llu, \"beyond\": %llu, \"highest\": %lld}\n",
           (unsigned long long)received, (unsigned long long)unique, (unsigned long long)dups,
           (unsigned long long)reordered, (unsigned long long)foreign, (unsigned long long)beyond,
           any ? (long long)highest : -1LL);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 2 && !strcmp(argv[1], "flood")) return flood(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "send")) return sender(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "recv")) return receiver(argc, argv);
    fprintf(stderr, "usage: %s flood|send|recv ...\n", argv[0]);
    return 2;
}
"""


def build(directory: str | None = None) -> str:
    """Compile the tool (once per source version) and return the binary's path."""
    return build_c(SOURCE, "weft-flood", "the flood tool", LabError, directory)
