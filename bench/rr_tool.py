"""A UDP request/response probe for IPv6, compiled at run time with gcc (as ``bench flood``'s tool).

sockperf 3.7 (Debian 12's) refuses IPv6 addresses, so a dual-stack ``bench run`` measures the IPv6
request/response with this instead: the same probe as ``sockperf pp -m 64 --full-rtt`` (one
64-byte UDP message in flight, the round trip of each timed with CLOCK_MONOTONIC, the p50 over
``seconds``), both ends pinned by the caller. ``rr6 server ADDR PORT SECONDS`` echoes until its
time is up; ``rr6 client ADDR PORT SECONDS`` prints ``p50_us COUNT`` (exit 1 when nothing came back).
"""
from __future__ import annotations

from .ctool import build_c

SOURCE = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9;
}
static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y);
}
int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: rr6 server|client ADDR PORT SECONDS\n"); return 2; }
    struct sockaddr_in6 sa; memset(&sa, 0, sizeof sa);
    sa.sin6_family = AF_INET6; sa.sin6_port = htons(atoi(argv[3]));
    if (inet_pton(AF_INET6, argv[2], &sa.sin6_addr) != 1) { fprintf(stderr, "bad address %s\n", argv[2]); return 2; }
    double seconds = atof(argv[4]), end = now() + seconds;
    int fd = socket(AF_INET6, SOCK_DGRAM, 0);
    struct timeval tv = {0, 200000};  /* a lost message costs 200 ms, not the whole probe */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[64]; memset(buf, 'w', sizeof buf);
    if (!strcmp(argv[1], "server")) {
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa)) { perror("bind"); return 1; }
        struct sockaddr_in6 peer; socklen_t len;
        while (now() < end) {
            len = sizeof peer;
            ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&peer, &len);
            if (n > 0) sendto(fd, buf, n, 0, (struct sockaddr *)&peer, len);
        }
        return 0;
    }
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) { perror("connect"); return 1; }
    size_t cap = 1 << 20, count = 0;
    double *rtt = malloc(cap * sizeof *rtt);
    while (now() < end && count < cap) {
        double t0 = now();
        if (send(fd, buf, sizeof buf, 0) != sizeof buf) continue;
        if (recv(fd, buf, sizeof buf, 0) == sizeof buf) rtt[count++] = (now() - t0) * 1e6;
    }
    if (!count) { fprintf(stderr, "no answer from %s\n", argv[2]); return 1; }
    qsort(rtt, count, sizeof *rtt, cmp);
    printf("%.3f %zu\n", rtt[count / 2], count);
    return 0;
}
"""


class ToolError(RuntimeError):
    """The tool cannot be built; one line."""


def build(directory: str | None = None) -> str:
    """Compile the tool (once per source version) and return the binary's path."""
    return build_c(SOURCE, "weft-rr6", "the IPv6 request/response probe", ToolError, directory)
