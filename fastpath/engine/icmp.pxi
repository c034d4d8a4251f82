# ICMP net unreachable, written back into the TUN for a read without a route (tx).
# Included by _engine.pyx.
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
        w.tx_cnt[<int>C_TX_ICMP_UNREACHABLE_LIMITED] += 1
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
        w.tx_cnt[<int>C_TX_ICMP_UNREACHABLE_SENT] += 1


# -- IPv6 (dual-stack): ICMPv6 destination unreachable, code 0 "no route to destination" --------------
# The same rules in RFC 4443's words (2.4 (e)): no reply to an ICMPv6 error, nor to a packet whose
# source or destination is not one host (unspecified, loopback, multicast), nor to what hides its
# upper layer behind extension headers (an error may be in there); the same token bucket; from the
# unreachable destination (as for IPv4, see above); the quote as long as fits in 1280 bytes.

cdef inline bint one_host6(const uint8_t *a) noexcept nogil:
    cdef int i
    cdef uint8_t rest = 0
    if a[0] == 0xff:
        return False                  # multicast
    for i in range(15):
        rest |= a[i]
    return not (rest == 0 and (a[15] == 0 or a[15] == 1))     # :: and ::1


cdef inline bint icmp6_allowed(const uint8_t *pkt, uint32_t plen) noexcept nogil:
    cdef uint32_t tot = 40 + wf_be16(pkt + 4)
    cdef uint8_t nh = pkt[6]
    if tot > plen:
        return False
    if not one_host6(pkt + 8) or not one_host6(pkt + 24):
        return False
    if nh == 0 or nh == 43 or nh == 44 or nh == 60 or nh == 50 or nh == 51:
        return False                  # extension headers: the upper layer is not at hand
    if nh == 58 and (tot < 41 or pkt[40] < 128):
        return False                  # an ICMPv6 error (types 0-127), or no type at all
    return True


cdef void tx_unreachable6(Worker *w, const uint8_t *pkt, uint32_t plen) noexcept nogil:
    """Answer an unroutable IPv6 TUN read with ICMPv6 type 1 code 0, written back into the TUN:
    IPv6 (traffic class and flow 0, hop limit 64, next header 58) from the offending packet's
    destination to its source; ICMPv6 1/0, 4 unused bytes, then the offending packet as read,
    cut to fit 1280 bytes."""
    cdef Conf *c = w.conf
    cdef uint8_t *b = w.icmp6_buf
    cdef uint8_t *ip = b + VNET_HDR_LEN
    cdef uint8_t *icmp = ip + 40
    cdef uint32_t q, n
    cdef uint64_t s
    cdef ssize_t r
    if not icmp6_allowed(pkt, plen):
        return
    if not icmp_take_token(w):
        w.tx_cnt[<int>C_TX_ICMP_UNREACHABLE_LIMITED] += 1
        return
    q = 40 + wf_be16(pkt + 4)
    if q > ICMP6_MAX - 48:
        q = ICMP6_MAX - 48
    n = 48 + q
    memset(b, 0, VNET_HDR_LEN + 48)   # the vnet header stays zero: no GSO, checksum complete
    ip[0] = 0x60
    wf_put16(ip + 4, 8 + q)
    ip[6] = 58
    ip[7] = 64
    memcpy(ip + 8, pkt + 24, 16)      # from the unreachable destination
    memcpy(ip + 24, pkt + 8, 16)      # to the sender
    icmp[0] = 1
    icmp[1] = 0
    memcpy(icmp + 8, pkt, q)
    s = wf_pseudo6(ip, 58, 8 + q)
    wf_put_csum(icmp + 2, <uint16_t>~wf_fold(wf_csum(icmp, 8 + q, s)))
    if c.dry:
        r = n
    elif c.vnet:
        r = write(w.tun_fd, b, VNET_HDR_LEN + n)
    else:
        r = write(w.tun_fd, ip, n)
    if r >= 0:
        w.tx_cnt[<int>C_TX_ICMP_UNREACHABLE_SENT] += 1
