/* weft_hostgw_guard: tc INGRESS of the underlay interface (-iface) of a host-gw node, the opt-in
 * source guard (host-gw/kernel's source_guard option, weftd --source-guard).
 *
 * host-gw carries pod packets as they are: a peer routes them to us via our PublicIP, so the only
 * sign of who sent one is the frame's source MAC. The rule: an IPv4 packet whose source lies in
 * the Network must come from the node whose lease holds that source, i.e. its frame's source MAC
 * must be the MAC of that lease's PublicIP on this interface. Per packet: one LPM lookup in
 * weft_peers (every lease: subnet -> PublicIP; ours flagged local) and one bpf_fib_lookup of the
 * PublicIP (route and neighbour entry: the kernel's, no per-peer rule). Each checked packet lands
 * in exactly one counter: weft_counters[HOSTGW_PASSED], or weft_drops[reason] for the first check
 * it fails, in this order:
 *
 *   HOSTGW_OWN_SUBNET  the source is in this node's own subnet (its pods are behind cni0, never
 *                      behind the underlay)
 *   HOSTGW_NO_PEER     no lease holds the source
 *   HOSTGW_NOT_ROUTED  the lease's PublicIP is not reached directly out of the interface the packet
 *                      came in on (no route, a route through a gateway or another device, or
 *                      forwarding off on the interface: the FIB lookup's verdict)
 *   HOSTGW_NO_NEIGH    the PublicIP has no valid neighbour entry (not resolved, or FAILED): its MAC
 *                      is unknown, so the packet cannot be checked and is dropped. Linux learns a
 *                      peer's MAC from the ARP request the peer sends before its first packet to us,
 *                      and the backend asks the kernel to resolve every peer's PublicIP when its
 *                      lease arrives and on each resync (for a peer that still knows our MAC after
 *                      our neighbour table lost its entry).
 *   HOSTGW_SPOOFED     the frame's source MAC is not that neighbour's MAC
 *
 * Untouched and uncounted: non-IPv4 (ARP), frames for another host (PACKET_OTHERHOST: the kernel
 * drops them before IP), IPv4 too short for its header or not version 4 / IHL 5+ (the kernel drops
 * those), and every source outside the Network (the node's own underlay traffic). GSO and GRO
 * packets are checked once (their segments share the headers) and count their segments.
 * An attacker on the same L2 segment can forge a MAC as easily as an IP: the guard stops a peer
 * or a host with its own MAC from claiming another node's pods, not a MAC thief.
 */
#include "common.h"

#define WEFT_PACKET_OTHERHOST	3
#define WEFT_AF_INET		2

/* The guard's check: TC_ACT_OK (passed, or not a packet it checks) or the drop, counted. Also
 * weft_hostgw_from_underlay's first step under WEFT_CFG_RX_CHECK (hostgw.c, the same compile). */
static __always_inline int weft_hostgw_check(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP) || skb->pkt_type == WEFT_PACKET_OTHERHOST)
		return TC_ACT_OK;
	struct weft_config *cfg = weft_cfg();
	if (!cfg || !cfg->netmask)	/* no Network configured: nothing to check against */
		return TC_ACT_OK;
	struct ethhdr *eth = weft_frame(skb);
	if (!eth)
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if (ip->version != 4 || ip->ihl < 5 || (ip->saddr & cfg->netmask) != cfg->network)
		return TC_ACT_OK;

	__u32 segs = weft_segs(skb);
	struct weft_peer_key key = {.prefixlen = 32, .addr = ip->saddr};
	__u8 smac[ETH_ALEN];
	__builtin_memcpy(smac, eth->h_source, ETH_ALEN);
	struct weft_peer *peer = weft_peers.lookup(&key);
	if (!peer)
		return weft_drop_n(WEFT_DROP_HOSTGW_NO_PEER, segs);
	if (peer->flags & WEFT_PEER_LOCAL)
		return weft_drop_n(WEFT_DROP_HOSTGW_OWN_SUBNET, segs);

	__u32 holder = bpf_htonl(peer->remote_ipv4);
	__u32 ifindex = skb->ingress_ifindex;
	struct bpf_fib_lookup fib = {};
	fib.family = WEFT_AF_INET;
	fib.ifindex = ifindex;
	fib.ipv4_dst = holder;
	fib.tot_len = 20;	/* non-zero: the helper checks this, not the skb, against the MTU */
	int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_DIRECT);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return weft_drop_n(WEFT_DROP_HOSTGW_NOT_ROUTED, segs);
	/* the next hop must be the PublicIP itself (no gateway), out of the interface we are on */
	if ((fib.ifindex ^ ifindex) | (fib.ipv4_dst ^ holder))
		return weft_drop_n(WEFT_DROP_HOSTGW_NOT_ROUTED, segs);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return weft_drop_n(WEFT_DROP_HOSTGW_NO_NEIGH, segs);
	if (!weft_mac_eq(fib.dmac, smac))
		return weft_drop_n(WEFT_DROP_HOSTGW_SPOOFED, segs);
	weft_count(WEFT_CNT_HOSTGW_PASSED, segs);
	return TC_ACT_OK;
}

int weft_hostgw_guard(struct __sk_buff *skb)
{
	return weft_hostgw_check(skb);
}
