/* Key and value structs of weft's BPF maps, and the counter indexes.
 *
 * Mirrored in Python by fastpath/bpf/__init__.py (ctypes); tests/test_bpf_programs.py checks that
 * sizes, offsets and enum values agree, so change both together.
 */
#ifndef WEFT_TYPES_H
#define WEFT_TYPES_H

/* weft_peers key (LPM trie): prefixlen must come first. */
struct weft_peer_key {
	__u32 prefixlen;	/* bits of addr that count: the peer subnet's length */
	__u32 addr;		/* the peer subnet's network address, network byte order */
};

/* weft_peers value: where a peer's subnet is reached. */
struct weft_peer {
	__u32 remote_ipv4;	/* the peer's PublicIP, host byte order (as bpf_tunnel_key wants it) */
	__u32 vni;		/* VXLAN network identifier to send with */
	__u8 vtep_mac[6];	/* the peer's VtepMAC: inner destination MAC */
	__u16 flags;		/* reserved, 0 */
};

/* An IPv6 address, network byte order (weft_peer_ips6 key). */
struct weft_ip6 {
	__u32 a[4];
};

/* weft_peers6 key (LPM trie): an IPv6 peer subnet (the IPv6 side of a dual-stack lease). */
struct weft_peer6_key {
	__u32 prefixlen;	/* bits of addr that count: the peer's IPv6 subnet length */
	__u8 addr[16];		/* the subnet's network address, network byte order */
};

/* weft_peers6 value: where a peer's IPv6 subnet is reached (VXLAN over the IPv6 underlay, as
 * flannel's flannel-v6.<VNI> sends it). */
struct weft_peer6 {
	__u32 remote_ipv6[4];	/* the peer's PublicIPv6, network byte order (as bpf_tunnel_key wants it) */
	__u32 vni;		/* VXLAN network identifier to send with */
	__u8 vtep_mac[6];	/* the peer's IPv6 VtepMAC (BackendV6Data): inner destination MAC */
	__u16 flags;		/* WEFT_PEER_* */
};

/* weft_peers and weft_peers6 value flags */
#define WEFT_PEER_LOCAL		(1U << 0)	/* our own subnet: never encapsulated, never a miss */

/* weft_endpoints key: a local pod's IPv4 address (network byte order); value: */
struct weft_endpoint {
	__u32 ifindex;		/* host side of the pod's veth (a port of the pod bridge) */
	__u8 mac[6];		/* the pod's MAC */
	__u8 bridge_mac[6];	/* the pod bridge's MAC: the pod's gateway, our inner source MAC */
};

/* weft_config[0]: this node's runtime settings, written by the control plane. */
struct weft_config {
	__u8 vtep_mac[6];	/* our VtepMAC: inner source MAC */
	__u16 vxlan_port;	/* the UDP port VXLAN arrives on (Backend.Port), network byte order */
	__u32 vxlan_ifindex;	/* the external (collect_md) VXLAN device */
	__u32 local_ipv4;	/* outer source address, host byte order; 0: the route's */
	__u32 network;		/* the cluster Network, network byte order */
	__u32 netmask;		/* its mask, network byte order; zero: no IPv4 (IPv6-only network) */
	__u32 mtu;		/* the VXLAN device's MTU */
	__u32 flags;		/* WEFT_CFG_* */
	__u32 vni;		/* our VNI (Backend.VNI): the only one received */
	__u32 public_ipv4;	/* our PublicIP, host byte order (peers send to it; may differ behind NAT) */
	/* IPv6 (dual-stack); netmask6 all zero: this node carries no IPv6 */
	__u8 vtep_mac6[6];	/* our IPv6 VtepMAC (BackendV6Data): inner MACs of IPv6 frames */
	__u16 mtu6;		/* IPv6 packets' overlay MTU: mtu - 20 (the outer header is IPv6) */
	__u32 network6[4];	/* IPv6Network, network byte order */
	__u32 netmask6[4];	/* its mask, network byte order */
	__u32 local_ipv6[4];	/* outer source address, network byte order; 0: the route's */
	__u32 public_ipv6[4];	/* our PublicIPv6, network byte order */
	__u32 underlay_ifindex;	/* host-gw/ebpf: the underlay interface pod traffic to peers leaves by */
};

/* weft_config.flags: runtime switches (never cflags). */
#define WEFT_CFG_RX_REDIRECT	(1U << 0)	/* from_overlay: FIB lookup + redirect to the pod bridge */
#define WEFT_CFG_RX_NEIGH	(1U << 1)	/* from_overlay: always bpf_redirect_neigh (kernel keeps neigh fresh) */
#define WEFT_CFG_TTL_DEC	(1U << 2)	/* decrement the inner TTL where the stack is bypassed */
#define WEFT_CFG_PODS_REDIRECT	(1U << 3)	/* from_pods: encapsulate and redirect (else: stack) */
#define WEFT_CFG_RX_PEER	(1U << 4)	/* from_overlay: known endpoint -> bpf_redirect_peer into the pod */
#define WEFT_CFG_OUTER_CSUM	(1U << 5)	/* outer UDP checksum, as the kernel device (udpcsum is its default) */
#define WEFT_CFG_RX_CHECK	(1U << 6)	/* from_overlay: tunnel source must hold the inner source (else drop) */
#define WEFT_CFG_POD_PORT	(1U << 7)	/* from_pod_port: encapsulate on the pod's veth, before the bridge */

/* Indexes of weft_counters (per-CPU u64). Packets count GSO segments. */
enum weft_counter {
	WEFT_CNT_TX_PACKETS = 0,	/* encapsulated toward a peer */
	WEFT_CNT_TX_BYTES = 1,
	WEFT_CNT_RX_PACKETS = 2,	/* decapsulated, arriving on the VXLAN device */
	WEFT_CNT_RX_BYTES = 3,
	WEFT_CNT_RX_REDIRECT = 4,	/* received and redirected straight to the pod bridge */
	WEFT_CNT_RX_STACK = 5,		/* received and left to the stack */
	WEFT_CNT_MAP_MISS = 6,		/* a destination in the Network with no weft_peers entry */
	WEFT_CNT_PODS_REDIRECT = 7,	/* from_pods: encapsulated and redirected, stack bypassed */
	WEFT_CNT_PODS_STACK = 8,	/* from_pods: IPv4 in the Network left to the stack (TTL, MTU, miss) */
	WEFT_CNT_RX_PEER = 9,		/* received and redirected into the pod's namespace (redirect_peer) */
	WEFT_CNT_UNDERLAY_PASSED = 10,	/* from_underlay: VXLAN datagrams that passed every check */
	WEFT_CNT_HOSTGW_PASSED = 11,	/* hostgw_guard: packets from a Network source that passed (by segment) */
	WEFT_CNT_MAX = 12,
};

#endif
