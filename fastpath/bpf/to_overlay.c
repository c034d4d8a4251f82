/* weft_to_overlay: tc EGRESS of flannel.<VNI> (VXLAN, external/collect_md mode).
 *
 * Everything the stack routes into the overlay arrives here: the node's one route for the whole
 * Network points at this NOARP device, so host-originated traffic (and pod traffic when
 * weft_from_pods is not attached) needs no per-peer route, neighbour or FDB entry. Frames that
 * weft_from_pods already prepared carry a tunnel key and pass untouched.
 */
#include "common.h"

int weft_to_overlay(struct __sk_buff *skb)
{
	struct bpf_tunnel_key have;
	if (bpf_skb_get_tunnel_key(skb, &have, sizeof(have), 0) == 0)
		return TC_ACT_OK;	/* prepared (and counted) by weft_from_pods */

	struct weft_config *cfg = weft_cfg();
	if (!cfg)
		return weft_drop(WEFT_DROP_NO_CONFIG);
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return weft_drop(WEFT_DROP_NOT_IPV4);
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
