/* Helpers shared by weft's tc programs: counters, drops, header access, the encapsulation step. */
#ifndef WEFT_COMMON_H
#define WEFT_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>

#include "maps.h"

#define WEFT_TUNNEL_TTL		64	/* what the kernel VXLAN device uses (ip_default_ttl) */

/* weft_peer_of() results. */
#define WEFT_ENCAP_DONE		0	/* a peer holds the destination */
#define WEFT_ENCAP_PASS		1	/* not overlay traffic */
#define WEFT_ENCAP_MISS		2	/* in the Network, no peer entry */

static __always_inline void weft_count(__u32 idx, __u64 n)
{
	__u64 *v = weft_counters.lookup(&idx);
	if (v)
		*v += n;
}

static __always_inline int weft_drop(__u32 reason)
{
	__u64 *v = weft_drops.lookup(&reason);
	if (v)
		*v += 1;
	return TC_ACT_SHOT;
}

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

static __always_inline void weft_set_macs(struct ethhdr *eth, const __u8 *dst, const __u8 *src)
{
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
}

/* The peer for daddr: WEFT_ENCAP_DONE with *out set, WEFT_ENCAP_PASS (not overlay traffic, or our
 * own subnet) or WEFT_ENCAP_MISS (in the Network, no peer entry). */
static __always_inline int weft_peer_of(struct weft_config *cfg, __u32 daddr, struct weft_peer **out)
{
	if ((daddr & cfg->netmask) != cfg->network)
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

#endif
