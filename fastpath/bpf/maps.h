/* Every map weft's programs use, declared once. Names carry the weft_ prefix (what `bpftool map`
 * and `weftctl peermap` show). The control plane fills them; nothing per peer is a cflag. */
#ifndef WEFT_MAPS_H
#define WEFT_MAPS_H

#include "types.h"
#include "drop_reasons.h"

/* Peer subnet -> peer PublicIP, VNI, VtepMAC. LPM so that any pod address finds its subnet. */
BPF_LPM_TRIE(weft_peers, struct weft_peer_key, struct weft_peer, 65536);

/* Peer PublicIP (network byte order) -> how many of the peers' subnets it holds. The receive
 * check's first question, "is the sender a peer at all", is one hash lookup (O(1) per datagram,
 * whatever the number of peers). Kept by the control plane with weft_peers; our own IP is not in it. */
BPF_HASH(weft_peer_ips, __u32, __u32, 65536);

/* The IPv6 twins of weft_peers and weft_peer_ips (dual-stack): peer IPv6 subnet -> PublicIPv6,
 * VNI, IPv6 VtepMAC; PublicIPv6 (16 bytes, network byte order) -> how many IPv6 subnets it holds. */
BPF_LPM_TRIE(weft_peers6, struct weft_peer6_key, struct weft_peer6, 65536);
BPF_HASH(weft_peer_ips6, struct weft_ip6, __u32, 65536);

/* Local pod IPv4 -> host veth ifindex, pod MAC, bridge MAC; learnt by the control plane from the
 * pod bridge's neighbour and FDB tables. Only a shortcut: a pod not in it takes the FIB path. */
BPF_HASH(weft_endpoints, __u32, struct weft_endpoint, 4096);

/* Local pod IPv6 (dual-stack) -> the same, learnt from the bridge's IPv6 neighbour table. */
BPF_HASH(weft_endpoints6, struct weft_ip6, struct weft_endpoint, 4096);

/* One entry: this node's settings (struct weft_config). */
BPF_ARRAY(weft_config, struct weft_config, 1);

/* enum weft_counter -> per-CPU u64; the control plane sums the CPUs when /metrics is read. */
BPF_PERCPU_ARRAY(weft_counters, __u64, WEFT_CNT_MAX);

/* enum weft_drop_reason -> per-CPU u64. */
BPF_PERCPU_ARRAY(weft_drops, __u64, WEFT_DROP_MAX);

#endif
