# The UDP side: building the batch of encapsulated datagrams a tx pass sends with one sendmmsg,
# and taking a recvmmsg batch apart (rx: every datagram, or every segment of a GRO message,
# checked and counted before its inner packet goes to the TUN). Included by _engine.pyx.

# -- tx: the send batch ----------------------------------------------------------------------------

cdef void tx_flush(Worker *w) noexcept nogil:
    cdef int sent = 0, r, i
    cdef Conf *c = w.conf
    if c.dry:
        sent = w.n_msgs
    if w.n_v6:
        tx_flush_mixed(w, sent)
        return
    while sent < w.n_msgs:
        r = sendmmsg(w.send_fd, w.tx_msgs + sent, <unsigned int>(w.n_msgs - sent), 0)
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
    tx_batch_done(w)


cdef inline bint msg_is_v6(mmsghdr *m) noexcept nogil:
    return m.msg_hdr.msg_namelen == sizeof(sockaddr_in6)


cdef void tx_flush_mixed(Worker *w, int sent) noexcept nogil:
    """A batch that holds messages to IPv6 peers: each run of messages of one family leaves in one
    sendmmsg on that family's socket (a batch of IPv4 messages only never comes here)."""
    cdef int r, i, end, fd
    cdef bint v6
    while sent < w.n_msgs:
        v6 = msg_is_v6(&w.tx_msgs[sent])
        end = sent + 1
        while end < w.n_msgs and msg_is_v6(&w.tx_msgs[end]) == v6:
            end += 1
        fd = w.send6_fd if v6 else w.send_fd
        r = sendmmsg(fd, w.tx_msgs + sent, <unsigned int>(end - sent), 0)
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
        if msg_is_v6(&w.tx_msgs[i]):
            w.tx_cnt[<int>C_TX_IPV6_PACKETS] += w.tx_msg_segs[i]
    tx_batch_done(w)


cdef inline void tx_batch_done(Worker *w) noexcept nogil:
    w.tx_cnt[<int>C_TX_DATAGRAM_SENDS] += w.n_msgs
    w.n_msgs = 0
    w.n_v6 = 0
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


cdef inline mmsghdr *tx_new_msg6(Worker *w, const uint8_t *peer6, uint16_t gso) noexcept nogil:
    """tx_new_msg for an IPv6 peer: the message names a sockaddr_in6 (and so goes to sock6_fd)."""
    cdef int m = w.n_msgs
    cdef mmsghdr *msg = tx_new_msg(w, 0, gso)
    cdef sockaddr_in6 *name = &w.tx_names6[m]
    name.sin6_family = AF_INET6
    name.sin6_port = w.conf.port_n
    name.sin6_flowinfo = 0
    memcpy(name.sin6_addr.s6_addr, peer6, 16)
    name.sin6_scope_id = 0
    msg.msg_hdr.msg_name = name
    msg.msg_hdr.msg_namelen = sizeof(sockaddr_in6)
    w.n_v6 += 1
    return msg


cdef inline uint8_t *tx_encap6(Worker *w, uint8_t *h, const uint8_t *peer_mac) noexcept nogil:
    """VXLAN + inner Ethernet for an IPv6 packet: our flannel-v6 MAC, type 0x86DD."""
    cdef Conf *c = w.conf
    h[0] = 0x08
    h[1] = 0
    h[2] = 0
    h[3] = 0
    h[4] = c.vni[0]
    h[5] = c.vni[1]
    h[6] = c.vni[2]
    h[7] = 0
    memcpy(h + 8, peer_mac, 6)
    memcpy(h + 14, c.mac6, 6)
    h[20] = 0x86
    h[21] = 0xdd
    return h + VXLAN_ENCAP


cdef void tx_single6(Worker *w, uint8_t *pkt, uint32_t plen, const uint8_t *peer6,
                     const uint8_t *peer_mac) noexcept nogil:
    cdef mmsghdr *msg
    cdef iovec *iov
    cdef uint8_t *h
    tx_reserve(w, 1, 2, 1)
    msg = tx_new_msg6(w, peer6, 0)
    iov = msg.msg_hdr.msg_iov
    h = w.tx_hdr + w.n_hdr * HDR_STRIDE
    w.n_hdr += 1
    tx_encap6(w, h, peer_mac)
    iov[0].iov_base = h
    iov[0].iov_len = VXLAN_ENCAP
    iov[1].iov_base = pkt
    iov[1].iov_len = plen
    msg.msg_hdr.msg_iovlen = 2
    w.n_iov += 2
    w.tx_msg_segs[w.n_msgs - 1] = 1
    w.tx_msg_bytes[w.n_msgs - 1] = plen


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


# -- rx: receive, check, decapsulate ---------------------------------------------------------------

cdef void rx_segment(Worker *w, uint8_t *d, uint32_t n, uint32_t src_n, uint32_t gso) noexcept nogil:
    """Check one encapsulated packet and deliver it, or count why it was dropped: rx_datagrams
    and then exactly one of rx_packets (when written) or an rx_drop_* counter. The checks run in
    this order and the first one failed names the counter (docs/hostile-input.md lists them).

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
                    (<sockaddr_in *>&w.rx_names[i]).sin_addr.s_addr)
    rx_flush_run(w)
    return r


# -- rx over the IPv6 underlay (dual-stack vxlan) ----------------------------------------------------

cdef void rx_segment6(Worker *w, uint8_t *d, uint32_t n, const uint8_t *src6, uint32_t gso) noexcept nogil:
    """rx_segment for a datagram from the IPv6 socket: a VXLAN frame to our flannel-v6 MAC holding
    one IPv6 packet whose source is inside the sending peer's IPv6 subnet. Same counters, same
    order of checks; the inner family's own: ``rx_drop_not_ipv6`` (ethertype or version)."""
    cdef Conf *c = w.conf
    cdef uint64_t *cnt = w.rx_cnt
    cdef uint8_t *p
    cdef uint8_t peer6[16]
    cdef uint32_t tot, l4hl = 0
    cnt[<int>C_RX_DATAGRAMS] += 1
    if n < VXLAN_ENCAP:
        cnt[<int>C_RX_DROP_SHORT] += 1
        return
    if d[0] != 0x08 or d[1] != 0 or d[2] != 0 or d[3] != 0 or d[7] != 0:
        cnt[<int>C_RX_DROP_BAD_VXLAN] += 1
        return
    if d[4] != c.vni[0] or d[5] != c.vni[1] or d[6] != c.vni[2]:
        cnt[<int>C_RX_DROP_WRONG_VNI] += 1
        return
    if memcmp(d + 8, c.mac6, 6) != 0:
        cnt[<int>C_RX_DROP_WRONG_MAC] += 1
        return
    if d[20] != 0x86 or d[21] != 0xdd:
        cnt[<int>C_RX_DROP_NOT_IPV6] += 1
        return
    p = d + VXLAN_ENCAP
    n -= VXLAN_ENCAP
    if n < 1:
        cnt[<int>C_RX_DROP_SHORT] += 1
        return
    if (p[0] >> 4) != 6:
        cnt[<int>C_RX_DROP_NOT_IPV6] += 1
        return
    if n < 40:
        cnt[<int>C_RX_DROP_SHORT] += 1
        return
    tot = 40 + wf_be16(p + 4)
    if tot > n:
        cnt[<int>C_RX_DROP_BAD_IP] += 1
        return
    if gso:
        if p[6] == 6 and tot >= 60:
            l4hl = (p[52] >> 4) * 4
            if l4hl < 20 or 40 + l4hl > tot:
                cnt[<int>C_RX_DROP_BAD_IP] += 1
                return
        elif p[6] == 17 and tot >= 48:
            l4hl = 8
        if gso == GSO_AUTO and c.mtu > 40 + l4hl:
            gso = c.mtu - 40 - l4hl
        if l4hl == 0 or 40 + l4hl + gso > c.mtu:
            cnt[<int>C_RX_DROP_OVERSIZED] += 1
            return
    elif tot > c.mtu:
        cnt[<int>C_RX_DROP_OVERSIZED] += 1
        return
    if not route6_of(c, p + 8, peer6, NULL) or memcmp(peer6, src6, 16) != 0:
        if is_peer6(c, src6):
            cnt[<int>C_RX_DROP_SPOOFED_SRC] += 1
        else:
            cnt[<int>C_RX_DROP_UNKNOWN_PEER] += 1
        return
    if gso:
        rx_write_gso(w, p, tot, l4hl, gso)
    else:
        rx_deliver6(w, p, tot)


cdef inline bint is_kernel_gso6(Conf *c, const uint8_t *d, uint32_t n, uint32_t gro) noexcept nogil:
    """is_kernel_gso for the IPv6 underlay: one VXLAN header and one inner IPv6 TSO/USO packet."""
    cdef const uint8_t *p = d + VXLAN_ENCAP
    if n <= VXLAN_ENCAP + 40 or n - VXLAN_ENCAP <= c.mtu:
        return False
    if (p[0] >> 4) != 6 or <uint32_t>40 + wf_be16(p + 4) != n - VXLAN_ENCAP:
        return False
    return (p[6] == 6 and gro == 0) or (p[6] == 17 and gro != 0 and gro < n)


cdef void rx_datagram6(Worker *w, uint8_t *d, uint32_t n, uint32_t gro, const uint8_t *src6) noexcept nogil:
    """rx_datagram for the IPv6 socket."""
    cdef uint32_t off = 0, seg
    cdef Conf *c = w.conf
    if is_kernel_gso6(c, d, n, gro):
        rx_segment6(w, d, n, src6, (gro if gro != 0 and gro < n else GSO_AUTO) if c.vnet else 0)
        return
    if gro == 0 or gro > n:
        gro = n
    if n == 0:
        rx_segment6(w, d, 0, src6, 0)
        return
    if gro < n:
        w.rx_cnt[<int>C_RX_GRO_MESSAGES] += 1
    while off < n:
        seg = n - off
        if seg > gro:
            seg = gro
        rx_segment6(w, d + off, seg, src6, 0)
        off += seg


cdef int rx_pass6(Worker *w) noexcept nogil:
    """rx_pass on the IPv6 underlay's socket (the same buffers: the two passes take turns)."""
    cdef int r, i
    cdef msghdr *mh
    for i in range(RX_BATCH):
        mh = &w.rx_msgs[i].msg_hdr
        mh.msg_namelen = sizeof(sockaddr_in6)
        mh.msg_controllen = CTRL_SPACE
        mh.msg_flags = 0
    while True:
        r = recvmmsg(w.sock6_fd, w.rx_msgs, RX_BATCH, MSG_DONTWAIT, NULL)
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
        rx_datagram6(w, w.rx_buf + i * RX_BUF, w.rx_msgs[i].msg_len, gro_size(mh),
                     w.rx_names[i].sin6_addr.s6_addr)
    rx_flush_run(w)
    return r
