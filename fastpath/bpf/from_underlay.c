/* weft_from_underlay: tc INGRESS of the underlay interface (-iface, e.g. eth0).
 *
 * Every UDP datagram to our VXLAN port is checked here, before the kernel's IP, UDP and VXLAN code
 * spends anything on it, and lands in exactly one counter: weft_counters[UNDERLAY_PASSED], or
 * weft_drops[reason] for the first check it fails, in this order:
 *
 *   FRAGMENT      the first fragment of a fragmented datagram (weft and flannel never send one:
 *                 the overlay MTU keeps every outer packet within the underlay MTU)
 *   MALFORMED     outer IPv4/UDP header: IHL not 5, bad header checksum, total length beyond the
 *                 frame or below IPv4 + UDP, UDP length not the IPv4 payload's
 *   UNKNOWN_PEER  outer source is no peer's PublicIP (one hash lookup: O(1) per datagram)
 *   TRUNCATED     too short for VXLAN + inner Ethernet + inner IPv4, or an inner total length
 *                 beyond the datagram (or below the inner header)
 *   BAD_VXLAN     VXLAN flags other than I, or reserved bits set (what the kernel driver refuses)
 *   WRONG_VNI     a VNI other than ours
 *   WRONG_MAC     inner destination MAC not our VtepMAC, or inner source MAC ours (a loop)
 *   INNER_NOT_IPV4  inner EtherType not IPv4, or inner version not 4, or IHL below 5
 *   ECN           outer CE on a not-ECT inner packet (RFC 6040; the kernel drops these too)
 *   SPOOFED_SRC   inner source outside the subnet of the peer with that outer source (LPM lookup)
 *   GSO_BATCH     passed, but arrived in one UDP GSO skb with a datagram that failed (see below)
 *
 * "A datagram to our port": IPv4 for this host (not PACKET_OTHERHOST, which the kernel drops
 * before IP), UDP, not a later fragment (no UDP header: it expires in reassembly), destination
 * port = Backend.Port, destination our interface address or PublicIP (any address outside the
 * Network when the interface has none), or a link-layer broadcast/multicast. Anything else passes
 * untouched and uncounted: traffic this node forwards, a pod's own UDP port 8472. A frame too short to show its UDP port
 * is left to the kernel, which drops it (Ip InHdrErrors / InTruncatedPkts, Udp InErrors).
 * GSO: a tunnel GSO or GRO packet (one VXLAN header; its segments' headers copies of the first's)
 * is checked once and counts its segments; a UDP GSO batch (several VXLAN datagrams in one skb, as
 * UDP_SEGMENT sends arrive over a veth) is checked and counted datagram by datagram.
 * Passed datagrams meet the kernel's UDP checksum check next (Udp InCsumErrors), then the VXLAN
 * device and weft_from_overlay.
 *
 * IPv6 underlay (dual-stack: flannel-v6.<VNI> peers send VXLAN between PublicIPv6 addresses): the same
 * checks in the same order and counters (weft_underlay6), with the outer IPv6 header: FRAGMENT is a
 * first fragment (fragment header, offset 0, UDP to our port); MALFORMED: a payload length beyond
 * the frame, or a UDP length not the payload's (only UDP directly after the IPv6 header is ours;
 * other extension headers pass untouched: a datagram behind them reaches the VXLAN socket only
 * through weft_from_overlay's check); UNKNOWN_PEER: source not in weft_peer_ips6; WRONG_MAC against
 * our IPv6 VtepMAC; INNER_NOT_IPV4: inner frame not IPv6 (flannel never mixes families);
 * TRUNCATED: an inner payload length beyond the datagram; SPOOFED_SRC: inner source outside the
 * IPv6 subnet (weft_peers6) of the peer with that PublicIPv6.
 *
 * IPv6-only (weft_config's IPv4 netmask zero): IPv4 datagrams pass untouched and uncounted, as IPv6
 * ones do on a node without IPv6; one that reaches the VXLAN socket meets weft_from_overlay's check,
 * which drops it (no IPv4 sender is a peer: weft_peer_ips is empty).
 */
#include "common.h"

#define WEFT_IP_MF		0x2000
#define WEFT_IP_OFFSET		0x1FFF
#define WEFT_VXLAN_I		0x08000000	/* the only VXLAN flag flannel sends */
#define WEFT_PACKET_OTHERHOST	3
#define WEFT_UDP_HLEN		8
#define WEFT_VXLAN_HLEN		8
#define WEFT_OUTER_LEN		(ETH_HLEN + 20 + WEFT_UDP_HLEN)			/* 42 */
#define WEFT_OUTER6_LEN		(ETH_HLEN + WEFT_IP6_HLEN + WEFT_UDP_HLEN)		/* 62 */
#define WEFT_INNER_MIN		(WEFT_VXLAN_HLEN + ETH_HLEN + 20)		/* 42 */
#define WEFT_MAX_BATCH		64	/* datagrams of a UDP GSO batch checked one by one (more: MALFORMED) */

struct weft_udphdr {
	__be16 source;
	__be16 dest;
	__be16 len;
	__be16 check;
};

/* The 20-byte header's ones' complement sum is 0xffff when its checksum is right. */
static __always_inline int weft_ip_csum_ok(const struct iphdr *ip)
{
	const __u16 *w = (const void *)ip;
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return sum == 0xffff;
}

/* Whether a datagram to daddr would reach our VXLAN socket rather than be forwarded. */
static __always_inline int weft_to_us(struct __sk_buff *skb, struct weft_config *cfg, __u32 daddr)
{
	if (skb->pkt_type != 0)	/* PACKET_BROADCAST, PACKET_MULTICAST */
		return 1;
	__u32 d = bpf_ntohl(daddr);
	if (cfg->local_ipv4)
		return d == cfg->local_ipv4 || d == cfg->public_ipv4;
	return !weft_in_network(cfg, daddr);
}

/* The first `len` bytes in the linear area; NULL when the frame is shorter (or the pull fails). */
static __always_inline void *weft_linear(struct __sk_buff *skb, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (data + len <= end)
		return data;
	if (len > skb->len || bpf_skb_pull_data(skb, len) < 0)
		return NULL;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	return data + len <= end ? data : NULL;
}

/* XOR-OR of two MACs: 0 when they are equal. */
static __always_inline __u32 weft_mac_diff(const __u8 *a, const __u8 *b)
{
	return (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) | (a[5] ^ b[5]);
}

/* One VXLAN datagram's payload: VXLAN header + inner Ethernet + inner IPv4 header, at `off` in the
 * frame, `len` bytes long (its share of the UDP payload). 0 or a drop reason.
 * Each check is one branch on an XOR-OR of packet bytes where it can be (not a chain of && and ||):
 * the verifier walks every path of every datagram of a GSO batch (up to WEFT_MAX_BATCH), so the
 * paths through one datagram decide how long the program takes to load.
 * The 42 bytes are copied to the stack two bytes in, so that the inner IPv4 header is 4-byte
 * aligned (the verifier wants aligned stack access): VXLAN at 2, inner Ethernet at 10, IPv4 at 24. */
static __always_inline __u32 weft_check_datagram(struct __sk_buff *skb, struct weft_config *cfg,
						 __u32 off, __u32 len, __u8 outer_tos, __u32 remote)
{
	if (len < WEFT_INNER_MIN)
		return WEFT_DROP_TRUNCATED;
	__u32 raw[11] = {};
	__u8 *b = (__u8 *)raw;
	if (bpf_skb_load_bytes(skb, off, b + 2, WEFT_INNER_MIN) < 0)
		return WEFT_DROP_TRUNCATED;
	if ((b[2] ^ (WEFT_VXLAN_I >> 24)) | b[3] | b[4] | b[5] | b[9])
		return WEFT_DROP_BAD_VXLAN;
	if ((((__u32)b[6] << 16) | ((__u32)b[7] << 8) | b[8]) ^ cfg->vni)
		return WEFT_DROP_WRONG_VNI;
	if (weft_mac_diff(b + 10, cfg->vtep_mac))
		return WEFT_DROP_WRONG_MAC;
	if (!weft_mac_diff(b + 16, cfg->vtep_mac))
		return WEFT_DROP_WRONG_MAC;
	if ((*(__u16 *)(b + 22) ^ bpf_htons(ETH_P_IP)) | ((b[24] & 0xF0) ^ 0x40))
		return WEFT_DROP_INNER_NOT_IPV4;
	__u32 ihl4 = (b[24] & 15) * 4;
	if (ihl4 < 20)
		return WEFT_DROP_INNER_NOT_IPV4;
	__u32 itot = bpf_ntohs(*(__u16 *)(b + 26));
	if (itot < ihl4 || itot + WEFT_VXLAN_HLEN + ETH_HLEN > len)
		return WEFT_DROP_TRUNCATED;
	if (!(((outer_tos & 3) ^ 3) | (b[25] & 3)))
		return WEFT_DROP_ECN;
	return weft_check_source(raw[9], remote);	/* inner saddr: b + 36 */
}

static __always_inline __u32 weft_check_datagram6(struct __sk_buff *skb, struct weft_config *cfg,
						  __u32 off, __u32 len, __u8 outer_ecn, const __u32 *remote);

/* A UDP GSO batch (UDP_SEGMENT sends: vxlan/fastpath peers, a local sender over a veth) carries
 * several VXLAN datagrams, gso bytes of UDP payload each: each is checked and counted. One failing
 * datagram drops the batch (an skb goes or stays whole); its passing ones count as GSO_BATCH.
 * ``v6`` (a constant at each call: the compiler keeps one family's code) picks the outer family:
 * IPv4 from ``remote``, IPv6 from ``remote6``. */
static __always_inline int weft_check_batch(struct __sk_buff *skb, struct weft_config *cfg, __u32 payload,
					    __u32 gso, __u8 outer_tos, __u32 remote, const __u32 *remote6,
					    const int v6)
{
	__u32 n = (payload + gso - 1) / gso;
	if (n > WEFT_MAX_BATCH)
		return weft_drop_n(WEFT_DROP_MALFORMED, n);
	__u32 ok = 0, failed = 0, at = 0;
	for (__u32 k = 0; k < WEFT_MAX_BATCH; k++) {
		if (at >= payload)
			break;
		__u32 len = payload - at;
		if (len > gso)
			len = gso;
		__u32 reason = v6 ? weft_check_datagram6(skb, cfg, WEFT_OUTER6_LEN + at, len, outer_tos, remote6)
				  : weft_check_datagram(skb, cfg, WEFT_OUTER_LEN + at, len, outer_tos, remote);
		if (reason) {
			weft_drop_n(reason, 1);
			failed = 1;
		} else {
			ok++;
		}
		at += gso;
	}
	if (failed)
		return weft_drop_n(WEFT_DROP_GSO_BATCH, ok);
	weft_count(WEFT_CNT_UNDERLAY_PASSED, ok);
	return TC_ACT_OK;
}

/* Check a datagram to our port and count it (GSO: every datagram it stands for); the tc verdict. */
static __always_inline int weft_underlay(struct __sk_buff *skb, struct weft_config *cfg)
{
	__u32 segs = weft_segs(skb);
	struct ethhdr *eth = weft_linear(skb, WEFT_OUTER_LEN);
	if (!eth)
		return weft_drop_n(WEFT_DROP_MALFORMED, segs);
	struct iphdr *ip = (void *)(eth + 1);
	if (ip->frag_off & bpf_htons(WEFT_IP_MF))
		return weft_drop_n(WEFT_DROP_FRAGMENT, segs);
	if (ip->ihl != 5 || !weft_ip_csum_ok(ip))
		return weft_drop_n(WEFT_DROP_MALFORMED, segs);
	struct weft_udphdr *udp = (void *)(ip + 1);
	__u32 frame = skb->len - ETH_HLEN;
	__u32 tot = bpf_ntohs(ip->tot_len);
	__u32 ulen = bpf_ntohs(udp->len);
	/* A GRO packet beyond 64 KB (gro_ipv4_max_size raised) carries no lengths: the frame's. */
	if (skb->gso_size && frame > 0xFFFF) {
		tot = frame;
		ulen = frame - 20;
	}
	if (tot > frame || tot < 20 + WEFT_UDP_HLEN || ulen != tot - 20)
		return weft_drop_n(WEFT_DROP_MALFORMED, segs);
	__u32 saddr = ip->saddr;
	if (!weft_peer_ips.lookup(&saddr))
		return weft_drop_n(WEFT_DROP_UNKNOWN_PEER, segs);
	__u8 outer_tos = ip->tos;
	__u32 remote = bpf_ntohl(saddr);
	__u32 payload = ulen - WEFT_UDP_HLEN;

	/* GSO: a tunnel packet (a VXLAN device's, or GRO's: one VXLAN header, the inner packet spans
	 * the payload, every segment's headers copies of the first's) is checked once; a UDP GSO
	 * batch (the first inner packet ends before the first gso bytes do) datagram by datagram. */
	__u32 gso = skb->gso_size;
	if (gso && payload > gso) {
		__be16 itot = 0;
		bpf_skb_load_bytes(skb, WEFT_OUTER_LEN + WEFT_VXLAN_HLEN + ETH_HLEN + 2, &itot, sizeof(itot));
		if (bpf_ntohs(itot) + WEFT_VXLAN_HLEN + ETH_HLEN != payload)
			return weft_check_batch(skb, cfg, payload, gso, outer_tos, remote, NULL, 0);
	}
	__u32 reason = weft_check_datagram(skb, cfg, WEFT_OUTER_LEN, payload, outer_tos, remote);
	if (reason)
		return weft_drop_n(reason, segs);
	weft_count(WEFT_CNT_UNDERLAY_PASSED, segs);
	return TC_ACT_OK;
}

/* -- the IPv6 underlay -------------------------------------------------------------------------- */

#define WEFT_INNER6_MIN		(WEFT_VXLAN_HLEN + ETH_HLEN + WEFT_IP6_HLEN)	/* 62 */
#define WEFT_NEXTHDR_FRAGMENT	44

static __always_inline int weft_to_us6(struct __sk_buff *skb, struct weft_config *cfg, const __u32 *daddr)
{
	if (skb->pkt_type != 0)	/* PACKET_BROADCAST, PACKET_MULTICAST */
		return 1;
	if (cfg->local_ipv6[0] | cfg->local_ipv6[1] | cfg->local_ipv6[2] | cfg->local_ipv6[3])
		return weft_ip6_eq(daddr, cfg->local_ipv6) || weft_ip6_eq(daddr, cfg->public_ipv6);
	return !weft_in_network6(cfg, daddr);
}

/* weft_check_datagram over the IPv6 underlay: VXLAN header + inner Ethernet + inner IPv6 header at
 * `off`, `len` bytes. Copied two bytes in, so that the inner IPv6 header is 4-byte aligned on the
 * stack: VXLAN at 2, inner Ethernet at 10, IPv6 at 24 (source raw[8..11]). */
static __always_inline __u32 weft_check_datagram6(struct __sk_buff *skb, struct weft_config *cfg,
						  __u32 off, __u32 len, __u8 outer_ecn, const __u32 *remote)
{
	if (len < WEFT_INNER6_MIN)
		return WEFT_DROP_TRUNCATED;
	__u32 raw[16] = {};
	__u8 *b = (__u8 *)raw;
	if (bpf_skb_load_bytes(skb, off, b + 2, WEFT_INNER6_MIN) < 0)
		return WEFT_DROP_TRUNCATED;
	if ((b[2] ^ (WEFT_VXLAN_I >> 24)) | b[3] | b[4] | b[5] | b[9])
		return WEFT_DROP_BAD_VXLAN;
	if ((((__u32)b[6] << 16) | ((__u32)b[7] << 8) | b[8]) ^ cfg->vni)
		return WEFT_DROP_WRONG_VNI;
	if (weft_mac_diff(b + 10, cfg->vtep_mac6))
		return WEFT_DROP_WRONG_MAC;
	if (!weft_mac_diff(b + 16, cfg->vtep_mac6))
		return WEFT_DROP_WRONG_MAC;
	if ((*(__u16 *)(b + 22) ^ bpf_htons(ETH_P_IPV6)) | ((b[24] & 0xF0) ^ 0x60))
		return WEFT_DROP_INNER_NOT_IPV4;
	__u32 itot = WEFT_IP6_HLEN + bpf_ntohs(*(__u16 *)(b + 28));
	if (itot + WEFT_VXLAN_HLEN + ETH_HLEN > len)
		return WEFT_DROP_TRUNCATED;
	if (!((outer_ecn ^ 3) | ((b[25] >> 4) & 3)))
		return WEFT_DROP_ECN;
	return weft_check_source6(&raw[8], remote);	/* inner saddr: b + 32 */
}

/* weft_underlay for an IPv6 datagram to our port (UDP right after the IPv6 header). */
static __always_inline int weft_underlay6(struct __sk_buff *skb, struct weft_config *cfg, struct ipv6hdr *ip6)
{
	__u32 segs = weft_segs(skb);
	__u32 frame = skb->len - ETH_HLEN;
	__u32 plen = bpf_ntohs(ip6->payload_len);
	struct weft_udphdr *udp = (void *)(ip6 + 1);
	__u32 ulen = bpf_ntohs(udp->len);
	/* A GRO packet beyond 64 KB carries no lengths (BIG TCP's jumbo form): the frame's. */
	if (skb->gso_size && frame > 0xFFFF + WEFT_IP6_HLEN) {
		plen = frame - WEFT_IP6_HLEN;
		ulen = plen;
	}
	if (WEFT_IP6_HLEN + plen > frame || plen < WEFT_UDP_HLEN || ulen != plen)
		return weft_drop_n(WEFT_DROP_MALFORMED, segs);
	struct weft_ip6 remote = {};
	__builtin_memcpy(remote.a, &ip6->saddr, 16);
	if (!weft_peer_ips6.lookup(&remote))
		return weft_drop_n(WEFT_DROP_UNKNOWN_PEER, segs);
	__u8 outer_ecn = (((__u8 *)ip6)[1] >> 4) & 3;
	__u32 payload = ulen - WEFT_UDP_HLEN;

	__u32 gso = skb->gso_size;
	if (gso && payload > gso) {
		__be16 ipl = 0;
		bpf_skb_load_bytes(skb, WEFT_OUTER6_LEN + WEFT_VXLAN_HLEN + ETH_HLEN + 4, &ipl, sizeof(ipl));
		if (WEFT_IP6_HLEN + bpf_ntohs(ipl) + WEFT_VXLAN_HLEN + ETH_HLEN != payload)
			return weft_check_batch(skb, cfg, payload, gso, outer_ecn, 0, remote.a, 1);
	}
	__u32 reason = weft_check_datagram6(skb, cfg, WEFT_OUTER6_LEN, payload, outer_ecn, remote.a);
	if (reason)
		return weft_drop_n(reason, segs);
	weft_count(WEFT_CNT_UNDERLAY_PASSED, segs);
	return TC_ACT_OK;
}

static __always_inline int weft_from_underlay6(struct __sk_buff *skb)
{
	struct weft_config *cfg = weft_cfg();
	if (!cfg || !cfg->vxlan_port || !cfg->netmask6[0])
		return TC_ACT_OK;
	struct ethhdr *eth = weft_linear(skb, WEFT_OUTER6_LEN);
	if (!eth)
		return TC_ACT_OK;	/* too short for UDP after IPv6: the kernel's to judge */
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	if (ip6->version != 6 || !weft_to_us6(skb, cfg, (const __u32 *)&ip6->daddr))
		return TC_ACT_OK;
	if (ip6->nexthdr == WEFT_NEXTHDR_FRAGMENT) {
		/* fragment header: next header, reserved, offset (13 bits) + flags; then UDP if first */
		__u8 fh[8] = {};
		__be16 dport = 0;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + WEFT_IP6_HLEN, fh, sizeof(fh)) < 0 || fh[0] != 17 ||
		    ((fh[2] << 8 | fh[3]) & 0xFFF8) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + WEFT_IP6_HLEN + 8 + 2, &dport, sizeof(dport)) < 0 ||
		    dport != cfg->vxlan_port)
			return TC_ACT_OK;
		return weft_drop_n(WEFT_DROP_FRAGMENT, weft_segs(skb));
	}
	if (ip6->nexthdr != 17)
		return TC_ACT_OK;
	struct weft_udphdr *udp = (void *)(ip6 + 1);
	if (udp->dest != cfg->vxlan_port)
		return TC_ACT_OK;
	return weft_underlay6(skb, cfg, ip6);
}

int weft_from_underlay(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP) || skb->pkt_type == WEFT_PACKET_OTHERHOST) {
		if (skb->protocol == bpf_htons(ETH_P_IPV6) && skb->pkt_type != WEFT_PACKET_OTHERHOST)
			return weft_from_underlay6(skb);
		return TC_ACT_OK;
	}
	struct weft_config *cfg = weft_cfg();
	if (!cfg || !cfg->vxlan_port || !cfg->netmask)
		return TC_ACT_OK;	/* netmask zero: an IPv6-only node, no IPv4 peer to check against */
	/* Is it a datagram to our port? Read only what that needs (IPv4 + the UDP port). */
	struct ethhdr *eth = weft_linear(skb, ETH_HLEN + 20);
	if (!eth)
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if (ip->version != 4 || ip->ihl < 5 || ip->protocol != 17 || (ip->frag_off & bpf_htons(WEFT_IP_OFFSET)))
		return TC_ACT_OK;
	if (!weft_to_us(skb, cfg, ip->daddr))
		return TC_ACT_OK;
	__be16 dport = 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + ip->ihl * 4 + 2, &dport, sizeof(dport)) < 0)
		return TC_ACT_OK;
	if (dport != cfg->vxlan_port)
		return TC_ACT_OK;

	return weft_underlay(skb, cfg);
}
