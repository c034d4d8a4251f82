"""What both engines (the compiled ``Engine`` and ``ReferenceEngine``) share: their counters and
how they read a MAC argument.

``COUNTER_NAMES`` is the one list of the engines' counters. The compiled engine indexes its
per-worker counter arrays with a C enum made from it at build time: setup.py writes
``counters.pxi`` (``C_<NAME>`` = its position, then ``N_COUNTERS``), so the order here is the
order in C. Plain Python without imports of its own: setup.py runs this file to read the list.
"""
from __future__ import annotations

COUNTER_NAMES = (
    "tx_packets",                   # inner packets sent (after segmentation)
    "tx_bytes",
    "tx_ipv6_packets",              # ... of them IPv6 (dual-stack vxlan: over the IPv6 underlay)
    "tx_reads",                     # TUN reads (a super-packet is one read)
    "tx_super_packets",             # reads that were GSO super-packets
    "tx_datagram_sends",            # sendmmsg messages (one may carry up to 64 segments)
    "tx_batches",
    "tx_batch_1",
    "tx_batch_2_7",
    "tx_batch_8_plus",
    "tx_drop_no_route",
    "tx_drop_not_ipv4",
    "tx_drop_malformed",
    "tx_drop_gso_unsupported",
    "tx_drop_send_error",
    "tx_read_errors",
    "tx_icmp_unreachable_sent",     # ICMP net unreachable replies written to the TUN (no route)
    "tx_icmp_unreachable_limited",  # ... withheld by the rate limit
    "rx_datagrams",                 # datagrams taken from the socket (a GRO message: each in it)
    "rx_packets",                   # inner packets delivered to the TUN
    "rx_bytes",
    "rx_ipv6_packets",              # ... of them IPv6 (from the IPv6 underlay's socket)
    "rx_tun_writes",
    "rx_gro_writes",                # TUN writes that carried a GSO super-packet
    "rx_batches",
    "rx_batch_1",
    "rx_batch_2_7",
    "rx_batch_8_plus",
    "rx_drop_short",
    "rx_drop_bad_ip",
    "rx_drop_not_ipv4",
    "rx_drop_not_ipv6",             # IPv6 underlay: inner ethertype not 0x86DD or version not 6
    "rx_drop_oversized",
    "rx_drop_bad_vxlan",
    "rx_drop_wrong_vni",
    "rx_drop_wrong_mac",
    "rx_drop_unknown_peer",
    "rx_drop_spoofed_src",
    "rx_drop_tun_write",
    "rx_recv_errors",
    "rx_super_packets",             # kernel VXLAN GSO datagrams (one inner TSO packet) passed on whole
    "rx_gro_messages",              # socket messages that held several datagrams (UDP GRO)
)

# Every datagram counted in rx_datagrams ends in exactly one of these; every TUN read counted in
# tx_reads in one tx_drop_* or in tx_packets (a super-packet: as many as it was cut into).
RX_OUTCOMES = ("rx_packets",) + tuple(n for n in COUNTER_NAMES if n.startswith("rx_drop_"))
TX_OUTCOMES = ("tx_packets",) + tuple(n for n in COUNTER_NAMES if n.startswith("tx_drop_"))

NO_MAC = b"\0" * 6


def mac_bytes(mac) -> bytes:
    """A MAC given as 6 bytes, ``"aa:bb:..."``/``"aa-bb-..."``/hex, or None/empty (all zeros)."""
    if mac is None or mac in (b"", ""):
        return NO_MAC
    if isinstance(mac, str):
        mac = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    mac = bytes(mac)
    if len(mac) != 6:
        raise ValueError(f"MAC {mac.hex(':')} is not 6 bytes")
    return mac
