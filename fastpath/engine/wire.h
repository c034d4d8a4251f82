/* weft engine: byte-level helpers shared by the Cython engine (header only, no state).
 *
 * - Big-endian field access on unaligned packet bytes.
 * - The Internet checksum, accumulated over native-order loads (RFC 1071: byte-order independent;
 *   the odd trailing byte rule below assumes a little-endian CPU, as does the TUN's vnet header).
 * - The route table entry and its seqlock: Python (one writer, holding the GIL) replaces an entry
 *   while the packet threads read it without a lock; a reader that sees the sequence change or odd
 *   retries, so it never uses half of an old entry and half of a new one.
 * - The set of peers' public addresses (a hash under the same kind of seqlock).
 */
#ifndef WEFT_WIRE_H
#define WEFT_WIRE_H
#include <stdint.h>
#include <string.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "weft's engine assumes a little-endian CPU (vnet header and checksum helpers)"
#endif

static inline uint16_t wf_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline void wf_put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline uint32_t wf_be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void wf_put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static inline uint32_t wf_ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* Ones' complement sum of n bytes added to s (not folded): native 32-bit words summed into 64
 * bits (RFC 1071: 2^16 = 1 mod 0xffff, so the fold gives the 16-bit sum of any word size). */
static inline uint64_t wf_csum_scalar(const uint8_t *p, size_t n, uint64_t s) {
    while (n >= 32) {
        uint64_t a, b, c, d;
        memcpy(&a, p, 8); memcpy(&b, p + 8, 8); memcpy(&c, p + 16, 8); memcpy(&d, p + 24, 8);
        s += (a & 0xffffffffu) + (a >> 32) + (b & 0xffffffffu) + (b >> 32)
           + (c & 0xffffffffu) + (c >> 32) + (d & 0xffffffffu) + (d >> 32);
        p += 32; n -= 32;
    }
    while (n >= 4) { uint32_t v; memcpy(&v, p, 4); s += v; p += 4; n -= 4; }
    if (n >= 2) { uint16_t v; memcpy(&v, p, 2); s += v; p += 2; n -= 2; }
    if (n) s += *p;
    return s;
}

/* The same sum, 64 bytes per step with AVX2 (32-bit words widened into four 64-bit lanes). The
 * transmit path sums every payload byte it segments, so this is most of the engine's own CPU
 * time: ~2.5x the scalar loop on the lab's EPYC. Chosen at run time; the scalar loop elsewhere. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define WF_CSUM_SIMD_MIN 256
__attribute__((target("avx2")))
static uint64_t wf_csum_avx2(const uint8_t *p, size_t n, uint64_t s) {
    const __m256i zero = _mm256_setzero_si256();
    __m256i lo = zero, hi = zero;
    uint64_t lane[4];
    while (n >= 64) {   /* each lane gains < 2^33 per step: no overflow below 2^31 steps */
        __m256i a = _mm256_loadu_si256((const __m256i *)p);
        __m256i b = _mm256_loadu_si256((const __m256i *)(p + 32));
        lo = _mm256_add_epi64(lo, _mm256_unpacklo_epi32(a, zero));
        hi = _mm256_add_epi64(hi, _mm256_unpackhi_epi32(a, zero));
        lo = _mm256_add_epi64(lo, _mm256_unpacklo_epi32(b, zero));
        hi = _mm256_add_epi64(hi, _mm256_unpackhi_epi32(b, zero));
        p += 64; n -= 64;
    }
    _mm256_storeu_si256((__m256i *)lane, _mm256_add_epi64(lo, hi));
    /* fold each lane to 32 bits first, so adding four of them to s cannot overflow */
    for (int i = 0; i < 4; i++)
        s += (lane[i] & 0xffffffffu) + (lane[i] >> 32);
    return wf_csum_scalar(p, n, s);
}

static inline uint64_t wf_csum(const uint8_t *p, size_t n, uint64_t s) {
    if (n >= WF_CSUM_SIMD_MIN && __builtin_cpu_supports("avx2"))
        return wf_csum_avx2(p, n, s);
    return wf_csum_scalar(p, n, s);
}
#else
static inline uint64_t wf_csum(const uint8_t *p, size_t n, uint64_t s) { return wf_csum_scalar(p, n, s); }
#endif

static inline uint16_t wf_fold(uint64_t s) {
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    return (uint16_t)s;
}

/* Store a checksum computed over native loads (so in native order). */
static inline void wf_put_csum(uint8_t *p, uint16_t c) { memcpy(p, &c, 2); }

/* The IPv4 pseudo header (src, dst from the packet; proto; L4 length), native order. */
static inline uint64_t wf_pseudo(const uint8_t *ip, uint32_t proto, uint32_t l4len) {
    return (uint64_t)wf_ld32(ip + 12) + wf_ld32(ip + 16)
         + (uint16_t)((proto << 8) | (proto >> 8))
         + (uint16_t)(((l4len & 0xff) << 8) | ((l4len >> 8) & 0xff));
}

/* IPv4 header checksum, written in place. */
static inline void wf_ip_csum(uint8_t *ip, unsigned ihl) {
    ip[10] = ip[11] = 0;
    wf_put_csum(ip + 10, (uint16_t)~wf_fold(wf_csum(ip, ihl, 0)));
}

typedef struct {
    uint32_t seq;
    uint32_t ip;       /* peer's public IPv4, network order; 0: no route */
    uint8_t mac[6];    /* peer's VTEP MAC (vxlan) */
    uint16_t pad;
} wf_route_t;

static inline uint32_t wf_route_read(const wf_route_t *r, uint8_t *mac) {
    uint32_t s1, s2, ip;
    for (;;) {
        s1 = __atomic_load_n(&r->seq, __ATOMIC_ACQUIRE);
        ip = __atomic_load_n(&r->ip, __ATOMIC_RELAXED);
        if (mac) memcpy(mac, r->mac, 6);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        s2 = __atomic_load_n(&r->seq, __ATOMIC_RELAXED);
        if (!(s1 & 1) && s1 == s2) return ip;
    }
}

static inline void wf_route_write(wf_route_t *r, uint32_t ip, const uint8_t *mac) {
    uint32_t s = r->seq;
    __atomic_store_n(&r->seq, s + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&r->ip, ip, __ATOMIC_RELAXED);
    memcpy(r->mac, mac, 6);
    __atomic_store_n(&r->seq, s + 2, __ATOMIC_RELEASE);
}

/* The peers' public IPv4 addresses (network order; 0 is never one), so that telling a spoofed
 * inner source (the sender holds a lease) from an unknown sender costs O(1) whatever the number
 * of routes: open addressing with linear probing, at most half full (the engine sizes it for a
 * distinct peer per route slot), deletion by backward shift (no tombstones to pile up). The hash
 * is seeded per engine, so senders cannot choose addresses that probe long. One writer (Python,
 * holding the GIL) changes it under a sequence count; packet threads read it without a lock and
 * retry while the count is odd or moved, as for a route entry. */
typedef struct {
    uint32_t seq;
    uint32_t mask;     /* number of slots - 1 (a power of two) */
    uint32_t seed;
    uint32_t *slot;    /* 0: empty */
} wf_peers_t;

static inline uint32_t wf_peer_home(const wf_peers_t *t, uint32_t ip) {
    uint32_t h = ip ^ t->seed;          /* murmur3's finalizer: every input bit moves every output bit */
    h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13; h *= 0xc2b2ae35u; h ^= h >> 16;
    return h & t->mask;
}

static inline int wf_peer_has(const wf_peers_t *t, uint32_t ip) {
    uint32_t s1, s2, i, n, v;
    int found;
    if (ip == 0)
        return 0;
    for (;;) {
        s1 = __atomic_load_n(&t->seq, __ATOMIC_ACQUIRE);
        found = 0;
        if (!(s1 & 1)) {
            i = wf_peer_home(t, ip);
            for (n = 0; n <= t->mask; n++) {    /* bounded even mid-change: never a full table */
                v = __atomic_load_n(&t->slot[i], __ATOMIC_RELAXED);
                if (v == ip) { found = 1; break; }
                if (v == 0) break;
                i = (i + 1) & t->mask;
            }
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        s2 = __atomic_load_n(&t->seq, __ATOMIC_RELAXED);
        if (!(s1 & 1) && s1 == s2)
            return found;
    }
}

static inline void wf_peers_begin(wf_peers_t *t) {
    __atomic_store_n(&t->seq, t->seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static inline void wf_peers_end(wf_peers_t *t) { __atomic_store_n(&t->seq, t->seq + 1, __ATOMIC_RELEASE); }

/* Writer only; ``ip`` != 0 and the table has an empty slot. */
static inline void wf_peer_add(wf_peers_t *t, uint32_t ip) {
    uint32_t i = wf_peer_home(t, ip);
    while (t->slot[i] != 0) {
        if (t->slot[i] == ip)
            return;
        i = (i + 1) & t->mask;
    }
    wf_peers_begin(t);
    __atomic_store_n(&t->slot[i], ip, __ATOMIC_RELAXED);
    wf_peers_end(t);
}

/* Writer only. Each later member of the cluster whose home slot is not cyclically in (hole, its
 * slot] moves back into the hole, so every member stays reachable from its home (Knuth, 6.4 R). */
static inline void wf_peer_del(wf_peers_t *t, uint32_t ip) {
    uint32_t i = wf_peer_home(t, ip), j, k, v;
    while (t->slot[i] != ip) {
        if (t->slot[i] == 0)
            return;
        i = (i + 1) & t->mask;
    }
    wf_peers_begin(t);
    for (j = i;;) {
        j = (j + 1) & t->mask;
        v = t->slot[j];
        if (v == 0)
            break;
        k = wf_peer_home(t, v);
        if (j > i ? (k <= i || k > j) : (k <= i && k > j)) {
            __atomic_store_n(&t->slot[i], v, __ATOMIC_RELAXED);
            i = j;
        }
    }
    __atomic_store_n(&t->slot[i], 0, __ATOMIC_RELAXED);
    wf_peers_end(t);
}

/* The IPv6 pseudo header (src, dst from the packet; upper-layer length < 64 KB; next header),
 * native order (RFC 8200 8.1): the v4 one's two small words plus eight address words. */
static inline uint64_t wf_pseudo6(const uint8_t *ip, uint32_t proto, uint32_t l4len) {
    uint64_t s = 0;
    for (int i = 8; i < 40; i += 4)
        s += wf_ld32(ip + i);
    return s + (uint16_t)((proto << 8) | (proto >> 8))
             + (uint16_t)(((l4len & 0xff) << 8) | ((l4len >> 8) & 0xff));
}

/* IPv6 routes and peers: a map from a 16-byte key (a subnet's prefix with its host bits clear,
 * or a peer's public IPv6 address) to a peer (public IPv6 + VTEP MAC). IPv6 subnets are sparse in
 * their Network (a /56 holds 256 /64s, a /48 65,536), so no direct table: open addressing with
 * linear probing, at most half full (sized for one entry per IPv4 route slot: a lease has one
 * subnet of each family), deletion by backward shift, a per-engine seed. One writer (Python,
 * holding the GIL) changes it under the sequence count; packet threads copy an entry out
 * without a lock and retry while the count is odd or moved. The IPv4 path never touches it. */
typedef struct {
    uint8_t key[16];
    uint8_t ip[16];    /* the peer's public IPv6 (network order) */
    uint8_t mac[6];    /* its VTEP MAC */
    uint8_t used;
    uint8_t pad;
} wf_entry6_t;

typedef struct {
    uint32_t seq;
    uint32_t mask;     /* number of slots - 1 (a power of two) */
    uint32_t seed;
    uint32_t count;    /* entries in use (writer only) */
    wf_entry6_t *slot;
} wf_map6_t;

static inline uint32_t wf_map6_home(const wf_map6_t *t, const uint8_t *key) {
    uint32_t h = t->seed;
    for (int i = 0; i < 16; i += 4) {
        uint32_t k = wf_ld32(key + i) * 0xcc9e2d51u;
        k = (k << 15) | (k >> 17);
        h ^= k * 0x1b873593u;
        h = ((h << 13) | (h >> 19)) * 5 + 0xe6546b64u;
    }
    h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13; h *= 0xc2b2ae35u; h ^= h >> 16;
    return h & t->mask;
}

/* Copy the entry of ``key`` into ip/mac (either may be NULL); 1 when there is one. */
static inline int wf_map6_get(const wf_map6_t *t, const uint8_t *key, uint8_t *ip, uint8_t *mac) {
    uint32_t s1, s2, i, n;
    int found;
    for (;;) {
        s1 = __atomic_load_n(&t->seq, __ATOMIC_ACQUIRE);
        found = 0;
        if (!(s1 & 1)) {
            i = wf_map6_home(t, key);
            for (n = 0; n <= t->mask; n++) {    /* bounded even mid-change: never a full table */
                const wf_entry6_t *e = &t->slot[i];
                if (!__atomic_load_n(&e->used, __ATOMIC_RELAXED))
                    break;
                if (memcmp(e->key, key, 16) == 0) {
                    if (ip) memcpy(ip, e->ip, 16);
                    if (mac) memcpy(mac, e->mac, 6);
                    found = 1;
                    break;
                }
                i = (i + 1) & t->mask;
            }
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        s2 = __atomic_load_n(&t->seq, __ATOMIC_RELAXED);
        if (!(s1 & 1) && s1 == s2)
            return found;
    }
}

static inline void wf_map6_begin(wf_map6_t *t) {
    __atomic_store_n(&t->seq, t->seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static inline void wf_map6_end(wf_map6_t *t) { __atomic_store_n(&t->seq, t->seq + 1, __ATOMIC_RELEASE); }

/* Writer only. Set (or replace) the entry of ``key``; -1 when the table is half full already. */
static inline int wf_map6_put(wf_map6_t *t, const uint8_t *key, const uint8_t *ip, const uint8_t *mac) {
    uint32_t i = wf_map6_home(t, key);
    while (t->slot[i].used && memcmp(t->slot[i].key, key, 16) != 0)
        i = (i + 1) & t->mask;
    if (!t->slot[i].used && 2 * (t->count + 1) > t->mask + 1)
        return -1;
    wf_map6_begin(t);
    if (!t->slot[i].used) {
        memcpy(t->slot[i].key, key, 16);
        t->count++;
    }
    memcpy(t->slot[i].ip, ip ? ip : key, 16);
    if (mac) memcpy(t->slot[i].mac, mac, 6); else memset(t->slot[i].mac, 0, 6);
    __atomic_store_n(&t->slot[i].used, 1, __ATOMIC_RELAXED);
    wf_map6_end(t);
    return 0;
}

/* Writer only: remove the entry of ``key`` (backward shift, as wf_peer_del). */
static inline void wf_map6_del(wf_map6_t *t, const uint8_t *key) {
    uint32_t i = wf_map6_home(t, key), j, k;
    while (memcmp(t->slot[i].key, key, 16) != 0 || !t->slot[i].used) {
        if (!t->slot[i].used)
            return;
        i = (i + 1) & t->mask;
    }
    wf_map6_begin(t);
    for (j = i;;) {
        j = (j + 1) & t->mask;
        if (!t->slot[j].used)
            break;
        k = wf_map6_home(t, t->slot[j].key);
        if (j > i ? (k <= i || k > j) : (k <= i && k > j)) {
            t->slot[i] = t->slot[j];
            i = j;
        }
    }
    memset(&t->slot[i], 0, sizeof(wf_entry6_t));
    t->count--;
    wf_map6_end(t);
}

static inline int wf_load_flag(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void wf_store_flag(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
#endif
