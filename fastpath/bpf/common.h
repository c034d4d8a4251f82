/* Helpers shared by weft's tc programs: counters, drops, header access, the encapsulation step. */
#ifndef WEFT_COMMON_H
#define WEFT_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#include "maps.h"

#define WEFT_TUNNEL_TTL		64	/* what the kernel VXLAN device uses (ip_default_ttl) */

/* weft_peer_of() results. */
#define WEFT_ENCAP_DONE		0	/* a peer holds the destination */
#define WEFT_ENCAP_PASS		1	/* not overlay traffic */
#define WEFT_ENCAP_MISS		2	/* in the Network, no peer entry */

/* bcc 0.26 declares bpf_redirect_neigh with 3 arguments; the kernel's helper takes 4. */
static long (*weft_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

static __always_inline void weft_count(__u32 idx, __u64 n)
{
	__u64 *v = weft_counters.lookup(&idx);
	if (v)
		*v += n;
}

/* Drop, counting n packets (a GRO packet on receive counts its segments). */
static __always_inline int weft_drop_n(__u32 reason, __u64 n)
{
	__u64 *v = weft_drops.lookup(&reason);
	if (v)
		*v += n;
	return TC_ACT_SHOT;
}

static __always_inline int weft_drop(__u32 reason)
{
	return weft_drop_n(reason, 1);
}

/* How many packets an skb stands for: for counting only. Whether an skb is GSO is gso_size (a
 * TCP skb that is not GSO still carries gso_segs 1). */
static __always_inline __u32 weft_segs(struct __sk_buff *skb)
{
	__u32 segs = skb->gso_segs;
	return segs ? segs : 1;
}

static __always_inline struct weft_config *weft_cfg(void)
{
	__u32 zero = 0;
	return weft_config.lookup(&zero);
}

/* The Ethernet frame, with its IPv4 header pulled into the linear area if needed; NULL if short.
 * The IPv4 header is at (struct iphdr *)(eth + 1). */
static __always_inline struct ethhdr *weft_frame(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (data + ETH_HLEN + sizeof(struct iphdr) > end) {
		if (bpf_skb_pull_data(skb, ETH_HLEN + sizeof(struct iphdr)) < 0)
			return NULL;
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		if (data + ETH_HLEN + sizeof(struct iphdr) > end)
			return NULL;
	}
	return data;
}

/* TTL - 1 with the checksum fixed incrementally, as the kernel's ip_decrease_ttl() does. Direct
 * packet writes: the verifier makes the head writable once on entry (what the stack's skb_cow
 * does when it forwards), cheaper than a store-bytes and a csum-replace helper per packet. */
static __always_inline void weft_ttl_dec(struct iphdr *ip)
{
	__u32 check = (__u32)ip->check;
	check += (__u32)bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

static __always_inline int weft_mac_eq(const __u8 *a, const __u8 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) |
		(a[5] ^ b[5])) == 0;
}

/* The receive rule (the userspace engines' too): the inner source must lie in the subnet of the
 * peer whose PublicIP sent it (remote: host byte order). 0 or WEFT_DROP_SPOOFED_SRC. */
static __always_inline __u32 weft_check_source(__u32 inner_saddr, __u32 remote)
{
	struct weft_peer_key key = {.prefixlen = 32, .addr = inner_saddr};
	struct weft_peer *peer = weft_peers.lookup(&key);
	if (!peer)
		return WEFT_DROP_SPOOFED_SRC;
	/* one branch, not three: see weft_check_datagram (from_underlay.c) */
	if ((peer->flags & WEFT_PEER_LOCAL) | (peer->remote_ipv4 ^ remote))
		return WEFT_DROP_SPOOFED_SRC;
	return 0;
}

/* A FIB lookup for the IPv4 packet ``ip`` as forwarding would make it, arriving on ``ifindex``;
 * tot_len 0: the kernel checks the skb (GSO-aware) against the MTU. */
static __always_inline void weft_fib4_init(struct bpf_fib_lookup *fib, struct iphdr *ip, __u32 ifindex)
{
	fib->family = 2;	/* AF_INET */
	fib->tos = ip->tos;
	fib->l4_protocol = ip->protocol;
	fib->tot_len = 0;
	fib->ipv4_src = ip->saddr;
	fib->ipv4_dst = ip->daddr;
	fib->ifindex = ifindex;
}

static __always_inline void weft_set_macs(struct ethhdr *eth, const __u8 *dst, const __u8 *src)
{
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
}

/* Whether a (network byte order) IPv4 address lies in the Network; never on an IPv6-only node
 * (netmask zero: this node carries no IPv4, and every program leaves IPv4 alone). */
static __always_inline int weft_in_network(struct weft_config *cfg, __u32 daddr)
{
	return cfg->netmask && (daddr & cfg->netmask) == cfg->network;
}

/* The peer for daddr: WEFT_ENCAP_DONE with *out set, WEFT_ENCAP_PASS (not overlay traffic, or our
 * own subnet) or WEFT_ENCAP_MISS (in the Network, no peer entry). */
static __always_inline int weft_peer_of(struct weft_config *cfg, __u32 daddr, struct weft_peer **out)
{
	if (!weft_in_network(cfg, daddr))
		return WEFT_ENCAP_PASS;
	struct weft_peer_key key = {.prefixlen = 32, .addr = daddr};
	struct weft_peer *peer = weft_peers.lookup(&key);
	if (!peer)
		return WEFT_ENCAP_MISS;
	if (peer->flags & WEFT_PEER_LOCAL)
		return WEFT_ENCAP_PASS;
	*out = peer;
	return WEFT_ENCAP_DONE;
}

/* Whether a packet (or, when it is GSO, each of its segments) is bigger than the overlay MTU
 * ``mtu``. ``l3_len`` bytes of IP header (IPv4 with IHL 5, or IPv6 with no extension header) follow
 * eth and carry ``l4_proto``. GSO is gso_size > 0: a segment is then the IP and TCP/UDP headers +
 * gso_size; other GSO types (a tunnel inside the pod) count as too big: the stack decides. */
static __always_inline int weft_too_big_l3(struct __sk_buff *skb, __u32 mtu, __u32 l3_len, __u8 l4_proto)
{
	__u32 gso = skb->gso_size;
	if (!gso)
		return skb->len > mtu + ETH_HLEN;
	__u32 l4 = 8;
	if (l4_proto == 6) {
		__u8 doff = 0;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + l3_len + 12, &doff, 1) < 0)
			return 1;
		l4 = (doff >> 4) * 4;
	} else if (l4_proto != 17) {
		return 1;
	}
	return l3_len + l4 + gso > mtu;
}

static __always_inline int weft_too_big(struct __sk_buff *skb, struct weft_config *cfg, struct iphdr *ip)
{
	return weft_too_big_l3(skb, cfg->mtu, sizeof(struct iphdr), ip->protocol);
}

/* Encapsulate toward peer: the tunnel key (outer destination, VNI) for the collect_md device, and
 * the inner frame a kernel VXLAN peer expects: dst = peer VtepMAC, src = our VtepMAC. Returns 0
 * or -enum weft_drop_reason. Packet pointers stay valid (set_tunnel_key does not touch data). */
static __always_inline int weft_encap(struct __sk_buff *skb, struct weft_config *cfg,
				      struct weft_peer *peer, struct ethhdr *eth)
{
	struct bpf_tunnel_key tkey = {};
	tkey.tunnel_id = peer->vni;
	tkey.remote_ipv4 = peer->remote_ipv4;
	tkey.tunnel_ttl = WEFT_TUNNEL_TTL;
	tkey.local_ipv4 = cfg->local_ipv4;
	/* The outer UDP checksum: a VXLAN device made the way flannel (and vxlan/kernel) makes it has
	 * udpcsum on (the kernel's default), so WEFT_CFG_OUTER_CSUM is on by default; without it,
	 * BPF_F_ZERO_CSUM_TX sends 0 (valid for IPv4, Cilium's choice). */
	__u64 tflags = (cfg->flags & WEFT_CFG_OUTER_CSUM) ? 0 : BPF_F_ZERO_CSUM_TX;
	if (bpf_skb_set_tunnel_key(skb, &tkey, sizeof(tkey), tflags) < 0)
		return -WEFT_DROP_TUNNEL_KEY;
	weft_set_macs(eth, peer->vtep_mac, cfg->vtep_mac);
	return 0;
}

/* -- IPv6 (dual-stack): the same steps for the IPv6 side, in weft_peers6 ------------------------- */

#define WEFT_IP6_HLEN		40

/* The Ethernet frame with its IPv6 header in the linear area, or NULL if short; the IPv6 header
 * is at (struct ipv6hdr *)(eth + 1). */
static __always_inline struct ethhdr *weft_frame6(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (data + ETH_HLEN + WEFT_IP6_HLEN > end) {
		if (bpf_skb_pull_data(skb, ETH_HLEN + WEFT_IP6_HLEN) < 0)
			return NULL;
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		if (data + ETH_HLEN + WEFT_IP6_HLEN > end)
			return NULL;
	}
	return data;
}

/* Whether a (network byte order) IPv6 address lies in the IPv6 Network; never without IPv6. */
static __always_inline int weft_in_network6(struct weft_config *cfg, const __u32 *a)
{
	if (!cfg->netmask6[0])
		return 0;
	return (((a[0] & cfg->netmask6[0]) ^ cfg->network6[0]) | ((a[1] & cfg->netmask6[1]) ^ cfg->network6[1]) |
		((a[2] & cfg->netmask6[2]) ^ cfg->network6[2]) | ((a[3] & cfg->netmask6[3]) ^ cfg->network6[3])) == 0;
}

static __always_inline int weft_ip6_eq(const __u32 *a, const __u32 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0;
}

static __always_inline struct weft_peer6 *weft_peer6_lookup(const __u32 *addr)
{
	struct weft_peer6_key key = {.prefixlen = 128};
	__builtin_memcpy(key.addr, addr, 16);
	return weft_peers6.lookup(&key);
}

/* weft_peer_of for IPv6 (daddr: the packet's, network byte order). */
static __always_inline int weft_peer6_of(struct weft_config *cfg, const __u32 *daddr, struct weft_peer6 **out)
{
	if (!weft_in_network6(cfg, daddr))
		return WEFT_ENCAP_PASS;
	struct weft_peer6 *peer = weft_peer6_lookup(daddr);
	if (!peer)
		return WEFT_ENCAP_MISS;
	if (peer->flags & WEFT_PEER_LOCAL)
		return WEFT_ENCAP_PASS;
	*out = peer;
	return WEFT_ENCAP_DONE;
}

/* The receive rule for IPv6: the inner source lies in the IPv6 subnet of the peer whose PublicIPv6
 * (remote, network byte order) sent it. 0 or WEFT_DROP_SPOOFED_SRC. */
static __always_inline __u32 weft_check_source6(const __u32 *inner_saddr, const __u32 *remote)
{
	struct weft_peer6 *peer = weft_peer6_lookup(inner_saddr);
	if (!peer)
		return WEFT_DROP_SPOOFED_SRC;
	if ((peer->flags & WEFT_PEER_LOCAL) | !weft_ip6_eq(peer->remote_ipv6, remote))
		return WEFT_DROP_SPOOFED_SRC;
	return 0;
}

/* weft_too_big for IPv6 packets (cfg->mtu6: the IPv6 outer header is 20 bytes bigger). */
static __always_inline int weft_too_big6(struct __sk_buff *skb, struct weft_config *cfg, struct ipv6hdr *ip6)
{
	return weft_too_big_l3(skb, cfg->mtu6, WEFT_IP6_HLEN, ip6->nexthdr);
}

/* weft_encap toward an IPv6 peer: the tunnel key names the peer's PublicIPv6 (the collect_md device
 * sends VXLAN over the IPv6 underlay, as flannel-v6.<VNI> does); inner MACs: the peer's IPv6 VtepMAC,
 * our IPv6 VtepMAC. The outer UDP checksum is always on: a zero checksum is not valid over IPv6
 * (a kernel VXLAN device drops it unless udp6zerocsumrx is set, which flannel never sets). */
static __always_inline int weft_encap6(struct __sk_buff *skb, struct weft_config *cfg,
				       struct weft_peer6 *peer, struct ethhdr *eth)
{
	struct bpf_tunnel_key tkey = {};
	tkey.tunnel_id = peer->vni;
	__builtin_memcpy(tkey.remote_ipv6, peer->remote_ipv6, 16);
	__builtin_memcpy(tkey.local_ipv6, cfg->local_ipv6, 16);
	tkey.tunnel_ttl = WEFT_TUNNEL_TTL;
	if (bpf_skb_set_tunnel_key(skb, &tkey, sizeof(tkey), BPF_F_TUNINFO_IPV6) < 0)
		return -WEFT_DROP_TUNNEL_KEY;
	weft_set_macs(eth, peer->vtep_mac, cfg->vtep_mac6);
	return 0;
}

#endif
