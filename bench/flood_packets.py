"""Hostile datagrams for ``bench flood``, crafted as whole Ethernet frames (outer headers may lie).

Each class builds a pool of distinct datagrams (a datagram is one frame, or several when it is
sent as outer IP fragments); the flooder sends the pool cyclically. ``CLASSES`` in bench.flood
says which counters each class is expected to land in; this module only builds bytes.

Addresses are chosen so that nothing a class provokes comes back to node 2 (see ``Target``): the
inner hosts are ``fake_host`` addresses nobody holds, so a packet a data plane does deliver dies
in an unanswered ARP, and the ICMP errors it may cause go to a host on node 1 or 3 that does not
exist either. Node 2 thus receives only the flood and the legitimate stream.
"""
from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass, field

from fastpath.engine.reference import ip_checksum as checksum

ETH_IP, ETH_IP6, ETH_ARP, ETH_VLAN = 0x0800, 0x86DD, 0x0806, 0x8100
VXLAN_FLAGS = 0x08                 # the I flag: the VNI is valid
DISCARD_PORT = 9                   # inner UDP destination port: the discard service, never answered
POOL = 256                         # distinct datagrams per class


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", "").replace("-", ""))


def ip4(addr) -> bytes:
    return ipaddress.IPv4Address(addr).packed


def fake_host(subnet) -> ipaddress.IPv4Address:
    """An address of ``subnet`` that no pod holds (pods count up from .2): broadcast - 2."""
    net = ipaddress.IPv4Network(subnet)
    return net.broadcast_address - 2


@dataclass
class Target:
    """Where the flood goes and what it may pretend to be."""
    wire: str                        # "udp" or "vxlan"
    port: int                        # node 2's data-plane port
    vni: int
    dst_mac: str                     # node 2's eth0
    src_mac: str                     # the flooder's eth0
    dst_ip: str                      # node 2's public IP
    own_ip: str                      # the flooder's underlay address
    peer_ip: str                     # node 1's public IP (forged as the outer source)
    network: ipaddress.IPv4Network
    subnets: dict                    # node index -> its subnet
    node_mtu: int                    # node 2's FLANNEL_MTU (the largest inner packet it takes)
    underlay_mtu: int = 1500
    vtep_mac: str = ""               # node 2's VtepMAC (vxlan: the inner destination MAC)
    peer_vtep_mac: str = ""          # node 1's VtepMAC
    unknown_sources: list = field(default_factory=list)   # outer sources that are no peer

    def unleased_subnet(self) -> ipaddress.IPv4Network:
        """A subnet of the Network no node holds (the last one)."""
        plen = next(iter(self.subnets.values())).prefixlen
        held = set(map(str, self.subnets.values()))
        for net in reversed(list(self.network.subnets(new_prefix=plen))):
            if str(net) not in held:
                return net
        raise ValueError("every subnet of the Network is leased")


# -- headers ---------------------------------------------------------------------------------------

def ipv4(src, dst, payload: bytes, proto: int = 17, *, ident: int = 1, ttl: int = 64, frag: int = 0x4000,
         ihl: int = 5, total: int | None = None, csum: int | None = None, version: int = 4,
         options: bytes = b"") -> bytes:
    """An IPv4 header + payload; ``total``/``ihl``/``csum``/``version`` may lie."""
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0,
                                total if total is not None else 20 + len(options) + len(payload),
                                ident & 0xFFFF, frag, ttl, proto, 0, ip4(src), ip4(dst)) + options)
    hdr[10:12] = (checksum(bytes(hdr)) if csum is None else csum).to_bytes(2, "big")
    return bytes(hdr) + payload


def udp(src, dst, sport: int, dport: int, payload: bytes, *, length: int | None = None,
        bad_csum: bool = False) -> bytes:
    """A UDP header + payload with its checksum (over the true length); ``length`` may lie."""
    true_len = 8 + len(payload)
    pseudo = ip4(src) + ip4(dst) + struct.pack("!BBH", 0, 17, true_len)
    seg = struct.pack("!HHHH", sport, dport, true_len, 0) + payload
    cs = checksum(pseudo + seg) or 0xFFFF
    if bad_csum:
        cs = cs ^ 0x5A5A or 1
    return struct.pack("!HHHH", sport, dport, length if length is not None else true_len, cs) + payload


def inner_packet(src, dst, size: int, rng: random.Random, df: bool = True) -> bytes:
    """A well-formed inner IPv4/UDP packet of ``size`` bytes to the discard port."""
    body = rng.randbytes(max(0, size - 28))
    return ipv4(src, dst, udp(src, dst, rng.randrange(32768, 61000), DISCARD_PORT, body),
                ident=rng.randrange(1 << 16), frag=0x4000 if df else 0)


def vxlan_header(vni: int, flags: int = VXLAN_FLAGS) -> bytes:
    return bytes([flags, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\0"


def encap(t: Target, inner: bytes, *, vni: int | None = None, flags: int = VXLAN_FLAGS,
          inner_dst_mac: str | None = None, ethertype: int = ETH_IP) -> bytes:
    """What the wire format puts in the outer UDP payload: udp = the inner packet itself;
    vxlan = VXLAN header + inner Ethernet header + the inner packet."""
    if t.wire == "udp":
        return inner
    eth = mac(inner_dst_mac or t.vtep_mac) + mac(t.peer_vtep_mac) + ethertype.to_bytes(2, "big")
    return vxlan_header(t.vni if vni is None else vni, flags) + eth + inner


def frame(t: Target, ip_packet: bytes) -> bytes:
    return mac(t.dst_mac) + mac(t.src_mac) + ETH_IP.to_bytes(2, "big") + ip_packet


def outer(t: Target, payload: bytes, rng: random.Random, src=None, **udp_lies) -> list[bytes]:
    """One datagram: a single frame, or outer IP fragments when it exceeds the underlay MTU."""
    src = src or t.own_ip
    seg = udp(src, t.dst_ip, rng.randrange(32768, 61000), t.port, payload, **udp_lies)
    ident = rng.randrange(1, 1 << 16)
    if 20 + len(seg) <= t.underlay_mtu:
        return [frame(t, ipv4(src, t.dst_ip, seg, ident=ident, frag=0))]
    step = (t.underlay_mtu - 20) // 8 * 8
    frames = []
    for off in range(0, len(seg), step):
        more = 0x2000 if off + step < len(seg) else 0
        frames.append(frame(t, ipv4(src, t.dst_ip, seg[off:off + step], ident=ident, frag=more | (off // 8))))
    return frames


# -- the classes' pools ------------------------------------------------------------------------------
# Each builder returns a list of datagrams (lists of frames). The inner hosts:
#   a = a host of node 1's subnet nobody holds, b = the same on node 2, c = on node 3.

def _hosts(t: Target):
    return (fake_host(t.subnets[1]), fake_host(t.subnets[2]),
            fake_host(t.subnets[3]) if 3 in t.subnets else fake_host(t.unleased_subnet()))


def valid_payload(t: Target, rng: random.Random, size: int = 200) -> bytes:
    a, b, _ = _hosts(t)
    return encap(t, inner_packet(a, b, size, rng))


def pool_random(t, rng):
    """Random bytes (0 .. MTU-28 of them), half from node 1's address, half from unknown sources."""
    return [outer(t, rng.randbytes(rng.randrange(0, t.underlay_mtu - 28)), rng,
                  src=t.peer_ip if i % 2 else rng.choice(t.unknown_sources))
            for i in range(POOL)]


def pool_truncated(t, rng):
    """A valid datagram of node 1's cut inside its headers: every length 0 .. header length - 1."""
    out = []
    while len(out) < POOL:
        whole = valid_payload(t, rng)
        head = 28 if t.wire == "udp" else 8 + 14 + 28
        for n in range(head):
            out.append(outer(t, whole[:n], rng, src=t.peer_ip))
    return out[:POOL]


def pool_bad_ip_len(t, rng):
    """Inner IPv4 headers that lie: total length beyond the data or below the header, IHL < 5,
    IHL past the data, a wrong header checksum. From node 1's address."""
    a, b, _ = _hosts(t)
    out = []
    for i in range(POOL):
        body = udp(a, b, 40000 + i, DISCARD_PORT, rng.randbytes(rng.randrange(0, 200)))
        real = 20 + len(body)
        kind = i % 6
        if kind == 0:
            pkt = ipv4(a, b, body, total=real + rng.randrange(1, 2000))
        elif kind == 1:
            pkt = ipv4(a, b, body, total=rng.randrange(0, 20))
        elif kind == 2:
            pkt = ipv4(a, b, body, ihl=rng.randrange(0, 5))
        elif kind == 3:
            pkt = ipv4(a, b, b"", ihl=15, total=20)[:20]          # says 60 header bytes, has 20
        elif kind == 4:
            good = ipv4(a, b, body)
            pkt = good[:10] + ((int.from_bytes(good[10:12], "big") ^ 0x1111) or 1).to_bytes(2, "big") + good[12:]
        else:
            pkt = ipv4(a, b, body, total=0)
        out.append(outer(t, encap(t, pkt), rng, src=t.peer_ip))
    return out


def pool_wrong_vni(t, rng):
    """Valid VXLAN from node 1's address with another VNI (0, VNI+1, 2^24-1, random)."""
    vnis = [0, (t.vni + 1) % (1 << 24), (1 << 24) - 1]
    out = []
    for i in range(POOL):
        vni = vnis[i] if i < len(vnis) else rng.randrange(1 << 24)
        if vni == t.vni:
            vni = (vni + 1) % (1 << 24)
        a, b, _ = _hosts(t)
        out.append(outer(t, encap(t, inner_packet(a, b, 200, rng), vni=vni), rng, src=t.peer_ip))
    return out


def pool_bad_vxlan_flags(t, rng):
    """VXLAN headers without the I flag (the VNI is not valid), right VNI, from node 1."""
    a, b, _ = _hosts(t)
    out = []
    for i in range(POOL):
        flags = (0x00, 0x80, 0x04, 0xF7)[i] if i < 4 else rng.randrange(256) & ~VXLAN_FLAGS
        out.append(outer(t, encap(t, inner_packet(a, b, 200, rng), flags=flags), rng, src=t.peer_ip))
    return out


def pool_wrong_mac(t, rng):
    """Valid VXLAN with the right VNI, but the inner frame is for another VTEP's MAC."""
    a, b, _ = _hosts(t)
    out = []
    for _ in range(POOL):
        other = bytes([rng.randrange(256) & 0xFE | 0x02]) + rng.randbytes(5)
        if other == mac(t.vtep_mac):
            continue
        out.append(outer(t, encap(t, inner_packet(a, b, 200, rng), inner_dst_mac=other.hex(":")),
                         rng, src=t.peer_ip))
    return out


def pool_not_ipv4(t, rng):
    """Inner packets that are not IPv4: IPv6, ARP, VLAN-tagged or random EtherTypes (vxlan), and
    IP versions other than 4 (both wire formats). From node 1."""
    a, b, _ = _hosts(t)
    ip6 = (bytes([0x60, 0, 0, 0]) + (8).to_bytes(2, "big") + bytes([17, 64]) + bytes(15) + b"\x01"
           + bytes(15) + b"\x02" + udp("0.0.0.0", "0.0.0.0", 40000, DISCARD_PORT, b""))
    arp = bytes.fromhex("0001080006040001") + mac(t.peer_vtep_mac or "02:00:00:00:00:01") + ip4(a) + bytes(6) + ip4(b)
    out = []
    for i in range(POOL):
        kind = i % 4 if t.wire == "vxlan" else 3
        if kind == 0:
            payload = encap(t, ip6, ethertype=ETH_IP6)
        elif kind == 1:
            payload = encap(t, arp, ethertype=ETH_ARP)
        elif kind == 2:
            ethertype = rng.choice([ETH_VLAN, 0x88CC, 0x8847, rng.randrange(0x0600, 0x10000)])
            if ethertype == ETH_IP:
                ethertype = ETH_VLAN
            payload = encap(t, inner_packet(a, b, 200, rng), ethertype=ethertype)
        else:
            version = rng.choice([v for v in range(16) if v != 4])
            pkt = bytearray(inner_packet(a, b, rng.randrange(28, 400), rng))
            pkt[0] = (version << 4) | (pkt[0] & 15)
            payload = encap(t, bytes(pkt))
        out.append(outer(t, payload, rng, src=t.peer_ip))
    return out


def pool_non_peer(t, rng):
    """Valid-looking datagrams (node 1's pod subnet to node 2's) from outer sources that hold no
    lease: the flooder's own address and 255 others, so a per-source cost would show."""
    a, b, _ = _hosts(t)
    srcs = t.unknown_sources
    return [outer(t, encap(t, inner_packet(a, b, rng.randrange(28, 1000), rng)), rng, src=srcs[i % len(srcs)])
            for i in range(POOL)]


def pool_spoofed_inner(t, rng):
    """From node 1's address (forged) with an inner source that is not node 1's: node 3's
    subnet, node 2's own, outside the Network."""
    _, b, c = _hosts(t)
    srcs = [c, fake_host(t.subnets[2]), ipaddress.IPv4Address("192.0.2.77")]
    return [outer(t, encap(t, inner_packet(srcs[i % 3], b, rng.randrange(28, 1000), rng)), rng, src=t.peer_ip)
            for i in range(POOL)]


def pool_outside_subnet(t, rng):
    """From node 1's address (forged), inner source on node 1, inner destination not on node 2:
    node 3's subnet, a subnet nobody holds, outside the Network. A data plane that delivers them
    hands node 2's kernel transit traffic to route."""
    a, _, c = _hosts(t)
    dsts = [c, fake_host(t.unleased_subnet()), ipaddress.IPv4Address("192.0.2.78")]
    return [outer(t, encap(t, inner_packet(a, dsts[i % 3], rng.randrange(28, 1000), rng)), rng, src=t.peer_ip)
            for i in range(POOL)]


def pool_oversized(t, rng):
    """A valid inner packet larger than node 2's MTU (up to ~9 KB), from node 1: the outer
    datagram exceeds the underlay MTU, so it travels as outer IP fragments (2..7 frames)."""
    a, b, _ = _hosts(t)
    return [outer(t, encap(t, inner_packet(a, b, rng.randrange(t.node_mtu + 1, 9000), rng)), rng, src=t.peer_ip)
            for _ in range(POOL)]


def pool_outer_truncated(t, rng):
    """Frames cut inside the outer IPv4 header (0..19 bytes of it), or with an IPv4 header whose
    total length ends inside the UDP header (0..7 bytes of it)."""
    out = []
    for i in range(POOL):
        whole = frame(t, ipv4(t.own_ip, t.dst_ip, udp(t.own_ip, t.dst_ip, 40000, t.port, valid_payload(t, rng))))
        if i % 2 == 0:
            out.append([whole[:14 + (i // 2) % 20]])
        else:
            k = (i // 2) % 8
            seg = udp(t.own_ip, t.dst_ip, 40000, t.port, b"")[:k]
            out.append([frame(t, ipv4(t.own_ip, t.dst_ip, seg))])
    return out


def pool_outer_ip_lies(t, rng):
    """Outer IPv4 headers that lie: total length beyond the frame or below 20, IHL < 5 or past
    the frame, a wrong header checksum, version 6 in an IPv4 frame."""
    out = []
    for i in range(POOL):
        seg = udp(t.own_ip, t.dst_ip, rng.randrange(32768, 61000), t.port, valid_payload(t, rng))
        real = 20 + len(seg)
        kind = i % 6
        if kind == 0:
            pkt = ipv4(t.own_ip, t.dst_ip, seg, total=real + rng.randrange(1, 3000))
        elif kind == 1:
            pkt = ipv4(t.own_ip, t.dst_ip, seg, total=rng.randrange(0, 20))
        elif kind == 2:
            pkt = ipv4(t.own_ip, t.dst_ip, seg, ihl=rng.randrange(0, 5))
        elif kind == 3:
            pkt = ipv4(t.own_ip, t.dst_ip, b"", ihl=15, total=20)[:20]
        elif kind == 4:
            good = ipv4(t.own_ip, t.dst_ip, seg)
            pkt = good[:10] + ((int.from_bytes(good[10:12], "big") ^ 0x2222) or 1).to_bytes(2, "big") + good[12:]
        else:
            pkt = ipv4(t.own_ip, t.dst_ip, seg, version=6)
        out.append([frame(t, pkt)])
    return out


def pool_outer_udp_lies(t, rng):
    """Outer UDP headers that lie: length beyond the datagram, below 8, 0, a wrong checksum; and
    a length that stops before trailing junk (the kernel trims it: a valid datagram arrives)."""
    out = []
    for i in range(POOL):
        payload = valid_payload(t, rng)
        kind = i % 5
        if kind == 0:
            lies = {"length": 8 + len(payload) + rng.randrange(1, 1000)}
        elif kind == 1:
            lies = {"length": rng.randrange(1, 8)}
        elif kind == 2:
            lies = {"length": 0}
        elif kind == 3:
            lies = {"bad_csum": True}
        else:
            junk = rng.randbytes(rng.randrange(1, 64))
            src = t.own_ip
            seg = udp(src, t.dst_ip, rng.randrange(32768, 61000), t.port, payload)
            out.append([frame(t, ipv4(src, t.dst_ip, seg + junk))])   # IP says more; UDP says less
            continue
        out.append(outer(t, payload, rng, **lies))
    return out


def write_pool(path: str, pool: list[list[bytes]]) -> int:
    """The flooder's pool file (native-endian u16 counts and lengths); returns frames per cycle."""
    frames = 0
    with open(path, "wb") as f:
        for dgram in pool:
            f.write(struct.pack("=H", len(dgram)))
            for fr in dgram:
                f.write(struct.pack("=H", len(fr)))
                f.write(fr)
            frames += len(dgram)
    return frames
