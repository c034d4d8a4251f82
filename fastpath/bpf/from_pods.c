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

/* The encapsulated packet leaves through the VXLAN device, counted. */
static __always_inline int weft_pods_sent(struct __sk_buff *skb, struct weft_config *cfg)
{
	weft_count(WEFT_CNT_TX_PACKETS, weft_segs(skb));
	weft_count(WEFT_CNT_TX_BYTES, skb->len);
	weft_count(WEFT_CNT_PODS_REDIRECT, 1);
	return bpf_redirect(cfg->vxlan_ifindex, 0);
}

static __always_inline int weft_pods6(struct __sk_buff *skb)
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
	if (weft_pods_missed(rc, peer))
		return TC_ACT_OK;
	if (ip6->hop_limit <= 1 || ip6->nexthdr == 0 || weft_too_big6(skb, cfg, ip6)) {
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

int weft_from_pods(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return skb->protocol == bpf_htons(ETH_P_IPV6) ? weft_pods6(skb) : TC_ACT_OK;
	struct weft_config *cfg = weft_pods_cfg();
	if (!cfg)
		return TC_ACT_OK;
	struct ethhdr *eth = weft_frame(skb);
	if (!eth)
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);

	struct weft_peer *peer = NULL;
	int rc = weft_peer_of(cfg, ip->daddr, &peer);
	if (weft_pods_missed(rc, peer))
		return TC_ACT_OK;
	/* Leave to the stack what it must answer with ICMP: expiring TTL, too big to send (GSO by
	 * its segments); and IP options, which forwarding may have to process. */
	if (ip->ttl <= 1 || ip->ihl != 5 || weft_too_big(skb, cfg, ip)) {
		weft_count(WEFT_CNT_PODS_STACK, 1);
		return TC_ACT_OK;
	}
	rc = weft_encap(skb, cfg, peer, eth);
	if (rc < 0)
		return weft_drop(-rc);
	if (cfg->flags & WEFT_CFG_TTL_DEC)
		weft_ttl_dec(ip);
	return weft_pods_sent(skb, cfg);
}
