# Segmentation: cutting a TUN's TSO/USO super-packet into inner packets (tx), and merging
# consecutive in-order TCP segments of one flow back into one GSO write to the TUN (rx).
# Included by _engine.pyx.

# -- tx: cut a super-packet ------------------------------------------------------------------------

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
    w.tx_cnt[<int>C_TX_SUPER_PACKETS] += 1
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


cdef void tx_segment6(Worker *w, uint8_t *pkt, uint32_t plen, bint tcp, uint32_t mss,
                      const uint8_t *peer6, const uint8_t *peer_mac) noexcept nogil:
    """tx_segment for an IPv6 super-packet (TSO6/USO6; TCP or UDP right after the 40-byte header)
    to the peer at public IPv6 ``peer6``: the same cut and batching; IPv6's payload length instead
    of total length, ID and header checksum; its pseudo header. A copy of tx_segment rather than a
    flag in it, so that the IPv4 cut stays exactly as it was."""
    cdef uint32_t ihl = 40
    cdef Conf *c = w.conf
    cdef uint8_t *l4 = pkt + ihl
    cdef uint32_t l4min = 20 if tcp else 8
    cdef uint32_t l4hl, hl
    cdef uint32_t paylen, nseg, segsize, per_send, i, chunk, k, seq0 = 0
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
    w.tx_cnt[<int>C_TX_SUPER_PACKETS] += 1
    payload = pkt + hl
    per_send = MAX_UDP_PAYLOAD // segsize
    if per_send > UDP_MAX_SEGS:
        per_send = UDP_MAX_SEGS
    if per_send < 1:
        per_send = 1
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
        if (w.open_msg >= 0 and w.open_msg == w.n_msgs - 1 and w.open_peer == 0
                and w.open_segsize == segsize and w.open_count < per_send
                and memcmp(w.open_peer6, peer6, 16) == 0):
            msg = &w.tx_msgs[w.open_msg]
        else:
            tx_reserve(w, 1, 2 * per_send, per_send)
            msg = tx_new_msg6(w, peer6, <uint16_t>segsize)
            memcpy(w.open_peer6, peer6, 16)
            w.open_msg = w.n_msgs - 1
            w.open_peer = 0
            w.open_segsize = segsize
            w.open_count = 0
        w.open_count += 1
        if chunk < mss:
            w.open_msg = -1
        h = w.tx_hdr + w.n_hdr * HDR_STRIDE
        w.n_hdr += 1
        ip = tx_encap6(w, h, peer_mac)
        memcpy(ip, pkt, hl)
        wf_put16(ip + 4, hl - 40 + chunk)         # payload length; no ID, no header checksum
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
            s = wf_pseudo6(ip, 6, l4hl + chunk)
            s = wf_csum(l4h, l4hl, s)
            s = wf_csum(payload + i * mss, chunk, s)
            wf_put_csum(l4h + 16, <uint16_t>~wf_fold(s))
        else:
            wf_put16(l4h + 4, 8 + chunk)
            l4h[6] = 0
            l4h[7] = 0
            s = wf_pseudo6(ip, 17, 8 + chunk)
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


# -- rx: merge segments into one GSO write ---------------------------------------------------------

cdef void rx_flush_run(Worker *w) noexcept nogil:
    cdef Run *run = &w.run
    cdef uint8_t *h
    cdef uint8_t *ip
    cdef virtio_net_hdr *vh
    cdef uint32_t thl
    if run.nseg == 0:
        return
    if run.v6:
        rx_flush_run6(w, run)
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
            run.v6 = False
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


# -- rx, IPv6: the same merge for the IPv6 underlay's TCP segments ---------------------------------------

cdef void rx_flush_run6(Worker *w, Run *run) noexcept nogil:
    """rx_flush_run for a run of IPv6 segments: one GSO_TCPV6 write (payload length and the
    pseudo-header sum fixed), or the one segment as it came."""
    cdef uint8_t *ip
    cdef virtio_net_hdr *vh
    cdef uint32_t thl
    cdef uint64_t before
    if run.nseg == 1:
        run.nseg = 0
        rx_write_one6(w, run.first, run.hl + run.total_pay)
        return
    before = w.rx_cnt[<int>C_RX_PACKETS]
    vh = <virtio_net_hdr *>w.wr_hdr
    vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
    vh.gso_type = VIRTIO_NET_HDR_GSO_TCPV6
    vh.hdr_len = <uint16_t>run.hl
    vh.gso_size = <uint16_t>run.gso
    vh.csum_start = 40
    vh.csum_offset = 16
    ip = w.wr_hdr + VNET_HDR_LEN
    memcpy(ip, run.first, run.hl)
    thl = run.hl - 40
    wf_put16(ip + 4, thl + run.total_pay)
    ip[53] |= run.flags_or & 0x08     # PSH if any segment had it
    wf_put_csum(ip + 56, wf_fold(wf_pseudo6(ip, 6, thl + run.total_pay)))
    w.wr_iov[0].iov_base = w.wr_hdr
    w.wr_iov[0].iov_len = VNET_HDR_LEN + run.hl
    rx_write(w, w.wr_iov, run.nseg + 1, run.nseg, run.hl + run.total_pay)
    w.rx_cnt[<int>C_RX_GRO_WRITES] += 1
    w.rx_cnt[<int>C_RX_IPV6_PACKETS] += w.rx_cnt[<int>C_RX_PACKETS] - before
    run.nseg = 0


cdef inline bint run_accepts6(Run *run, uint8_t *p, uint32_t hl, uint32_t pay) noexcept nogil:
    cdef uint8_t *q = run.first
    if not run.v6 or run.nseg >= RUN_MAX_SEGS or hl != run.hl or pay > run.gso or run.last_pay != run.gso:
        return False
    if run.flags_or & 0x08:
        return False                  # a PSH ends the run
    if run.hl + run.total_pay + pay > 65535:
        return False
    if wf_be32(p + 44) != run.next_seq:
        return False
    # IPv6: version, traffic class, flow label; next header, hop limit; addresses equal
    if memcmp(p, q, 4) != 0 or memcmp(p + 6, q + 6, 34) != 0:
        return False
    # TCP: ports, ack, data offset, window, urgent pointer and options equal; flags but PSH equal
    if memcmp(p + 40, q + 40, 4) != 0 or memcmp(p + 48, q + 48, 5) != 0:
        return False
    if (p[53] & ~0x08) != (q[53] & ~0x08) or memcmp(p + 54, q + 54, 2) != 0:
        return False
    if memcmp(p + 58, q + 58, hl - 58) != 0:
        return False
    return True


cdef void rx_deliver6(Worker *w, uint8_t *p, uint32_t n) noexcept nogil:
    """rx_deliver for one valid inner IPv6 packet (no extension headers are merged: TCP must be
    the next header)."""
    cdef Run *run = &w.run
    cdef uint32_t thl, hl, pay
    cdef uint8_t fl
    if not w.conf.vnet:
        rx_write_one6(w, p, n)
        return
    if p[6] == 6 and n >= 60:
        thl = (p[52] >> 4) * 4
        hl = 40 + thl
        fl = p[53]
        if thl >= 20 and hl < n and (fl & ~0x08) == 0x10:     # ACK, maybe PSH; carries data
            pay = n - hl
            if run.nseg and run_accepts6(run, p, hl, pay):
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
            run.v6 = True
            run.first = p
            run.hl = hl
            run.gso = pay
            run.last_pay = pay
            run.total_pay = pay
            run.next_seq = wf_be32(p + 44) + pay
            run.flags_or = fl
            w.wr_iov[1].iov_base = p + hl
            w.wr_iov[1].iov_len = pay
            return
    rx_flush_run(w)
    rx_write_one6(w, p, n)
