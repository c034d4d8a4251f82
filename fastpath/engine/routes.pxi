# Routes: which peer an inner address goes to, and whether a public IP is a peer's.
# Included by _engine.pyx (one extension: these inline into both packet paths).
#
# ``routes[i]`` is the peer holding the i-th subnet of the Network, so the lookup is one
# subtraction and one shift; entries are replaced by Python (Engine.set_route) under a per-entry
# seqlock (wire.h). The peers' public IPs are also kept in a hash set (wire.h, ``wf_peers_t``), so a
# datagram from an unknown sender costs O(1) to classify, however many routes there are.

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


# IPv6 (dual-stack): the destination must be inside the IPv6 Network; its subnet prefix (the
# address under IPv6SubnetLen's mask) is looked up in the routes6 map (wire.h). Only the IPv6
# path calls these: the IPv4 path's table and its cost are untouched.

cdef inline bint in_net6(Conf *c, const uint8_t *addr) noexcept nogil:
    cdef int i
    for i in range(16):
        if (addr[i] & c.net6_mask[i]) != c.net6[i]:
            return False
    return True


cdef inline bint route6_of(Conf *c, const uint8_t *addr, uint8_t *peer_ip, uint8_t *mac) noexcept nogil:
    """The peer (public IPv6 into ``peer_ip``, VTEP MAC into ``mac``; either may be NULL) for an
    inner IPv6 address; False: none."""
    cdef uint8_t key[16]
    cdef int i
    if not in_net6(c, addr):
        return False
    for i in range(16):
        key[i] = addr[i] & c.sub6_mask[i]
    return wf_map6_get(&c.routes6, key, peer_ip, mac) != 0


cdef inline bint is_peer6(Conf *c, const uint8_t *ip) noexcept nogil:
    """Whether some route goes to this public IPv6 address."""
    return wf_map6_get(&c.peers6, ip, NULL, NULL) != 0
