/* host-gw/ebpf's shortcuts (fastpath/hostgw/ebpf.py); the kernel routes stay as host-gw/kernel
 * programs them (one per peer via its PublicIP), so whatever these programs leave to the stack
 * (and the node's own traffic) takes the kernel's path unchanged.
 *
 * weft_hostgw_from_pods, tc INGRESS of the pod bridge (cni0): an IPv4 packet for a peer's subnet
 * (weft_peers: subnet -> PublicIP, ours flagged local) leaves straight by the underlay interface
 * (weft_config.underlay_ifindex) through bpf_redirect_neigh with the peer's PublicIP as next hop:
 * the kernel's neighbour entry gives the MACs (and is resolved when missing). No IP forwarding, no
 * netfilter FORWARD/POSTROUTING; the TTL is decremented here. Left to the stack (counted in
 * pods_stack): TTL 1, IP options, bigger than the underlay MTU (GSO: a segment), no lease for the
 * destination (a miss, also counted in map_miss). Outside the Network or our own subnet: untouched.
 *
 * weft_hostgw_from_pod_port, tc INGRESS of each learnt pod's host veth (a port of cni0): the same,
 * before the bridge, for that pod's own frames to its gateway (as vxlan/ebpf's weft_from_pod_port):
 * the bridge and its netfilter hook (br_netfilter: a conntrack lookup, and for flows the node never
 * confirms, as here, a conntrack allocated and freed per packet) are skipped too.
 *
 * weft_hostgw_from_underlay, tc INGRESS of the underlay interface: with WEFT_CFG_RX_CHECK (the
 * source_guard option) the guard's check (hostgw_guard.c, same compile) runs first and drops, by
 * reason, what weft_hostgw_guard would drop. Then an IPv4 packet addressed to this host
 * (PACKET_HOST) for a pod the bridge watcher learnt (weft_endpoints), whose MAC the kernel's
 * neighbour entry confirms (bpf_fib_lookup), enters the pod's namespace through bpf_redirect_peer:
 * no IP forwarding, no bridge, no backlog queue (rx_peer). Any other packet to the Network goes up
 * the stack (rx_stack); the rest (ARP, the node's own traffic) is untouched and uncounted.
 */
#include "common.h"

#define WEFT_PACKET_HOST	0
#define WEFT_AF_INET		2

/* A pod's IPv4 frame (eth, checked by the caller) to a peer's subnet: out of the underlay
 * interface toward the peer's PublicIP; anything else to the stack, counted when ``count``. */
static __always_inline int weft_hostgw_pods4(struct __sk_buff *skb, struct ethhdr *eth, int count)
{
	struct weft_config *cfg = weft_cfg();
	if (!cfg || !cfg->underlay_ifindex || !(cfg->flags & WEFT_CFG_PODS_REDIRECT))
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	struct weft_peer *peer = weft_pods_peer(skb, cfg, ip, count);	/* from_pods.c (same compile) */
	if (!peer)
		return TC_ACT_OK;
	if (cfg->flags & WEFT_CFG_TTL_DEC)
		weft_ttl_dec(ip);
	struct bpf_redir_neigh nh = {.nh_family = WEFT_AF_INET, .ipv4_nh = bpf_htonl(peer->remote_ipv4)};
	weft_count(WEFT_CNT_TX_PACKETS, weft_segs(skb));
	weft_count(WEFT_CNT_TX_BYTES, skb->len);
	weft_count(WEFT_CNT_PODS_REDIRECT, 1);
	return weft_redirect_neigh(cfg->underlay_ifindex, &nh, sizeof(nh), 0);
}

int weft_hostgw_from_pods(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct ethhdr *eth = weft_frame(skb);
	return eth ? weft_hostgw_pods4(skb, eth, 1) : TC_ACT_OK;
}

/* On a learnt pod's port, before the bridge: only that pod's own frames to its gateway
 * (weft_port_frame4); the rest goes on to the bridge, and cni0's program counts what
 * it leaves to the stack (so each packet lands in one counter). */
int weft_hostgw_from_pod_port(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct ethhdr *eth = weft_port_frame4(skb);	/* from_pods.c (same compile) */
	return eth ? weft_hostgw_pods4(skb, eth, 0) : TC_ACT_OK;
}

int weft_hostgw_from_underlay(struct __sk_buff *skb)
{
	struct weft_config *cfg = weft_cfg();
	if (!cfg)
		return TC_ACT_OK;
	if (cfg->flags & WEFT_CFG_RX_CHECK) {
		int verdict = weft_hostgw_check(skb);
		if (verdict != TC_ACT_OK)
			return verdict;
	}
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct ethhdr *eth = weft_frame(skb);
	if (!eth)
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if (!weft_in_network(cfg, ip->daddr))
		return TC_ACT_OK;
	if (!(cfg->flags & WEFT_CFG_RX_PEER) || skb->pkt_type != WEFT_PACKET_HOST || ip->ttl <= 1 ||
	    ip->ihl != 5)
		goto stack;
	__u32 daddr = ip->daddr;
	struct weft_endpoint *ep = weft_endpoints.lookup(&daddr);
	if (!ep)
		goto stack;
	struct bpf_fib_lookup fib = {};
	weft_fib4_init(&fib, ip, skb->ingress_ifindex);
	/* The kernel's route (to the pod bridge) and neighbour entry (fib.dmac) vouch for the learnt
	 * endpoint: a pod that left, or changed its MAC, takes the stack's path until relearnt. */
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS ||
	    fib.ifindex == skb->ingress_ifindex || !weft_mac_eq(ep->mac, fib.dmac))
		goto stack;
	if (cfg->flags & WEFT_CFG_TTL_DEC)
		weft_ttl_dec(ip);
	weft_set_macs(eth, ep->mac, ep->bridge_mac);
	weft_count(WEFT_CNT_RX_PEER, 1);
	return bpf_redirect_peer(ep->ifindex, 0);

stack:
	weft_count(WEFT_CNT_RX_STACK, 1);
	return TC_ACT_OK;
}
