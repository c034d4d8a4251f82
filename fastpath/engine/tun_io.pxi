# The TUN side: reading it (tx: classify and route each read, then hand it to the UDP side) and
# writing to it (rx: one inner packet, or a GSO super-packet behind a virtio_net_hdr).
# Included by _engine.pyx.

# -- reads (tx) ------------------------------------------------------------------------------------

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
        if (pkt[0] >> 4) == 6 and c.v6:
            tx_v6(w, vh, pkt, plen, gso)
            return
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


cdef void tx_packet6(Worker *w, virtio_net_hdr *vh, uint8_t *pkt, uint32_t plen, int gso) noexcept nogil:
    """One TUN read holding an IPv6 packet (dual-stack vxlan): route it by its destination's
    subnet to the peer's public IPv6 and queue it as IPv4 reads are (TSO/USO cut the same way)."""
    cdef Conf *c = w.conf
    cdef uint8_t peer6[16]
    cdef uint8_t mac[6]
    cdef uint32_t tot, cs, co
    if plen < 40:
        w.tx_cnt[<int>C_TX_DROP_MALFORMED] += 1
        return
    if not route6_of(c, pkt + 24, peer6, mac):
        w.tx_cnt[<int>C_TX_DROP_NO_ROUTE] += 1
        tx_unreachable6(w, pkt, plen)
        return
    if gso == VIRTIO_NET_HDR_GSO_NONE:
        tot = 40 + wf_be16(pkt + 4)
        if tot > plen:
            w.tx_cnt[<int>C_TX_DROP_MALFORMED] += 1
            return
        plen = tot
        if vh != NULL and (vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM):
            cs = vh.csum_start
            co = vh.csum_offset
            if cs < 40 or cs + co + 2 > plen:
                w.tx_cnt[<int>C_TX_DROP_MALFORMED] += 1
                return
            wf_put_csum(pkt + cs + co, <uint16_t>~wf_fold(wf_csum(pkt + cs, plen - cs, 0)))
        tx_single6(w, pkt, plen, peer6, mac)
    elif gso == VIRTIO_NET_HDR_GSO_TCPV6 and pkt[6] == 6:
        tx_segment6(w, pkt, plen, True, vh.gso_size, peer6, mac)
    elif gso == GSO_UDP_L4 and pkt[6] == 17:
        tx_segment6(w, pkt, plen, False, vh.gso_size, peer6, mac)
    else:                         # extension headers before TCP/UDP, or a v4 GSO type
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


# -- writes (rx) -----------------------------------------------------------------------------------

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


cdef void rx_write_one6(Worker *w, uint8_t *p, uint32_t n) noexcept nogil:
    """Write one inner IPv6 packet to the TUN (no merging: one write each). A partial TCP/UDP
    checksum (a kernel VXLAN sender on a veth, as for IPv4) is handed on as NEEDS_CSUM (vnet) or
    completed here. Counts rx_ipv6_packets when the write succeeds."""
    cdef iovec iov[2]
    cdef int k = 0
    cdef uint32_t off = 0
    cdef uint16_t field, ps
    cdef uint64_t psum, before = w.rx_cnt[<int>C_RX_PACKETS]
    cdef virtio_net_hdr *vh = <virtio_net_hdr *>w.wr_hdr
    cdef bint partial = False
    if p[6] == 6 and n >= 60:
        off = 16
    elif p[6] == 17 and n >= 48:
        off = 6
    if off:
        memcpy(&field, p + 40 + off, 2)
        psum = wf_pseudo6(p, p[6], n - 40)
        ps = wf_fold(psum)
        if field == ps and field != 0 and wf_fold(wf_csum(p + 40, n - 40, psum)) != 0xffff:
            partial = True
    if w.conf.vnet:
        memset(w.wr_hdr, 0, VNET_HDR_LEN)
        if partial:
            vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
            vh.csum_start = 40
            vh.csum_offset = <uint16_t>off
        iov[0].iov_base = w.wr_hdr
        iov[0].iov_len = VNET_HDR_LEN
        k = 1
    elif partial:
        wf_put_csum(p + 40 + off, <uint16_t>~wf_fold(wf_csum(p + 40, n - 40, 0)))
    iov[k].iov_base = p
    iov[k].iov_len = n
    rx_write(w, iov, k + 1, 1, n)
    w.rx_cnt[<int>C_RX_IPV6_PACKETS] += w.rx_cnt[<int>C_RX_PACKETS] - before


cdef void rx_write_gso(Worker *w, uint8_t *p, uint32_t n, uint32_t l4hl, uint32_t gso) noexcept nogil:
    """Pass an inner TSO/USO super-packet on whole: one GSO write, the TUN's kernel side segments."""
    cdef virtio_net_hdr *vh = <virtio_net_hdr *>w.wr_hdr
    cdef uint32_t ihl = (p[0] & 15) * 4
    cdef uint8_t proto = p[9]
    cdef bint v6 = (p[0] >> 4) == 6
    cdef iovec iov[2]
    cdef uint64_t before = w.rx_cnt[<int>C_RX_PACKETS]
    rx_flush_run(w)
    if v6:
        ihl = 40
        proto = p[6]
    vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
    vh.gso_type = (VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4) if proto == 6 else GSO_UDP_L4
    vh.hdr_len = <uint16_t>(ihl + l4hl)
    vh.gso_size = <uint16_t>gso
    vh.csum_start = <uint16_t>ihl
    vh.csum_offset = 16 if proto == 6 else 6
    if v6:
        wf_put_csum(p + ihl + vh.csum_offset, wf_fold(wf_pseudo6(p, proto, n - ihl)))
    else:
        wf_put_csum(p + ihl + vh.csum_offset, wf_fold(wf_pseudo(p, proto, n - ihl)))
    iov[0].iov_base = w.wr_hdr
    iov[0].iov_len = VNET_HDR_LEN
    iov[1].iov_base = p
    iov[1].iov_len = n
    rx_write(w, iov, 2, 1, n)
    w.rx_cnt[<int>C_RX_SUPER_PACKETS] += 1
    if v6:
        w.rx_cnt[<int>C_RX_IPV6_PACKETS] += w.rx_cnt[<int>C_RX_PACKETS] - before
