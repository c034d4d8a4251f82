/* weft_from_pods: tc INGRESS of the pod bridge (cni0).
 *
 * Pod traffic routed by the node reaches cni0's ingress (frames addressed to the bridge's own MAC).
 * Traffic for a peer's subnet is encapsulated here and redirected straight to flannel.<VNI>'s
 * egress, skipping the IP forwarding path; the TTL is decremented as forwarding would. Everything
 * else (local, outside the Network, TTL expiring, bigger than the overlay MTU (GSO: a segment),
 * no peer entry) follows the normal stack; a miss is counted.
 * IPv6 (dual-stack) takes the same steps in weft_pods6: a peer's IPv6 subnet (weft_peers6) goes
 * over the IPv6 underlay; hop limit 1, a hop-by-hop header (forwarding must read it), too big for
 * the IPv6 overlay MTU or a miss: the stack. Neighbour discovery (the pods resolve the bridge's
 * IPv6 gateway address like its IPv4 one) is link-local or multicast, never in the Network: the
 * stack answers it.
 * On an IPv6-only node (weft_config's IPv4 netmask zero) IPv4 is nobody's overlay traffic: it
 * follows the stack untouched and uncounted.
 *
 * weft_from_pod_port: tc INGRESS of each pod's host-side veth (a port of cni0). The same steps,
 * taken before the bridge: a frame there has not yet paid for the bridge, its netfilter hook
 * (br_netfilter: conntrack) and cni0's receive. It takes only what cni0's ingress would have been
 * handed for a learnt pod: a frame to the pod's gateway (destination MAC = the bridge's) from the
 * pod's own address (weft_endpoints: source IP -> this port). Anything else (switched to another
 * pod, a source not learnt yet, another port's address) goes on to the bridge untouched, and
 * weft_from_pods still sees what the bridge passes up. WEFT_CFG_POD_PORT off: all of it does.
 */
#include "common.h"

/* The pod-facing program's steps that both families share. */
static __always_inline struct weft_config *weft_pods_cfg(void)
{
	struct weft_config *cfg = weft_cfg();
	if (!cfg || !cfg->vxlan_ifindex || !(cfg->flags & WEFT_CFG_PODS_REDIRECT))
		return NULL;
	return cfg;
}

/* After a peer lookup: 1 when the packet goes to the stack (not the overlay's, or no peer: a
 * miss, counted), 0 when it goes on toward the peer. */
static __always_inline int weft_pods_missed(int rc, const void *peer)
{
	if (rc == WEFT_ENCAP_PASS)
		return 1;
	if (rc == WEFT_ENCAP_MISS || !peer) {
		weft_count(WEFT_CNT_MAP_MISS, 1);
		weft_count(WEFT_CNT_PODS_STACK, 1);
		return 1;
	}
	return 0;
}

/* The peer a pod's IPv4 packet goes to past forwarding, or NULL when the stack keeps it: not
 * overlay traffic; no peer (a miss); what the stack must answer with ICMP: expiring TTL, too big to
 * send (GSO by its segments); and IP options, which forwarding may have to process. Those are
 * counted when ``count`` (a program on a pod's port says 0: the bridge's program sees the packet
 * next and counts it). Also host-gw/ebpf's (hostgw.c, the same compile). */
static __always_inline struct weft_peer *weft_pods_peer(struct __sk_buff *skb, struct weft_config *cfg,
							 struct iphdr *ip, int count)
{
	struct weft_peer *peer = NULL;
	int rc = weft_peer_of(cfg, ip->daddr, &peer);
	if (rc != WEFT_ENCAP_DONE && !count)
		return NULL;
	if (weft_pods_missed(rc, peer))
		return NULL;
	if (ip->ttl <= 1 || ip->ihl != 5 || weft_too_big(skb, cfg, ip)) {
		if (count)
			weft_count(WEFT_CNT_PODS_STACK, 1);
		return NULL;
	}
	return peer;
}

/* The encapsulated packet leaves through the VXLAN device, counted. */
static __always_inline int weft_pods_sent(struct __sk_buff *skb, struct weft_config *cfg)
{
	weft_count(WEFT_CNT_TX_PACKETS, weft_segs(skb));
	weft_count(WEFT_CNT_TX_BYTES, skb->len);
	weft_count(WEFT_CNT_PODS_REDIRECT, 1);
	return bpf_redirect(cfg->vxlan_ifindex, 0);
}

/* ``count`` 0 (a pod's port): what goes to the stack is left uncounted, the bridge's program
 * sees it next and counts it. */
static __always_inline int weft_pods6(struct __sk_buff *skb, int count)
{
	struct weft_config *cfg = weft_pods_cfg();
	if (!cfg)
		return TC_ACT_OK;
	struct ethhdr *eth = weft_frame6(skb);
	if (!eth)
		return TC_ACT_OK;
	struct ipv6hdr *ip6 = (void *)(eth + 1);

	struct weft_peer6 *peer = NULL;
	int rc = weft_peer6_of(cfg, (const __u32 *)&ip6->daddr, &peer);
	if (rc != WEFT_ENCAP_DONE && !count)
		return TC_ACT_OK;
	if (weft_pods_missed(rc, peer))
		return TC_ACT_OK;
	if (ip6->hop_limit <= 1 || ip6->nexthdr == 0 || weft_too_big6(skb, cfg, ip6)) {
		if (count)
			weft_count(WEFT_CNT_PODS_STACK, 1);
		return TC_ACT_OK;
	}
	rc = weft_encap6(skb, cfg, peer, eth);
	if (rc < 0)
		return weft_drop(-rc);
	if (cfg->flags & WEFT_CFG_TTL_DEC)
		ip6->hop_limit--;	/* no header checksum in IPv6 */
	return weft_pods_sent(skb, cfg);
}

static __always_inline int weft_pods4(struct __sk_buff *skb, int count)
{
	struct weft_config *cfg = weft_pods_cfg();
	if (!cfg)
		return TC_ACT_OK;
	struct ethhdr *eth = weft_frame(skb);
	if (!eth)
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);

	struct weft_peer *peer = weft_pods_peer(skb, cfg, ip, count);
	if (!peer)
		return TC_ACT_OK;
	int rc = weft_encap(skb, cfg, peer, eth);
	if (rc < 0)
		return weft_drop(-rc);
	if (cfg->flags & WEFT_CFG_TTL_DEC)
		weft_ttl_dec(ip);
	return weft_pods_sent(skb, cfg);
}

int weft_from_pods(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return skb->protocol == bpf_htons(ETH_P_IPV6) ? weft_pods6(skb, 1) : TC_ACT_OK;
	return weft_pods4(skb, 1);
}

/* Whether a frame on a pod's port is that learnt pod's, to its gateway. */
static __always_inline int weft_port_owns(struct __sk_buff *skb, struct weft_endpoint *ep, struct ethhdr *eth)
{
	return ep && ep->ifindex == skb->ingress_ifindex && weft_mac_eq(eth->h_dest, ep->bridge_mac);
}

/* The IPv4 frame on a pod's port when it is that learnt pod's own, to its gateway; else NULL.
 * Also host-gw/ebpf's (hostgw.c, the same compile). */
static __always_inline struct ethhdr *weft_port_frame4(struct __sk_buff *skb)
{
	struct ethhdr *eth = weft_frame(skb);
	if (!eth)
		return NULL;
	__u32 saddr = ((struct iphdr *)(eth + 1))->saddr;
	return weft_port_owns(skb, weft_endpoints.lookup(&saddr), eth) ? eth : NULL;
}

int weft_from_pod_port(struct __sk_buff *skb)
{
	struct weft_config *cfg = weft_cfg();
	if (!cfg || !(cfg->flags & WEFT_CFG_POD_PORT))
		return TC_ACT_OK;	/* switched off: everything goes on to the bridge (and cni0's program) */
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return weft_port_frame4(skb) ? weft_pods4(skb, 0) : TC_ACT_OK;
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ethhdr *eth = weft_frame6(skb);
		if (!eth)
			return TC_ACT_OK;
		struct weft_ip6 saddr = {};
		__builtin_memcpy(saddr.a, &((struct ipv6hdr *)(eth + 1))->saddr, 16);
		if (!weft_port_owns(skb, weft_endpoints6.lookup(&saddr), eth))
			return TC_ACT_OK;
		return weft_pods6(skb, 0);
	}
	return TC_ACT_OK;
}
