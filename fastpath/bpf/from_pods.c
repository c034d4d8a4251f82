/* weft_from_pods: tc INGRESS of the pod bridge (cni0).
 *
 * Pod traffic routed by the node reaches cni0's ingress (frames addressed to the bridge's own MAC).
 * Traffic for a peer's subnet is encapsulated here and redirected straight to flannel.<VNI>'s
 * egress, skipping the IP forwarding path; the TTL is decremented as forwarding would. Everything
 * else (local, outside the Network, TTL expiring, bigger than the overlay MTU (GSO: a segment),
 * no peer entry) follows the normal stack; a miss is counted.
 */
#include "common.h"

int weft_from_pods(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct weft_config *cfg = weft_cfg();
	if (!cfg || !cfg->vxlan_ifindex || !(cfg->flags & WEFT_CFG_PODS_REDIRECT))
		return TC_ACT_OK;
	struct ethhdr *eth = weft_frame(skb);
	if (!eth)
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);

	struct weft_peer *peer = NULL;
	int rc = weft_peer_of(cfg, ip->daddr, &peer);
	if (rc == WEFT_ENCAP_PASS)
		return TC_ACT_OK;
	if (rc == WEFT_ENCAP_MISS || !peer) {
		weft_count(WEFT_CNT_MAP_MISS, 1);
		weft_count(WEFT_CNT_PODS_STACK, 1);
		return TC_ACT_OK;
	}
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
	weft_count(WEFT_CNT_TX_PACKETS, weft_segs(skb));
	weft_count(WEFT_CNT_TX_BYTES, skb->len);
	weft_count(WEFT_CNT_PODS_REDIRECT, 1);
	return bpf_redirect(cfg->vxlan_ifindex, 0);
}
