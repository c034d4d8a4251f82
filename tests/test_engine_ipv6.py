"""The compiled engine's IPv6 side (dual-stack vxlan/fastpath), byte by byte.

Against frames built by hand here (VXLAN header, inner Ethernet with type 0x86DD, flannel-v6's
MACs; inner packets from scapy): what a TUN read of an IPv6 packet becomes on the IPv6 underlay's
socket, what a datagram from it becomes on the TUN, TSO/USO super-packets cut into valid IPv6
segments, a kernel peer's unsegmented GSO datagram and partial checksums, a batch that mixes both
families, every hostile datagram in exactly one counter (and every truncation and byte flip of a
good one), the IPv6 route table and peer set, and the engine process's control protocol with
IPv6 routes. The reference engine is IPv4 only (udp/python): it refuses the IPv6 arguments.

Set-up as tests/test_engine.py: the "TUN" is one end of an AF_UNIX datagram socketpair; the UDP
sockets live in a namespace made for the module (exact name, deleted by that name) with the
underlay addresses of both families on its loopback (no DAD).
"""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import needs_root

pytest.importorskip("scapy.all")
from scapy.all import IP, TCP, UDP, raw  # noqa: E402
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoRequest, IPv6, IPv6ExtHdrHopByHop  # noqa: E402

from fastpath.engine.reference import ReferenceEngine  # noqa: E402

try:
    from fastpath.engine._engine import Engine
except ImportError:
    Engine = None

pytestmark = [needs_root, pytest.mark.skipif(Engine is None, reason="compiled engine not built")]

NETWORK, NETWORK6 = "10.244.0.0/16", "fd10:244::/56"
A_SUB, B_SUB = "10.244.1.0/24", "10.244.2.0/24"
A_SUB6, B_SUB6, C_SUB6 = "fd10:244:0:1::/64", "fd10:244:0:2::/64", "fd10:244:0:3::/64"
A_IP, B_IP = "198.18.0.1", "198.18.0.2"
A6, B6, C6, STRANGER6 = (f"2001:db8:198:18::{n}" for n in (1, 2, 3, 9))
A_MAC, B_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
A_MAC6, B_MAC6, C_MAC6 = "02:00:00:00:06:0a", "02:00:00:00:06:0b", "02:00:00:00:06:0c"
PORT = 8472
MTU = 1450
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(name: str, fn):
    out: dict = {}

    def run():
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            out["v"] = fn()
        except BaseException as exc:
            out["e"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in out:
        raise out["e"]
    return out["v"]


@pytest.fixture(scope="module")
def ns():
    name = f"wft6{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        for addr in (A_IP, B_IP):
            subprocess.run(["ip", "-n", name, "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
        for addr in (A6, B6, C6, STRANGER6):
            subprocess.run(["ip", "-n", name, "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad"],
                           check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def udp(ns: str, addr: str, port: int = 0) -> socket.socket:
    def make():
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        s.bind((addr, port))
        return s
    return in_netns(ns, make)


class Node:
    """A dual-stack engine (node A): its TUN stand-in ``tun`` and its sockets of both families."""

    def __init__(self, ns: str, *, vnet_hdr: bool = False, mtu: int = MTU):
        self.tun, self._end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.tun, self._end):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock = udp(ns, A_IP)
        self.sock6 = udp(ns, A6)
        self.engine = Engine(self._end.fileno(), self.sock.fileno(), mode="vxlan", network=NETWORK,
                             subnet_len=24, local_subnet=A_SUB, vtep_mac=A_MAC, port=PORT, mtu=mtu,
                             vnet_hdr=vnet_hdr, network6=NETWORK6, subnet6_len=64,
                             local_subnet6=A_SUB6, vtep_mac6=A_MAC6, sock6_fd=self.sock6.fileno())
        self.engine.set_route(B_SUB, B_IP, B_MAC)
        self.engine.set_route(B_SUB6, B6, B_MAC6)
        self.engine.set_route(C_SUB6, C6, C_MAC6)

    def tun_read_all(self) -> list[bytes]:
        out = []
        self.tun.settimeout(0.0001)
        while True:
            try:
                out.append(self.tun.recv(70000))
            except (BlockingIOError, socket.timeout):
                return out

    def close(self) -> None:
        self.engine.close()
        for s in (self.tun, self._end, self.sock, self.sock6):
            s.close()


@pytest.fixture
def node(ns):
    made = []

    def make(**kw):
        n = Node(ns, **kw)
        made.append(n)
        return n
    yield make
    for n in made:
        n.close()


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def vxlan6(inner: bytes, dst_mac: str = A_MAC6, src_mac: str = B_MAC6, vni: int = 1,
           ethertype: int = 0x86DD) -> bytes:
    """A VXLAN frame as a kernel flannel-v6.<VNI> device sends it, built by hand (RFC 7348):
    flags 0x08, 3 reserved bytes, the VNI (24 bits), a reserved byte; inner Ethernet dst, src, type."""
    return (bytes([0x08, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\0" + mac(dst_mac) + mac(src_mac)
            + struct.pack("!H", ethertype) + inner)


def ping6(src: str = "fd10:244:0:1::2", dst: str = "fd10:244:0:2::2", data: bytes = b"ping6") -> bytes:
    return raw(IPv6(src=src, dst=dst, hlim=64) / ICMPv6EchoRequest(id=7, seq=1, data=data))


def vnet(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def recv_all(sock: socket.socket, wait: float = 2.0) -> list[tuple[bytes, tuple]]:
    out = []
    sock.settimeout(wait)
    while True:
        try:
            out.append(sock.recvfrom(70000))
        except socket.timeout:
            return out
        sock.settimeout(0.3)


def wait_stats(engine, key: str, value: int, timeout: float = 5.0) -> dict:
    """The engine's stats once ``key`` reached ``value`` (a running engine counts after it wrote)."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s[key] >= value or time.monotonic() > deadline:
            return s
        time.sleep(0.01)


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def outcomes(d: dict, direction: str = "rx") -> dict:
    return {k: v for k, v in d.items()
            if v and (k == f"{direction}_packets" or k.startswith(f"{direction}_drop_"))}


def l4_checksum_ok(pkt: bytes) -> bool:
    """Whether an IPv6 packet's TCP/UDP checksum is right (scapy recomputes it independently)."""
    p = IPv6(pkt)
    layer = p[TCP] if TCP in p else p[UDP]
    got = layer.chksum
    layer.chksum = None
    return IPv6(raw(p))[type(layer)].chksum == got


# -- encap and decap ---------------------------------------------------------------------------------

@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain", "vnet"])
def test_ipv6_read_becomes_a_flannel_v6_frame_to_the_peers_ipv6(node, ns, vnet_hdr):
    n = node(vnet_hdr=vnet_hdr)
    peer6, peer4 = udp(ns, B6, PORT), udp(ns, B_IP, PORT)
    try:
        inner = ping6()
        n.engine.start()
        n.tun.send((vnet() if vnet_hdr else b"") + inner + b"trailing")  # cut at the payload length
        got = recv_all(peer6)
        assert [d for d, _ in got] == [vxlan6(inner, dst_mac=B_MAC6, src_mac=A_MAC6)]
        assert got[0][1][0] == A6                           # from our IPv6 underlay address
        assert recv_all(peer4, 0.3) == []                   # nothing on the IPv4 underlay
        s = n.engine.stats()
        assert (s["tx_packets"], s["tx_ipv6_packets"], s["tx_datagram_sends"]) == (1, 1, 1)
    finally:
        n.engine.stop()
        peer6.close()
        peer4.close()


@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain", "vnet"])
def test_flannel_v6_frame_becomes_the_inner_packet_on_the_tun(node, ns, vnet_hdr):
    n = node(vnet_hdr=vnet_hdr)
    inner = ping6(src="fd10:244:0:2::2", dst="fd10:244:0:1::2")
    n.engine._inject_rx(vxlan6(inner), B6)
    prefix = vnet() if vnet_hdr else b""
    assert n.tun_read_all() == [prefix + inner]
    # the same over the real IPv6 socket, engine running
    peer6 = udp(ns, B6, PORT)
    try:
        n.engine.start()
        peer6.sendto(vxlan6(inner), (A6, n.sock6.getsockname()[1]))
        n.tun.settimeout(2)
        assert n.tun.recv(70000) == prefix + inner
        s = wait_stats(n.engine, "rx_ipv6_packets", 2)   # counted just after the write
        assert (s["rx_datagrams"], s["rx_packets"], s["rx_ipv6_packets"]) == (2, 2, 2)
    finally:
        n.engine.stop()
        peer6.close()


def test_one_batch_of_both_families_leaves_on_both_sockets(node, ns):
    """Reads of both families queued before the engine starts are one tx batch: each run of one
    family leaves on its own socket, in order, and nothing is sent twice or lost."""
    n = node()
    peer6, peer4 = udp(ns, B6, PORT), udp(ns, B_IP, PORT)
    try:
        v4 = [raw(IP(src="10.244.1.2", dst="10.244.2.2", id=i) / UDP(sport=1, dport=2) / b"v4") for i in range(6)]
        v6 = [ping6(data=bytes([i]) * 8) for i in range(6)]
        order = [v4[0], v6[0], v6[1], v4[1], v4[2], v6[2], v4[3], v6[3], v6[4], v4[4], v6[5], v4[5]]
        for pkt in order:
            n.tun.send(pkt)
        n.engine.start()
        got6 = [d for d, _ in recv_all(peer6)]
        got4 = [d for d, _ in recv_all(peer4, 0.5)]
        assert got6 == [vxlan6(p, dst_mac=B_MAC6, src_mac=A_MAC6) for p in v6]
        assert [d[22:] for d in got4] == v4 and all(d[20:22] == b"\x08\x00" for d in got4)
        s = n.engine.stats()
        assert (s["tx_packets"], s["tx_ipv6_packets"], s["tx_batches"]) == (12, 6, 1)
    finally:
        n.engine.stop()
        peer6.close()
        peer4.close()


# -- offloads ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("paylen,mss", [(5000, 1000), (4001, 1000), (800, 1220)])
def test_tso6_super_packet_is_cut_into_valid_ipv6_segments(node, ns, paylen, mss):
    n = node(vnet_hdr=True)
    peer6 = udp(ns, B6, PORT)
    try:
        payload = bytes(range(256)) * (paylen // 256 + 1)
        sup = raw(IPv6(src="fd10:244:0:1::2", dst="fd10:244:0:2::2") / TCP(
            sport=40000, dport=5201, seq=1000, flags="PA") / payload[:paylen])
        n.engine.start()
        n.tun.send(vnet(1, 4, 60, mss, 40, 16) + sup)        # NEEDS_CSUM, GSO_TCPV6
        got = [d for d, _ in recv_all(peer6)]
        want = -(-paylen // mss)
        assert len(got) == want
        data = b""
        for i, d in enumerate(got):
            assert d[:22] == vxlan6(b"", dst_mac=B_MAC6, src_mac=A_MAC6)
            seg = d[22:]
            p = IPv6(seg)
            assert p.plen == len(seg) - 40 and p.src == "fd10:244:0:1::2" and p.nh == 6
            assert p[TCP].seq == 1000 + i * mss
            assert ("P" in str(p[TCP].flags)) == (i == want - 1)     # PSH only on the last
            assert l4_checksum_ok(seg), i
            data += bytes(p[TCP].payload)
        assert data == payload[:paylen]
        s = n.engine.stats()
        assert (s["tx_packets"], s["tx_ipv6_packets"]) == (want, want)
        assert s["tx_datagram_sends"] <= 2          # UDP_SEGMENT: the kernel cut the sends
    finally:
        n.engine.stop()
        peer6.close()


def test_uso6_super_packet_is_cut_into_valid_ipv6_datagrams(node, ns):
    n = node(vnet_hdr=True)
    peer6 = udp(ns, B6, PORT)
    try:
        sup = raw(IPv6(src="fd10:244:0:1::2", dst="fd10:244:0:2::2") / UDP(sport=9, dport=10) / (b"u" * 3000))
        n.engine.start()
        n.tun.send(vnet(1, 5, 48, 1200, 40, 6) + sup)        # GSO_UDP_L4
        got = [d[22:] for d, _ in recv_all(peer6)]
        assert [len(IPv6(g)[UDP].payload) for g in got] == [1200, 1200, 600]
        assert all(l4_checksum_ok(g) for g in got)
    finally:
        n.engine.stop()
        peer6.close()


def test_kernel_peers_unsegmented_ipv6_gso_datagram_is_written_whole(node):
    """A kernel flannel-v6 device's TSO packet crosses a veth unsegmented (as over IPv4): one GSO
    write, GSO_TCPV6, segment size from the MTU, the checksum field the pseudo-header sum."""
    n = node(vnet_hdr=True)
    inner = raw(IPv6(src="fd10:244:0:2::2", dst="fd10:244:0:1::2") / TCP(
        sport=5201, dport=40000, seq=1, flags="A") / (b"k" * 7000))
    n.engine._inject_rx(vxlan6(inner), B6, 0)
    out = n.tun_read_all()
    assert len(out) == 1
    assert struct.unpack("<BBHHHH", out[0][:10]) == (1, 4, 60, MTU - 60, 40, 16)
    assert out[0][10:66] == inner[:56] and out[0][68:] == inner[58:]
    s = n.engine.stats()
    assert (s["rx_super_packets"], s["rx_packets"], s["rx_ipv6_packets"]) == (1, 1, 1)


def _segments6(n: int, size: int = 1300, seq0: int = 1000, src: str = "fd10:244:0:2::2", psh_last=False) -> list[bytes]:
    return [raw(IPv6(src=src, dst="fd10:244:0:1::2", fl=5) / TCP(
        sport=5201, dport=40000, seq=seq0 + i * size, ack=77,
        flags="PA" if psh_last and i == n - 1 else "A") / (bytes([i]) * size)) for i in range(n)]


def test_in_order_ipv6_tcp_segments_are_merged_into_one_gso_write(node):
    """A GRO message of one flow's consecutive IPv6 segments becomes one GSO_TCPV6 write (payload
    length and pseudo-header sum fixed, payloads in order), as IPv4 segments do; a gap, another
    flow or a PSH ends the run."""
    n = node(vnet_hdr=True)
    segs = _segments6(5, psh_last=True)
    frames = [vxlan6(x) for x in segs]
    n.engine._inject_rx(b"".join(frames), B6, len(frames[0]))
    out = n.tun_read_all()
    assert len(out) == 1
    hdr = struct.unpack("<BBHHHH", out[0][:10])
    assert hdr == (1, 4, 60, 1300, 40, 16)
    ip = out[0][10:]
    assert ip[:4] == segs[0][:4] and struct.unpack("!H", ip[4:6])[0] == 20 + 5 * 1300
    assert ip[6:53] == segs[0][6:53] and ip[53] == segs[0][53] | 0x08      # PSH carried over
    assert ip[60:] == b"".join(x[60:] for x in segs)
    s = n.engine.stats()
    assert (s["rx_gro_writes"], s["rx_packets"], s["rx_ipv6_packets"]) == (1, 5, 5)
    # a gap in the sequence, and a second flow: three writes of 2, 1 and 1 segments
    gap = _segments6(2) + _segments6(1, seq0=1000 + 5 * 1300) + _segments6(1, src="fd10:244:0:2::3")
    n.engine._inject_rx(b"".join(vxlan6(x) for x in gap), B6, len(vxlan6(gap[0])))
    out = n.tun_read_all()
    assert [struct.unpack("<BB", o[:2]) for o in out] == [(1, 4), (0, 0), (0, 0)]
    assert out[1][10:] == gap[2] and out[2][10:] == gap[3]


@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain", "vnet"])
def test_partial_inner_ipv6_checksum(node, vnet_hdr):
    """A kernel sender on a veth leaves the inner checksum as the pseudo-header sum: completed here
    (plain TUN) or handed on as NEEDS_CSUM (vnet); a complete one is left alone."""
    n = node(vnet_hdr=vnet_hdr)
    good = raw(IPv6(src="fd10:244:0:2::2", dst="fd10:244:0:1::2") / TCP(sport=1, dport=2, flags="A") / b"partial")
    src, dst = socket.inet_pton(socket.AF_INET6, "fd10:244:0:2::2"), socket.inet_pton(socket.AF_INET6, "fd10:244:0:1::2")
    words = struct.unpack("!16H", src + dst)
    s = sum(words) + (len(good) - 40) + 6
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    partial = bytearray(good)
    struct.pack_into("!H", partial, 56, s)
    n.engine._inject_rx(vxlan6(bytes(partial)), B6)
    out = n.tun_read_all()
    if vnet_hdr:
        assert out == [vnet(1, 0, 0, 0, 40, 16) + bytes(partial)]
    else:
        assert out == [good]
    n.engine._inject_rx(vxlan6(good), B6)
    assert n.tun_read_all() == [(vnet() if vnet_hdr else b"") + good]


# -- hostile input ---------------------------------------------------------------------------------

def _inner6(src: str = "fd10:244:0:2::2", dst: str = "fd10:244:0:1::2", payload: bytes = b"data") -> bytes:
    return raw(IPv6(src=src, dst=dst) / UDP(sport=1, dport=2) / payload)


def _rx6_cases() -> list[tuple[str, bytes, str, str]]:
    """(name, datagram, outer IPv6 source, the counter it lands in) for node A (routes to B's and
    C's IPv6 subnets), mtu 1450."""
    good = _inner6()
    long_plen = bytearray(good)
    struct.pack_into("!H", long_plen, 4, 4000)
    return [
        ("good", vxlan6(good), B6, "rx_packets"),
        ("good-from-second-peer", vxlan6(_inner6(src="fd10:244:0:3::7")), C6, "rx_packets"),
        ("trailing-bytes", vxlan6(good + b"pad"), B6, "rx_packets"),
        ("unknown-peer", vxlan6(good), STRANGER6, "rx_drop_unknown_peer"),
        ("spoofed-src", vxlan6(_inner6(src="fd10:244:0:3::2")), B6, "rx_drop_spoofed_src"),
        ("spoofed-own-subnet", vxlan6(_inner6(src="fd10:244:0:1::9")), B6, "rx_drop_spoofed_src"),
        ("spoofed-unrouted-subnet", vxlan6(_inner6(src="fd10:244:0:9::2")), B6, "rx_drop_spoofed_src"),
        ("outside-network6", vxlan6(_inner6(src="fd99::2")), B6, "rx_drop_spoofed_src"),
        ("unknown-peer-outside-network6", vxlan6(_inner6(src="fd99::2")), STRANGER6, "rx_drop_unknown_peer"),
        ("payload-length-beyond-data", vxlan6(bytes(long_plen)), B6, "rx_drop_bad_ip"),
        ("oversized", vxlan6(_inner6(payload=b"z" * 2000)), B6, "rx_drop_oversized"),
        ("inner-ipv4", vxlan6(raw(IP(src="10.244.2.2", dst="10.244.1.2") / UDP()), ethertype=0x0800), B6,
         "rx_drop_not_ipv6"),
        ("ipv4-in-86dd", vxlan6(raw(IP(src="10.244.2.2", dst="10.244.1.2") / UDP())), B6, "rx_drop_not_ipv6"),
        ("arp", vxlan6(b"\0" * 28, ethertype=0x0806), B6, "rx_drop_not_ipv6"),
        ("truncated-header", vxlan6(good[:39]), B6, "rx_drop_short"),
        ("no-inner", vxlan6(b""), B6, "rx_drop_short"),
        ("vxlan-truncated", vxlan6(good)[:21], B6, "rx_drop_short"),
        ("empty", b"", B6, "rx_drop_short"),
        ("no-I-flag", b"\x00" + vxlan6(good)[1:], B6, "rx_drop_bad_vxlan"),
        ("reserved-byte-7", vxlan6(good)[:7] + b"\x01" + vxlan6(good)[8:], B6, "rx_drop_bad_vxlan"),
        ("wrong-vni", vxlan6(good, vni=2), B6, "rx_drop_wrong_vni"),
        ("v4-vtep-mac", vxlan6(good, dst_mac=A_MAC), B6, "rx_drop_wrong_mac"),
        ("broadcast-mac", vxlan6(good, dst_mac="ff:ff:ff:ff:ff:ff"), B6, "rx_drop_wrong_mac"),
    ]


@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain", "vnet"])
def test_each_received_ipv6_case_lands_in_its_counter(node, vnet_hdr):
    n = node(vnet_hdr=vnet_hdr)
    wrong = {}
    for name, dgram, src, counter in _rx6_cases():
        before = n.engine.stats()
        n.engine._inject_rx(dgram, src)
        d = delta(before, n.engine.stats())
        written = n.tun_read_all()
        if d.get("rx_datagrams") != 1 or outcomes(d) != {counter: 1} or len(written) != (counter == "rx_packets"):
            wrong[name] = (counter, d, len(written))
    assert not wrong


def test_v6_frames_on_the_ipv4_underlay_and_v4_frames_on_the_ipv6_one_are_dropped(node):
    """Each underlay carries its own family: flannel.<VNI> never sends IPv6, flannel-v6 never IPv4."""
    n = node()
    before = n.engine.stats()
    v4frame_of_v6 = vxlan6(_inner6(), dst_mac=A_MAC, src_mac=B_MAC)
    n.engine._inject_rx(v4frame_of_v6, B_IP)
    v4 = raw(IP(src="10.244.2.2", dst="10.244.1.2") / UDP() / b"x")
    n.engine._inject_rx(vxlan6(v4, ethertype=0x0800), B6)
    d = delta(before, n.engine.stats())
    assert outcomes(d) == {"rx_drop_not_ipv4": 1, "rx_drop_not_ipv6": 1}
    assert n.tun_read_all() == []


def test_every_truncation_and_byte_flip_of_a_good_frame_ends_in_one_outcome(node):
    """No crash and exactly one outcome per datagram, whatever the bytes (a deterministic sweep:
    every prefix of a good frame, and each byte of its headers flipped)."""
    n = node(vnet_hdr=True)
    good = vxlan6(raw(IPv6(src="fd10:244:0:2::2", dst="fd10:244:0:1::2") / TCP(sport=1, dport=2, flags="A") / (b"t" * 40)))
    cases = [good[:k] for k in range(len(good))]
    cases += [good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1:] for i in range(22 + 60)]
    before = n.engine.stats()
    for dgram in cases:
        for src in (B6, STRANGER6):
            n.engine._inject_rx(dgram, src)
    d = delta(before, n.engine.stats())
    assert d["rx_datagrams"] == 2 * len(cases)
    assert sum(outcomes(d).values()) == 2 * len(cases)
    assert len(n.tun_read_all()) == d.get("rx_packets", 0)


def test_ipv6_read_without_a_route_and_other_versions(node, ns):
    n = node()
    before = n.engine.stats()
    n.engine._inject_tx(ping6(dst="fd10:244:0:9::2"))          # no route
    n.engine._inject_tx(ping6(dst="fd99::2"))                  # outside the IPv6 Network
    n.engine._inject_tx(ping6()[:39])                          # shorter than the header
    bad = bytearray(ping6())
    struct.pack_into("!H", bad, 4, 1000)                       # payload length beyond the read
    n.engine._inject_tx(bytes(bad))
    n.engine._inject_tx(b"\x50" + ping6()[1:])                 # version 5
    d = delta(before, n.engine.stats())
    assert outcomes(d, "tx") == {"tx_drop_no_route": 2, "tx_drop_malformed": 2, "tx_drop_not_ipv4": 1}


@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain", "vnet"])
def test_unroutable_ipv6_read_gets_icmpv6_no_route(node, vnet_hdr):
    """ICMPv6 destination unreachable, code 0 (no route), from the unreachable destination to the
    sender, quoting the read (cut to fit 1280 bytes), written back into the TUN."""
    n = node(vnet_hdr=vnet_hdr)
    prefix = vnet() if vnet_hdr else b""
    lost = ping6(dst="fd10:244:0:9::2")
    n.engine._inject_tx(prefix + lost)
    want = raw(IPv6(src="fd10:244:0:9::2", dst="fd10:244:0:1::2", hlim=64) / ICMPv6DestUnreach(code=0) / lost)
    assert n.tun_read_all() == [prefix + want]
    big = _inner6(src="fd10:244:0:1::2", dst="fd10:244:0:9::2", payload=b"b" * 2000)
    n.engine._inject_tx(prefix + big)
    out = n.tun_read_all()
    assert len(out) == 1 and len(out[0]) == len(prefix) + 1280
    reply = out[0][len(prefix):]
    assert reply[:8] == bytes([0x60, 0, 0, 0]) + struct.pack("!H", 1240) + bytes([58, 64])
    assert reply[8:40] == big[24:40] + big[8:24] and reply[40:42] == b"\x01\x00" and reply[44:48] == bytes(4)
    assert reply[48:] == big[:1232]
    # the ICMPv6 checksum: pseudo header (addresses, length, next header 58) + message sum to 0xffff
    words = reply[8:40] + struct.pack("!IxxxB", 1240, 58) + reply[40:]
    total = sum(struct.unpack(f"!{len(words) // 2}H", words))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF
    # none for an ICMPv6 error, a multicast or unspecified address, or behind extension headers
    before = n.engine.stats()
    for pkt in (raw(IPv6(src="fd10:244:0:1::2", dst="fd10:244:0:9::2") / ICMPv6DestUnreach() / lost),
                ping6(src="::", dst="fd10:244:0:9::2"), ping6(dst="ff0e::1"),
                raw(IPv6(src="fd10:244:0:1::2", dst="fd10:244:0:9::2") / IPv6ExtHdrHopByHop() / UDP() / b"x")):
        n.engine._inject_tx(prefix + pkt)
    d = delta(before, n.engine.stats())
    assert d == {"tx_reads": 4, "tx_drop_no_route": 4} and n.tun_read_all() == []
    # the IPv4 replies' token bucket: at most 50 in a burst (2 spent above, refilled 1 per ms)
    before = n.engine.stats()
    t0 = time.monotonic()
    for _ in range(1000):
        n.engine._inject_tx(prefix + lost)
    elapsed = time.monotonic() - t0
    d = delta(before, n.engine.stats())
    assert d["tx_icmp_unreachable_sent"] + d["tx_icmp_unreachable_limited"] == 1000, d
    assert 48 <= d["tx_icmp_unreachable_sent"] <= 50 + 1000 * elapsed + 1, (d, elapsed)
    assert len(n.tun_read_all()) == d["tx_icmp_unreachable_sent"]


def test_ipv4_only_engine_drops_ipv6_reads_as_before(ns):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    s = udp(ns, A_IP)
    e = Engine(b.fileno(), s.fileno(), mode="vxlan", network=NETWORK, subnet_len=24, local_subnet=A_SUB,
               vtep_mac=A_MAC)
    try:
        e._inject_tx(ping6())
        assert e.stats()["tx_drop_not_ipv4"] == 1
        with pytest.raises(ValueError, match="carries no IPv6"):
            e.set_route(B_SUB6, B6, B_MAC6)
        assert e.lookup("fd10:244:0:2::1") is None and not e._is_peer(B6)
    finally:
        e.close()
        for x in (a, b, s):
            x.close()


# -- routes -------------------------------------------------------------------------------------------

def test_ipv6_routes_lookup_and_peer_set(node):
    n = node()
    e = n.engine
    assert e.lookup("fd10:244:0:2::7") == (B6, B_MAC6)
    assert e.lookup("fd10:244:0:3::7") == (C6, C_MAC6)
    assert e.lookup("fd10:244:0:4::7") is None and e.lookup("fd10:245::1") is None
    assert e._is_peer(B6) and e._is_peer(C6) and not e._is_peer(STRANGER6)
    assert e.routes()[B_SUB6] == (B6, B_MAC6) and e.routes()[B_SUB] == (B_IP, B_MAC)
    assert e.stats()["routes"] == 3
    e.set_route("fd10:244:0:4::/64", B6, B_MAC6)    # a second route to B
    e.remove_route(B_SUB6)
    assert e.lookup("fd10:244:0:2::7") is None and e._is_peer(B6)      # B still holds :4::
    e.set_route("fd10:244:0:4::/64", C6, C_MAC6)    # moved to C
    assert not e._is_peer(B6) and e.lookup("fd10:244:0:4::1") == (C6, C_MAC6)
    e.remove_route("fd10:244:0:4::/64")
    e.remove_route("fd10:244:0:4::/64")             # twice: nothing happens
    assert e._is_peer(C6) and e.stats()["routes"] == 2
    for subnet, ip, peer_mac, why in [
            (A_SUB6, B6, B_MAC6, "own IPv6 subnet"),
            ("fd10:244:0:2::/80", B6, B_MAC6, "is not a /64"),
            ("fd10:245::/64", B6, B_MAC6, "is not a /64 of fd10:244::/56"),
            (B_SUB6, B_IP, B_MAC6, "not an IPv6 address"),
            (B_SUB6, "::", B_MAC6, "not a unicast"),
            (B_SUB6, "ff02::1", B_MAC6, "not a unicast"),
            (B_SUB6, B6, None, "VTEP MAC")]:
        with pytest.raises(ValueError, match=why):
            e.set_route(subnet, ip, peer_mac)
    assert e.stats()["routes"] == 2               # nothing half-set


def test_many_ipv6_routes_churn_matches_a_model(ns):
    """Add/remove/move 2000 times over 200 subnets: the packet path's lookups agree with a dict."""
    import random
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    s4, s6 = udp(ns, A_IP), udp(ns, A6)
    e = Engine(b.fileno(), s4.fileno(), mode="vxlan", network=NETWORK, subnet_len=24, local_subnet=A_SUB,
               vtep_mac=A_MAC, network6="fd10::/48", subnet6_len=64, local_subnet6="fd10::/64",
               vtep_mac6=A_MAC6, sock6_fd=s6.fileno())
    rng = random.Random(16)
    model: dict[str, str] = {}
    try:
        for _ in range(2000):
            k = rng.randrange(1, 201)
            subnet = f"fd10:0:0:{k:x}::/64"
            if rng.random() < 0.3:
                e.remove_route(subnet)
                model.pop(subnet, None)
            else:
                peer = f"2001:db8::{rng.randrange(1, 40):x}"
                e.set_route(subnet, peer, B_MAC6)
                model[subnet] = peer
        for k in range(1, 201):
            got = e.lookup(f"fd10:0:0:{k:x}::5")
            want = model.get(f"fd10:0:0:{k:x}::/64")
            assert (got[0] if got else None) == want, k
        peers = set(model.values())
        assert all(e._is_peer(f"2001:db8::{i:x}") == (f"2001:db8::{i:x}" in peers) for i in range(1, 40))
    finally:
        e.close()
        for x in (a, b, s4, s6):
            x.close()


def test_ipv6_arguments_are_checked(ns):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    s4, s6 = udp(ns, A_IP), udp(ns, A6)
    base = dict(mode="vxlan", network=NETWORK, subnet_len=24, local_subnet=A_SUB, vtep_mac=A_MAC,
                network6=NETWORK6, subnet6_len=64, local_subnet6=A_SUB6, vtep_mac6=A_MAC6, sock6_fd=s6.fileno())
    try:
        for change, why in [({"mode": "udp"}, "vxlan mode"), ({"subnet6_len": 56}, "subnet6_len"),
                            ({"subnet6_len": None}, "subnet6_len"), ({"local_subnet6": "fd99::/64"}, "local subnet6"),
                            ({"local_subnet6": None}, "local subnet6"), ({"vtep_mac6": None}, "vtep_mac6"),
                            ({"sock6_fd": None}, "sock6_fd"),
                            ({"network6": "10.0.0.0/8"}, "network6 '10.0.0.0/8' is not an IPv6 network")]:
            with pytest.raises(ValueError, match=why):
                Engine(b.fileno(), s4.fileno(), **{**base, **change})
        with pytest.raises(ValueError, match="without network6"):
            Engine(b.fileno(), s4.fileno(), mode="vxlan", network=NETWORK, subnet_len=24, local_subnet=A_SUB,
                   vtep_mac=A_MAC, sock6_fd=s6.fileno())
        with pytest.raises(ValueError, match="IPv4 only"):
            ReferenceEngine(b.fileno(), s4.fileno(), **base)
    finally:
        for x in (a, b, s4, s6):
            x.close()


# -- the engine process (control protocol) --------------------------------------------------------------


@contextlib.contextmanager
def engine_process(ns: str, tag: str):
    """An engine process (``python -m fastpath.engine.proc``) in ``ns`` and a control client to it:
    (proc, client). Killed on the way out if the test did not stop it."""
    from fastpath.engine import control
    name = f"weft-engine-{tag}{secrets.token_hex(2)}"
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "fastpath.engine.proc", name],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def connect():
            deadline = time.monotonic() + 20
            while True:
                try:
                    return control.EngineClient(name)
                except (ConnectionRefusedError, FileNotFoundError):
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.05)
        yield proc, in_netns(ns, connect)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_engine_process_carries_ipv6_routes(ns):
    """``start`` with the IPv6 config opens the second socket (IPv6 only, same port as the IPv4
    one); set_route/replace_routes/routes carry IPv6 subnets; an IPv6 config without its parts
    is refused with one line."""
    from fastpath.engine import control
    with engine_process(ns, "t6") as (proc, client):
        config = {"dev": "wt6" + secrets.token_hex(2), "engine": "compiled", "mode": "vxlan", "network": NETWORK,
                  "subnet_len": 24, "local_subnet": A_SUB, "local": A_IP, "port": 18472, "workers": 1,
                  "mtu": MTU, "vnet_hdr": True, "busy_poll_us": 0, "local6": A6,
                  "kwargs": {"vni": 1, "vtep_mac": A_MAC, "network6": NETWORK6, "subnet6_len": 64,
                             "local_subnet6": A_SUB6, "vtep_mac6": A_MAC6}}
        broken = {**config, "kwargs": {k: v for k, v in config["kwargs"].items() if k != "vtep_mac6"}}
        from fastpath.engine.proc import RequestError, _check_config
        with pytest.raises(RequestError, match="IPv6 needs local6 and kwargs"):
            _check_config(broken)
        info = client.start(config, {ipaddress.IPv6Network(B_SUB6): (B6, B_MAC6),
                                     ipaddress.IPv4Network(B_SUB): (B_IP, B_MAC)})
        assert info["running"] and info["routes"] == 2
        socks = subprocess.run(["ip", "netns", "exec", ns, "ss", "-H", "-u", "-a", "-n", "-p"],
                               capture_output=True, text=True).stdout
        mine = [line for line in socks.splitlines() if f"pid={proc.pid}," in line]
        assert any(f"{A_IP}:18472" in line for line in mine) and any(f"[{A6}]:18472" in line for line in mine), mine
        client.set_route(C_SUB6, C6, C_MAC6)
        assert client.routes()[C_SUB6] == (C6, C_MAC6)
        removed = client.request("replace_routes", routes=control.routes_message(
            {ipaddress.IPv6Network(C_SUB6): (C6, C_MAC6), ipaddress.IPv4Network(B_SUB): (B_IP, B_MAC)}))["removed"]
        assert removed == [B_SUB6]
        assert set(client.routes()) == {C_SUB6, B_SUB}
        for routes, why in [({"fd10:244:0:2::/80": [B6, B_MAC6]}, "is not a /64"),
                            ({B_SUB6: [B_IP, B_MAC6]}, "not of one address family"),
                            ({"fd99::/64": [B6, B_MAC6]}, "is not a /64")]:
            with pytest.raises(control.EngineRefused, match=why):
                client.request("replace_routes", routes=routes)
        assert set(client.routes()) == {C_SUB6, B_SUB}      # a refused table changes nothing
        client.stop()
        client.close()
        assert proc.wait(timeout=10) == 0
