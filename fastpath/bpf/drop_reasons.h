/* Why a weft program dropped a packet. Every TC_ACT_SHOT goes through weft_drop(reason), which
 * bumps weft_drops[reason] (per-CPU; GSO packets count their segments on receive). Mirrored by
 * fastpath.bpf.DropReason (checked by a test).
 *
 * 1-6: sending (to_overlay, from_pods). 7-17: receiving: from_underlay (the underlay interface's
 * ingress, every datagram to our VXLAN port lands in exactly one of 7-17 or in
 * weft_counters[UNDERLAY_PASSED]) and from_overlay (flannel.N ingress: what reached the VXLAN
 * socket some other way, e.g. a local pod sending to its node's port). 18-22: hostgw_guard (host-gw's
 * source guard on the underlay interface's ingress: every IPv4 packet with a source in the Network
 * lands in exactly one of 18-22 or in weft_counters[HOSTGW_PASSED]). */
#ifndef WEFT_DROP_REASONS_H
#define WEFT_DROP_REASONS_H

enum weft_drop_reason {
	WEFT_DROP_NONE = 0,
	WEFT_DROP_SHORT = 1,		/* frame too short for Ethernet + IPv4 headers */
	WEFT_DROP_NOT_IPV4 = 2,		/* non-IPv4 frame routed into the VXLAN device (IPv6 on a node without IPv6) */
	WEFT_DROP_NOT_OVERLAY = 3,	/* IPv4 (IPv6) outside the Network (IPv6Network) routed into the VXLAN device */
	WEFT_DROP_NO_PEER = 4,		/* in the Network, but no peer holds that subnet */
	WEFT_DROP_TUNNEL_KEY = 5,	/* bpf_skb_set_tunnel_key failed; on receive: no tunnel key */
	WEFT_DROP_NO_CONFIG = 6,	/* weft_config not readable */
	WEFT_DROP_FRAGMENT = 7,		/* a fragmented datagram to our port (its first fragment) */
	WEFT_DROP_MALFORMED = 8,	/* outer IPv4/UDP: IHL not 5, bad header checksum, lengths that disagree */
	WEFT_DROP_UNKNOWN_PEER = 9,	/* outer source is no peer's PublicIP */
	WEFT_DROP_TRUNCATED = 10,	/* too short for VXLAN + inner Ethernet + inner IPv4 (its total length) */
	WEFT_DROP_BAD_VXLAN = 11,	/* VXLAN flags other than I, or reserved bits set */
	WEFT_DROP_WRONG_VNI = 12,	/* a VNI other than ours */
	WEFT_DROP_WRONG_MAC = 13,	/* inner destination MAC not our VtepMAC, or inner source MAC ours */
	WEFT_DROP_INNER_NOT_IPV4 = 14,	/* inner frame not IPv4 (over the IPv6 underlay: not IPv6) */
	WEFT_DROP_ECN = 15,		/* outer CE on a not-ECT inner packet (RFC 6040: drop) */
	WEFT_DROP_SPOOFED_SRC = 16,	/* inner source outside the subnet of the peer that sent it */
	WEFT_DROP_GSO_BATCH = 17,	/* passed, but shared a UDP GSO skb with a datagram that failed */
	WEFT_DROP_HOSTGW_OWN_SUBNET = 18,	/* source in this node's own subnet, arriving from the underlay */
	WEFT_DROP_HOSTGW_NO_PEER = 19,	/* source in the Network, but no lease holds it */
	WEFT_DROP_HOSTGW_NOT_ROUTED = 20,	/* the lease holder's PublicIP is not a neighbour on this interface */
	WEFT_DROP_HOSTGW_NO_NEIGH = 21,	/* the lease holder's MAC is not resolved (no valid neighbour entry) */
	WEFT_DROP_HOSTGW_SPOOFED = 22,	/* the frame's source MAC is not the lease holder's */
	WEFT_DROP_MAX = 23,
};

#endif
