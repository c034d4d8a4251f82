/* Why a weft program dropped a packet. Every TC_ACT_SHOT goes through weft_drop(reason), which
 * bumps weft_drops[reason] (per-CPU). Mirrored by fastpath.bpf.DropReason (checked by a test). */
#ifndef WEFT_DROP_REASONS_H
#define WEFT_DROP_REASONS_H

enum weft_drop_reason {
	WEFT_DROP_NONE = 0,
	WEFT_DROP_SHORT = 1,		/* frame too short for Ethernet + IPv4 headers */
	WEFT_DROP_NOT_IPV4 = 2,		/* non-IPv4 frame routed into the VXLAN device */
	WEFT_DROP_NOT_OVERLAY = 3,	/* IPv4 outside the Network routed into the VXLAN device */
	WEFT_DROP_NO_PEER = 4,		/* in the Network, but no peer holds that subnet */
	WEFT_DROP_TUNNEL_KEY = 5,	/* bpf_skb_set_tunnel_key failed */
	WEFT_DROP_NO_CONFIG = 6,	/* weft_config not readable */
	WEFT_DROP_MAX = 7,
};

#endif
