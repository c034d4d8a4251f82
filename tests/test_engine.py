"""The userspace engines, byte by byte: encap/decap against packets built independently with scapy,
the compiled engine against the reference engine on every case, offload paths (TSO/USO split,
UDP GSO sends, GRO merge into one TUN write), a hypothesis fuzz of the receive path (no crash,
every datagram in exactly one counter), route add/remove, and the package's surface (the
``_engine.pyi`` stub against the compiled class, the TUN flag query).

Hostile input: every malformed, spoofed or foreign case names the one counter it must land in
(both engines, with and without a vnet header), also when sent at a running engine's real socket
(each datagram counted once, per class; what the kernel drops before the socket is
``rx_socket_drops`` and the namespace's Udp RcvbufErrors).

Set-up: the "TUN" is one end of an AF_UNIX datagram socketpair (a datagram per packet, as a TUN
read/write), the UDP sockets live in a network namespace made for the module (exact name, deleted
by that name) with the underlay addresses on its loopback. The ICMP net unreachable tests use a real
TUN device in that namespace (``TunNode``).
"""
from __future__ import annotations

import ast
import ctypes
import inspect
import os
import secrets
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import needs_root

scapy_all = pytest.importorskip("scapy.all")
from scapy.all import ICMP, IP, TCP, UDP, Ether, Raw, raw  # noqa: E402
from scapy.layers.vxlan import VXLAN  # noqa: E402

from fastpath.engine.reference import ReferenceEngine, ip_checksum  # noqa: E402

try:
    from fastpath.engine._engine import Engine
except ImportError:  # not built: the compiled cases skip, the reference ones still run
    Engine = None

pytestmark = needs_root

NETWORK = "10.244.0.0/16"
A_SUB, B_SUB, C_SUB = "10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"
A_IP, B_IP, C_IP, STRANGER = "198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.9"
A_MAC, B_MAC, C_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
PORTS = {"udp": 8285, "vxlan": 8472}
CLONE_NEWNET = 0x40000000

ENGINES = [pytest.param(ReferenceEngine, id="reference"),
           pytest.param(Engine, id="compiled",
                        marks=pytest.mark.skipif(Engine is None, reason="compiled engine not built"))]
needs_compiled = pytest.mark.skipif(Engine is None, reason="compiled engine not built")

_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(name: str, fn):
    """Run ``fn`` in a short-lived thread inside namespace ``name``; sockets it makes stay there."""
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
    name = f"wfte{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        for addr in (A_IP, B_IP, C_IP, STRANGER):
            subprocess.run(["ip", "-n", name, "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def udp_socket(ns: str, addr: str, port: int = 0, gro: bool = False) -> socket.socket:
    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: bursts must not drop
        s.bind((addr, port))
        if gro:
            s.setsockopt(socket.IPPROTO_UDP, 104, 1)
        return s
    return in_netns(ns, make)


class Node:
    """One engine: its TUN stand-in (``tun``, the test's end) and its UDP socket in the namespace."""

    def __init__(self, cls, ns: str, mode: str, *, vnet_hdr: bool = False, mtu: int = 0,
                 subnet: str = A_SUB, ip: str = A_IP, mac: str = A_MAC, sock_port: int = 0):
        self.mode, self.ip, self.mac, self.port = mode, ip, mac, PORTS[mode]
        self.tun, self._engine_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.tun, self._engine_end):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock = udp_socket(ns, ip, sock_port)  # 0 unless a test sends to the engine
        self.engine = cls(self._engine_end.fileno(), self.sock.fileno(), mode=mode, network=NETWORK,
                          subnet_len=24, local_subnet=subnet, vni=1, vtep_mac=mac, port=self.port,
                          mtu=mtu, vnet_hdr=vnet_hdr)

    def tun_read_all(self, wait: float = 0.0) -> list[bytes]:
        out = []
        self.tun.settimeout(wait if wait else 0.0001)
        while True:
            try:
                out.append(self.tun.recv(70000))
            except (BlockingIOError, socket.timeout):
                return out
            self.tun.settimeout(0.2 if wait else 0.0001)

    def close(self) -> None:
        self.engine.close()
        for s in (self.tun, self._engine_end, self.sock):
            s.close()


@pytest.fixture
def make_node(ns):
    made = []

    def make(cls, mode, **kw):
        node = Node(cls, ns, mode, **kw)
        made.append(node)
        return node
    yield make
    for node in made:
        node.close()


def vxlan(inner: bytes, dst_mac: str, src_mac: str, vni: int = 1) -> bytes:
    return raw(VXLAN(flags=0x08, vni=vni) / Ether(dst=dst_mac, src=src_mac, type=0x0800)) + inner


def encapsulated(mode: str, inner: bytes, dst_mac: str = A_MAC, src_mac: str = B_MAC) -> bytes:
    return inner if mode == "udp" else vxlan(inner, dst_mac, src_mac)


def recv_all(sock: socket.socket, wait: float = 2.0) -> list[tuple[bytes, tuple]]:
    out = []
    sock.settimeout(wait)
    while True:
        try:
            out.append(sock.recvfrom(70000))
        except socket.timeout:
            return out
        sock.settimeout(0.2)


def sent_to(node: "Node", peer: socket.socket, read: bytes) -> list[bytes]:
    """Start ``node``'s engine, hand it one TUN read, return the datagrams ``peer`` got (closed)."""
    try:
        node.engine.start()
        node.tun.send(read)
        return [d for d, _ in recv_all(peer)]
    finally:
        peer.close()


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


# -- byte-level encap and decap ------------------------------------------------------------------

INNER_CASES = {
    "icmp": lambda: raw(IP(src="10.244.1.2", dst="10.244.2.2", id=7) / ICMP(id=1, seq=1) / b"ping"),
    "udp": lambda: raw(IP(src="10.244.1.5", dst="10.244.2.9", ttl=3) / UDP(sport=53, dport=5353) / (b"x" * 300)),
    "tcp-options": lambda: raw(IP(src="10.244.1.2", dst="10.244.2.2", options=[b"\x01" * 4])
                               / TCP(sport=1, dport=2, flags="S", options=[("MSS", 1400)])),
    "full-mtu": lambda: raw(IP(src="10.244.1.2", dst="10.244.2.2") / UDP() / (b"\xab" * 1422)),
}


@pytest.mark.parametrize("mode", ["udp", "vxlan"])
@pytest.mark.parametrize("case", sorted(INNER_CASES))
@pytest.mark.parametrize("cls", ENGINES)
def test_encap_matches_scapy(make_node, ns, cls, mode, case):
    node = make_node(cls, mode, sock_port=PORTS[mode])
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    peer = udp_socket(ns, B_IP, PORTS[mode])
    try:
        node.engine.start()
        inner = INNER_CASES[case]()
        node.tun.send(inner)
        got = recv_all(peer)
    finally:
        peer.close()
    expected = inner if mode == "udp" else raw(
        VXLAN(flags=0x08, vni=1) / Ether(dst=B_MAC, src=A_MAC, type=0x0800) / IP(inner))
    assert [d for d, _ in got] == [expected]
    assert got[0][1] == (A_IP, PORTS[mode])
    s = node.engine.stats()
    assert (s["tx_packets"], s["tx_bytes"]) == (1, len(inner))


@pytest.mark.parametrize("mode", ["udp", "vxlan"])
@pytest.mark.parametrize("case", sorted(INNER_CASES))
@pytest.mark.parametrize("cls", ENGINES)
def test_decap_matches_scapy(make_node, ns, cls, mode, case):
    node = make_node(cls, mode, mtu=1472 if mode == "udp" else 1450, sock_port=PORTS[mode])
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    # the same packet travelling back: from pod 10.244.2.x to 10.244.1.x
    pkt = IP(INNER_CASES[case]())
    pkt.src, pkt.dst = pkt.dst, pkt.src
    del pkt.chksum
    inner = raw(pkt)
    sender = udp_socket(ns, B_IP, 0)
    try:
        node.engine.start()
        sender.sendto(encapsulated(mode, inner), (A_IP, PORTS[mode]))
        got = node.tun_read_all(wait=2.0)
    finally:
        sender.close()
    assert got == [inner]
    s = node.engine.stats()
    assert (s["rx_packets"], s["rx_bytes"], s["rx_datagrams"]) == (1, len(inner), 1)


def test_vxlan_frame_from_kernel_layout_is_padded_ethernet(make_node):
    """A short inner packet in a frame with Ethernet padding (as some senders pad to 60 bytes)
    is delivered without the padding, in both engines."""
    inner = raw(IP(src="10.244.2.2", dst="10.244.1.2") / ICMP())
    frame = vxlan(inner, A_MAC, B_MAC) + b"\0" * 18
    outs = []
    for cls in (ReferenceEngine, Engine) if Engine else (ReferenceEngine,):
        node = make_node(cls, "vxlan")
        node.engine.set_route(B_SUB, B_IP, B_MAC)
        node.engine._inject_rx(frame, B_IP)
        outs.append(node.tun_read_all())
    assert all(o == [inner] for o in outs)


# -- hostile input: every case lands in one named counter, in both engines ----------------------
#
# Each case names the one counter it must land in. The receive checks run in a fixed order (see
# docs/hostile-input.md and rx_segment in fastpath/engine/udp_io.pxi) and a datagram lands in the
# first one it fails, so e.g. a stranger's datagram with a wrong VNI counts as wrong_vni, not
# unknown_peer.

def _inner(payload: bytes = b"data", **ip) -> bytes:
    """A valid inner UDP packet from pod 10.244.2.2 (peer B's subnet) to 10.244.1.2 (ours);
    ``ip``: IPv4 fields to override (scapy recomputes the header checksum, so the field named is
    the packet's only defect)."""
    fields = dict(src="10.244.2.2", dst="10.244.1.2")
    fields.update(ip)
    return raw(IP(**fields) / UDP(sport=1, dport=2) / payload)


def _rx_cases(mode: str) -> list[tuple[str, bytes, str, str]]:
    """(name, datagram, outer source, the counter it lands in) for a node of Network 10.244.0.0/16
    holding 10.244.1.0/24, with routes to B (10.244.2.0/24) and C (10.244.3.0/24), mtu 1472."""
    good = _inner()
    bad_csum = bytearray(good)
    bad_csum[10] ^= 0xFF
    enc = lambda p: encapsulated(mode, p)  # noqa: E731
    cases = [
        ("good", enc(good), B_IP, "rx_packets"),
        ("good-from-second-peer", enc(_inner(src="10.244.3.7")), C_IP, "rx_packets"),
        ("trailing-bytes", enc(good + b"pad"), B_IP, "rx_packets"),          # delivered trimmed
        ("unknown-peer", enc(good), STRANGER, "rx_drop_unknown_peer"),
        ("zero-source", enc(_inner(src="10.99.0.1")), "0.0.0.0", "rx_drop_unknown_peer"),
        ("zero-source-peer-subnet", enc(good), "0.0.0.0", "rx_drop_unknown_peer"),
        ("spoofed-src", enc(_inner(src="10.244.3.2")), B_IP, "rx_drop_spoofed_src"),
        ("spoofed-unrouted-subnet", enc(_inner(src="10.244.9.2")), B_IP, "rx_drop_spoofed_src"),
        ("spoofed-own-subnet", enc(_inner(src="10.244.1.9")), B_IP, "rx_drop_spoofed_src"),
        ("outside-network", enc(_inner(src="10.99.0.1")), B_IP, "rx_drop_spoofed_src"),
        ("bad-ip-csum", enc(bytes(bad_csum)), B_IP, "rx_drop_bad_ip"),
        ("ihl-below-5", enc(_inner(ihl=4)), B_IP, "rx_drop_bad_ip"),
        ("length-below-header", enc(_inner(len=19)), B_IP, "rx_drop_bad_ip"),
        ("length-beyond-data", enc(_inner(len=1400)), B_IP, "rx_drop_bad_ip"),
        ("header-beyond-length", enc(_inner(ihl=15, len=40)), B_IP, "rx_drop_bad_ip"),
        ("ipv6", enc(bytes([0x60]) + b"\0" * 39), B_IP, "rx_drop_not_ipv4"),
        ("version-0", enc(b"\x05" + good[1:]), B_IP, "rx_drop_not_ipv4"),
        ("truncated-header", enc(good[:12]), B_IP, "rx_drop_short"),
        ("one-byte", enc(b"\x45"), B_IP, "rx_drop_short"),
        ("oversized", enc(_inner(b"z" * 2000)), B_IP, "rx_drop_oversized"),
        ("oversized-from-stranger", enc(_inner(b"z" * 2000)), STRANGER, "rx_drop_oversized"),
        ("bad-ip-from-stranger", enc(bytes(bad_csum)), STRANGER, "rx_drop_bad_ip"),
    ]
    if mode == "udp":
        cases.append(("empty", b"", B_IP, "rx_drop_short"))
    else:
        v = vxlan(good, A_MAC, B_MAC)
        cases += [
            ("empty", b"", B_IP, "rx_drop_short"),
            ("vxlan-truncated", v[:21], B_IP, "rx_drop_short"),
            ("vxlan-no-inner", vxlan(b"", A_MAC, B_MAC), B_IP, "rx_drop_short"),
            ("no-I-flag", b"\x00" + v[1:], B_IP, "rx_drop_bad_vxlan"),
            # reserved bits: must be zero (as Linux's vxlan without extensions)
            ("reserved-flag-bit", b"\x0c" + v[1:], B_IP, "rx_drop_bad_vxlan"),
            ("reserved-bytes-1-3", v[:2] + b"\x01" + v[3:], B_IP, "rx_drop_bad_vxlan"),
            ("reserved-byte-7", v[:7] + b"\x01" + v[8:], B_IP, "rx_drop_bad_vxlan"),
            ("wrong-vni", vxlan(good, A_MAC, B_MAC, vni=2), B_IP, "rx_drop_wrong_vni"),
            ("wrong-vni-from-stranger", vxlan(good, A_MAC, B_MAC, vni=2), STRANGER, "rx_drop_wrong_vni"),
            ("wrong-mac", vxlan(good, "02:00:00:00:00:99", B_MAC), B_IP, "rx_drop_wrong_mac"),
            ("broadcast-mac", vxlan(good, "ff:ff:ff:ff:ff:ff", B_MAC), B_IP, "rx_drop_wrong_mac"),
            ("arp", raw(VXLAN(flags=0x08, vni=1) / Ether(dst=A_MAC, src=B_MAC, type=0x0806)) + b"\0" * 28,
             B_IP, "rx_drop_not_ipv4"),
            ("vlan-tagged", v[:20] + b"\x81\x00" + v[22:], B_IP, "rx_drop_not_ipv4"),
        ]
    return cases


RX_ENGINES = [pytest.param(ReferenceEngine, False, id="reference"),
              pytest.param(Engine, False, id="compiled",
                           marks=pytest.mark.skipif(Engine is None, reason="compiled engine not built")),
              pytest.param(Engine, True, id="compiled-vnet",
                           marks=pytest.mark.skipif(Engine is None, reason="compiled engine not built"))]


def outcomes(d: dict, direction: str = "rx") -> dict:
    """The outcome counters in ``d`` that are not 0: {rx,tx}_packets and every {rx,tx}_drop_* (by
    name, so a drop counter the engine adds is an outcome here without being listed)."""
    return {k: v for k, v in d.items()
            if v and (k == f"{direction}_packets" or k.startswith(f"{direction}_drop_"))}


@pytest.mark.parametrize("mode", ["udp", "vxlan"])
@pytest.mark.parametrize("cls,vnet", RX_ENGINES)
def test_each_received_case_lands_in_its_counter(make_node, cls, vnet, mode):
    node = make_node(cls, mode, mtu=1472, vnet_hdr=vnet)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    node.engine.set_route(C_SUB, C_IP, C_MAC)
    wrong = {}
    for name, dgram, src, counter in _rx_cases(mode):
        before = node.engine.stats()
        node.engine._inject_rx(dgram, src)
        d = delta(before, node.engine.stats())
        written = node.tun_read_all()
        if d.get("rx_datagrams") != 1 or outcomes(d) != {counter: 1} or len(written) != (counter == "rx_packets"):
            wrong[name] = (counter, d, len(written))
    assert not wrong


@needs_compiled
@pytest.mark.parametrize("mode", ["udp", "vxlan"])
def test_engines_agree_on_receive(make_node, mode):
    """Same bytes to the TUN and the same counters, case by case."""
    ref = make_node(ReferenceEngine, mode, mtu=1472)
    fast = make_node(Engine, mode, mtu=1472)
    for node in (ref, fast):
        node.engine.set_route(B_SUB, B_IP, B_MAC)
        node.engine.set_route(C_SUB, C_IP, C_MAC)
    for name, dgram, src, counter in _rx_cases(mode):
        results = []
        for node in (ref, fast):
            before = node.engine.stats()
            node.engine._inject_rx(dgram, src)
            results.append((node.tun_read_all(), delta(before, node.engine.stats())))
        assert results[0] == results[1], name
        assert outcomes(results[0][1]) == {counter: 1}, (name, results[0][1])


def _tx_cases() -> list[tuple[str, bytes, str]]:
    """(name, TUN read, the counter it lands in) for the node of _rx_cases; B gets 3 packets, C 1."""
    to_b = raw(IP(src="10.244.1.2", dst="10.244.2.2") / UDP() / b"pad")
    return [
        ("to-b", raw(IP(src="10.244.1.2", dst="10.244.2.2") / ICMP()), "tx_packets"),
        ("to-c", raw(IP(src="10.244.1.2", dst="10.244.3.2") / UDP() / b"to C"), "tx_packets"),
        ("trailing-bytes", to_b + b"trailing", "tx_packets"),          # sent trimmed
        ("ip-options", raw(IP(src="10.244.1.2", dst="10.244.2.2", options=[b"\x01" * 4]) / UDP()), "tx_packets"),
        ("no-route", raw(IP(src="10.244.1.2", dst="10.244.4.2") / UDP()), "tx_drop_no_route"),
        ("outside-network", raw(IP(src="10.244.1.2", dst="8.8.8.8") / UDP()), "tx_drop_no_route"),
        ("own-subnet", raw(IP(src="10.244.1.2", dst="10.244.1.3") / UDP()), "tx_drop_no_route"),
        ("ipv6", bytes([0x60]) + b"\0" * 39, "tx_drop_not_ipv4"),
        ("short", b"\x45\x00", "tx_drop_malformed"),
        ("ihl-below-5", raw(IP(src="10.244.1.2", dst="10.244.2.2", ihl=4) / UDP()), "tx_drop_malformed"),
        ("ihl-beyond-data", b"\x4f" + to_b[1:20], "tx_drop_malformed"),
        ("length-beyond-data", raw(IP(src="10.244.1.2", dst="10.244.2.2", len=1400) / UDP()), "tx_drop_malformed"),
        ("length-below-header", raw(IP(src="10.244.1.2", dst="10.244.2.2", len=19) / UDP()), "tx_drop_malformed"),
    ]


@pytest.mark.parametrize("mode", ["udp", "vxlan"])
@pytest.mark.parametrize("cls,vnet", RX_ENGINES)
def test_each_sent_case_lands_in_its_counter(make_node, ns, cls, vnet, mode):
    node = make_node(cls, mode, vnet_hdr=vnet)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    node.engine.set_route(C_SUB, C_IP, C_MAC)
    b = udp_socket(ns, B_IP, PORTS[mode])
    c = udp_socket(ns, C_IP, PORTS[mode])
    wrong = {}
    try:
        for name, pkt, counter in _tx_cases():
            before = node.engine.stats()
            node.engine._inject_tx((vnet_hdr() if vnet else b"") + pkt)
            d = delta(before, node.engine.stats())
            if d.get("tx_reads") != 1 or outcomes(d, "tx") != {counter: 1}:
                wrong[name] = (counter, d)
        got = ([d for d, _ in recv_all(b, 0.5)], [d for d, _ in recv_all(c, 0.2)])
    finally:
        b.close()
        c.close()
    assert not wrong
    strip = (lambda d: d[22:]) if mode == "vxlan" else (lambda d: d)
    cases = {name: pkt for name, pkt, _ in _tx_cases()}
    assert [strip(d) for d in got[0]] == [cases["to-b"], cases["trailing-bytes"][:-len(b"trailing")],
                                          cases["ip-options"]]
    assert [strip(d) for d in got[1]] == [cases["to-c"]]


@needs_compiled
@pytest.mark.parametrize("mode", ["udp", "vxlan"])
def test_engines_agree_on_send(make_node, ns, mode):
    """A running engine of each kind gets the same reads: same datagrams out, same counters."""
    port = PORTS[mode]
    cases = [pkt for _, pkt, _ in _tx_cases()]
    results = []
    for cls in (ReferenceEngine, Engine):
        node = make_node(cls, mode)
        node.engine.set_route(B_SUB, B_IP, B_MAC)
        node.engine.set_route(C_SUB, C_IP, C_MAC)
        b = udp_socket(ns, B_IP, port)
        c = udp_socket(ns, C_IP, port)
        try:
            node.engine.start()
            for pkt in cases:
                node.tun.send(pkt)
            deadline = time.time() + 10
            while time.time() < deadline and node.engine.stats()["tx_reads"] < len(cases):
                time.sleep(0.02)
            node.engine.stop()
            got = ([d for d, _ in recv_all(b, 0.5)], [d for d, _ in recv_all(c, 0.5)])
        finally:
            b.close()
            c.close()
        s = node.engine.stats()
        results.append((got, {k: v for k, v in s.items()
                              if k.startswith("tx_drop") or k in ("tx_packets", "tx_bytes", "tx_reads")}))
    assert results[0] == results[1]
    want = {}
    for _, _, counter in _tx_cases():
        want[counter] = want.get(counter, 0) + 1
    assert outcomes(results[0][1], "tx") == want
    assert (len(results[0][0][0]), len(results[0][0][1])) == (3, 1)


# -- offloads (compiled engine) ------------------------------------------------------------------

def vnet_hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def pseudo_sum(src: str, dst: str, proto: int, length: int) -> int:
    data = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, length)
    return (~ip_checksum(data)) & 0xFFFF


@needs_compiled
@pytest.mark.parametrize("mode", ["udp", "vxlan"])
@pytest.mark.parametrize("paylen,mss", [(5000, 1000), (64000, 1448), (1000, 1448), (4001, 1000)])
def test_tso_super_packet_is_split_like_scapy(make_node, ns, mode, paylen, mss):
    node = make_node(Engine, mode, vnet_hdr=True)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    peer = udp_socket(ns, B_IP, PORTS[mode])  # no UDP_GRO: the kernel hands us each segment
    payload = os.urandom(paylen)
    sup = IP(src="10.244.1.2", dst="10.244.2.2", id=1000, flags="DF") / TCP(
        sport=40000, dport=5201, seq=0xFFFFF000, ack=77, flags="PA", window=500,
        options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]) / payload
    wire = bytearray(raw(sup))
    ip_tcp = 20 + 32
    # as the kernel hands a TSO packet over: TCP checksum field = pseudo-header sum
    struct.pack_into("!H", wire, 36, pseudo_sum("10.244.1.2", "10.244.2.2", 6, len(wire) - 20))
    got = sent_to(node, peer, vnet_hdr(1, 1, ip_tcp, mss, 20, 16) + bytes(wire))
    nseg = max(1, -(-paylen // mss))
    expected = []
    for i in range(nseg):
        chunk = payload[i * mss:(i + 1) * mss]
        seg = IP(src="10.244.1.2", dst="10.244.2.2", id=1000 + i, flags="DF") / TCP(
            sport=40000, dport=5201, seq=(0xFFFFF000 + i * mss) & 0xFFFFFFFF, ack=77,
            flags="PA" if i == nseg - 1 else "A", window=500,
            options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]) / chunk
        expected.append(encapsulated(mode, raw(seg), B_MAC, A_MAC))
    assert len(got) == nseg
    assert got == expected
    s = node.engine.stats()
    assert s["tx_packets"] == nseg and s["tx_super_packets"] == 1
    assert s["tx_datagram_sends"] == -(-nseg // max(1, min(64, 65507 // (len(expected[0])))))


@needs_compiled
def test_uso_super_packet_is_split_like_scapy(make_node, ns):
    node = make_node(Engine, "udp", vnet_hdr=True)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    peer = udp_socket(ns, B_IP, 8285)
    payload = os.urandom(3000)
    wire = bytearray(raw(IP(src="10.244.1.2", dst="10.244.2.2", id=5) / UDP(sport=9, dport=10) / payload))
    struct.pack_into("!H", wire, 26, pseudo_sum("10.244.1.2", "10.244.2.2", 17, len(wire) - 20))
    got = sent_to(node, peer, vnet_hdr(1, 5, 28, 1200, 20, 6) + bytes(wire))
    expected = [raw(IP(src="10.244.1.2", dst="10.244.2.2", id=5 + i) / UDP(sport=9, dport=10)
                    / payload[i * 1200:(i + 1) * 1200]) for i in range(3)]
    assert got == expected


@needs_compiled
def test_needs_csum_single_packet_gets_checksum(make_node, ns):
    node = make_node(Engine, "udp", vnet_hdr=True)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    peer = udp_socket(ns, B_IP, 8285)
    pkt = IP(src="10.244.1.2", dst="10.244.2.2") / TCP(sport=5, dport=6, flags="A") / b"hello"
    wire = bytearray(raw(pkt))
    struct.pack_into("!H", wire, 36, pseudo_sum("10.244.1.2", "10.244.2.2", 6, len(wire) - 20))
    assert sent_to(node, peer, vnet_hdr(1, 0, 0, 0, 20, 16) + bytes(wire)) == [raw(pkt)]


def _tso(paylen: int, dataofs: int | None = None, dst: str = "10.244.2.2") -> bytes:
    """A TCP super-packet as the TUN hands it over: checksum field = pseudo-header sum."""
    tcp = TCP(sport=40000, dport=5201, seq=1, ack=77, flags="PA")
    if dataofs is not None:
        tcp.dataofs = dataofs
    wire = bytearray(raw(IP(src="10.244.1.2", dst=dst, id=1000, flags="DF") / tcp / (b"t" * paylen)))
    struct.pack_into("!H", wire, 36, pseudo_sum("10.244.1.2", dst, 6, len(wire) - 20))
    return bytes(wire)


def _uso(paylen: int) -> bytes:
    wire = bytearray(raw(IP(src="10.244.1.2", dst="10.244.2.2", id=5) / UDP(sport=9, dport=10) / (b"u" * paylen)))
    struct.pack_into("!H", wire, 26, pseudo_sum("10.244.1.2", "10.244.2.2", 17, len(wire) - 20))
    return bytes(wire)


# TUN reads with a virtio_net_hdr the engine must refuse, and the counter each lands in.
# The largest IPv4 packet is 65535 bytes: a TCP payload of 65495 behind 40 bytes of headers.
VNET_TX_CASES = {
    "vnet-header-truncated": (lambda: vnet_hdr(1, 1, 40, 1000)[:6], "tx_drop_malformed"),
    "tso-gso-size-0": (lambda: vnet_hdr(1, 1, 40, 0, 20, 16) + _tso(5000), "tx_drop_malformed"),
    "uso-gso-size-0": (lambda: vnet_hdr(1, 5, 28, 0, 20, 6) + _uso(3000), "tx_drop_malformed"),
    "tso-doff-below-5": (lambda: vnet_hdr(1, 1, 40, 1000, 20, 16) + _tso(5000, dataofs=4), "tx_drop_malformed"),
    "tso-doff-0": (lambda: vnet_hdr(1, 1, 40, 1000, 20, 16) + _tso(5000, dataofs=0), "tx_drop_malformed"),
    "tso-options-beyond-data": (lambda: vnet_hdr(1, 1, 80, 1000, 20, 16) + _tso(20, dataofs=15),
                                "tx_drop_malformed"),
    "tso-tcp-header-truncated": (lambda: vnet_hdr(1, 1, 40, 1000, 20, 16) + _tso(0)[:32], "tx_drop_malformed"),
    "uso-udp-header-truncated": (lambda: vnet_hdr(1, 5, 28, 1000, 20, 6) + _uso(0)[:24], "tx_drop_malformed"),
    # a segment no UDP datagram can carry (65,507 bytes at most): the 16-bit size must not wrap
    "tso-segment-beyond-datagram": (lambda: vnet_hdr(1, 1, 40, 65480, 20, 16) + _tso(65495),
                                    "tx_drop_gso_unsupported"),
    "tso-gso-above-payload-beyond-datagram": (lambda: vnet_hdr(1, 1, 40, 65535, 20, 16) + _tso(65495),
                                              "tx_drop_gso_unsupported"),
    "tcpv4-gso-on-udp": (lambda: vnet_hdr(1, 1, 28, 1000, 20, 6) + _uso(3000), "tx_drop_gso_unsupported"),
    "uso-gso-on-tcp": (lambda: vnet_hdr(1, 5, 40, 1000, 20, 16) + _tso(3000), "tx_drop_gso_unsupported"),
    "gso-tcpv6": (lambda: vnet_hdr(1, 4, 40, 1000, 20, 16) + _tso(3000), "tx_drop_gso_unsupported"),
    "gso-ufo": (lambda: vnet_hdr(1, 3, 28, 1000, 20, 6) + _uso(3000), "tx_drop_gso_unsupported"),
    "needs-csum-beyond-packet": (lambda: vnet_hdr(1, 0, 0, 0, 20, 200) + _tso(10), "tx_drop_malformed"),
    "needs-csum-in-ip-header": (lambda: vnet_hdr(1, 0, 0, 0, 10, 0) + _tso(10), "tx_drop_malformed"),
}


@needs_compiled
@pytest.mark.parametrize("mode", ["udp", "vxlan"])
def test_malformed_vnet_reads_land_in_their_counter(make_node, ns, mode):
    node = make_node(Engine, mode, vnet_hdr=True)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    peer = udp_socket(ns, B_IP, PORTS[mode])
    wrong = {}
    try:
        for name in sorted(VNET_TX_CASES):
            read, counter = VNET_TX_CASES[name]
            before = node.engine.stats()
            node.engine._inject_tx(read())
            d = delta(before, node.engine.stats())
            if d.get("tx_reads") != 1 or outcomes(d, "tx") != {counter: 1}:
                wrong[name] = (counter, d)
        sent = recv_all(peer, 0.3)
    finally:
        peer.close()
    assert not wrong
    assert sent == []


@needs_compiled
@pytest.mark.parametrize("mode", ["udp", "vxlan"])
def test_gso_size_above_payload_is_one_segment(make_node, ns, mode):
    """A GSO read whose segment size exceeds its payload is sent as one packet, checksums done."""
    node = make_node(Engine, mode, vnet_hdr=True)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    peer = udp_socket(ns, B_IP, PORTS[mode])
    try:
        node.engine._inject_tx(vnet_hdr(1, 1, 40, 9000, 20, 16) + _tso(5000))
        got = [d for d, _ in recv_all(peer, 1.0)]
    finally:
        peer.close()
    want = raw(IP(src="10.244.1.2", dst="10.244.2.2", id=1000, flags="DF")
               / TCP(sport=40000, dport=5201, seq=1, ack=77, flags="PA") / (b"t" * 5000))
    assert got == [encapsulated(mode, want, B_MAC, A_MAC)]
    s = node.engine.stats()
    assert (s["tx_packets"], s["tx_super_packets"]) == (1, 1)


def _segments(n: int, size: int, seq0: int = 1000, last: int | None = None, flags_last="A"):
    segs = []
    seq = seq0
    for i in range(n):
        ln = last if (last is not None and i == n - 1) else size
        data = bytes([i & 0xFF]) * ln
        segs.append(raw(IP(src="10.244.2.2", dst="10.244.1.2", id=i, flags="DF")
                        / TCP(sport=5201, dport=40000, seq=seq, ack=9, window=100,
                              flags=flags_last if i == n - 1 else "A") / data))
        seq += ln
    return segs


@needs_compiled
@pytest.mark.parametrize("mode", ["udp", "vxlan"])
def test_gro_merges_in_order_segments_into_one_gso_write(make_node, mode):
    node = make_node(Engine, mode, vnet_hdr=True)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    segs = _segments(5, 1000, flags_last="PA")
    dgrams = [encapsulated(mode, s) for s in segs]
    node.engine._inject_rx(b"".join(dgrams), B_IP, gro=len(dgrams[0]))
    out = node.tun_read_all()
    assert len(out) == 1
    vh = struct.unpack("<BBHHHH", out[0][:10])
    assert vh == (1, 1, 40, 1000, 20, 16)
    pkt = out[0][10:]
    merged = IP(src="10.244.2.2", dst="10.244.1.2", id=0, flags="DF") / TCP(
        sport=5201, dport=40000, seq=1000, ack=9, window=100, flags="PA") / b"".join(
        bytes([i]) * 1000 for i in range(5))
    want = bytearray(raw(merged))
    assert pkt[:36] == bytes(want[:36]) and pkt[38:] == bytes(want[38:])
    # NEEDS_CSUM: the field holds the pseudo-header sum; completing it gives scapy's checksum
    assert struct.unpack("!H", pkt[36:38])[0] == pseudo_sum("10.244.2.2", "10.244.1.2", 6, len(pkt) - 20)
    assert ip_checksum(pkt[20:]) == struct.unpack("!H", want[36:38])[0]
    s = node.engine.stats()
    assert (s["rx_packets"], s["rx_gro_writes"], s["rx_tun_writes"]) == (5, 1, 1)


@needs_compiled
def test_gro_does_not_merge_across_gaps_or_flows(make_node):
    node = make_node(Engine, "udp", vnet_hdr=True)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    a = _segments(3, 500, seq0=0)
    gap = _segments(2, 500, seq0=5000)          # sequence gap: new run
    other = raw(IP(src="10.244.2.3", dst="10.244.1.2") / TCP(sport=1, dport=2, seq=1500, flags="A") / (b"o" * 500))
    ping = raw(IP(src="10.244.2.2", dst="10.244.1.2") / ICMP())
    node.engine._inject_rx(b"".join(a + gap + [other]), B_IP, gro=len(a[0]))
    node.engine._inject_rx(ping, B_IP)
    out = node.tun_read_all()
    kinds = [(struct.unpack("<BBHHHH", o[:10])[1], len(o) - 10) for o in out]
    assert kinds == [(1, 40 + 1500), (1, 40 + 1000), (0, 540), (0, len(ping))]
    assert node.engine.stats()["rx_packets"] == 7


@needs_compiled
def test_udp_gso_and_gro_through_real_sockets(make_node, ns):
    """Segments sent with UDP_SEGMENT arrive in one recvmmsg with a UDP_GRO size and are merged."""
    node = make_node(Engine, "udp", vnet_hdr=True, sock_port=8285)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    segs = _segments(8, 1400)
    sender = udp_socket(ns, B_IP, 0)
    try:
        sender.setsockopt(socket.IPPROTO_UDP, 103, len(segs[0]))
        node.engine.start()
        sender.sendto(b"".join(segs), (A_IP, 8285))
        out = node.tun_read_all(wait=2.0)
    finally:
        sender.close()
    assert len(out) == 1 and len(out[0]) == 10 + 40 + 8 * 1400
    s = node.engine.stats()
    assert s["rx_packets"] == 8 and s["rx_gro_writes"] == 1


# -- fuzz ----------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _mutations():
    base = raw(IP(src="10.244.2.2", dst="10.244.1.2") / TCP(sport=1, dport=2, flags="A") / (b"q" * 40))
    return st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)).map(
            lambda t: base[:t[0]] + bytes([t[1]]) + base[t[0] + 1:]),
        st.integers(0, len(base)).map(lambda n: base[:n]),
        st.just(base),
    )


@needs_compiled
@pytest.mark.parametrize("mode", ["udp", "vxlan"])
def test_fuzz_receive_every_datagram_accounted_and_engines_agree(ns, mode):
    ref = Node(ReferenceEngine, ns, mode, mtu=1472)
    fast = Node(Engine, ns, mode, mtu=1472)
    gro = Node(Engine, ns, mode, mtu=1472, vnet_hdr=True)
    nodes = (ref, fast, gro)
    for node in nodes:
        node.engine.set_route(B_SUB, B_IP, B_MAC)
        node.engine.set_route(C_SUB, C_IP, C_MAC)

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(inner=_mutations(), wrap=st.booleans(), src=st.sampled_from([B_IP, C_IP, STRANGER]),
           vni=st.sampled_from([1, 1, 1, 7]), copies=st.integers(1, 3))
    def check(inner, wrap, src, vni, copies):
        dgram = vxlan(inner, A_MAC, B_MAC, vni) if (mode == "vxlan" and wrap) else inner
        copies = copies if dgram else 1      # several: one UDP GRO message of equal datagrams
        outs = []
        for node in nodes:
            before = node.engine.stats()
            node.engine._inject_rx(dgram * copies, src, len(dgram) if copies > 1 else 0)
            d = delta(before, node.engine.stats())
            assert d.get("rx_datagrams") == copies
            assert sum(outcomes(d).values()) == copies, d
            got = node.tun_read_all()
            if node is gro:
                got = [g[10:] for g in got]
            outs.append((got, outcomes(d)))
        assert outs[0] == outs[1] == outs[2]

    try:
        check()
    finally:
        for node in nodes:
            node.close()


def _vnet_reads():
    """TUN reads of a vnet engine: any header (GSO types, sizes, checksum offsets) in front of a
    TCP or UDP super-packet, cut short or with one byte changed."""
    bases = (_tso(3000), _uso(2000), raw(IP(src="10.244.1.2", dst="10.244.2.2") / ICMP() / b"x"))
    packet = st.tuples(st.sampled_from(bases), st.integers(0, 3100), st.integers(0, 3100),
                       st.integers(0, 255)).map(     # (base, byte to change, length cut to, new byte)
        lambda t: (t[0][:t[1]] + bytes([t[3]]) + t[0][t[1] + 1:])[:t[2]] if t[1] < len(t[0]) else t[0][:t[2]])
    header = st.tuples(st.sampled_from([0, 1, 2]), st.sampled_from([0, 1, 3, 4, 5, 6, 0x81, 0x85]),
                       st.integers(0, 0xFFFF),
                       st.one_of(st.sampled_from([0, 1, 7, 536, 1448, 2999, 3000, 65535]), st.integers(0, 0xFFFF)),
                       st.integers(0, 120), st.integers(0, 40))
    return st.tuples(header, packet).map(lambda t: struct.pack("<BBHHHH", *t[0]) + t[1])


@needs_compiled
@pytest.mark.parametrize("mode", ["udp", "vxlan"])
def test_fuzz_vnet_reads_each_end_in_one_outcome(make_node, ns, mode):
    """No crash, and every read counted once, in tx_packets (as many as it was cut into) or in
    one tx_drop_* counter."""
    node = make_node(Engine, mode, vnet_hdr=True)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    peer = udp_socket(ns, B_IP, PORTS[mode])

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(read=_vnet_reads())
    def check(read):
        before = node.engine.stats()
        node.engine._inject_tx(read)
        d = delta(before, node.engine.stats())
        assert d.get("tx_reads") == 1 and len(outcomes(d, "tx")) == 1, d
        try:                                  # drained: the next sends find room
            while peer.recv(70000, socket.MSG_DONTWAIT):
                pass
        except BlockingIOError:
            pass

    try:
        check()
    finally:
        peer.close()


@needs_compiled
def test_running_engine_survives_garbage_and_keeps_forwarding(make_node, ns):
    node = make_node(Engine, "vxlan", vnet_hdr=True, mtu=1450, sock_port=8472)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    sender = udp_socket(ns, B_IP, 0)
    stranger = udp_socket(ns, STRANGER, 0)
    try:
        node.engine.start()
        for i in range(2000):
            (sender if i % 2 else stranger).sendto(os.urandom(i % 300), (A_IP, 8472))
        good = raw(IP(src="10.244.2.2", dst="10.244.1.2") / ICMP())
        sender.sendto(vxlan(good, A_MAC, B_MAC), (A_IP, 8472))
        deadline = time.time() + 5
        while time.time() < deadline and node.engine.stats()["rx_datagrams"] < 2001:
            time.sleep(0.05)
        out = node.tun_read_all(wait=1.0)
    finally:
        sender.close()
        stranger.close()
    s = node.engine.stats()
    assert s["rx_datagrams"] == 2001
    assert sum(outcomes(s).values()) == 2001
    assert out and out[-1][10:] == good
    assert s["rx_packets"] == 1


def udp_snmp(ns: str) -> dict[str, int]:
    """The ``Udp:`` line of /proc/net/snmp in namespace ``ns``."""
    text = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], check=True,
                          capture_output=True, text=True).stdout
    names, values = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    return dict(zip(names, map(int, values)))


def wait_for(fn, timeout: float = 20.0, settle: float = 0.3) -> None:
    """Until ``fn()`` holds, then ``settle`` seconds more (a count that would overshoot shows)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not fn():
        time.sleep(0.02)
    time.sleep(settle)


UDP_SEGMENT = 103


@pytest.mark.parametrize("mode", ["udp", "vxlan"])
@pytest.mark.parametrize("cls,vnet", RX_ENGINES)
def test_hostile_datagrams_over_a_real_socket_each_land_in_one_counter(make_node, ns, cls, vnet, mode):
    """Every case of _rx_cases, 25 times over, from real sockets at the engine's real socket while it
    runs, plus UDP_SEGMENT sends of mixed same-size datagrams (a compiled engine gets each as one
    UDP GRO message): rx_datagrams is the number sent and each class is in its own counter."""
    port = PORTS[mode]
    node = make_node(cls, mode, mtu=1472, vnet_hdr=vnet, sock_port=port)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    node.engine.set_route(C_SUB, C_IP, C_MAC)
    senders = {ip: udp_socket(ns, ip) for ip in (B_IP, C_IP, STRANGER)}
    cases = [c for c in _rx_cases(mode) if c[2] in senders]       # not 0.0.0.0: no socket has it
    good = encapsulated(mode, _inner(b"g" * 100))
    size = len(good)
    bad_csum = bytearray(good)
    bad_csum[size - len(_inner(b"g" * 100)) + 10] ^= 0xFF
    batch = [(good, "rx_packets"), (bytes(bad_csum), "rx_drop_bad_ip"),
             (encapsulated(mode, _inner(b"g" * 100, src="10.244.3.2")), "rx_drop_spoofed_src"),
             (encapsulated(mode, bytes([0x60]) + b"\0" * (size - len(encapsulated(mode, b"")) - 1)),
              "rx_drop_not_ipv4"),
             (good, "rx_packets"), (encapsulated(mode, _inner(b"g" * 10)), "rx_packets")]
    rounds = 25
    want: dict[str, int] = {}
    snmp_before = udp_snmp(ns)
    try:
        node.engine.start()
        for _ in range(rounds):
            for _, dgram, src, counter in cases:
                senders[src].sendto(dgram, (A_IP, port))
                want[counter] = want.get(counter, 0) + 1
            senders[B_IP].sendmsg([b"".join(d for d, _ in batch)],
                                  [(socket.IPPROTO_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, (A_IP, port))
            for _, counter in batch:
                want[counter] = want.get(counter, 0) + 1
        sent = sum(want.values())
        wait_for(lambda: node.engine.stats()["rx_datagrams"] >= sent)
        node.engine.stop()
    finally:
        for s in senders.values():
            s.close()
    s = node.engine.stats()
    # the kernel dropped nothing before the socket, so the engine saw every datagram sent
    assert s["rx_socket_drops"] == 0 and udp_snmp(ns)["RcvbufErrors"] == snmp_before["RcvbufErrors"]
    assert s["rx_datagrams"] == sent
    assert outcomes(s) == want
    if cls is not ReferenceEngine:            # the UDP_SEGMENT sends came as GRO messages
        assert s["rx_gro_messages"] == rounds


@pytest.mark.parametrize("cls,vnet", RX_ENGINES)
def test_datagrams_the_kernel_drops_at_the_socket_are_counted(make_node, ns, cls, vnet):
    """Datagrams that find the socket's receive buffer full never reach the engine: the kernel
    counts them (the socket's drop count, Udp RcvbufErrors in the namespace) and so does
    ``rx_socket_drops``; with ``rx_datagrams`` they add up to what was sent."""
    node = make_node(cls, "udp", vnet_hdr=vnet, sock_port=8285)
    node.engine.set_route(B_SUB, B_IP)
    node.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # after the engine's 8 MB
    sender = udp_socket(ns, B_IP)
    sent = 300
    snmp_before = udp_snmp(ns)
    try:
        for _ in range(sent):                 # the engine is not running: the buffer fills up
            sender.sendto(_inner(b"x" * 500), (A_IP, 8285))
    finally:
        sender.close()
    assert node.engine.stats()["rx_socket_drops"] > 0
    node.engine.start()
    wait_for(lambda: (lambda s: s["rx_datagrams"] + s["rx_socket_drops"] >= sent)(node.engine.stats()))
    node.engine.stop()
    s = node.engine.stats()
    assert s["rx_datagrams"] > 0 and s["rx_datagrams"] == s["rx_packets"]
    assert s["rx_datagrams"] + s["rx_socket_drops"] == sent
    assert udp_snmp(ns)["RcvbufErrors"] - snmp_before["RcvbufErrors"] == s["rx_socket_drops"]


# -- routes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ENGINES)
def test_route_add_remove(make_node, ns, cls):
    node = make_node(cls, "udp")
    eng = node.engine
    peer = udp_socket(ns, B_IP, 8285)
    pkt = raw(IP(src="10.244.1.2", dst="10.244.2.2") / ICMP())
    back = raw(IP(src="10.244.2.2", dst="10.244.1.2") / ICMP())
    try:
        eng._inject_rx(back, B_IP)
        assert eng.stats()["rx_drop_unknown_peer"] == 1
        assert eng.lookup("10.244.2.77") is None
        eng.set_route(B_SUB, B_IP)
        eng.set_route(B_SUB, B_IP)                       # idempotent
        assert eng.lookup("10.244.2.77") == (B_IP, "00:00:00:00:00:00")   # the packet path's table
        assert eng.lookup("10.244.3.77") is None
        eng._inject_rx(back, B_IP)
        assert node.tun_read_all() == [back]
        eng.start()
        node.tun.send(pkt)
        assert [d for d, _ in recv_all(peer)] == [pkt]
        eng.remove_route(B_SUB)                          # while running
        node.tun.send(pkt)
        deadline = time.time() + 5
        while time.time() < deadline and eng.stats()["tx_reads"] < 2:
            time.sleep(0.02)
        assert recv_all(peer, 0.3) == []
        assert eng.stats()["tx_drop_no_route"] == 1, eng.stats()
        eng.set_route(B_SUB, C_IP)                       # the subnet moved to another node
        eng.stop()
        eng._inject_rx(back, B_IP)
        assert eng.stats()["rx_drop_unknown_peer"] == 2     # B holds no lease any more
        eng.set_route(C_SUB, B_IP)                       # B holds 10.244.3.0/24 now
        eng._inject_rx(back, B_IP)                       # ... but sends from 10.244.2.2
        assert eng.stats()["rx_drop_spoofed_src"] == 1
    finally:
        peer.close()
    for bad in (("10.245.0.0/24", B_IP), ("10.244.2.0/25", B_IP), (A_SUB, B_IP), (B_SUB, "0.0.0.0")):
        with pytest.raises(ValueError):
            eng.set_route(*bad)
    assert (eng.lookup("10.244.2.1"), eng.lookup("10.244.3.1"), eng.lookup("10.244.1.1")) == (
        (C_IP, "00:00:00:00:00:00"), (B_IP, "00:00:00:00:00:00"), None)   # refusals changed nothing
    eng.set_route("10.244.255.0/24", C_IP)              # last index of the table
    eng.set_route("10.244.0.0/24", C_IP)                # first
    assert eng.lookup("10.244.255.255")[0] == eng.lookup("10.244.0.0")[0] == C_IP
    assert eng.lookup("10.243.255.255") is None and eng.lookup("10.245.0.0") is None


@pytest.mark.parametrize("cls", ENGINES)
def test_peers_follow_routes(make_node, cls):
    """A sender is a peer while it holds at least one route: its datagrams with a foreign inner
    source count as spoofed_src; once it holds none, as unknown_peer."""
    node = make_node(cls, "udp")
    eng = node.engine
    foreign = raw(IP(src="10.244.9.2", dst="10.244.1.2") / ICMP())      # nobody's subnet

    def lands(src):
        before = eng.stats()
        eng._inject_rx(foreign, src)
        return list(outcomes(delta(before, eng.stats())))

    assert lands(B_IP) == ["rx_drop_unknown_peer"]
    eng.set_route(B_SUB, B_IP)
    eng.set_route("10.244.5.0/24", B_IP)               # B holds two subnets
    assert lands(B_IP) == ["rx_drop_spoofed_src"]
    eng.remove_route(B_SUB)
    assert lands(B_IP) == ["rx_drop_spoofed_src"]       # still holds 10.244.5.0/24
    eng.set_route("10.244.5.0/24", C_IP)                # which moves to C
    assert lands(B_IP) == ["rx_drop_unknown_peer"]
    assert lands(C_IP) == ["rx_drop_spoofed_src"]
    eng.set_route("10.244.5.0/24", C_IP)                # the same again: C holds it once
    eng.remove_route("10.244.5.0/24")
    assert lands(C_IP) == ["rx_drop_unknown_peer"]
    assert lands("0.0.0.0") == ["rx_drop_unknown_peer"]  # unused route slots hold 0
    for i in range(256):                                 # many peers, many slots
        if i != 1:
            eng.set_route(f"10.244.{i}.0/24", f"198.19.{i // 200}.{i % 200 + 1}")
    assert lands("198.19.1.55") == ["rx_drop_spoofed_src"] and lands("198.19.1.57") == ["rx_drop_unknown_peer"]
    for i in range(256):
        if i != 1:
            eng.remove_route(f"10.244.{i}.0/24")
    assert lands("198.19.1.55") == ["rx_drop_unknown_peer"] and lands("198.19.0.1") == ["rx_drop_unknown_peer"]


@pytest.mark.parametrize("cls", ENGINES)
def test_peer_set_matches_a_model_under_churn(cls):
    """Random route changes on a Network of 16 route slots (a peer set of 32 slots) with 24
    candidate peers, so probes collide and deletions shift entries back: after every change the
    engine takes exactly the IPs that hold a route for peers. Many engines: the hash seed varies."""
    import random
    rng = random.Random(13)
    pool = [f"198.18.{i}.{i * 7 % 250 + 1}" for i in range(24)]
    subnets = [f"10.244.{i}.0/24" for i in range(1, 16)]
    for _ in range(1 if cls is ReferenceEngine else 20):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        eng = cls(b.fileno(), s.fileno(), mode="udp", network="10.244.0.0/20", subnet_len=24,
                  local_subnet="10.244.0.0/24")
        model: dict[str, str] = {}
        try:
            for _ in range(400):
                subnet = rng.choice(subnets)
                if rng.random() < 0.4:
                    eng.remove_route(subnet)
                    model.pop(subnet, None)
                else:
                    model[subnet] = rng.choice(pool)
                    eng.set_route(subnet, model[subnet])
                wrong = [ip for ip in pool + ["0.0.0.0"] if eng._is_peer(ip) != (ip in model.values())]
                assert not wrong, (model, wrong)
        finally:
            eng.close()
            for x in (a, b, s):
                x.close()


@needs_compiled
@pytest.mark.parametrize("threads", [{}, {"split_threads": True}, {"busy_poll_us": 500}],
                         ids=["duplex", "split", "busy-poll"])
def test_route_swaps_while_forwarding(ns, threads):
    """Routes change under a busy engine: no crash, no packet to a wrong peer."""
    node = Node(Engine, ns, "udp")
    node.engine.close()
    node.engine = Engine(node._engine_end.fileno(), node.sock.fileno(), mode="udp", network=NETWORK,
                         subnet_len=24, local_subnet=A_SUB, port=8285, **threads)
    b = udp_socket(ns, B_IP, 8285)
    c = udp_socket(ns, C_IP, 8285)
    node.engine.set_route(B_SUB, B_IP)
    node.engine.start()
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            node.engine.set_route(C_SUB, C_IP)
            node.engine.remove_route(C_SUB)
    t = threading.Thread(target=flip)
    t.start()
    try:
        pkt_b = raw(IP(src="10.244.1.2", dst="10.244.2.2") / UDP() / b"b")
        pkt_c = raw(IP(src="10.244.1.2", dst="10.244.3.2") / UDP() / b"c")
        for _ in range(500):
            node.tun.send(pkt_b)
            node.tun.send(pkt_c)
    finally:
        time.sleep(0.3)
        stop.set()
        t.join()
    got_b = [d for d, _ in recv_all(b, 1.0)]
    got_c = [d for d, _ in recv_all(c, 0.5)]
    b.close()
    c.close()
    node.close()
    assert got_b == [pkt_b] * 500
    assert set(got_c) <= {pkt_c}
    s = node.engine.stats()
    assert s["tx_packets"] + s["tx_drop_no_route"] == 1000


# -- kernel VXLAN peers (their quirks on a veth underlay) ------------------------------------------

@needs_compiled
def test_kernel_vxlan_gso_datagram_is_written_whole(make_node):
    """A kernel VXLAN device's GSO packet reaches a UDP socket unsegmented when it crossed a veth:
    one VXLAN header, one inner TSO packet, no UDP_GRO size (USO: with its segment size; seen
    with a kernel vxlan device in two namespaces, Linux 6.18). It goes to the TUN as one GSO write
    with the segment size derived from the MTU (TSO) or given (USO)."""
    node = make_node(Engine, "vxlan", vnet_hdr=True, mtu=1450)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    opts = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
    inner = raw(IP(src="10.244.2.2", dst="10.244.1.2", flags="DF") / TCP(
        sport=5201, dport=40000, seq=1, flags="PA", options=opts) / (b"k" * 6990))
    node.engine._inject_rx(vxlan(inner, A_MAC, B_MAC), B_IP, 0)
    out = node.tun_read_all()
    assert len(out) == 1
    assert struct.unpack("<BBHHHH", out[0][:10]) == (1, 1, 52, 1398, 20, 16)
    assert out[0][10:46] == inner[:36] and out[0][48:] == inner[38:]
    uso = raw(IP(src="10.244.2.2", dst="10.244.1.2") / UDP(sport=7, dport=8) / (b"u" * 6000))
    node.engine._inject_rx(vxlan(uso, A_MAC, B_MAC), B_IP, 1200)
    out = node.tun_read_all()
    assert len(out) == 1
    assert struct.unpack("<BBHHHH", out[0][:10]) == (1, 5, 28, 1200, 20, 6)
    assert out[0][10:36] == uso[:26] and out[0][38:] == uso[28:]
    s = node.engine.stats()
    assert (s["rx_datagrams"], s["rx_super_packets"], s["rx_packets"]) == (2, 2, 2)


@needs_compiled
def test_tcp_above_mtu_with_a_gro_size_is_cut_into_datagrams(make_node):
    """A TCP packet above the MTU never comes with a GRO size from a kernel VXLAN sender: such a
    message is UDP GRO's work on separate datagrams, so it is cut at the GRO size and each piece
    counted (here none is a VXLAN packet: bad_vxlan)."""
    node = make_node(Engine, "vxlan", vnet_hdr=True, mtu=1450)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    msg = vxlan(_kernel_super(), A_MAC, B_MAC)
    before = node.engine.stats()
    node.engine._inject_rx(msg, B_IP, 1398)
    d = delta(before, node.engine.stats())
    pieces = -(-len(msg) // 1398)
    assert (d["rx_datagrams"], d["rx_gro_messages"]) == (pieces, 1)
    assert outcomes(d) == {"rx_drop_bad_ip": 1, "rx_drop_bad_vxlan": pieces - 1}
    assert node.tun_read_all() == []


def _kernel_super(payload: int = 6990, **tcp) -> bytes:
    """The inner packet of a kernel VXLAN sender's unsegmented GSO datagram (TCP, from B's pod)."""
    return raw(IP(src="10.244.2.2", dst="10.244.1.2", flags="DF")
               / TCP(sport=5201, dport=40000, seq=1, flags="A", **tcp) / (b"k" * payload))


# Unsegmented kernel VXLAN datagrams (inner packet above the MTU of 1450) that cannot be passed on
# whole, and the counter each lands in: one datagram, one count.
SUPER_RX_CASES = {
    "tcp-doff-below-5": (lambda: _kernel_super(dataofs=2), 0, "rx_drop_bad_ip"),
    "tcp-doff-0": (lambda: _kernel_super(dataofs=0), 0, "rx_drop_bad_ip"),
    "uso-segment-above-mtu": (lambda: raw(IP(src="10.244.2.2", dst="10.244.1.2") / UDP() / (b"u" * 6000)), 1423,
                              "rx_drop_oversized"),
    "fragment": (lambda: raw(IP(src="10.244.2.2", dst="10.244.1.2", flags="MF")
                             / TCP(sport=5201, dport=40000, flags="A") / (b"f" * 6990)), 0, "rx_drop_oversized"),
    "not-tcp-or-udp": (lambda: raw(IP(src="10.244.2.2", dst="10.244.1.2") / ICMP() / (b"i" * 6990)), 0,
                       "rx_drop_oversized"),
    "udp-without-gro-size": (lambda: raw(IP(src="10.244.2.2", dst="10.244.1.2") / UDP() / (b"u" * 6990)), 0,
                             "rx_drop_oversized"),      # USO always comes with its segment size
    "spoofed-src": (lambda: raw(IP(src="10.244.3.2", dst="10.244.1.2") / TCP(flags="A") / (b"s" * 6990)), 0,
                    "rx_drop_spoofed_src"),
    "from-stranger": (lambda: _kernel_super(), 0, "rx_drop_unknown_peer"),
}


@needs_compiled
def test_unsegmented_kernel_vxlan_datagram_edges(make_node):
    node = make_node(Engine, "vxlan", vnet_hdr=True, mtu=1450)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    node.engine.set_route(C_SUB, C_IP, C_MAC)
    wrong = {}
    for name in sorted(SUPER_RX_CASES):
        inner, gro, counter = SUPER_RX_CASES[name]
        before = node.engine.stats()
        node.engine._inject_rx(vxlan(inner(), A_MAC, B_MAC), STRANGER if name == "from-stranger" else B_IP, gro)
        d = delta(before, node.engine.stats())
        if d.get("rx_datagrams") != 1 or outcomes(d) != {counter: 1} or node.tun_read_all():
            wrong[name] = (counter, d)
    assert not wrong


@pytest.mark.parametrize("cls", ENGINES)
def test_unsegmented_kernel_vxlan_datagram_without_vnet_is_one_oversized_datagram(make_node, cls):
    """Without a vnet header nothing can take a super-packet: it is one datagram, too large;
    never cut at the GRO size into pieces that are no datagrams at all."""
    node = make_node(cls, "vxlan", mtu=1450)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    before = node.engine.stats()
    node.engine._inject_rx(vxlan(_kernel_super(), A_MAC, B_MAC), B_IP, 0)
    uso = raw(IP(src="10.244.2.2", dst="10.244.1.2") / UDP() / (b"u" * 6000))
    node.engine._inject_rx(vxlan(uso, A_MAC, B_MAC), B_IP, 1200)
    d = delta(before, node.engine.stats())
    assert (d.get("rx_datagrams"), outcomes(d)) == (2, {"rx_drop_oversized": 2})
    assert node.tun_read_all() == []


@pytest.mark.parametrize("mode", ["udp", "vxlan"])
@pytest.mark.parametrize("cls,vnet", RX_ENGINES)
def test_gro_batch_counts_every_datagram_in_it(make_node, cls, vnet, mode):
    """A UDP GRO message is several datagrams of one size (the last may be shorter): each is
    checked and counted on its own, whatever is wrong with its neighbours."""
    node = make_node(cls, mode, mtu=1472, vnet_hdr=vnet)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    node.engine.set_route(C_SUB, C_IP, C_MAC)
    good = encapsulated(mode, _inner(b"g" * 100))
    size = len(good)
    bad_csum = bytearray(good)
    bad_csum[size - len(_inner(b"g" * 100)) + 10] ^= 0xFF
    spoofed = encapsulated(mode, _inner(b"g" * 100, src="10.244.3.2"))
    v6 = encapsulated(mode, bytes([0x60]) + b"\0" * (size - len(encapsulated(mode, b"")) - 1))
    batch = [good, bytes(bad_csum), spoofed, v6, good, encapsulated(mode, _inner(b"g" * 10))]
    assert {len(d) for d in batch[:-1]} == {size}
    before = node.engine.stats()
    node.engine._inject_rx(b"".join(batch), B_IP, size)
    d = delta(before, node.engine.stats())
    assert d.get("rx_datagrams") == 6
    assert outcomes(d) == {"rx_packets": 3, "rx_drop_bad_ip": 1, "rx_drop_spoofed_src": 1,
                           "rx_drop_not_ipv4": 1}
    assert d.get("rx_gro_messages") == 1


@pytest.mark.parametrize("cls", ENGINES)
def test_partial_inner_checksum_is_completed(make_node, cls):
    """A kernel VXLAN sender on a veth leaves the inner TCP checksum as the pseudo-header sum."""
    node = make_node(cls, "vxlan")
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    good = raw(IP(src="10.244.2.2", dst="10.244.1.2") / TCP(sport=1, dport=2, flags="A") / b"partial")
    partial = bytearray(good)
    struct.pack_into("!H", partial, 36, pseudo_sum("10.244.2.2", "10.244.1.2", 6, len(good) - 20))
    node.engine._inject_rx(vxlan(bytes(partial), A_MAC, B_MAC), B_IP)
    assert node.tun_read_all() == [good]
    node.engine._inject_rx(vxlan(good, A_MAC, B_MAC), B_IP)   # a complete one is left alone
    assert node.tun_read_all() == [good]


@needs_compiled
def test_partial_inner_checksum_vnet_marks_needs_csum(make_node):
    node = make_node(Engine, "vxlan", vnet_hdr=True)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    good = raw(IP(src="10.244.2.2", dst="10.244.1.2") / UDP(sport=1, dport=2) / b"partial")
    partial = bytearray(good)
    struct.pack_into("!H", partial, 26, pseudo_sum("10.244.2.2", "10.244.1.2", 17, len(good) - 20))
    node.engine._inject_rx(vxlan(bytes(partial), A_MAC, B_MAC), B_IP)
    out = node.tun_read_all()
    assert struct.unpack("<BBHHHH", out[0][:10]) == (1, 0, 0, 0, 20, 6)
    assert out[0][10:] == bytes(partial)


@needs_compiled
def test_process_exits_cleanly_with_a_running_engine():
    """weftd exits on SIGTERM without stopping the engine: atexit must stop its nogil threads
    before the interpreter frees their buffers (else: a crash at every daemon exit)."""
    code = textwrap.dedent("""
        import socket
        from fastpath.engine._engine import Engine
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        e = Engine(b.fileno(), s.fileno(), mode="udp", network="10.244.0.0/16", subnet_len=24,
                   local_subnet="10.244.1.0/24", vnet_hdr=True, busy_poll_us=100)
        e.start()
        del e
        print("ok")
    """)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for _ in range(3):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                             cwd=repo, env=dict(os.environ, PYTHONPATH=repo))
        assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-1000:]


# -- ICMP net unreachable for TUN packets without a route ----------------------------------------
#
# These run on a real TUN device in the module's namespace. The test's side of it is a packet
# socket bound to the device: what it sends goes out of the device, i.e. the engine reads it from
# its fd exactly as given (no routing, so any source or destination can be injected); what the
# engine writes to its fd arrives on the device and the packet socket gets those bytes before the
# stack looks at them.

ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
ICMP_BURST = 50                     # consts.pxi / reference.py

TUN_ENGINES = [pytest.param(ReferenceEngine, False, id="reference"),
               pytest.param(Engine, False, id="compiled",
                            marks=pytest.mark.skipif(Engine is None, reason="compiled engine not built")),
               pytest.param(Engine, True, id="compiled-vnet",
                            marks=pytest.mark.skipif(Engine is None, reason="compiled engine not built"))]


class TunNode:
    """An engine on a real TUN (``tun_name``) in the namespace; ``wire``: the packet socket."""

    def __init__(self, cls, ns: str, *, vnet_hdr: bool, address: str | None = None):
        from fastpath.engine.tun import open_tun
        self.ns = ns
        self.name = f"wfic{secrets.token_hex(3)}"
        self.fd = in_netns(ns, lambda: open_tun(self.name, vnet_hdr=vnet_hdr))[0]
        self.wire = self.sock = self.engine = None
        try:
            # IPv6 off (as the backends do): no router solicitations and the like on the TUN
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                            f"net.ipv6.conf.{self.name}.disable_ipv6=1"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", self.name, "txqueuelen", "10000", "up"],
                           check=True)
            if address:   # as the userspace backends set it up: <subnet address>/32, Network route
                subprocess.run(["ip", "-n", ns, "addr", "add", f"{address}/32", "dev", self.name],
                               check=True)
                subprocess.run(["ip", "-n", ns, "route", "add", NETWORK, "dev", self.name,
                                "src", address], check=True)

            def packet_socket():
                s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                s.bind((self.name, ETH_P_IP))
                return s
            self.wire = in_netns(ns, packet_socket)
            self.sock = udp_socket(ns, A_IP, 0)
            self.engine = cls(self.fd, self.sock.fileno(), mode="udp", network=NETWORK, subnet_len=24,
                              local_subnet=A_SUB, port=8285, vnet_hdr=vnet_hdr)
            self.engine.set_route(B_SUB, B_IP)
        except BaseException:
            self.close()
            raise

    def inject(self, pkt: bytes) -> None:
        """A packet the engine will read from the TUN."""
        self.wire.sendto(pkt, (self.name, ETH_P_IP))

    def written(self, wait: float = 1.0) -> list[bytes]:
        """What the engine wrote to the TUN (IPv4 packets, without any vnet header)."""
        out = []
        self.wire.settimeout(wait)
        while True:
            try:
                data, addr = self.wire.recvfrom(70000)
            except socket.timeout:
                return out
            if addr[2] != PACKET_OUTGOING:
                out.append(data)
            self.wire.settimeout(0.2)

    def wait_reads(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and self.engine.stats()["tx_reads"] < n:
            time.sleep(0.02)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        for s in (self.wire, self.sock):
            if s is not None:
                s.close()
        os.close(self.fd)             # not persistent: the device goes with its address and route


@pytest.fixture
def make_tun(ns):
    made = []

    def make(cls, **kw):
        node = TunNode(cls, ns, **kw)
        made.append(node)
        return node
    yield make
    for node in made:
        node.close()


def unreachable(pkt: bytes, ident: int) -> bytes:
    """The expected reply, built with scapy from the offending packet alone."""
    o = IP(pkt)
    ihl = o.ihl * 4
    quote = pkt[:ihl + min(8, o.len - ihl)]
    return raw(IP(src=o.dst, dst=o.src, id=ident, tos=0xC0 | (o.tos & 0x1E), flags=0, ttl=64, proto=1)
               / ICMP(type=3, code=0) / Raw(quote))


UNREACHABLE_CASES = {
    "udp": lambda: raw(IP(src="10.244.1.2", dst="10.244.4.2", id=9) / UDP(sport=1234, dport=53) / b"query"),
    "tcp-syn-ip-options": lambda: raw(IP(src="10.244.1.2", dst="10.244.9.7", options=[b"\x01" * 4], tos=0x2B)
                                      / TCP(sport=40000, dport=80, flags="S", options=[("MSS", 1400)])),
    "echo-request": lambda: raw(IP(src="10.244.1.3", dst="10.244.200.1") / ICMP(id=7, seq=1) / (b"p" * 56)),
    "outside-network": lambda: raw(IP(src="10.244.1.2", dst="8.8.8.8") / UDP(sport=5, dport=6)),
    "short-payload": lambda: raw(IP(src="10.244.1.2", dst="10.244.4.2", proto=253) / b"abc"),
    "first-fragment": lambda: raw(IP(src="10.244.1.2", dst="10.244.4.2", flags="MF", id=77)
                                  / UDP(sport=9, dport=9) / (b"f" * 64))[:20 + 8 + 64],
    "from-node-address": lambda: raw(IP(src="10.244.1.0", dst="10.244.5.1") / UDP(sport=7, dport=7)),
}


@pytest.mark.parametrize("cls,vnet", TUN_ENGINES)
def test_unroutable_packet_gets_net_unreachable(make_tun, cls, vnet):
    node = make_tun(cls, vnet_hdr=vnet)
    node.engine.start()
    cases = [UNREACHABLE_CASES[k]() for k in sorted(UNREACHABLE_CASES)]
    got = []
    for pkt in cases:                 # one at a time: each reply in order
        node.inject(pkt)
        got += node.written()
    assert got == [unreachable(pkt, i) for i, pkt in enumerate(cases)]
    for pkt, reply in zip(cases, got):
        r = IP(reply)
        assert (r.version, r.ihl, r.ttl, r.proto, r.flags, r.frag) == (4, 5, 64, 1, 0, 0)
        assert ip_checksum(reply[:20]) == 0 and ip_checksum(reply[20:]) == 0
        assert (r.src, r.dst) == (IP(pkt).dst, IP(pkt).src)
        assert (r[ICMP].type, r[ICMP].code) == (3, 0)
        quoted = reply[28:]
        assert quoted == pkt[:len(quoted)] and len(quoted) == min(len(pkt), IP(pkt).ihl * 4 + 8)
    s = node.engine.stats()
    assert s["tx_drop_no_route"] == s["tx_icmp_unreachable_sent"] == len(cases)
    assert s["tx_icmp_unreachable_limited"] == 0 and s["tx_packets"] == 0


@needs_compiled
def test_engines_write_the_same_unreachable_bytes(make_tun):
    cases = [UNREACHABLE_CASES[k]() for k in sorted(UNREACHABLE_CASES)]
    outs = []
    for cls, vnet in ((ReferenceEngine, False), (Engine, False), (Engine, True)):
        node = make_tun(cls, vnet_hdr=vnet)
        node.engine.start()
        for pkt in cases:
            node.inject(pkt)
        node.wait_reads(len(cases))
        s = node.engine.stats()       # batching differs (by design): compare what happened
        outs.append((node.written(), {k: v for k, v in s.items()
                                      if k.startswith(("tx_drop", "tx_icmp")) or k == "tx_reads"}))
    assert outs[0] == outs[1] == outs[2]
    assert len(outs[0][0]) == len(cases)


NO_REPLY_CASES = {
    "icmp-unreachable": lambda: raw(IP(src="10.244.1.2", dst="10.244.4.2") / ICMP(type=3, code=1)
                                    / IP(src="10.244.4.2", dst="10.244.1.2") / UDP()),
    "icmp-time-exceeded": lambda: raw(IP(src="10.244.1.2", dst="10.244.4.2") / ICMP(type=11)
                                      / IP(src="10.244.4.2", dst="10.244.1.2") / UDP()),
    "icmp-redirect": lambda: raw(IP(src="10.244.1.2", dst="10.244.4.2") / ICMP(type=5) / (b"r" * 28)),
    "icmp-source-quench": lambda: raw(IP(src="10.244.1.2", dst="10.244.4.2") / ICMP(type=4) / (b"q" * 28)),
    "icmp-parameter-problem": lambda: raw(IP(src="10.244.1.2", dst="10.244.4.2") / ICMP(type=12) / (b"p" * 28)),
    "icmp-unknown-type": lambda: raw(IP(src="10.244.1.2", dst="10.244.4.2") / ICMP(type=42)),
    "icmp-without-type": lambda: raw(IP(src="10.244.1.2", dst="10.244.4.2", proto=1)),
    "later-fragment": lambda: raw(IP(src="10.244.1.2", dst="10.244.4.2", frag=185, id=77) / (b"f" * 64)),
    "last-fragment-no-mf": lambda: raw(IP(src="10.244.1.2", dst="10.244.4.2", frag=8, id=78) / (b"g" * 8)),
    "src-limited-broadcast": lambda: raw(IP(src="255.255.255.255", dst="10.244.4.2") / UDP()),
    "src-zero": lambda: raw(IP(src="0.0.0.0", dst="10.244.4.2") / UDP(sport=68, dport=67)),
    "src-multicast": lambda: raw(IP(src="224.0.0.5", dst="10.244.4.2") / UDP()),
    "src-loopback": lambda: raw(IP(src="127.0.0.1", dst="10.244.4.2") / UDP()),
    "src-subnet-broadcast": lambda: raw(IP(src="10.244.1.255", dst="10.244.4.2") / UDP()),
    "dst-limited-broadcast": lambda: raw(IP(src="10.244.1.2", dst="255.255.255.255") / UDP(sport=68, dport=67)),
    "dst-multicast": lambda: raw(IP(src="10.244.1.2", dst="239.1.2.3") / UDP()),
    "dst-subnet-broadcast": lambda: raw(IP(src="10.244.1.2", dst="10.244.4.255") / UDP()),
    "dst-network-broadcast": lambda: raw(IP(src="10.244.1.2", dst="10.244.255.255") / UDP()),
    "dst-zero": lambda: raw(IP(src="10.244.1.2", dst="0.0.0.0") / UDP()),
    "length-beyond-data": lambda: (lambda p: p[:2] + b"\x05\xdc" + p[4:])(
        raw(IP(src="10.244.1.2", dst="10.244.4.2") / UDP())),
}


@pytest.mark.parametrize("cls,vnet", TUN_ENGINES)
def test_no_unreachable_for_errors_fragments_and_non_hosts(make_tun, cls, vnet):
    node = make_tun(cls, vnet_hdr=vnet)
    node.engine.start()
    for name in sorted(NO_REPLY_CASES):
        node.inject(NO_REPLY_CASES[name]())
    control = UNREACHABLE_CASES["echo-request"]()       # read after all of them: answered
    node.inject(control)
    node.wait_reads(len(NO_REPLY_CASES) + 1)
    assert node.written() == [unreachable(control, 0)]
    s = node.engine.stats()
    assert s["tx_drop_no_route"] == len(NO_REPLY_CASES) + 1
    assert (s["tx_icmp_unreachable_sent"], s["tx_icmp_unreachable_limited"]) == (1, 0)


@pytest.mark.parametrize("cls,vnet", TUN_ENGINES)
def test_unreachable_replies_are_rate_limited(make_tun, cls, vnet):
    node = make_tun(cls, vnet_hdr=vnet)
    node.engine.start()
    flood = [raw(IP(src="10.244.1.2", dst=f"10.244.{4 + i % 200}.{1 + i % 250}") / UDP(sport=i, dport=9))
             for i in range(3000)]
    routed = raw(IP(src="10.244.1.2", dst="10.244.2.2") / UDP() / b"still forwarded")
    peer = udp_socket(node.ns, B_IP, 8285)
    try:
        t0 = time.monotonic()
        for pkt in flood:
            node.inject(pkt)
        node.inject(routed)
        got = [d for d, _ in recv_all(peer)]
        elapsed = time.monotonic() - t0
    finally:
        peer.close()
    replies = node.written(0.5)
    s = node.engine.stats()
    assert got == [routed]
    unroutable = s["tx_drop_no_route"]
    assert unroutable == s["tx_reads"] - 1 and unroutable > 2 * ICMP_BURST   # the TUN may drop some
    assert s["tx_icmp_unreachable_sent"] + s["tx_icmp_unreachable_limited"] == unroutable
    assert s["tx_icmp_unreachable_limited"] > 0
    assert ICMP_BURST <= s["tx_icmp_unreachable_sent"] <= ICMP_BURST + 1000 * elapsed + 1
    assert len(replies) == s["tx_icmp_unreachable_sent"]
    assert all(IP(r)[ICMP].type == 3 for r in replies)


@needs_compiled
def test_unroutable_gso_super_packet_is_answered_once(make_node):
    """A TSO super-packet is one TUN read: one reply, quoting its headers; the write carries a
    zeroed virtio_net_hdr."""
    node = make_node(Engine, "udp", vnet_hdr=True)
    node.engine.set_route(B_SUB, B_IP, B_MAC)
    wire = bytearray(raw(IP(src="10.244.1.2", dst="10.244.4.2", id=1000, flags="DF") / TCP(
        sport=40000, dport=5201, seq=1, ack=77, flags="PA") / os.urandom(20000)))
    struct.pack_into("!H", wire, 36, pseudo_sum("10.244.1.2", "10.244.4.2", 6, len(wire) - 20))
    node.tun.send(vnet_hdr(1, 1, 40, 1400, 20, 16) + bytes(wire))
    node.engine.start()
    deadline = time.time() + 5
    while time.time() < deadline and node.engine.stats()["tx_reads"] < 1:
        time.sleep(0.01)
    node.engine.stop()          # joins the loop: the read has been handled to the end
    out = node.tun_read_all(wait=0.5)
    assert out == [b"\0" * 10 + unreachable(bytes(wire), 0)]
    s = node.engine.stats()
    assert (s["tx_super_packets"], s["tx_packets"], s["tx_drop_no_route"]) == (0, 0, 1)
    assert s["tx_icmp_unreachable_sent"] == 1


@pytest.mark.parametrize("cls,vnet", TUN_ENGINES)
def test_sender_socket_gets_enetunreach(make_tun, cls, vnet):
    """End to end through the kernel: the TUN has the node's address and the Network route, as
    the userspace backends set it up; a connected UDP socket sending to a subnet nobody holds gets
    ENETUNREACH, and its error queue names the ICMP and its source (the unreachable address)."""
    import errno
    node = make_tun(cls, vnet_hdr=vnet, address="10.244.1.0")
    node.engine.start()
    IP_RECVERR = 11

    def connect():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        s.connect(("10.244.4.2", 9))
        return s
    s = in_netns(node.ns, connect)
    try:
        s.send(b"anyone?")
        s.settimeout(3.0)
        with pytest.raises(OSError) as exc:
            s.recv(100)
        assert exc.value.errno == errno.ENETUNREACH
        _, anc, _, _ = s.recvmsg(100, 512, socket.MSG_ERRQUEUE)
    finally:
        s.close()
    (level, kind, data), = anc
    assert (level, kind) == (socket.IPPROTO_IP, IP_RECVERR)
    ee_errno, origin, icmp_type, icmp_code = struct.unpack_from("=IBBB", data)
    assert (ee_errno, origin, icmp_type, icmp_code) == (errno.ENETUNREACH, 2, 3, 0)  # 2: ICMP
    assert socket.inet_ntoa(data[16 + 4:16 + 8]) == "10.244.4.2"                    # offender
    node.engine.stop()          # the error may reach the socket before the engine counts the write
    s = node.engine.stats()
    assert (s["tx_drop_no_route"], s["tx_icmp_unreachable_sent"]) == (1, 1)



# -- the package's surface: the .pyi stub, the TUN flag query -----------------------------------

def _stub_params(fn: ast.FunctionDef) -> dict:
    """{name: default, or ... for none} of a function in the stub, ``self`` left out."""
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [...] * (len(positional) - len(a.defaults)) + [ast.literal_eval(d) for d in a.defaults]
    out = dict(zip((p.arg for p in positional), defaults))
    out.update((p.arg, ... if d is None else ast.literal_eval(d))
               for p, d in zip(a.kwonlyargs, a.kw_defaults))
    out.pop("self")
    return out


def _params(fn) -> dict:
    return {n: ... if p.default is inspect.Parameter.empty else p.default
            for n, p in inspect.signature(fn).parameters.items() if n != "self"}


@needs_compiled
def test_stub_names_the_compiled_engines_api(ns):
    """_engine.pyi is what editors and readers see of the compiled Engine: each method there has
    the compiled one's parameters and defaults, every public name of the class is there, and its
    constructor is the reference engine's (same API) and is taken by the compiled one."""
    import fastpath.engine
    stub = ast.parse(Path(fastpath.engine.__file__).with_name("_engine.pyi").read_text())
    cls = next(n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
    attrs = {a.target.id for a in cls.body if isinstance(a, ast.AnnAssign)}
    public = {n for n in dir(Engine) if not n.startswith("_")}
    assert public == {n for n in methods if not n.startswith("_")} | attrs
    for name, fn in methods.items():
        if name not in ("__init__", "running"):     # running: a property, no parameters
            assert _stub_params(fn) == _params(getattr(Engine, name)), name
    init = _stub_params(methods["__init__"])
    assert init == _params(ReferenceEngine.__init__)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    s = udp_socket(ns, A_IP, 0)
    given = {"tun_fd": b.fileno(), "sock_fd": s.fileno(), "network": NETWORK, "subnet_len": 24,
             "local_subnet": A_SUB, "vtep_mac": A_MAC}
    try:
        Engine(**{**{k: v for k, v in init.items() if v is not ...}, **given}).close()
        with pytest.raises(TypeError):
            Engine(**given, workers=1)   # gone: the compiled engine runs a worker per TUN fd
    finally:
        for x in (a, b, s):
            x.close()


def test_has_vnet_hdr_tells_how_the_tun_was_opened(ns):
    from fastpath.engine.tun import has_vnet_hdr, open_tun
    fds = []
    try:
        for vnet in (True, False):
            fds += in_netns(ns, lambda: open_tun(f"wfvh{secrets.token_hex(3)}", vnet_hdr=vnet))
            assert has_vnet_hdr(fds[-1]) is vnet
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            assert has_vnet_hdr(s.fileno()) is False        # not a TUN
    finally:
        for fd in fds:
            os.close(fd)
