# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled TUN <-> UDP engine: flannel's udp wire format and VXLAN, with batching and offloads.

Layout (after uvloop): C declarations in ``sock.pxd``/``tun.pxd``/``wire.pxd`` (+ ``wire.h``),
tunables in ``consts.pxi``, and here the engine. Python sees only ``Engine`` (configure, routes,
start/stop, counters); packets never become Python objects.

Per worker (one TUN queue + one UDP socket), one thread runs both directions under ``nogil``
(``duplex_loop``; ``split_threads=True``: one thread per direction):

- tx: ``read`` the TUN until it is empty or TX_BATCH reads are in hand. With IFF_VNET_HDR the TUN
  hands over up to 64 KB TCP (TSO) or UDP (USO) super-packets; each is cut into MSS-sized inner
  packets here (IP total length, id and checksum, TCP sequence, flags and checksum fixed per
  segment), encapsulated, and grouped into ``UDP_SEGMENT`` sends of at most 65,507 bytes (full-size
  segments of consecutive super-packets to one peer share a send). The whole batch leaves in one
  ``sendmmsg``. Segment headers are built in a scratch area and the payload is never copied (two
  iovecs per segment). A read without a route is answered with an ICMP net unreachable written
  back into the TUN (``tx_unreachable``: RFC 1122/1812 exceptions, a token bucket per worker).
- rx: ``recvmmsg`` up to RX_BATCH datagrams; with ``UDP_GRO`` each can hold many same-size segments.
  Every segment is checked (VXLAN header, VNI, destination MAC, IPv4 header, length, checksum,
  outer source holds a lease, inner source inside that peer's subnet) and consecutive in-order TCP
  segments of one flow are merged back into one TSO super-packet written to the TUN with a
  ``virtio_net_hdr`` (GSO_TCPV4, NEEDS_CSUM), payload again by iovec, one ``writev`` per run.
  Kernel VXLAN peers on a veth underlay are special: their GSO packets arrive unsegmented (one
  VXLAN header, one inner super-packet; passed on whole as one GSO write) and their small packets
  carry a partial inner checksum (pseudo-header sum only; passed on as NEEDS_CSUM).
- idle: poll() on the TUN, the socket and a stop eventfd; with ``busy_poll_us`` the thread first
  keeps trying (sched_yield between tries) that long after its last packet, for a shorter RTT.

Routes: ``routes[i]`` is the peer holding the i-th subnet of the Network, so the lookup is one
subtraction and one shift. Entries are replaced by Python under a per-entry seqlock (wire.h).
The peers' public IPs are also kept in a hash set (wire.h, ``wf_peers_t``), so a datagram from
an unknown sender costs O(1) to classify, however many routes there are.

Hostile input: every datagram taken from the socket counts once in ``rx_datagrams`` and once in
``rx_packets`` or one ``rx_drop_*`` (the first check it fails); every TUN read once in
``tx_reads`` and in ``tx_packets`` or one ``tx_drop_*``. No header field is read before the
length that holds it is checked. What the kernel drops before the socket is ``rx_socket_drops``.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset, memcmp
from libc.stdlib cimport calloc, free
from libc.errno cimport errno, EAGAIN, EINTR
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from "<sched.h>" nogil:
    int sched_yield()

from fastpath.engine.sock cimport *
from fastpath.engine.tun cimport *
from fastpath.engine.wire cimport *

import atexit
import ipaddress
import os
import threading

include "consts.pxi"

COUNTER_NAMES = (
    "tx_packets", "tx_bytes", "tx_reads", "tx_super_packets", "tx_datagram_sends", "tx_batches",
    "tx_batch_1", "tx_batch_2_7", "tx_batch_8_plus",
    "tx_drop_no_route", "tx_drop_not_ipv4", "tx_drop_malformed", "tx_drop_gso_unsupported",
    "tx_drop_send_error", "tx_read_errors",
    "tx_icmp_unreachable_sent", "tx_icmp_unreachable_limited",
    "rx_datagrams", "rx_packets", "rx_bytes", "rx_tun_writes", "rx_gro_writes", "rx_batches",
    "rx_batch_1", "rx_batch_2_7", "rx_batch_8_plus",
    "rx_drop_short", "rx_drop_bad_ip", "rx_drop_not_ipv4", "rx_drop_oversized",
    "rx_drop_bad_vxlan", "rx_drop_wrong_vni", "rx_drop_wrong_mac", "rx_drop_unknown_peer",
    "rx_drop_spoofed_src", "rx_drop_tun_write", "rx_recv_errors", "rx_super_packets",
    "rx_gro_messages",
)
assert len(COUNTER_NAMES) == N_COUNTERS

# Engines whose threads run. Their C loops use the Engine's buffers without the GIL, so they must
# be stopped before the interpreter tears objects down: atexit does it for a process that exits
# without calling stop() (weftd on SIGTERM leaves the data plane "in place", i.e. just exits).
_RUNNING = set()


def _stop_all():
    for engine in list(_RUNNING):
        engine.stop()


atexit.register(_stop_all)

# Every datagram counted in rx_datagrams ends in exactly one of these; every TUN read counted in
# tx_reads in one tx_drop_* or in tx_packets (a super-packet: as many as it was cut into).
RX_OUTCOMES = ("rx_packets",) + tuple(n for n in COUNTER_NAMES if n.startswith("rx_drop_"))
TX_OUTCOMES = ("tx_packets",) + tuple(n for n in COUNTER_NAMES if n.startswith("tx_drop_"))


cdef struct Conf:
    int mode
    int vnet                  # the TUN fd carries a virtio_net_hdr before each packet
    int stop
    int dry                   # benchmarks: build batches, skip the system calls
    uint32_t net_base         # host order
    uint32_t net_mask
    int shift                 # 32 - subnet_len
    uint32_t nroutes
    int64_t local_idx
    wf_route_t *routes
    wf_peers_t peers          # the public IPs that hold a route (is_peer)
    uint8_t vni[3]            # network order, as on the wire
    uint8_t mac[6]            # our VTEP MAC
    uint16_t port_n           # peers' UDP port, network order
    uint32_t mtu              # largest inner packet accepted from the wire
    int64_t busy_poll_ns      # duplex loop: keep polling this long after the last packet
    int encap                 # bytes before the inner IPv4 header in a datagram


cdef struct Run:              # inner TCP segments being merged for one GSO write
    int nseg
    uint8_t *first            # first segment (its headers are the template)
    uint32_t hl               # IPv4 + TCP header length
    uint32_t gso              # payload size of the first segment (= gso_size)
    uint32_t last_pay
    uint32_t total_pay
    uint32_t next_seq
    uint8_t flags_or


cdef struct Worker:
    Conf *conf
    int tun_fd
    int sock_fd
    int stop_fd
    # tx
    uint8_t *rd_buf
    mmsghdr *tx_msgs
    iovec *tx_iov
    uint8_t *tx_hdr
    sockaddr_in *tx_names
    uint8_t *tx_ctrl
    uint32_t *tx_msg_segs
    uint32_t *tx_msg_bytes
    int n_msgs
    int n_iov
    int n_hdr
    int open_msg              # last message, still taking full-size segments (-1: none)
    uint32_t open_peer
    uint32_t open_segsize
    uint32_t open_count
    # rx
    mmsghdr *rx_msgs
    iovec *rx_iov
    uint8_t *rx_buf
    sockaddr_in *rx_names
    uint8_t *rx_ctrl
    iovec *wr_iov
    uint8_t *wr_hdr
    Run run
    # ICMP net unreachable (tx path). Its own buffer: with split_threads the rx thread owns wr_hdr.
    uint8_t icmp_buf[ICMP_BUF]
    uint16_t icmp_id          # IP ID of the next reply (per worker, deterministic)
    int64_t icmp_credit_ns    # token bucket: ICMP_COST_NS per reply, at most ICMP_BURST replies
    int64_t icmp_last_ns      # when the credit was last topped up (0: never, a full bucket)
    uint64_t tx_cnt[N_COUNTERS]
    uint64_t rx_cnt[N_COUNTERS]


# -- helpers ---------------------------------------------------------------------------------------

cdef inline uint32_t route_of(Conf *c, uint32_t ip_n, uint8_t *mac) noexcept nogil:
    """The peer's public IP (network order) for an inner address (network order); 0: none."""
    cdef uint32_t h = ntohl(ip_n)
    if (h & c.net_mask) != c.net_base:
        return 0
    cdef uint32_t idx = (h - c.net_base) >> c.shift
    if idx >= c.nroutes:
        return 0
    return wf_route_read(&c.routes[idx], mac)


cdef inline bint is_peer(Conf *c, uint32_t ip_n) noexcept nogil:
    """Whether some route goes to this public IP (network order): O(1), whatever the routes."""
    return wf_peer_has(&c.peers, ip_n) != 0


cdef inline void bucket(uint64_t *cnt, int base, int n) noexcept nogil:
    if n <= 1:
        cnt[base] += 1
    elif n < 8:
        cnt[base + 1] += 1
    else:
        cnt[base + 2] += 1


cdef void wait_readable(Worker *w, int fd, int timeout) noexcept nogil:
    cdef pollfd pfd[2]
    pfd[0].fd = fd
    pfd[0].events = POLLIN
    pfd[0].revents = 0
    pfd[1].fd = w.stop_fd
    pfd[1].events = POLLIN
    pfd[1].revents = 0
    poll(pfd, 2, timeout)


# -- tx: TUN -> UDP --------------------------------------------------------------------------------

cdef void tx_flush(Worker *w) noexcept nogil:
    cdef int sent = 0, r, i
    cdef Conf *c = w.conf
    if c.dry:
        sent = w.n_msgs
    while sent < w.n_msgs:
        r = sendmmsg(w.sock_fd, w.tx_msgs + sent, <unsigned int>(w.n_msgs - sent), 0)
        if r < 0:
            if errno == EINTR:
                continue
            w.tx_cnt[<int>C_TX_DROP_SEND_ERROR] += w.tx_msg_segs[sent]
            w.tx_msg_segs[sent] = 0
            w.tx_msg_bytes[sent] = 0
            sent += 1
            continue
        sent += r
    for i in range(w.n_msgs):
        w.tx_cnt[<int>C_TX_PACKETS] += w.tx_msg_segs[i]
        w.tx_cnt[<int>C_TX_BYTES] += w.tx_msg_bytes[i]
    w.tx_cnt[<int>C_TX_DATAGRAM_SENDS] += w.n_msgs
    w.n_msgs = 0
    w.open_msg = -1
    w.n_iov = 0
    w.n_hdr = 0


cdef inline void tx_reserve(Worker *w, int nmsg, int niov, int nhdr) noexcept nogil:
    if (w.n_msgs + nmsg > TX_MAX_MSGS or w.n_iov + niov > TX_MAX_IOV
            or w.n_hdr + nhdr > TX_MAX_HDRS):
        tx_flush(w)


cdef inline mmsghdr *tx_new_msg(Worker *w, uint32_t peer_ip, uint16_t gso) noexcept nogil:
    """Open a datagram message to ``peer_ip``; ``gso``: UDP_SEGMENT size, 0 for one datagram."""
    cdef int m = w.n_msgs
    cdef mmsghdr *msg = &w.tx_msgs[m]
    cdef sockaddr_in *name = &w.tx_names[m]
    cdef cmsghdr *cm
    name.sin_family = AF_INET
    name.sin_port = w.conf.port_n
    name.sin_addr.s_addr = peer_ip
    msg.msg_hdr.msg_name = name
    msg.msg_hdr.msg_namelen = sizeof(sockaddr_in)
    msg.msg_hdr.msg_iov = &w.tx_iov[w.n_iov]
    msg.msg_hdr.msg_iovlen = 0
    msg.msg_hdr.msg_flags = 0
    if gso:
        msg.msg_hdr.msg_control = w.tx_ctrl + m * CTRL_SPACE
        msg.msg_hdr.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
        cm = CMSG_FIRSTHDR(&msg.msg_hdr)
        cm.cmsg_level = SOL_UDP
        cm.cmsg_type = UDP_SEGMENT
        cm.cmsg_len = CMSG_LEN(sizeof(uint16_t))
        memcpy(CMSG_DATA(cm), &gso, sizeof(uint16_t))
    else:
        msg.msg_hdr.msg_control = NULL
        msg.msg_hdr.msg_controllen = 0
    w.tx_msg_segs[m] = 0
    w.tx_msg_bytes[m] = 0
    w.n_msgs += 1
    return msg


cdef inline uint8_t *tx_encap(Worker *w, uint8_t *h, const uint8_t *peer_mac) noexcept nogil:
    """Write the encapsulation in front of an inner packet at ``h``; return where the packet goes."""
    cdef Conf *c = w.conf
    if c.mode == MODE_VXLAN:
        h[0] = 0x08
        h[1] = 0
        h[2] = 0
        h[3] = 0
        h[4] = c.vni[0]
        h[5] = c.vni[1]
        h[6] = c.vni[2]
        h[7] = 0
        memcpy(h + 8, peer_mac, 6)
        memcpy(h + 14, c.mac, 6)
        h[20] = 0x08
        h[21] = 0x00
        return h + VXLAN_ENCAP
    return h


cdef void tx_single(Worker *w, uint8_t *pkt, uint32_t plen, uint32_t peer_ip,
                    const uint8_t *peer_mac) noexcept nogil:
    cdef Conf *c = w.conf
    cdef mmsghdr *msg
    cdef iovec *iov
    cdef uint8_t *h
    tx_reserve(w, 1, 2, 1)
    msg = tx_new_msg(w, peer_ip, 0)
    iov = msg.msg_hdr.msg_iov
    if c.encap:
        h = w.tx_hdr + w.n_hdr * HDR_STRIDE
        w.n_hdr += 1
        tx_encap(w, h, peer_mac)
        iov[0].iov_base = h
        iov[0].iov_len = c.encap
        iov[1].iov_base = pkt
        iov[1].iov_len = plen
        msg.msg_hdr.msg_iovlen = 2
        w.n_iov += 2
    else:
        iov[0].iov_base = pkt
        iov[0].iov_len = plen
        msg.msg_hdr.msg_iovlen = 1
        w.n_iov += 1
    w.tx_msg_segs[w.n_msgs - 1] = 1
    w.tx_msg_bytes[w.n_msgs - 1] = plen


cdef void tx_segment(Worker *w, uint8_t *pkt, uint32_t plen, uint32_t ihl, bint tcp,
                     uint32_t mss, uint32_t peer_ip, const uint8_t *peer_mac) noexcept nogil:
    """Cut a TSO/USO super-packet into inner packets of ``mss`` payload bytes and queue them as
    UDP_SEGMENT sends (each below the 64 KB limit of one UDP send)."""
    cdef Conf *c = w.conf
    cdef uint8_t *l4 = pkt + ihl
    cdef uint32_t l4min = 20 if tcp else 8
    cdef uint32_t l4hl, hl
    cdef uint32_t paylen, nseg, segsize, per_send, i, chunk, k, seq0 = 0, id0
    cdef uint8_t flags0 = 0, f
    cdef uint8_t *payload
    cdef uint8_t *h
    cdef uint8_t *ip
    cdef uint8_t *l4h
    cdef mmsghdr *msg = NULL
    cdef iovec *iov
    cdef uint64_t s
    cdef uint16_t cs
    # Malformed (the read contradicts itself): a TCP/UDP header cut short or a TCP data offset
    # below 5 words (both looked at only once the bytes are known to be there), no segment size.
    if ihl + l4min > plen:
        w.tx_cnt[<int>C_TX_DROP_MALFORMED] += 1
        return
    l4hl = ((l4[12] >> 4) * 4) if tcp else 8
    hl = ihl + l4hl
    if l4hl < l4min or hl > plen or mss == 0:
        w.tx_cnt[<int>C_TX_DROP_MALFORMED] += 1
        return
    paylen = plen - hl
    if paylen <= mss:             # one segment (a segment size above the payload is no error)
        nseg = 1
        mss = paylen if paylen else 1
    else:
        nseg = (paylen + mss - 1) // mss
    segsize = c.encap + hl + mss
    if segsize > MAX_UDP_PAYLOAD:
        # No UDP datagram carries such a segment (and its size would not fit UDP_SEGMENT's 16 bits)
        w.tx_cnt[<int>C_TX_DROP_GSO_UNSUPPORTED] += 1
        return
    w.tx_cnt[<int>C_TX_SUPER] += 1
    payload = pkt + hl
    per_send = MAX_UDP_PAYLOAD // segsize
    if per_send > UDP_MAX_SEGS:
        per_send = UDP_MAX_SEGS
    if per_send < 1:
        per_send = 1
    id0 = wf_be16(pkt + 4)
    if tcp:
        seq0 = wf_be32(l4 + 4)
        flags0 = l4[13]
    for i in range(nseg):
        chunk = paylen - i * mss
        if chunk > mss:
            chunk = mss
        # Segments of consecutive super-packets to one peer share a UDP_SEGMENT message while
        # they are all full size (only a message's last segment may be short): about one send
        # per super-packet instead of two.
        if (w.open_msg >= 0 and w.open_msg == w.n_msgs - 1 and w.open_peer == peer_ip
                and w.open_segsize == segsize and w.open_count < per_send):
            msg = &w.tx_msgs[w.open_msg]
        else:
            tx_reserve(w, 1, 2 * per_send, per_send)
            msg = tx_new_msg(w, peer_ip, <uint16_t>segsize)
            w.open_msg = w.n_msgs - 1
            w.open_peer = peer_ip
            w.open_segsize = segsize
            w.open_count = 0
        w.open_count += 1
        if chunk < mss:
            w.open_msg = -1
        h = w.tx_hdr + w.n_hdr * HDR_STRIDE
        w.n_hdr += 1
        ip = tx_encap(w, h, peer_mac)
        memcpy(ip, pkt, hl)
        wf_put16(ip + 2, hl + chunk)
        wf_put16(ip + 4, (id0 + i) & 0xffff)
        wf_ip_csum(ip, ihl)
        l4h = ip + ihl
        if tcp:
            wf_put32(l4h + 4, seq0 + i * mss)
            f = flags0
            if i + 1 < nseg:
                f &= ~0x09            # FIN, PSH only on the last segment
            if i > 0:
                f &= ~0x80            # CWR only on the first
            l4h[13] = f
            l4h[16] = 0
            l4h[17] = 0
            s = wf_pseudo(ip, 6, l4hl + chunk)
            s = wf_csum(l4h, l4hl, s)
            s = wf_csum(payload + i * mss, chunk, s)
            wf_put_csum(l4h + 16, <uint16_t>~wf_fold(s))
        else:
            wf_put16(l4h + 4, 8 + chunk)
            l4h[6] = 0
            l4h[7] = 0
            s = wf_pseudo(ip, 17, 8 + chunk)
            s = wf_csum(l4h, 8, s)
            s = wf_csum(payload + i * mss, chunk, s)
            cs = <uint16_t>~wf_fold(s)
            if cs == 0:
                cs = 0xffff
            wf_put_csum(l4h + 6, cs)
        iov = msg.msg_hdr.msg_iov + msg.msg_hdr.msg_iovlen
        iov[0].iov_base = h
        iov[0].iov_len = c.encap + hl
        iov[1].iov_base = payload + i * mss
        iov[1].iov_len = chunk
        msg.msg_hdr.msg_iovlen += 2
        w.n_iov += 2
        w.tx_msg_segs[w.n_msgs - 1] += 1
        w.tx_msg_bytes[w.n_msgs - 1] += hl + chunk


# -- tx: ICMP net unreachable back into the TUN -----------------------------------------------------
#
# What flannel's udp proxy does for a TUN packet without a route (send_net_unreachable), with
# RFC 792/1122/1812 rules it lacks: no reply to an ICMP error, to a later fragment, to a source or
# destination that is not one host, nor above the rate limit; the quote is bounded by the packet.
#
# Source address of the reply: the offending packet's destination. The engine owns no address on
# the overlay; flannel answers from the TUN's own address, but that address is local to the host
# (weft gives the TUN <subnet address>/32), and Linux drops a packet arriving from outside with a
# local source as a martian (unless accept_local), so such a reply never reaches the sender. The
# original destination is what the sender was trying to reach, is routed through the TUN (so it
# passes even a strict rp_filter) and is never local; the quoted header, not the source, is what
# the sender's stack matches the error to its socket with (connected UDP gets ENETUNREACH).

cdef inline bint one_host(Conf *c, uint32_t h) noexcept nogil:
    """Whether a host-order address names one host (RFC 1122 3.2.1.3, RFC 1812 4.3.2.7): not in
    0/8, 127/8, multicast 224/4, 240/4 (with the limited broadcast), nor the all-ones host of a
    /subnet_len of the Network (a directed broadcast; the subnet's .0 is a node's TUN address)."""
    cdef uint32_t hostmask
    if (h >> 24) == 0 or (h >> 24) == 127 or h >= 0xe0000000u:
        return False
    if c.shift >= 2 and (h & c.net_mask) == c.net_base:
        hostmask = <uint32_t>((<uint64_t>1 << c.shift) - 1)
        if (h & hostmask) == hostmask:
            return False
    return True


cdef inline bint icmp_allowed(Conf *c, const uint8_t *pkt, uint32_t plen, uint32_t ihl) noexcept nogil:
    """Whether an unroutable packet may be answered (before the rate limit)."""
    cdef uint32_t tot = wf_be16(pkt + 2)
    cdef uint8_t t
    if tot < ihl or tot > plen:
        return False                  # malformed: nothing trustworthy to quote
    if wf_be16(pkt + 6) & 0x1fff:
        return False                  # not the first fragment
    if not one_host(c, wf_be32(pkt + 12)) or not one_host(c, wf_be32(pkt + 16)):
        return False
    if pkt[9] == 1:
        if tot < ihl + 1:
            return False              # ICMP without a type: may be an error
        t = pkt[ihl]
        # errors (unreachable, source quench, redirect, time exceeded, parameter problem), and
        # like Linux (icmp_send) any type it does not know (> 18) is taken for one
        if t == 3 or t == 4 or t == 5 or t == 11 or t == 12 or t > 18:
            return False
    return True


cdef inline bint icmp_take_token(Worker *w) noexcept nogil:
    cdef timespec ts
    cdef int64_t now, credit
    cdef int64_t cap = <int64_t>ICMP_BURST * ICMP_COST_NS
    clock_gettime(CLOCK_MONOTONIC, &ts)
    now = <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec
    if w.icmp_last_ns == 0:
        credit = cap
    else:
        credit = w.icmp_credit_ns + (now - w.icmp_last_ns)
        if credit > cap:
            credit = cap
    w.icmp_last_ns = now
    if credit < ICMP_COST_NS:
        w.icmp_credit_ns = credit
        return False
    w.icmp_credit_ns = credit - ICMP_COST_NS
    return True


cdef void tx_unreachable(Worker *w, const uint8_t *pkt, uint32_t plen, uint32_t ihl) noexcept nogil:
    """Answer an unroutable TUN packet with ICMP type 3 code 0, written back into the TUN.

    IPv4: no options, TOS precedence 6 plus the offender's TOS bits (as Linux), ID from the
    worker's counter, DF clear, TTL 64, protocol 1; ICMP: 3/0, unused 0, the offender's header
    (with options) and the first 8 bytes of its payload, as they were read (a GSO super-packet is
    one read: one reply, quoting its headers)."""
    cdef Conf *c = w.conf
    cdef uint8_t *b = w.icmp_buf
    cdef uint8_t *ip = b + VNET_HDR_LEN
    cdef uint8_t *icmp = ip + 20
    cdef uint32_t q, n
    cdef ssize_t r
    if not icmp_allowed(c, pkt, plen, ihl):
        return
    if not icmp_take_token(w):
        w.tx_cnt[<int>C_TX_ICMP_UNREACH_LIMITED] += 1
        return
    q = wf_be16(pkt + 2) - ihl
    if q > ICMP_QUOTE:
        q = ICMP_QUOTE
    n = 20 + 8 + ihl + q
    memset(b, 0, VNET_HDR_LEN + 28)   # the vnet header stays zero: no GSO, checksums complete
    ip[0] = 0x45
    ip[1] = 0xc0 | (pkt[1] & 0x1e)
    wf_put16(ip + 2, n)
    wf_put16(ip + 4, w.icmp_id)
    w.icmp_id = <uint16_t>(w.icmp_id + 1)
    ip[8] = 64
    ip[9] = 1
    memcpy(ip + 12, pkt + 16, 4)      # from the unreachable destination (see above)
    memcpy(ip + 16, pkt + 12, 4)      # to the sender
    wf_ip_csum(ip, 20)
    icmp[0] = 3
    icmp[1] = 0
    memcpy(icmp + 8, pkt, ihl + q)
    wf_put_csum(icmp + 2, <uint16_t>~wf_fold(wf_csum(icmp, 8 + ihl + q, 0)))
    if c.dry:
        r = n
    elif c.vnet:
        r = write(w.tun_fd, b, VNET_HDR_LEN + n)
    else:
        r = write(w.tun_fd, ip, n)
    if r >= 0:
        w.tx_cnt[<int>C_TX_ICMP_UNREACH_SENT] += 1


cdef void tx_packet(Worker *w, uint8_t *buf, ssize_t n) noexcept nogil:
    """One TUN read: classify, route and queue it."""
    cdef Conf *c = w.conf
    cdef virtio_net_hdr *vh = NULL
    cdef uint8_t *pkt = buf
    cdef uint32_t plen = <uint32_t>n, ihl, tot, peer, cs, co
    cdef uint8_t mac[6]
    cdef int gso = 0
    w.tx_cnt[<int>C_TX_READS] += 1
    if c.vnet:
        if n < VNET_HDR_LEN:
            w.tx_cnt[<int>C_TX_DROP_MALFORMED] += 1
            return
        vh = <virtio_net_hdr *>buf
        pkt = buf + VNET_HDR_LEN
        plen = <uint32_t>n - VNET_HDR_LEN
        gso = vh.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if plen < 20:
        w.tx_cnt[<int>C_TX_DROP_MALFORMED] += 1
        return
    if (pkt[0] >> 4) != 4:
        w.tx_cnt[<int>C_TX_DROP_NOT_IPV4] += 1
        return
    ihl = (pkt[0] & 15) * 4
    if ihl < 20 or ihl > plen:
        w.tx_cnt[<int>C_TX_DROP_MALFORMED] += 1
        return
    peer = route_of(c, wf_ld32(pkt + 16), mac)
    if peer == 0:
        w.tx_cnt[<int>C_TX_DROP_NO_ROUTE] += 1
        tx_unreachable(w, pkt, plen, ihl)
        return
    if gso == VIRTIO_NET_HDR_GSO_NONE:
        tot = wf_be16(pkt + 2)
        if tot < ihl or tot > plen:
            w.tx_cnt[<int>C_TX_DROP_MALFORMED] += 1
            return
        plen = tot
        if vh != NULL and (vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM):
            cs = vh.csum_start
            co = vh.csum_offset
            if cs < ihl or cs + co + 2 > plen:
                w.tx_cnt[<int>C_TX_DROP_MALFORMED] += 1
                return
            # the field holds the pseudo-header sum: summing from csum_start completes it
            wf_put_csum(pkt + cs + co, <uint16_t>~wf_fold(wf_csum(pkt + cs, plen - cs, 0)))
        tx_single(w, pkt, plen, peer, mac)
    elif gso == VIRTIO_NET_HDR_GSO_TCPV4 and pkt[9] == 6:
        tx_segment(w, pkt, plen, ihl, True, vh.gso_size, peer, mac)
    elif gso == GSO_UDP_L4 and pkt[9] == 17:
        tx_segment(w, pkt, plen, ihl, False, vh.gso_size, peer, mac)
    else:
        w.tx_cnt[<int>C_TX_DROP_GSO_UNSUPPORTED] += 1


cdef int tx_pass(Worker *w) noexcept nogil:
    """Read the TUN until it is empty or a batch is full, send the batch: reads (0: none, -1: error)."""
    cdef int nread = 0, err = 0
    cdef ssize_t n
    cdef uint8_t *buf
    while nread < TX_BATCH:
        buf = w.rd_buf + nread * RD_STRIDE
        n = read(w.tun_fd, buf, RD_STRIDE)
        if n < 0:
            if errno == EINTR:
                continue
            if errno != EAGAIN:
                w.tx_cnt[<int>C_TX_READ_ERRORS] += 1
                err = 1
            break
        if n == 0:
            break
        nread += 1
        tx_packet(w, buf, n)
    if w.n_msgs:
        tx_flush(w)
    if nread:
        w.tx_cnt[<int>C_TX_BATCHES] += 1
        bucket(w.tx_cnt, C_TX_BATCH_1, nread)
        return nread
    return -1 if err else 0


cdef void tx_loop(Worker *w) noexcept nogil:
    cdef Conf *c = w.conf
    cdef int r
    while not wf_load_flag(&c.stop):
        r = tx_pass(w)
        if r == 0:
            wait_readable(w, w.tun_fd, -1)
        elif r < 0:
            wait_readable(w, -1, IDLE_POLL_MS)


# -- rx: UDP -> TUN --------------------------------------------------------------------------------

cdef void rx_write(Worker *w, iovec *iov, int niov, uint32_t nseg, uint32_t nbytes) noexcept nogil:
    cdef ssize_t r
    if w.conf.dry:
        r = 0
    else:
        r = writev(w.tun_fd, iov, niov)
    if r < 0:
        w.rx_cnt[<int>C_RX_DROP_TUN_WRITE] += nseg
        return
    w.rx_cnt[<int>C_RX_TUN_WRITES] += 1
    w.rx_cnt[<int>C_RX_PACKETS] += nseg
    w.rx_cnt[<int>C_RX_BYTES] += nbytes


cdef void rx_write_one(Worker *w, uint8_t *p, uint32_t n) noexcept nogil:
    """Write one inner packet to the TUN.

    A kernel VXLAN sender on a veth underlay leaves the inner TCP/UDP checksum partial (the field
    holds only the pseudo-header sum; CHECKSUM_PARTIAL never gets completed on the way). A field
    equal to the pseudo-header sum is therefore handed on as NEEDS_CSUM (vnet) or completed here."""
    cdef iovec iov[2]
    cdef int k = 0
    cdef uint32_t ihl, off = 0
    cdef uint16_t field, ps
    cdef uint64_t psum
    cdef virtio_net_hdr *vh = <virtio_net_hdr *>w.wr_hdr
    cdef bint partial = False
    if n >= 20 and (wf_be16(p + 6) & 0x3fff) == 0:
        ihl = (p[0] & 15) * 4
        if p[9] == 6 and n >= ihl + 20:
            off = 16
        elif p[9] == 17 and n >= ihl + 8:
            off = 6
        if off:
            memcpy(&field, p + ihl + off, 2)
            psum = wf_pseudo(p, p[9], n - ihl)
            ps = wf_fold(psum)
            if field == ps and field != 0 and wf_fold(wf_csum(p + ihl, n - ihl, psum)) != 0xffff:
                partial = True
    if w.conf.vnet:
        memset(w.wr_hdr, 0, VNET_HDR_LEN)
        if partial:
            vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
            vh.csum_start = <uint16_t>ihl
            vh.csum_offset = <uint16_t>off
        iov[0].iov_base = w.wr_hdr
        iov[0].iov_len = VNET_HDR_LEN
        k = 1
    elif partial:
        wf_put_csum(p + ihl + off, <uint16_t>~wf_fold(wf_csum(p + ihl, n - ihl, 0)))
    iov[k].iov_base = p
    iov[k].iov_len = n
    rx_write(w, iov, k + 1, 1, n)


cdef void rx_flush_run(Worker *w) noexcept nogil:
    cdef Run *run = &w.run
    cdef uint8_t *h
    cdef uint8_t *ip
    cdef virtio_net_hdr *vh
    cdef uint32_t thl
    if run.nseg == 0:
        return
    if run.nseg == 1:
        rx_write_one(w, run.first, run.hl + run.total_pay)
        run.nseg = 0
        return
    vh = <virtio_net_hdr *>w.wr_hdr
    vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
    vh.gso_type = VIRTIO_NET_HDR_GSO_TCPV4
    vh.hdr_len = <uint16_t>run.hl
    vh.gso_size = <uint16_t>run.gso
    vh.csum_start = 20
    vh.csum_offset = 16
    ip = w.wr_hdr + VNET_HDR_LEN
    memcpy(ip, run.first, run.hl)
    thl = run.hl - 20
    wf_put16(ip + 2, run.hl + run.total_pay)
    wf_ip_csum(ip, 20)
    ip[33] |= run.flags_or & 0x08     # PSH if any segment had it
    # NEEDS_CSUM: the field holds the (uncomplemented) pseudo-header sum
    wf_put_csum(ip + 36, wf_fold(wf_pseudo(ip, 6, thl + run.total_pay)))
    w.wr_iov[0].iov_base = w.wr_hdr
    w.wr_iov[0].iov_len = VNET_HDR_LEN + run.hl
    rx_write(w, w.wr_iov, run.nseg + 1, run.nseg, run.hl + run.total_pay)
    w.rx_cnt[<int>C_RX_GRO_WRITES] += 1
    run.nseg = 0


cdef inline bint run_accepts(Run *run, uint8_t *p, uint32_t hl, uint32_t pay) noexcept nogil:
    cdef uint8_t *q = run.first
    if run.nseg >= RUN_MAX_SEGS or hl != run.hl or pay > run.gso or run.last_pay != run.gso:
        return False
    if run.flags_or & 0x08:
        return False                  # a PSH ends the run
    if run.hl + run.total_pay + pay > 65535:
        return False
    if wf_be32(p + 24) != run.next_seq:
        return False
    # IPv4: version/IHL/TOS, flags/fragment, TTL/protocol, addresses equal
    if memcmp(p, q, 2) != 0 or memcmp(p + 6, q + 6, 4) != 0 or memcmp(p + 12, q + 12, 8) != 0:
        return False
    # TCP: ports, ack, data offset, window, urgent pointer and options equal; flags but PSH equal
    if memcmp(p + 20, q + 20, 4) != 0 or memcmp(p + 28, q + 28, 5) != 0:
        return False
    if (p[33] & ~0x08) != (q[33] & ~0x08) or memcmp(p + 34, q + 34, 2) != 0:
        return False
    if memcmp(p + 38, q + 38, hl - 38) != 0:
        return False
    return True


cdef void rx_deliver(Worker *w, uint8_t *p, uint32_t n) noexcept nogil:
    """Write one valid inner packet, merging in-order TCP data segments of one flow."""
    cdef Run *run = &w.run
    cdef uint32_t thl, hl, pay
    cdef uint8_t fl
    if not w.conf.vnet:
        rx_write_one(w, p, n)
        return
    if (p[9] == 6 and (p[0] & 15) == 5 and (wf_be16(p + 6) & 0x3fff) == 0 and n >= 40):
        thl = (p[32] >> 4) * 4
        hl = 20 + thl
        fl = p[33]
        if thl >= 20 and hl < n and (fl & ~0x08) == 0x10:     # ACK, maybe PSH; carries data
            pay = n - hl
            if run.nseg and run_accepts(run, p, hl, pay):
                w.wr_iov[1 + run.nseg].iov_base = p + hl
                w.wr_iov[1 + run.nseg].iov_len = pay
                run.nseg += 1
                run.last_pay = pay
                run.total_pay += pay
                run.next_seq = run.next_seq + pay
                run.flags_or |= fl
                return
            rx_flush_run(w)
            run.nseg = 1
            run.first = p
            run.hl = hl
            run.gso = pay
            run.last_pay = pay
            run.total_pay = pay
            run.next_seq = wf_be32(p + 24) + pay
            run.flags_or = fl
            w.wr_iov[1].iov_base = p + hl
            w.wr_iov[1].iov_len = pay
            return
    rx_flush_run(w)
    rx_write_one(w, p, n)


cdef void rx_write_gso(Worker *w, uint8_t *p, uint32_t n, uint32_t l4hl, uint32_t gso) noexcept nogil:
    """Pass an inner TSO/USO super-packet on whole: one GSO write, the TUN's kernel side segments."""
    cdef virtio_net_hdr *vh = <virtio_net_hdr *>w.wr_hdr
    cdef uint32_t ihl = (p[0] & 15) * 4
    cdef iovec iov[2]
    rx_flush_run(w)
    vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
    vh.gso_type = VIRTIO_NET_HDR_GSO_TCPV4 if p[9] == 6 else GSO_UDP_L4
    vh.hdr_len = <uint16_t>(ihl + l4hl)
    vh.gso_size = <uint16_t>gso
    vh.csum_start = <uint16_t>ihl
    vh.csum_offset = 16 if p[9] == 6 else 6
    wf_put_csum(p + ihl + vh.csum_offset, wf_fold(wf_pseudo(p, p[9], n - ihl)))
    iov[0].iov_base = w.wr_hdr
    iov[0].iov_len = VNET_HDR_LEN
    iov[1].iov_base = p
    iov[1].iov_len = n
    rx_write(w, iov, 2, 1, n)
    w.rx_cnt[<int>C_RX_SUPER] += 1


cdef void rx_segment(Worker *w, uint8_t *d, uint32_t n, uint32_t src_n, uint32_t gso) noexcept nogil:
    """Check one encapsulated packet and deliver it, or count why it was dropped: rx_datagrams
    and then exactly one of rx_packets (when written) or an rx_drop_* counter. The checks run in
    this order and the first one failed names the counter (engine.md lists them).

    ``gso`` > 0: the datagram is one VXLAN packet whose inner packet is a TSO/USO super-packet
    with that segment size (what a kernel VXLAN device sends over a veth)."""
    cdef Conf *c = w.conf
    cdef uint64_t *cnt = w.rx_cnt
    cdef uint8_t *p = d
    cdef uint32_t ihl, tot, peer, l4hl = 0
    cnt[<int>C_RX_DATAGRAMS] += 1
    if c.mode == MODE_VXLAN:
        if n < VXLAN_ENCAP:
            cnt[<int>C_RX_DROP_SHORT] += 1
            return
        # The I flag set, every reserved bit clear (as Linux's vxlan without extensions checks)
        if d[0] != 0x08 or d[1] != 0 or d[2] != 0 or d[3] != 0 or d[7] != 0:
            cnt[<int>C_RX_DROP_BAD_VXLAN] += 1
            return
        if d[4] != c.vni[0] or d[5] != c.vni[1] or d[6] != c.vni[2]:
            cnt[<int>C_RX_DROP_WRONG_VNI] += 1
            return
        if memcmp(d + 8, c.mac, 6) != 0:
            cnt[<int>C_RX_DROP_WRONG_MAC] += 1
            return
        if d[20] != 0x08 or d[21] != 0x00:
            cnt[<int>C_RX_DROP_NOT_IPV4] += 1
            return
        p = d + VXLAN_ENCAP
        n -= VXLAN_ENCAP
    if n < 1:
        cnt[<int>C_RX_DROP_SHORT] += 1
        return
    if (p[0] >> 4) != 4:
        cnt[<int>C_RX_DROP_NOT_IPV4] += 1
        return
    if n < 20:
        cnt[<int>C_RX_DROP_SHORT] += 1
        return
    ihl = (p[0] & 15) * 4
    tot = wf_be16(p + 2)
    if ihl < 20 or tot < ihl or tot > n or wf_fold(wf_csum(p, ihl, 0)) != 0xffff:
        cnt[<int>C_RX_DROP_BAD_IP] += 1
        return
    if gso:
        # a super-packet's TCP/UDP header must be whole (its segments repeat it): TCP with a data
        # offset of at least 5 words, within the packet
        if p[9] == 6 and tot >= ihl + 20:
            l4hl = (p[ihl + 12] >> 4) * 4
            if l4hl < 20 or ihl + l4hl > tot:
                cnt[<int>C_RX_DROP_BAD_IP] += 1
                return
        elif p[9] == 17 and tot >= ihl + 8:
            l4hl = 8
        if gso == GSO_AUTO and c.mtu > ihl + l4hl:
            gso = c.mtu - ihl - l4hl          # no GRO size given: the largest segment we take
        if l4hl == 0 or ihl + l4hl + gso > c.mtu or (wf_be16(p + 6) & 0x3fff):
            cnt[<int>C_RX_DROP_OVERSIZED] += 1
            return
    elif tot > c.mtu:
        cnt[<int>C_RX_DROP_OVERSIZED] += 1
        return
    # the inner source must be in a subnet whose route goes to the sender (0: no route; and no
    # sender has the address 0, so an unrouted source from 0.0.0.0 is no match)
    peer = route_of(c, wf_ld32(p + 12), NULL)
    if peer == 0 or peer != src_n:
        if is_peer(c, src_n):
            cnt[<int>C_RX_DROP_SPOOFED_SRC] += 1
        else:
            cnt[<int>C_RX_DROP_UNKNOWN_PEER] += 1
        return
    if gso:
        rx_write_gso(w, p, tot, l4hl, gso)
    else:
        rx_deliver(w, p, tot)


cdef inline bint is_kernel_gso(Conf *c, const uint8_t *d, uint32_t n, uint32_t gro) noexcept nogil:
    """Whether a socket message is a kernel VXLAN sender's GSO packet, which reaches a UDP socket
    unsegmented when it crossed a veth: one VXLAN header and one inner packet above the MTU whose
    total length is the rest of the datagram; TCP without a GRO size (a TSO packet: the kernel
    gives a size only for UDP GSO) or UDP with one (USO: its segment size). Anything else with a
    GRO size is what UDP GRO made of datagrams that were separate on the wire: cut and counted
    one by one."""
    cdef const uint8_t *p = d + VXLAN_ENCAP
    if c.mode != MODE_VXLAN or n <= VXLAN_ENCAP + 20 or n - VXLAN_ENCAP <= c.mtu:
        return False
    if (p[0] >> 4) != 4 or wf_be16(p + 2) != n - VXLAN_ENCAP:
        return False
    return (p[9] == 6 and gro == 0) or (p[9] == 17 and gro != 0 and gro < n)


cdef void rx_datagram(Worker *w, uint8_t *d, uint32_t n, uint32_t gro, uint32_t src_n) noexcept nogil:
    """One socket message: one datagram, or with UDP GRO several of ``gro`` bytes each (the last
    may be shorter), each checked and counted on its own."""
    cdef uint32_t off = 0, seg
    cdef Conf *c = w.conf
    if is_kernel_gso(c, d, n, gro):
        # one datagram: passed on whole (vnet: a GSO write), or without a vnet header too large
        rx_segment(w, d, n, src_n, (gro if gro != 0 and gro < n else GSO_AUTO) if c.vnet else 0)
        return
    if gro == 0 or gro > n:
        gro = n
    if n == 0:
        rx_segment(w, d, 0, src_n, 0)
        return
    if gro < n:
        w.rx_cnt[<int>C_RX_GRO_MESSAGES] += 1
    while off < n:
        seg = n - off
        if seg > gro:
            seg = gro
        rx_segment(w, d + off, seg, src_n, 0)
        off += seg


cdef inline uint32_t gro_size(msghdr *mh) noexcept nogil:
    cdef cmsghdr *cm = CMSG_FIRSTHDR(mh)
    cdef int v
    while cm != NULL:
        if cm.cmsg_level == SOL_UDP and cm.cmsg_type == UDP_GRO:
            memcpy(&v, CMSG_DATA(cm), sizeof(int))
            return <uint32_t>v
        cm = CMSG_NXTHDR(mh, cm)
    return 0


cdef int rx_pass(Worker *w) noexcept nogil:
    """One recvmmsg batch, checked and written: datagrams (0: none waiting, -1: error)."""
    cdef int r, i
    cdef msghdr *mh
    for i in range(RX_BATCH):
        mh = &w.rx_msgs[i].msg_hdr
        mh.msg_namelen = sizeof(sockaddr_in)
        mh.msg_controllen = CTRL_SPACE
        mh.msg_flags = 0
    while True:
        r = recvmmsg(w.sock_fd, w.rx_msgs, RX_BATCH, MSG_DONTWAIT, NULL)
        if r >= 0 or errno != EINTR:
            break
    if r <= 0:
        if r < 0 and errno != EAGAIN:
            w.rx_cnt[<int>C_RX_RECV_ERRORS] += 1
            return -1
        return 0
    w.rx_cnt[<int>C_RX_BATCHES] += 1
    bucket(w.rx_cnt, C_RX_BATCH_1, r)
    for i in range(r):
        mh = &w.rx_msgs[i].msg_hdr
        if mh.msg_flags & MSG_TRUNC:
            w.rx_cnt[<int>C_RX_DATAGRAMS] += 1
            w.rx_cnt[<int>C_RX_DROP_OVERSIZED] += 1
            continue
        rx_datagram(w, w.rx_buf + i * RX_BUF, w.rx_msgs[i].msg_len, gro_size(mh),
                    w.rx_names[i].sin_addr.s_addr)
    rx_flush_run(w)
    return r


cdef void rx_loop(Worker *w) noexcept nogil:
    cdef Conf *c = w.conf
    cdef int r
    while not wf_load_flag(&c.stop):
        r = rx_pass(w)
        if r == 0:
            wait_readable(w, w.sock_fd, -1)
        elif r < 0:
            wait_readable(w, -1, IDLE_POLL_MS)


cdef void duplex_loop(Worker *w) noexcept nogil:
    """Both directions in one thread. What a TUN write provokes (a TCP ACK, an echo reply) is
    already queued on the TUN when the write returns, so it leaves in the next pass without a
    thread wakeup: fewer context switches, a shorter RTT."""
    cdef Conf *c = w.conf
    cdef int t, r
    cdef pollfd pfd[3]
    cdef timespec now
    cdef int64_t last = 0, t_ns
    while not wf_load_flag(&c.stop):
        t = tx_pass(w)
        r = rx_pass(w)
        if c.busy_poll_ns:
            clock_gettime(CLOCK_MONOTONIC, &now)
            t_ns = <int64_t>now.tv_sec * 1000000000 + now.tv_nsec
            if t > 0 or r > 0:
                last = t_ns
                continue
            if t == 0 and r == 0 and t_ns - last < c.busy_poll_ns:
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
        poll(pfd, 3, IDLE_POLL_MS if (t < 0 or r < 0) else -1)


# -- Python surface --------------------------------------------------------------------------------

cdef int _alloc_worker(Worker *w, Conf *conf, int tun_fd, int sock_fd, int stop_fd) except -1:
    cdef int i
    memset(w, 0, sizeof(Worker))
    w.conf = conf
    w.open_msg = -1
    w.tun_fd = tun_fd
    w.sock_fd = sock_fd
    w.stop_fd = stop_fd
    w.rd_buf = <uint8_t *>calloc(TX_BATCH, RD_STRIDE)
    w.tx_msgs = <mmsghdr *>calloc(TX_MAX_MSGS, sizeof(mmsghdr))
    w.tx_iov = <iovec *>calloc(TX_MAX_IOV, sizeof(iovec))
    w.tx_hdr = <uint8_t *>calloc(TX_MAX_HDRS, HDR_STRIDE)
    w.tx_names = <sockaddr_in *>calloc(TX_MAX_MSGS, sizeof(sockaddr_in))
    w.tx_ctrl = <uint8_t *>calloc(TX_MAX_MSGS, CTRL_SPACE)
    w.tx_msg_segs = <uint32_t *>calloc(TX_MAX_MSGS, sizeof(uint32_t))
    w.tx_msg_bytes = <uint32_t *>calloc(TX_MAX_MSGS, sizeof(uint32_t))
    w.rx_msgs = <mmsghdr *>calloc(RX_BATCH, sizeof(mmsghdr))
    w.rx_iov = <iovec *>calloc(RX_BATCH, sizeof(iovec))
    w.rx_buf = <uint8_t *>calloc(RX_BATCH, RX_BUF)
    w.rx_names = <sockaddr_in *>calloc(RX_BATCH, sizeof(sockaddr_in))
    w.rx_ctrl = <uint8_t *>calloc(RX_BATCH, CTRL_SPACE)
    w.wr_iov = <iovec *>calloc(RUN_MAX_SEGS + 2, sizeof(iovec))
    w.wr_hdr = <uint8_t *>calloc(1, HDR_STRIDE)
    if (w.rd_buf == NULL or w.tx_msgs == NULL or w.tx_iov == NULL or w.tx_hdr == NULL
            or w.tx_names == NULL or w.tx_ctrl == NULL or w.tx_msg_segs == NULL
            or w.tx_msg_bytes == NULL or w.rx_msgs == NULL or w.rx_iov == NULL
            or w.rx_buf == NULL or w.rx_names == NULL or w.rx_ctrl == NULL or w.wr_iov == NULL
            or w.wr_hdr == NULL):
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
    free(w.rd_buf); free(w.tx_msgs); free(w.tx_iov); free(w.tx_hdr); free(w.tx_names)
    free(w.tx_ctrl); free(w.tx_msg_segs); free(w.tx_msg_bytes); free(w.rx_msgs); free(w.rx_iov)
    free(w.rx_buf); free(w.rx_names); free(w.rx_ctrl); free(w.wr_iov); free(w.wr_hdr)
    memset(w, 0, sizeof(Worker))


def _fds(value):
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _mac_bytes(mac):
    if mac is None or mac == b"" or mac == "":
        return b"\0" * 6
    if isinstance(mac, str):
        mac = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    mac = bytes(mac)
    if len(mac) != 6:
        raise ValueError(f"MAC {mac.hex(':')} is not 6 bytes")
    return mac


def _tun_has_vnet_hdr(fd):
    import fcntl
    import struct
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, b"\0" * 40)
    except OSError:
        return False
    return bool(struct.unpack_from("H", ifr, 16)[0] & IFF_VNET_HDR)


cdef class Engine:
    """TUN <-> UDP forwarding for one node.

    ``Engine(tun_fd, sock_fd, *, mode="udp"|"vxlan", network, subnet_len, local_subnet, vni=1,
    vtep_mac=b"", port, workers=1, mtu=0, vnet_hdr=None)``

    ``tun_fd``/``sock_fd``: an fd or a list of fds (one TUN queue and one UDP socket per worker);
    the caller owns them. ``split_threads``: two threads per worker (one per direction) instead
    of one thread doing both. ``busy_poll_us``: after forwarding, the duplex thread keeps polling
    (yielding the CPU between tries) this long before it sleeps: lower RTT, some CPU. ``vnet_hdr``: whether the TUN fd carries virtio_net_hdr (None: ask the
    TUN). ``mtu``: the largest inner packet accepted from the wire (0: 65535).
    """
    cdef Conf conf
    cdef Worker *workers
    cdef int nworkers
    cdef int stop_fd
    cdef object threads
    cdef object network
    cdef object local_subnet
    cdef readonly str mode
    cdef readonly int subnet_len
    cdef dict _peers
    cdef dict _peer_refs      # public IP (network order) -> routes that go to it
    cdef readonly bint split_threads

    def __cinit__(self):
        self.workers = NULL
        self.conf.routes = NULL
        self.conf.peers.slot = NULL
        self.stop_fd = -1

    def __init__(self, tun_fd, sock_fd, *, mode="udp", network, subnet_len, local_subnet, vni=1,
                 vtep_mac=b"", port=None, workers=1, mtu=0, vnet_hdr=None, split_threads=False,
                 busy_poll_us=0):
        tun_fds = _fds(tun_fd)
        sock_fds = _fds(sock_fd)
        if len(sock_fds) == 1 and len(tun_fds) > 1:
            sock_fds = sock_fds * len(tun_fds)
        if len(tun_fds) != len(sock_fds):
            raise ValueError("one UDP socket per TUN queue (or one for all)")
        if workers != len(tun_fds):
            if len(tun_fds) == 1 and workers > 1:
                raise ValueError(f"workers={workers} needs {workers} TUN queue fds")
        if mode not in ("udp", "vxlan"):
            raise ValueError(f"mode {mode!r}: must be 'udp' or 'vxlan'")
        net = ipaddress.IPv4Network(network)
        if not net.prefixlen <= subnet_len <= 32 or subnet_len - net.prefixlen > 24:
            raise ValueError(f"subnet_len {subnet_len} does not fit Network {net}")
        local = ipaddress.IPv4Network(local_subnet)
        if local.prefixlen != subnet_len or not local.subnet_of(net):
            raise ValueError(f"local subnet {local} is not a /{subnet_len} of {net}")
        if port is None:
            port = 8472 if mode == "vxlan" else 8285
        self.mode = mode
        self.split_threads = bool(split_threads)
        self.subnet_len = subnet_len
        self.network = net
        self.local_subnet = local
        self._peers = {}
        self._peer_refs = {}
        self.threads = []
        self.conf.mode = MODE_VXLAN if mode == "vxlan" else MODE_UDP
        self.conf.encap = VXLAN_ENCAP if mode == "vxlan" else 0
        if vnet_hdr is None:
            vnet_hdr = _tun_has_vnet_hdr(tun_fds[0])
        self.conf.vnet = 1 if vnet_hdr else 0
        self.conf.net_base = int(net.network_address)
        self.conf.net_mask = int(net.netmask)
        self.conf.shift = 32 - subnet_len
        self.conf.nroutes = 1 << (subnet_len - net.prefixlen)
        self.conf.local_idx = (int(local.network_address) - int(net.network_address)) >> (32 - subnet_len)
        if not 0 <= vni < 1 << 24:
            raise ValueError(f"VNI {vni} outside 0..16777215")
        self.conf.vni[0] = (vni >> 16) & 0xff
        self.conf.vni[1] = (vni >> 8) & 0xff
        self.conf.vni[2] = vni & 0xff
        mac = _mac_bytes(vtep_mac)
        if mode == "vxlan" and mac == b"\0" * 6:
            raise ValueError("vxlan mode needs vtep_mac")
        for i in range(6):
            self.conf.mac[i] = mac[i]
        self.conf.port_n = htons(port)
        self.conf.mtu = mtu if mtu else 65535
        self.conf.busy_poll_ns = int(busy_poll_us) * 1000
        self.conf.routes = <wf_route_t *>calloc(self.conf.nroutes, sizeof(wf_route_t))
        if self.conf.routes == NULL:
            raise MemoryError()
        # peer set: at least twice the slots of the most distinct peers there can be (one per
        # route), so it is never more than half full and never resized under the packet threads
        slots = 16
        while slots < 2 * self.conf.nroutes:
            slots *= 2
        self.conf.peers.mask = slots - 1
        self.conf.peers.seed = int.from_bytes(os.urandom(4), "little")
        self.conf.peers.slot = <uint32_t *>calloc(slots, sizeof(uint32_t))
        if self.conf.peers.slot == NULL:
            raise MemoryError()
        self.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.stop_fd < 0:
            raise OSError(errno, os.strerror(errno))
        self.nworkers = len(tun_fds)
        self.workers = <Worker *>calloc(self.nworkers, sizeof(Worker))
        if self.workers == NULL:
            raise MemoryError()
        for i in range(self.nworkers):
            _alloc_worker(&self.workers[i], &self.conf, tun_fds[i], sock_fds[i], self.stop_fd)
            os.set_blocking(tun_fds[i], False)
        for fd in set(sock_fds):
            self._tune_socket(fd)

    cdef _tune_socket(self, int fd):
        cdef int one = 1, size = SOCK_BUF
        if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(int)) != 0:
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(int))
        if setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(int)) != 0:
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(int))
        setsockopt(fd, SOL_UDP, UDP_GRO, &one, sizeof(int))   # older kernels: plain datagrams
        os.set_blocking(fd, True)         # sends block (backpressure); receives use MSG_DONTWAIT

    def __dealloc__(self):
        cdef int i
        if self.workers != NULL:
            for i in range(self.nworkers):
                _free_worker(&self.workers[i])
            free(self.workers)
            self.workers = NULL
        if self.conf.routes != NULL:
            free(self.conf.routes)
            self.conf.routes = NULL
        if self.conf.peers.slot != NULL:
            free(self.conf.peers.slot)
            self.conf.peers.slot = NULL
        if self.stop_fd >= 0:
            close(self.stop_fd)
            self.stop_fd = -1

    # -- routes --------------------------------------------------------------------------------
    cdef uint32_t _index(self, subnet) except? GSO_AUTO:
        net = ipaddress.IPv4Network(subnet)
        if net.prefixlen != self.subnet_len or not net.subnet_of(self.network):
            raise ValueError(f"{net} is not a /{self.subnet_len} of {self.network}")
        return (int(net.network_address) - self.conf.net_base) >> self.conf.shift

    def set_route(self, subnet, peer_ip, peer_mac=None):
        """Send packets for ``subnet`` to ``peer_ip`` (VXLAN: inner destination MAC ``peer_mac``)."""
        cdef uint32_t idx = self._index(subnet)
        cdef uint8_t mac[6]
        if idx == self.conf.local_idx:
            raise ValueError(f"{subnet} is this node's own subnet")
        ip = ipaddress.IPv4Address(peer_ip)
        if int(ip) == 0:
            raise ValueError("peer IP 0.0.0.0")
        m = _mac_bytes(peer_mac)
        if self.conf.mode == MODE_VXLAN and m == b"\0" * 6:
            raise ValueError("vxlan routes need the peer's VTEP MAC")
        for i in range(6):
            mac[i] = m[i]
        wf_route_write(&self.conf.routes[idx], htonl(int(ip)), mac)
        key = str(ipaddress.IPv4Network(subnet))
        old = self._peers.get(key)
        self._peers[key] = (str(ip), m.hex(":"))
        if old is None or old[0] != str(ip):
            self._peer_ref(htonl(int(ip)), 1)
            if old is not None:
                self._peer_ref(htonl(int(ipaddress.IPv4Address(old[0]))), -1)

    def remove_route(self, subnet):
        cdef uint32_t idx = self._index(subnet)
        cdef uint8_t mac[6]
        memset(mac, 0, 6)
        wf_route_write(&self.conf.routes[idx], 0, mac)
        old = self._peers.pop(str(ipaddress.IPv4Network(subnet)), None)
        if old is not None:
            self._peer_ref(htonl(int(ipaddress.IPv4Address(old[0]))), -1)

    cdef _peer_ref(self, uint32_t ip_n, int change):
        """Count a route to ``ip_n`` in or out; the peer set holds the IPs with at least one."""
        n = self._peer_refs.get(ip_n, 0) + change
        if n > 0:
            self._peer_refs[ip_n] = n
            if n == 1 and change > 0:
                wf_peer_add(&self.conf.peers, ip_n)
        else:
            self._peer_refs.pop(ip_n, None)
            wf_peer_del(&self.conf.peers, ip_n)

    def routes(self):
        """{subnet: (peer_ip, peer_mac)} as programmed."""
        return dict(self._peers)

    def lookup(self, addr):
        """(peer_ip, peer_mac) that a packet to ``addr`` goes to, read from the packet path's
        route table; None: no route."""
        cdef uint8_t mac[6]
        cdef uint32_t ip = route_of(&self.conf, htonl(int(ipaddress.IPv4Address(addr))), mac)
        if ip == 0:
            return None
        return str(ipaddress.IPv4Address(ntohl(ip))), bytes(mac[:6]).hex(":")

    # -- running -------------------------------------------------------------------------------
    def _run_tx(self, int i):
        cdef Worker *w = &self.workers[i]
        with nogil:
            tx_loop(w)

    def _run_rx(self, int i):
        cdef Worker *w = &self.workers[i]
        with nogil:
            rx_loop(w)

    def _run_duplex(self, int i):
        cdef Worker *w = &self.workers[i]
        with nogil:
            duplex_loop(w)

    def start(self):
        if self.threads:
            return
        wf_store_flag(&self.conf.stop, 0)
        loops = (("tx", self._run_tx), ("rx", self._run_rx)) if self.split_threads else (("io", self._run_duplex),)
        for i in range(self.nworkers):
            for name, fn in loops:
                t = threading.Thread(target=fn, args=(i,), name=f"weft-engine-{name}{i}", daemon=True)
                self.threads.append(t)
                t.start()
        _RUNNING.add(self)

    def stop(self):
        cdef uint64_t one = 1
        if not self.threads:
            return
        wf_store_flag(&self.conf.stop, 1)
        write(self.stop_fd, &one, sizeof(uint64_t))
        for t in self.threads:
            t.join()
        self.threads = []
        _RUNNING.discard(self)
        cdef ssize_t r = read(self.stop_fd, &one, sizeof(uint64_t))

    @property
    def running(self):
        return bool(self.threads)

    def close(self):
        """Stop; the fds stay the caller's."""
        self.stop()

    def stats(self):
        """Counters summed over the workers: {name: int}."""
        cdef int i, k
        cdef uint64_t tot[N_COUNTERS]
        memset(tot, 0, sizeof(tot))
        for i in range(self.nworkers):
            for k in range(N_COUNTERS):
                tot[k] += self.workers[i].tx_cnt[k] + self.workers[i].rx_cnt[k]
        out = {COUNTER_NAMES[k]: tot[k] for k in range(N_COUNTERS)}
        drops = self._socket_drops()
        if drops is not None:
            out["rx_socket_drops"] = drops
        out["routes"] = len(self._peers)
        out["workers"] = self.nworkers
        return out

    def _socket_drops(self):
        """Datagrams the kernel dropped at the engine's sockets before the engine could read
        them (its receive buffer was full: Udp RcvbufErrors): SO_MEMINFO's count since each socket was
        opened, summed; None when a socket cannot tell (closed), never a made-up 0."""
        cdef uint32_t info[SK_MEMINFO_VARS]
        cdef socklen_t size
        cdef int i
        total = 0
        for fd in {self.workers[i].sock_fd for i in range(self.nworkers)}:
            size = sizeof(info)
            if getsockopt(fd, SOL_SOCKET, SO_MEMINFO, info, &size) != 0 or size < sizeof(info):
                return None
            total += info[SK_MEMINFO_DROPS]
        return total

    # -- test and benchmark hooks (engine not started) -----------------------------------------
    def _inject_rx(self, bytes datagram, src_ip, int gro=0):
        """Run the receive path on one socket message as if it came from ``src_ip`` with UDP GRO
        size ``gro`` (0: none) and write what passes to the TUN."""
        cdef Worker *w = &self.workers[0]
        cdef uint32_t n = len(datagram)
        cdef uint32_t src = htonl(int(ipaddress.IPv4Address(src_ip)))
        if self.threads:
            raise RuntimeError("_inject_rx on a running engine")
        if n > RX_BUF:
            raise ValueError("datagram larger than 64 KB")
        memcpy(w.rx_buf, <const char *>datagram, n)
        with nogil:
            rx_datagram(w, w.rx_buf, n, gro, src)
            rx_flush_run(w)

    def _is_peer(self, ip):
        """Whether the packet path takes ``ip`` for a peer (the peer set's answer)."""
        return is_peer(&self.conf, htonl(int(ipaddress.IPv4Address(ip))))

    def _inject_tx(self, bytes read):
        """Run the transmit path on one TUN read (vnet header included when the engine has one)
        and send what it queued."""
        cdef Worker *w = &self.workers[0]
        cdef uint32_t n = len(read)
        if self.threads:
            raise RuntimeError("_inject_tx on a running engine")
        if n > RD_STRIDE:
            raise ValueError("read larger than a TUN read buffer")
        memcpy(w.rd_buf, <const char *>read, n)
        with nogil:
            tx_packet(w, w.rd_buf, n)
            if w.n_msgs:
                tx_flush(w)

    def _bench_encap(self, bytes packet, int count):
        """ns spent queueing ``count`` TUN reads of ``packet`` (vnet header included when the
        engine has one) into send batches, without sending: the tx path's per-batch CPU cost."""
        cdef Worker *w = &self.workers[0]
        cdef uint32_t n = len(packet)
        cdef const uint8_t *src = packet
        cdef int i, j
        cdef timespec t0, t1
        if self.threads:
            raise RuntimeError("benchmark on a running engine")
        if n > RD_STRIDE:
            raise ValueError("packet too large")
        self.conf.dry = 1
        try:
            with nogil:
                clock_gettime(CLOCK_MONOTONIC, &t0)
                for i in range(count):
                    j = i % TX_BATCH
                    memcpy(w.rd_buf + j * RD_STRIDE, src, n)
                    tx_packet(w, w.rd_buf + j * RD_STRIDE, n)
                    if j == TX_BATCH - 1:
                        tx_flush(w)
                tx_flush(w)
                clock_gettime(CLOCK_MONOTONIC, &t1)
        finally:
            self.conf.dry = 0
        return (t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec)

    def _bench_decap(self, bytes datagram, src_ip, int count, int gro=0):
        """ns spent checking and merging ``count`` copies of ``datagram`` (no TUN write)."""
        cdef Worker *w = &self.workers[0]
        cdef uint32_t n = len(datagram)
        cdef uint32_t src = htonl(int(ipaddress.IPv4Address(src_ip)))
        cdef int i
        cdef timespec t0, t1
        if self.threads:
            raise RuntimeError("benchmark on a running engine")
        if n > RX_BUF:
            raise ValueError("datagram too large")
        memcpy(w.rx_buf, <const char *>datagram, n)
        self.conf.dry = 1
        try:
            with nogil:
                clock_gettime(CLOCK_MONOTONIC, &t0)
                for i in range(count):
                    rx_datagram(w, w.rx_buf, n, gro, src)
                    if i % RX_BATCH == RX_BATCH - 1:
                        rx_flush_run(w)
                rx_flush_run(w)
                clock_gettime(CLOCK_MONOTONIC, &t1)
        finally:
            self.conf.dry = 0
        return (t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec)

    def _bench_lookup(self, dst_ip, int count):
        """ns spent on ``count`` route lookups of ``dst_ip``."""
        cdef uint32_t ip = htonl(int(ipaddress.IPv4Address(dst_ip)))
        cdef uint8_t mac[6]
        cdef uint64_t acc = 0
        cdef int i
        cdef timespec t0, t1
        with nogil:
            clock_gettime(CLOCK_MONOTONIC, &t0)
            for i in range(count):
                acc += route_of(&self.conf, ip, mac)
            clock_gettime(CLOCK_MONOTONIC, &t1)
        return (t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec)
