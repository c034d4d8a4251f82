/* weft_to_overlay: tc EGRESS of flannel.<VNI> (VXLAN, external/collect_md mode).
 *
 * Everything the stack routes into the overlay arrives here: the node's one route for the whole
 * Network points at this NOARP device, so host-originated traffic (and pod traffic when
 * weft_from_pods is not attached) needs no per-peer route, neighbour or FDB entry. Frames that
 * weft_from_pods already prepared carry a tunnel key and pass untouched.
 * IPv6 (dual-stack: the node's one IPv6 route, the IPv6Network via this device) in weft_to_overlay6:
 * over the IPv6 underlay to the peer of weft_peers6. IPv6 outside the Network (the device's own
 * multicast listener reports) is dropped as NOT_OVERLAY; on a node without IPv6, NOT_IPV4.
 * On an IPv6-only node (IPv4 netmask zero) no IPv4 route points here; IPv4 that arrives anyway is
 * NOT_OVERLAY, never a peer miss.
 */
#include "common.h"

static __always_inline int weft_to_overlay6(struct __sk_buff *skb, struct weft_config *cfg)
{
	struct bpf_tunnel_key have;
	if (bpf_skb_get_tunnel_key(skb, &have, sizeof(have), BPF_F_TUNINFO_IPV6) == 0)
		return TC_ACT_OK;	/* prepared (and counted) by weft_from_pods */
	if (!cfg->netmask6[0])
		return weft_drop(WEFT_DROP_NOT_IPV4);
	struct ethhdr *eth = weft_frame6(skb);
	if (!eth)
		return weft_drop(WEFT_DROP_SHORT);
	struct ipv6hdr *ip6 = (void *)(eth + 1);

	struct weft_peer6 *peer = NULL;
	int rc = weft_peer6_of(cfg, (const __u32 *)&ip6->daddr, &peer);
	if (rc == WEFT_ENCAP_PASS)
		return weft_drop(WEFT_DROP_NOT_OVERLAY);
	if (rc == WEFT_ENCAP_MISS || !peer) {
		weft_count(WEFT_CNT_MAP_MISS, 1);
		return weft_drop(WEFT_DROP_NO_PEER);
	}
	rc = weft_encap6(skb, cfg, peer, eth);
	if (rc < 0)
		return weft_drop(-rc);
	weft_count(WEFT_CNT_TX_PACKETS, weft_segs(skb));
	weft_count(WEFT_CNT_TX_BYTES, skb->len);
	return TC_ACT_OK;
}

int weft_to_overlay(struct __sk_buff *skb)
{
	struct bpf_tunnel_key have;
	if (bpf_skb_get_tunnel_key(skb, &have, sizeof(have), 0) == 0)
		return TC_ACT_OK;	/* prepared (and counted) by weft_from_pods */

	struct weft_config *cfg = weft_cfg();
	if (!cfg)
		return weft_drop(WEFT_DROP_NO_CONFIG);
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return skb->protocol == bpf_htons(ETH_P_IPV6) ? weft_to_overlay6(skb, cfg)
							      : weft_drop(WEFT_DROP_NOT_IPV4);
	struct ethhdr *eth = weft_frame(skb);
	if (!eth)
		return weft_drop(WEFT_DROP_SHORT);
	struct iphdr *ip = (void *)(eth + 1);

	struct weft_peer *peer = NULL;
	int rc = weft_peer_of(cfg, ip->daddr, &peer);
	if (rc == WEFT_ENCAP_PASS)
		return weft_drop(WEFT_DROP_NOT_OVERLAY);
	if (rc == WEFT_ENCAP_MISS || !peer) {
		weft_count(WEFT_CNT_MAP_MISS, 1);
		return weft_drop(WEFT_DROP_NO_PEER);
	}
	rc = weft_encap(skb, cfg, peer, eth);
	if (rc < 0)
		return weft_drop(-rc);
	weft_count(WEFT_CNT_TX_PACKETS, weft_segs(skb));
	weft_count(WEFT_CNT_TX_BYTES, skb->len);
	return TC_ACT_OK;
}
