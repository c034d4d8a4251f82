# C declarations of wire.h: packet field access, checksums, the seqlocked route entry, the peer set.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "wire.h" nogil:
    uint16_t wf_be16(const uint8_t *p)
    void wf_put16(uint8_t *p, uint32_t v)
    uint32_t wf_be32(const uint8_t *p)
    void wf_put32(uint8_t *p, uint32_t v)
    uint32_t wf_ld32(const uint8_t *p)
    uint64_t wf_csum(const uint8_t *p, size_t n, uint64_t s)
    uint16_t wf_fold(uint64_t s)
    void wf_put_csum(uint8_t *p, uint16_t c)
    uint64_t wf_pseudo(const uint8_t *ip, uint32_t proto, uint32_t l4len)
    void wf_ip_csum(uint8_t *ip, unsigned ihl)
    ctypedef struct wf_route_t:
        uint32_t seq
        uint32_t ip
        uint8_t mac[6]
    uint32_t wf_route_read(const wf_route_t *r, uint8_t *mac)
    void wf_route_write(wf_route_t *r, uint32_t ip, const uint8_t *mac)
    ctypedef struct wf_peers_t:
        uint32_t seq
        uint32_t mask
        uint32_t seed
        uint32_t *slot
    int wf_peer_has(const wf_peers_t *t, uint32_t ip)
    void wf_peer_add(wf_peers_t *t, uint32_t ip)
    void wf_peer_del(wf_peers_t *t, uint32_t ip)
    int wf_load_flag(const int *p)
    void wf_store_flag(int *p, int v)
    uint64_t wf_pseudo6(const uint8_t *ip, uint32_t proto, uint32_t l4len)
    ctypedef struct wf_entry6_t:
        uint8_t key[16]
        uint8_t ip[16]
        uint8_t mac[6]
        uint8_t used
    ctypedef struct wf_map6_t:
        uint32_t seq
        uint32_t mask
        uint32_t seed
        uint32_t count
        wf_entry6_t *slot
    int wf_map6_get(const wf_map6_t *t, const uint8_t *key, uint8_t *ip, uint8_t *mac)
    int wf_map6_put(wf_map6_t *t, const uint8_t *key, const uint8_t *ip, const uint8_t *mac)
    void wf_map6_del(wf_map6_t *t, const uint8_t *key)
