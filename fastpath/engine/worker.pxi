# A worker: its buffers (one TUN queue, one UDP socket) and the loops its threads run.
# Included by _engine.pyx.

cdef int _alloc_worker(Worker *w, Conf *conf, int tun_fd, int sock_fd, int sock6_fd, int send_fd,
                       int send6_fd, int stop_fd) except -1:
    cdef int i
    memset(w, 0, sizeof(Worker))
    w.conf = conf
    w.open_msg = -1
    w.tun_fd = tun_fd
    w.sock_fd = sock_fd
    w.sock6_fd = sock6_fd
    w.send_fd = send_fd
    w.send6_fd = send6_fd
    w.stop_fd = stop_fd
    w.rd_buf = <uint8_t *>calloc(TX_BATCH, RD_STRIDE)
    w.tx_msgs = <mmsghdr *>calloc(TX_MAX_MSGS, sizeof(mmsghdr))
    w.tx_iov = <iovec *>calloc(TX_MAX_IOV, sizeof(iovec))
    w.tx_hdr = <uint8_t *>calloc(TX_MAX_HDRS, HDR_STRIDE)
    w.tx_names = <sockaddr_in *>calloc(TX_MAX_MSGS, sizeof(sockaddr_in))
    w.tx_names6 = <sockaddr_in6 *>calloc(TX_MAX_MSGS, sizeof(sockaddr_in6))
    w.tx_ctrl = <uint8_t *>calloc(TX_MAX_MSGS, CTRL_SPACE)
    w.tx_msg_segs = <uint32_t *>calloc(TX_MAX_MSGS, sizeof(uint32_t))
    w.tx_msg_bytes = <uint32_t *>calloc(TX_MAX_MSGS, sizeof(uint32_t))
    w.rx_msgs = <mmsghdr *>calloc(RX_BATCH, sizeof(mmsghdr))
    w.rx_iov = <iovec *>calloc(RX_BATCH, sizeof(iovec))
    w.rx_buf = <uint8_t *>calloc(RX_BATCH, RX_BUF)
    w.rx_names = <sockaddr_in6 *>calloc(RX_BATCH, sizeof(sockaddr_in6))
    w.rx_ctrl = <uint8_t *>calloc(RX_BATCH, CTRL_SPACE)
    w.wr_iov = <iovec *>calloc(RUN_MAX_SEGS + 2, sizeof(iovec))
    w.wr_hdr = <uint8_t *>calloc(1, HDR_STRIDE)
    w.icmp6_buf = <uint8_t *>calloc(1, ICMP6_BUF)
    if (w.rd_buf == NULL or w.tx_msgs == NULL or w.tx_iov == NULL or w.tx_hdr == NULL
            or w.tx_names == NULL or w.tx_names6 == NULL or w.tx_ctrl == NULL or w.tx_msg_segs == NULL
            or w.tx_msg_bytes == NULL or w.rx_msgs == NULL or w.rx_iov == NULL
            or w.rx_buf == NULL or w.rx_names == NULL or w.rx_ctrl == NULL or w.wr_iov == NULL
            or w.wr_hdr == NULL or w.icmp6_buf == NULL):
        raise MemoryError()
    for i in range(RX_BATCH):
        w.rx_iov[i].iov_base = w.rx_buf + i * RX_BUF
        w.rx_iov[i].iov_len = RX_BUF
        w.rx_msgs[i].msg_hdr.msg_iov = &w.rx_iov[i]
        w.rx_msgs[i].msg_hdr.msg_iovlen = 1
        w.rx_msgs[i].msg_hdr.msg_name = &w.rx_names[i]
        w.rx_msgs[i].msg_hdr.msg_control = w.rx_ctrl + i * CTRL_SPACE
    return 0


cdef void _free_worker(Worker *w) noexcept nogil:
    free(w.rd_buf); free(w.tx_msgs); free(w.tx_iov); free(w.tx_hdr); free(w.tx_names); free(w.tx_names6)
    free(w.tx_ctrl); free(w.tx_msg_segs); free(w.tx_msg_bytes); free(w.rx_msgs); free(w.rx_iov)
    free(w.rx_buf); free(w.rx_names); free(w.rx_ctrl); free(w.wr_iov); free(w.wr_hdr); free(w.icmp6_buf)
    memset(w, 0, sizeof(Worker))


cdef inline void bucket(uint64_t *cnt, int base, int n) noexcept nogil:
    if n <= 1:
        cnt[base] += 1
    elif n < 8:
        cnt[base + 1] += 1
    else:
        cnt[base + 2] += 1


cdef void wait_readable(Worker *w, int fd, int fd2, int timeout) noexcept nogil:
    """Sleep until ``fd`` or ``fd2`` (-1: none; poll skips it) is readable, a stop, or ``timeout``."""
    cdef pollfd pfd[3]
    pfd[0].fd = fd
    pfd[0].events = POLLIN
    pfd[0].revents = 0
    pfd[1].fd = w.stop_fd
    pfd[1].events = POLLIN
    pfd[1].revents = 0
    pfd[2].fd = fd2
    pfd[2].events = POLLIN
    pfd[2].revents = 0
    poll(pfd, 3, timeout)


cdef inline int rx_both(Worker *w) noexcept nogil:
    """rx_pass, then rx_pass6 when the engine has an IPv6 socket: datagrams taken (0: none, -1:
    an error and none taken). IPv6-only: rx_pass6 alone (there is no IPv4 socket to read)."""
    cdef int r, r6
    if w.sock_fd < 0:
        return rx_pass6(w)
    r = rx_pass(w)
    if w.sock6_fd < 0:
        return r
    r6 = rx_pass6(w)
    if r > 0 or r6 > 0:
        return (r if r > 0 else 0) + (r6 if r6 > 0 else 0)
    return -1 if (r < 0 or r6 < 0) else 0


cdef void one_way_loop(Worker *w, bint tx) noexcept nogil:
    """One direction in a thread of its own (``split_threads``): tx reads the TUN, rx the socket(s)."""
    cdef Conf *c = w.conf
    cdef int fd = w.tun_fd if tx else w.sock_fd
    cdef int fd2 = -1 if tx else w.sock6_fd
    cdef int r
    while not wf_load_flag(&c.stop):
        if tx:
            r = tx_pass(w)
        else:
            r = rx_both(w)
        if r == 0:
            wait_readable(w, fd, fd2, -1)
        elif r < 0:
            wait_readable(w, -1, -1, IDLE_POLL_MS)


cdef inline uint64_t packets_moved(Worker *w) noexcept nogil:
    return w.tx_cnt[<int>C_TX_PACKETS] + w.rx_cnt[<int>C_RX_PACKETS]


cdef void duplex_loop(Worker *w) noexcept nogil:
    """Both directions in one thread. What a TUN write provokes (a TCP ACK, an echo reply) is
    already queued on the TUN when the write returns, so it leaves in the next pass without a
    thread wakeup: fewer context switches, a shorter RTT.

    Busy polling serves exchanges, not streams: it is off for BULK_QUIET_NS after any pass that
    moved more than SPIN_MAX_PACKETS packets, so a stream's thread sleeps in poll() while its next
    batch gathers. Spinning under a stream took the socket a few datagrams at a time and cost the
    receiving engine 24-27 % more CPU per Gbit, for no gain in throughput or round trip (issue 14)."""
    cdef Conf *c = w.conf
    cdef int t, r
    cdef pollfd pfd[4]
    cdef timespec now
    cdef int64_t last = 0, last_bulk = -BULK_QUIET_NS, t_ns
    cdef uint64_t before
    while not wf_load_flag(&c.stop):
        before = packets_moved(w)
        t = tx_pass(w)
        r = rx_both(w)
        if c.busy_poll_ns:
            clock_gettime(CLOCK_MONOTONIC, &now)
            t_ns = <int64_t>now.tv_sec * 1000000000 + now.tv_nsec
            if t > 0 or r > 0:
                last = t_ns
                if packets_moved(w) - before > SPIN_MAX_PACKETS:
                    last_bulk = t_ns
                continue
            if (t == 0 and r == 0 and t_ns - last < c.busy_poll_ns
                    and t_ns - last_bulk >= BULK_QUIET_NS):
                sched_yield()     # the answer to what we just forwarded is likely microseconds away
                continue
        elif t > 0 or r > 0:
            continue
        pfd[0].fd = w.tun_fd
        pfd[0].events = POLLIN
        pfd[0].revents = 0
        pfd[1].fd = w.sock_fd
        pfd[1].events = POLLIN
        pfd[1].revents = 0
        pfd[2].fd = w.stop_fd
        pfd[2].events = POLLIN
        pfd[2].revents = 0
        pfd[3].fd = w.sock6_fd       # -1 (skipped by poll) without IPv6
        pfd[3].events = POLLIN
        pfd[3].revents = 0
        poll(pfd, 4, IDLE_POLL_MS if (t < 0 or r < 0) else -1)
