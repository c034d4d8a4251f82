"""pytest-benchmark micro-benchmarks of the compiled engine's per-batch CPU cost (no system calls).

Each round runs the engine's own C path on a preallocated batch through its ``_bench_*`` hooks,
which return nanoseconds; the engine is never started and nothing is sent (no namespace needed).

    bench micro -k engine   (or: pytest benchmarks/test_engine_micro.py)

- encap/TSO: one batch = 32 TUN reads of a 64 KB TCP super-packet (MSS 1448) cut into 45 segments
  each, headers and checksums built, grouped into UDP_SEGMENT messages (udp and vxlan).
- encap/small: one batch = 64 single 1400-byte packets.
- decap/GRO: one batch = 64 datagrams of 44 x 1400-byte segments each (UDP GRO), checked and
  merged into GSO writes.
- lookup: 1000 route lookups.
- IPv6 (dual-stack vxlan): encap/TSO6 and decap/GRO6, the same batches with IPv6 inner packets
  over the IPv6 underlay (compare with their IPv4 rows: the per-segment work is the same).
- decap/unknown sender: one batch = 64 valid-looking datagrams from an address that holds no
  lease (each checked, then classified unknown_peer vs spoofed_src), with 1 route in a /16 Network
  (256 route slots) and with 4096 routes in a /8 (65,536 slots): the cost must not grow with them.
"""
from __future__ import annotations

import socket
import struct

import pytest

pytest.importorskip("pytest_benchmark")
scapy_all = pytest.importorskip("scapy.all")
from scapy.all import IP, TCP, raw  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.vxlan import VXLAN  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

try:
    from fastpath.engine._engine import Engine
except ImportError:
    Engine = None

pytestmark = [pytest.mark.benchmark,
              pytest.mark.skipif(Engine is None, reason="compiled engine not built")]
A_MAC, B_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
A_MAC6, B_MAC6 = "02:00:00:00:06:0a", "02:00:00:00:06:0b"


@pytest.fixture
def engine_for():
    made = []

    def make(mode, v6=False):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        dual = dict(network6="fd10:244::/56", subnet6_len=64, local_subnet6="fd10:244:0:1::/64",
                    vtep_mac6=A_MAC6, sock6_fd=s6.fileno()) if v6 else {}
        e = Engine(b.fileno(), s.fileno(), mode=mode, network="10.244.0.0/16", subnet_len=24,
                   local_subnet="10.244.1.0/24", vtep_mac=A_MAC, mtu=1472, vnet_hdr=True, **dual)
        e.set_route("10.244.2.0/24", "198.18.0.2", B_MAC)
        if v6:
            e.set_route("fd10:244:0:2::/64", "2001:db8:198:18::2", B_MAC6)
        made.append((e, a, b, s, s6))
        return e
    yield make
    for e, *socks in made:
        e.close()
        for s in socks:
            s.close()


def _tso_read(paylen=64000, mss=1448) -> bytes:
    pkt = IP(src="10.244.1.2", dst="10.244.2.2") / TCP(sport=1, dport=2, flags="A") / (b"\xa5" * paylen)
    return struct.pack("<BBHHHH", 1, 1, 40, mss, 20, 16) + raw(pkt)


def _run(benchmark, fn, per_round: int):
    """Benchmark ``fn`` (returns ns for ``per_round`` batches); report ns per batch."""
    result = benchmark(fn)
    return result / per_round


@pytest.mark.parametrize("mode", ["udp", "vxlan"])
def test_bench_encap_tso_batch(benchmark, engine_for, mode):
    e = engine_for(mode)
    read = _tso_read()
    ns = _run(benchmark, lambda: e._bench_encap(read, 32 * 10), 10)
    benchmark.extra_info["ns_per_batch_of_32_super_packets"] = ns
    benchmark.extra_info["ns_per_segment"] = ns / (32 * 45)


def test_bench_encap_tso6_batch(benchmark, engine_for):
    e = engine_for("vxlan", v6=True)
    pkt = IPv6(src="fd10:244:0:1::2", dst="fd10:244:0:2::2") / TCP(sport=1, dport=2, flags="A") / (b"\xa5" * 64000)
    read = struct.pack("<BBHHHH", 1, 4, 60, 1428, 40, 16) + raw(pkt)   # GSO_TCPV6, MSS 1428: 45 segments
    before = e.stats()["tx_ipv6_packets"]
    ns = _run(benchmark, lambda: e._bench_encap(read, 32 * 10), 10)
    assert e.stats()["tx_ipv6_packets"] > before      # it took the IPv6 path
    benchmark.extra_info["ns_per_batch_of_32_super_packets"] = ns
    benchmark.extra_info["ns_per_segment"] = ns / (32 * 45)


def test_bench_decap_gro6_batch(benchmark, engine_for):
    e = engine_for("vxlan", v6=True)
    segs = [raw(VXLAN(flags=8, vni=1) / Ether(dst=A_MAC6, src=B_MAC6, type=0x86DD)) + raw(
        IPv6(src="fd10:244:0:2::2", dst="fd10:244:0:1::2") / TCP(sport=2, dport=1, seq=1 + i * 1380, flags="A")
        / (b"d" * 1380)) for i in range(44)]
    dgram = b"".join(segs)
    before = e.stats()["rx_ipv6_packets"]
    ns = _run(benchmark, lambda: e._bench_decap(dgram, "2001:db8:198:18::2", 64 * 10, len(segs[0])), 10)
    assert e.stats()["rx_ipv6_packets"] > before      # delivered (dry: no TUN write), not dropped
    benchmark.extra_info["ns_per_batch_of_64_gro_datagrams"] = ns
    benchmark.extra_info["ns_per_segment"] = ns / (64 * 44)


def test_bench_encap_small_batch(benchmark, engine_for):
    e = engine_for("udp")
    pkt = struct.pack("<BBHHHH", 0, 0, 0, 0, 0, 0) + raw(
        IP(src="10.244.1.2", dst="10.244.2.2") / TCP(sport=1, dport=2, flags="A") / (b"s" * 1360))
    ns = _run(benchmark, lambda: e._bench_encap(pkt, 64 * 10), 10)
    benchmark.extra_info["ns_per_batch_of_64"] = ns


@pytest.mark.parametrize("mode", ["udp", "vxlan"])
def test_bench_decap_gro_batch(benchmark, engine_for, mode):
    e = engine_for(mode)
    segs = []
    for i in range(44):
        inner = raw(IP(src="10.244.2.2", dst="10.244.1.2") / TCP(
            sport=2, dport=1, seq=1 + i * 1400, flags="A") / (b"d" * 1400))
        if mode == "vxlan":
            inner = raw(VXLAN(flags=8, vni=1) / Ether(dst=A_MAC, src=B_MAC, type=0x800)) + inner
        segs.append(inner)
    dgram = b"".join(segs)
    ns = _run(benchmark, lambda: e._bench_decap(dgram, "198.18.0.2", 64 * 10, len(segs[0])), 10)
    benchmark.extra_info["ns_per_batch_of_64_gro_datagrams"] = ns
    benchmark.extra_info["ns_per_segment"] = ns / (64 * 44)


def test_bench_route_lookup(benchmark, engine_for):
    e = engine_for("udp")
    ns = _run(benchmark, lambda: e._bench_lookup("10.244.2.7", 1000), 1)
    benchmark.extra_info["ns_per_1000_lookups"] = ns


@pytest.mark.parametrize("network,routes", [("10.244.0.0/16", 1), ("10.0.0.0/8", 4096)],
                         ids=["1-route-of-256", "4096-routes-of-65536"])
def test_bench_decap_unknown_sender(benchmark, network, routes):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    base = int.from_bytes(socket.inet_aton(network.split("/")[0]), "big")
    subnet = lambda i: f"{socket.inet_ntoa((base + (i << 8)).to_bytes(4, 'big'))}/24"  # noqa: E731
    e = Engine(b.fileno(), s.fileno(), mode="udp", network=network, subnet_len=24,
               local_subnet=subnet(0), mtu=1472, vnet_hdr=True)
    try:
        for i in range(1, routes + 1):
            e.set_route(subnet(i), f"198.18.{i >> 8}.{i & 0xff}")
        addr = lambda a: socket.inet_ntoa(a.to_bytes(4, "big"))  # noqa: E731
        # from a pod of the first peer's subnet to ours: valid, but the sender holds no lease
        dgram = raw(IP(src=addr(base + (1 << 8) + 2), dst=addr(base + 2)) / TCP(flags="A") / (b"u" * 1000))
        before = e.stats()["rx_drop_unknown_peer"]
        ns = _run(benchmark, lambda: e._bench_decap(dgram, "198.19.0.9", 64 * 10), 10)
        assert e.stats()["rx_drop_unknown_peer"] > before     # it took the path measured
        benchmark.extra_info["ns_per_datagram"] = ns / 64
    finally:
        e.close()
        for x in (a, b, s):
            x.close()
