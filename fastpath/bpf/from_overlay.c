/* weft_from_overlay: tc INGRESS of flannel.<VNI> (VXLAN, external/collect_md mode).
 *
 * Decapsulated frames from any peer (kernel VXLAN or eBPF) arrive here addressed to our VtepMAC.
 * With WEFT_CFG_RX_CHECK (the default) a frame whose tunnel source does not hold its inner source
 * (or a foreign VNI, MAC, or non-IPv4) is dropped first, counted by reason (weft_check_rx).
 * With WEFT_CFG_RX_PEER, a pod in weft_endpoints whose MAC the kernel's neighbour table confirms
 * gets the frame through bpf_redirect_peer: straight into its namespace, no bridge, no backlog.
 * With WEFT_CFG_RX_REDIRECT a FIB lookup finds the pod bridge and the pod's MAC, and the frame is
 * redirected to the bridge's egress without the IP forwarding path; with WEFT_CFG_RX_NEIGH, or when
 * the neighbour is not resolved yet, bpf_redirect_neigh lets the kernel fill in (and keep fresh)
 * the neighbour. Anything else goes up the stack as with the kernel backend.
 *
 * IPv6 (dual-stack: inner IPv6 over the IPv6 underlay, what flannel-v6.<VNI> peers send): the tunnel
 * key is an IPv6 one; the check (weft_check_rx6) wants the sender in weft_peer_ips6, an IPv6 frame to
 * our IPv6 VtepMAC and the inner source in the sender's IPv6 subnet (weft_peers6). Then the same
 * receive paths (weft_from_overlay6): a pod in weft_endpoints6 whose MAC the neighbour table
 * confirms gets it through bpf_redirect_peer, else the FIB redirect to the bridge
 * (bpf_redirect_neigh while the pod's neighbour entry is unresolved), else the stack.
 * Frames left to the stack get the device's MAC as destination when our IPv6 VtepMAC differs from
 * it (a lease made by vxlan/kernel, whose flannel-v6 device has its own MAC): the stack drops
 * frames not addressed to the device (PACKET_OTHERHOST).
 * On an IPv6-only node (IPv4 netmask zero) the check drops every IPv4 frame (no IPv4 sender is a
 * peer); without the check an IPv4 frame meets the stack, never the FIB shortcut.
 */
#include "common.h"

#ifndef BPF_FIB_LOOKUP_SKIP_NEIGH
#define BPF_FIB_LOOKUP_SKIP_NEIGH (1U << 2)
#endif

/* Forward a decapsulated packet where the FIB lookup said (counted): through the kernel's
 * neighbour resolution when asked to (or when the lookup found no neighbour), else with the FIB's
 * MACs. */
static __always_inline int weft_fib_redirect(struct ethhdr *eth, struct bpf_fib_lookup *fib, __u32 neigh,
					     int rc)
{
	weft_count(WEFT_CNT_RX_REDIRECT, 1);
	if (neigh || rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return weft_redirect_neigh(fib->ifindex, NULL, 0, 0);
	weft_set_macs(eth, fib->dmac, fib->smac);
	return bpf_redirect(fib->ifindex, 0);
}

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#define WEFT_PACKET_HOST	0

/* weft_check_rx for a tunnel key that is not IPv4 (an IPv6 underlay). 0 or a drop reason. */
static __always_inline __u32 weft_check_rx6(struct __sk_buff *skb, struct weft_config *cfg)
{
	struct bpf_tunnel_key tkey = {};
	if (bpf_skb_get_tunnel_key(skb, &tkey, sizeof(tkey), BPF_F_TUNINFO_IPV6) < 0)
		return WEFT_DROP_TUNNEL_KEY;
	if (tkey.tunnel_id != cfg->vni)
		return WEFT_DROP_WRONG_VNI;
	struct weft_ip6 remote = {};
	__builtin_memcpy(remote.a, tkey.remote_ipv6, 16);
	if (!weft_peer_ips6.lookup(&remote))
		return WEFT_DROP_UNKNOWN_PEER;
	if (skb->protocol != bpf_htons(ETH_P_IPV6))
		return WEFT_DROP_INNER_NOT_IPV4;	/* over the IPv6 underlay: inner not IPv6 */
	struct ethhdr *eth = weft_frame6(skb);
	if (!eth)
		return WEFT_DROP_TRUNCATED;
	if (!weft_mac_eq(eth->h_dest, cfg->vtep_mac6))
		return WEFT_DROP_WRONG_MAC;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	if (ip6->version != 6)
		return WEFT_DROP_INNER_NOT_IPV4;
	return weft_check_source6((const __u32 *)&ip6->saddr, remote.a);
}

/* The receive path of an IPv6 frame (checked already): FIB redirect to a local pod, or the stack. */
static __always_inline int weft_from_overlay6(struct __sk_buff *skb, struct weft_config *cfg)
{
	struct ethhdr *eth = weft_frame6(skb);
	if (!eth)
		goto stack;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	if (!(cfg->flags & WEFT_CFG_RX_REDIRECT) || ip6->hop_limit <= 1 || ip6->nexthdr == 0 ||
	    !weft_in_network6(cfg, (const __u32 *)&ip6->daddr))
		goto to_stack;

	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET6;
	fib.flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0FFFFFFF);
	fib.l4_protocol = ip6->nexthdr;
	fib.tot_len = 0;
	__builtin_memcpy(fib.ipv6_src, &ip6->saddr, 16);
	__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, 16);
	fib.ifindex = skb->ingress_ifindex;
	__u32 neigh = cfg->flags & WEFT_CFG_RX_NEIGH;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), neigh ? BPF_FIB_LOOKUP_SKIP_NEIGH : 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		goto to_stack;
	if (fib.ifindex == skb->ingress_ifindex)
		goto to_stack;
	if ((cfg->flags & WEFT_CFG_RX_PEER) && rc == BPF_FIB_LKUP_RET_SUCCESS) {
		struct weft_ip6 daddr = {};
		__builtin_memcpy(daddr.a, &ip6->daddr, 16);
		struct weft_endpoint *ep = weft_endpoints6.lookup(&daddr);
		/* The kernel's neighbour entry (fib.dmac) vouches for the learnt endpoint. */
		if (ep && weft_mac_eq(ep->mac, fib.dmac)) {
			if (cfg->flags & WEFT_CFG_TTL_DEC)
				ip6->hop_limit--;
			weft_set_macs(eth, ep->mac, ep->bridge_mac);
			weft_count(WEFT_CNT_RX_PEER, 1);
			return bpf_redirect_peer(ep->ifindex, 0);
		}
	}
	if (cfg->flags & WEFT_CFG_TTL_DEC)
		ip6->hop_limit--;
	return weft_fib_redirect(eth, &fib, neigh, rc);

to_stack:
	if (!weft_mac_eq(eth->h_dest, cfg->vtep_mac)) {
		__builtin_memcpy(eth->h_dest, cfg->vtep_mac, ETH_ALEN);
		bpf_skb_change_type(skb, WEFT_PACKET_HOST);
	}
stack:
	weft_count(WEFT_CNT_RX_STACK, 1);
	return TC_ACT_OK;
}

/* WEFT_CFG_RX_CHECK: the tunnel key names the sender (outer source, VNI); the frame must be IPv4 to
 * our VtepMAC from a source in that sender's subnet. Datagrams that crossed the underlay interface
 * were checked by weft_from_underlay already (and pass again); this catches what reached the VXLAN
 * socket another way (a pod or process of this node sending to our port, another interface) and
 * fragmented datagrams if from_underlay is not attached. 0 or a drop reason. */
static __always_inline __u32 weft_check_rx(struct __sk_buff *skb, struct weft_config *cfg)
{
	struct bpf_tunnel_key tkey = {};
	if (bpf_skb_get_tunnel_key(skb, &tkey, sizeof(tkey), 0) < 0)
		return weft_check_rx6(skb, cfg);
	if (tkey.tunnel_id != cfg->vni)
		return WEFT_DROP_WRONG_VNI;
	__u32 remote = bpf_htonl(tkey.remote_ipv4);
	if (!weft_peer_ips.lookup(&remote))
		return WEFT_DROP_UNKNOWN_PEER;
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return WEFT_DROP_INNER_NOT_IPV4;
	struct ethhdr *eth = weft_frame(skb);
	if (!eth)
		return WEFT_DROP_TRUNCATED;
	if (!weft_mac_eq(eth->h_dest, cfg->vtep_mac))
		return WEFT_DROP_WRONG_MAC;
	struct iphdr *ip = (void *)(eth + 1);
	if (ip->version != 4 || ip->ihl < 5)
		return WEFT_DROP_INNER_NOT_IPV4;
	return weft_check_source(ip->saddr, tkey.remote_ipv4);
}

int weft_from_overlay(struct __sk_buff *skb)
{
	__u32 segs = weft_segs(skb);
	weft_count(WEFT_CNT_RX_PACKETS, segs);
	weft_count(WEFT_CNT_RX_BYTES, skb->len);

	struct weft_config *cfg = weft_cfg();
	if (cfg && (cfg->flags & WEFT_CFG_RX_CHECK)) {
		__u32 reason = weft_check_rx(skb, cfg);
		if (reason)
			return weft_drop_n(reason, segs);
	}
	if (!cfg || skb->protocol != bpf_htons(ETH_P_IP)) {
		if (cfg && skb->protocol == bpf_htons(ETH_P_IPV6))
			return weft_from_overlay6(skb, cfg);
		goto stack;
	}
	if (!(cfg->flags & WEFT_CFG_RX_REDIRECT))
		goto stack;
	struct ethhdr *eth = weft_frame(skb);
	if (!eth)
		goto stack;
	struct iphdr *ip = (void *)(eth + 1);
	if (ip->ttl <= 1 || ip->ihl != 5)
		goto stack;
	/* Only pod traffic takes a shortcut; anything else meets the stack (and its netfilter). */
	if (!weft_in_network(cfg, ip->daddr))
		goto stack;

	struct bpf_fib_lookup fib = {};
	weft_fib4_init(&fib, ip, skb->ingress_ifindex);
	__u32 neigh = cfg->flags & WEFT_CFG_RX_NEIGH;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), neigh ? BPF_FIB_LOOKUP_SKIP_NEIGH : 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		goto stack;
	if (fib.ifindex == skb->ingress_ifindex)
		goto stack;	/* not for a local pod: the stack decides */
	if ((cfg->flags & WEFT_CFG_RX_PEER) && rc == BPF_FIB_LKUP_RET_SUCCESS) {
		__u32 daddr = ip->daddr;
		struct weft_endpoint *ep = weft_endpoints.lookup(&daddr);
		/* The kernel's neighbour entry (fib.dmac) vouches for the learnt endpoint. */
		if (ep && weft_mac_eq(ep->mac, fib.dmac)) {
			if (cfg->flags & WEFT_CFG_TTL_DEC)
				weft_ttl_dec(ip);
			weft_set_macs(eth, ep->mac, ep->bridge_mac);
			weft_count(WEFT_CNT_RX_PEER, 1);
			return bpf_redirect_peer(ep->ifindex, 0);
		}
	}
	if (cfg->flags & WEFT_CFG_TTL_DEC)
		weft_ttl_dec(ip);
	return weft_fib_redirect(eth, &fib, neigh, rc);

stack:
	weft_count(WEFT_CNT_RX_STACK, 1);
	return TC_ACT_OK;
}
