"""vxlan/fastpath on an IPv6-only network (flannel's ``EnableIPv4: false``).

The engine has only its IPv6 side: no IPv4 Network, route table or socket (``Engine(tun, None,
network=None, network6=...)``); an IPv4 packet read from the TUN is answered "net unreachable" and
counted (``tx_drop_no_route``), an IPv4 packet inside a VXLAN frame from the IPv6 underlay is
counted (``rx_drop_not_ipv6``), and nothing IPv4 reaches it from the wire (it has no IPv4 socket).

Byte level (as tests/test_engine_ipv6.py: a socketpair for the TUN, UDP sockets in a namespace of
this module): the engine's arguments, the route table, the packet counts, the running loops, the
engine process (only the IPv6 socket is bound).

Real kernel (``tests.e2e.Testbed(dual_stack=True)``: three namespaced nodes with both underlays,
pods with IPv6 addresses from their subnet.env; each backend in an ``Agent``), with an IPv6-only
network config and leases ``0.0.0.0-0&fd10:244:0:N::-64``:

- three vxlan/fastpath nodes: pods reach each other over IPv6 (ping, and a byte-identical 8 MiB
  TCP transfer); the TUN holds no IPv4 address and no IPv4 route goes through it, the engine holds
  no IPv4 socket; IPv4 between pods does not pass; an IPv4 packet routed into the TUN by hand and an
  IPv4 frame sent from a peer's IPv6 address are counted and change nothing; a removed lease takes
  its peer out;
- node 1 vxlan/kernel (flannel-v6.1 only), nodes 2 and 3 vxlan/fastpath: ping every way and TCP
  both ways between the kernel node and a userspace node.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import struct
import subprocess
import sys
import time

import pytest

from controlplane.config import parse_config
from controlplane.lease import NO_IPV4, NO_PUBLIC_IP, Lease
from fastpath.engine.reference import ReferenceEngine
from fastpath.vxlan.vtep import parse_unicast_mac

from .conftest import needs_root
from .e2e import Testbed, built
from .nsagent import Agent, ipj, sh
from .test_engine_ipv6 import (A6, A_MAC6, A_SUB6, B6, B_MAC6, B_SUB6, C6, C_MAC6, C_SUB6, NETWORK6,
                               PORT, STRANGER6, delta, engine_process, in_netns, ns, outcomes, ping6, recv_all,  # noqa: F401
                               udp, vxlan6)
from .test_fastpath_dualstack import Lab as DualStackLab

pytest.importorskip("scapy.all")
from scapy.all import IP, UDP, raw  # noqa: E402

try:
    from fastpath.engine._engine import Engine
except ImportError:
    Engine = None

pytestmark = [needs_root, pytest.mark.skipif(Engine is None, reason="compiled engine not built")]

PREFIX = f"wf6o{os.getpid() % 1000}-"
NODES = (1, 2, 3)
V6ONLY = parse_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd10:244::/56", '
                      '"Backend": {"Type": "vxlan"}}')
V6ONLY_DIRECT = parse_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd10:244::/56", '
                             '"Backend": {"Type": "vxlan", "DirectRouting": true}}')


# -- the engine alone --------------------------------------------------------------------------------

class V6Node:
    """An IPv6-only engine (node A): the TUN stand-in ``tun``, its IPv6 socket, no IPv4 one."""

    def __init__(self, ns: str, **kw):
        self.tun, self._end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock6 = udp(ns, A6)
        self.engine = Engine(self._end.fileno(), None, mode="vxlan", network=None, port=PORT,
                             mtu=1450, vnet_hdr=False, network6=NETWORK6, subnet6_len=64,
                             local_subnet6=A_SUB6, vtep_mac6=A_MAC6, sock6_fd=self.sock6.fileno(), **kw)

    def tun_read_all(self, wait: float = 0.0001) -> list[bytes]:
        out = []
        self.tun.settimeout(wait)
        while True:
            try:
                out.append(self.tun.recv(70000))
            except (BlockingIOError, socket.timeout):
                return out
            self.tun.settimeout(0.0001)

    def close(self) -> None:
        self.engine.close()
        for s in (self.tun, self._end, self.sock6):
            s.close()


@pytest.fixture
def v6node(ns):
    made = []

    def make(**kw):
        n = V6Node(ns, **kw)
        made.append(n)
        return n
    yield make
    for n in made:
        n.close()


def ping4(src: str = "10.244.1.2", dst: str = "10.244.2.2") -> bytes:
    return raw(IP(src=src, dst=dst, ttl=64) / UDP(sport=1000, dport=2000) / b"four")


def test_ipv6_only_engine_carries_ipv6_and_counts_ipv4(v6node, ns):
    n = v6node()
    e = n.engine
    e.set_route(B_SUB6, B6, B_MAC6)
    peer = udp(ns, B6, PORT)
    try:
        e._inject_tx(ping6())
        got = recv_all(peer)
        assert [(d[:8], d[8:14], d[14:20], d[20:22], d[22:], src[0]) for d, src in got] == \
            [(bytes([8, 0, 0, 0, 0, 0, 1, 0]), bytes.fromhex(B_MAC6.replace(":", "")),
              bytes.fromhex(A_MAC6.replace(":", "")), b"\x86\xdd", ping6(), A6)]
    finally:
        peer.close()
    before = e.stats()
    e._inject_tx(ping4())                       # an IPv4 read: no IPv4 route can exist here
    d = delta(before, e.stats())
    assert outcomes(d, "tx") == {"tx_drop_no_route": 1} and d["tx_icmp_unreachable_sent"] == 1, d
    reply = n.tun_read_all()
    assert len(reply) == 1 and IP(reply[0]).src == "10.244.2.2" and IP(reply[0]).dst == "10.244.1.2"
    before = e.stats()
    e._inject_rx(vxlan6(ping4(src="10.244.2.2", dst="10.244.1.2"), ethertype=0x0800), B6)
    e._inject_rx(vxlan6(raw(IP(src="10.244.2.2", dst="10.244.1.2") / UDP()), ethertype=0x86DD), B6)
    d = delta(before, e.stats())
    assert outcomes(d) == {"rx_drop_not_ipv6": 2} and n.tun_read_all() == []
    with pytest.raises(ValueError, match="no IPv4 socket"):
        e._inject_rx(vxlan6(ping6(), dst_mac=A_MAC6), "198.18.0.2")
    for call in (lambda: e.set_route("10.244.2.0/24", "198.18.0.2", B_MAC6),
                 lambda: e.remove_route("10.244.2.0/24")):
        with pytest.raises(ValueError, match="carries no IPv4") as err:
            call()
        assert "\n" not in str(err.value)
    assert e.lookup("10.244.2.2") is None and not e._is_peer("198.18.0.2") and e.lookup("fd10:244:0:2::9") == (B6, B_MAC6)
    s = e.stats()
    assert s["routes"] == 1 and s["rx_socket_drops"] == 0 and e.routes() == {B_SUB6: (B6, B_MAC6)}


def test_ipv6_only_engine_route_table_holds_every_subnet_of_the_network(v6node):
    """No IPv4 route slots to size it by: the IPv6 Network's subnets (255 besides ours in a /56 of
    /64s) all fit, and one outside it is refused."""
    e = v6node().engine
    net6 = ipaddress.IPv6Network(NETWORK6)
    subnets = [s for s in net6.subnets(new_prefix=64) if str(s) != A_SUB6]
    for i, s in enumerate(subnets):
        e.set_route(s, f"2001:db8::{i + 1:x}", B_MAC6)
    assert e.stats()["routes"] == 255 and e.lookup("fd10:244:0:ff::1") == ("2001:db8::ff", B_MAC6)
    with pytest.raises(ValueError, match="is not a /64 of"):
        e.set_route("fd10:244:1::/64", B6, B_MAC6)


def test_ipv6_only_engine_arguments(ns):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    s4, s6 = udp(ns, "198.18.0.1"), udp(ns, A6)
    v6 = dict(network6=NETWORK6, subnet6_len=64, local_subnet6=A_SUB6, vtep_mac6=A_MAC6, sock6_fd=s6.fileno())
    try:
        for sock, kw, why in [(None, dict(mode="vxlan"), "needs network or network6"),
                              (None, dict(mode="udp", **v6), "vxlan mode"),
                              (s4.fileno(), dict(mode="vxlan", **v6), "sock_fd without network"),
                              (None, dict(mode="vxlan", subnet_len=24, **v6), "subnet_len/local_subnet without network"),
                              (None, dict(mode="vxlan", network="10.244.0.0/16", subnet_len=24,
                                          local_subnet="10.244.1.0/24", vtep_mac=A_MAC6, **v6), "sock_fd")]:
            with pytest.raises(ValueError, match=why) as err:
                Engine(b.fileno(), sock, **kw)
            assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match="IPv4 only"):   # udp/python's engine: IPv4 only
            ReferenceEngine(b.fileno(), s4.fileno(), mode="vxlan", **v6)
        with pytest.raises(ValueError, match="needs network"):
            ReferenceEngine(b.fileno(), s4.fileno(), mode="udp")
    finally:
        for x in (a, b, s4, s6):
            x.close()


def test_ipv6_only_engine_running_loops(v6node, ns):
    """The threads run with no IPv4 socket: a frame from the wire reaches the TUN, an IPv4 one is
    counted, and the idle loop reads no socket that is not there (no receive errors)."""
    for split in (False, True):
        n = v6node(split_threads=split)
        e = n.engine
        e.set_route(B_SUB6, B6, B_MAC6)
        e.start()
        sender = udp(ns, B6)
        try:
            to = n.sock6.getsockname()[:2]
            inner = ping6(src="fd10:244:0:2::2", dst="fd10:244:0:1::2")
            sender.sendto(vxlan6(inner), to)
            sender.sendto(vxlan6(ping4(src="10.244.2.2", dst="10.244.1.2"), ethertype=0x0800), to)
            assert n.tun_read_all(wait=3) == [inner]
            deadline = time.monotonic() + 3
            while e.stats()["rx_drop_not_ipv6"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)                          # idle: the loops sleep in poll()
            s = e.stats()
            assert (s["rx_packets"], s["rx_drop_not_ipv6"], s["rx_recv_errors"]) == (1, 1, 0), (split, s)
        finally:
            sender.close()
            e.stop()


def test_engine_process_binds_only_the_ipv6_socket(ns):
    from fastpath.engine import control
    from fastpath.engine.proc import RequestError, _check_config
    with engine_process(ns, "t6o") as (proc, client):
        config = {"dev": "wt6o" + secrets.token_hex(2), "engine": "compiled", "mode": "vxlan", "network": None,
                  "subnet_len": 0, "local_subnet": None, "local": None, "port": 18473, "workers": 2,
                  "mtu": 1450, "vnet_hdr": True, "busy_poll_us": 0, "local6": A6,
                  "kwargs": {"vni": 1, "vtep_mac": None, "network6": NETWORK6, "subnet6_len": 64,
                             "local_subnet6": A_SUB6, "vtep_mac6": A_MAC6}}
        for broken, why in [({**config, "local": "198.18.0.1"}, "IPv6-only"),
                            ({**config, "local6": None}, "local6"),
                            ({k: v for k, v in config.items() if k != "local6"}, "needs local6"),
                            ({**{k: v for k, v in config.items() if k != "local6"}, "kwargs": {"vni": 1}},
                             r"network null \(IPv6-only\) needs local6")]:
            with pytest.raises(RequestError, match=why):
                _check_config(broken)
        info = client.start(config, {ipaddress.IPv6Network(B_SUB6): (B6, B_MAC6)})
        assert info["running"] and info["routes"] == 1
        socks = subprocess.run(["ip", "netns", "exec", ns, "ss", "-H", "-u", "-a", "-n", "-p"],
                               capture_output=True, text=True).stdout
        mine = [line.split()[3] for line in socks.splitlines() if f"pid={proc.pid}," in line]
        # the two workers' receiving group on the VXLAN port, and each worker's send socket on an
        # ephemeral port (fastpath/engine/spread.py): IPv6 all
        assert sorted(a for a in mine if a.endswith(":18473")) == [f"[{A6}]:18473"] * 2, mine
        senders = [a for a in mine if not a.endswith(":18473")]
        assert len(senders) == 2 and all(a.startswith(f"[{A6}]:") for a in senders), mine
        removed = client.request("replace_routes", routes=control.routes_message(
            {ipaddress.IPv6Network(C_SUB6): (C6, C_MAC6)}))["removed"]
        assert removed == [B_SUB6] and set(client.routes()) == {C_SUB6}
        with pytest.raises(control.EngineRefused, match="carries IPv6 only"):
            client.request("replace_routes", routes={"10.244.2.0/24": ["198.18.0.2", B_MAC6]})
        assert client.stats()["rx_socket_drops"] == 0
        client.stop()
        client.close()
        assert proc.wait(timeout=10) == 0


# -- three nodes on the real kernel ---------------------------------------------------------------------

class Lab(DualStackLab):
    """The dual-stack testbed (both underlays, pods with IPv6), its network IPv6-only."""

    def __init__(self):
        super().__init__()
        # not the dual-stack test's names: both modules may run in one session
        Testbed.__init__(self, PREFIX, NODES, dual_stack=True)

    def iface(self, n: int) -> dict:
        # what controlplane.iface.resolve gives on an IPv6-only network: no PublicIP
        return dict(super().iface(n), public_ip=NO_PUBLIC_IP)

    def start(self, kinds: dict[int, str], config=V6ONLY, workers: int = 1) -> dict[int, Lease]:
        self.running = True
        for n in NODES:
            kind = kinds[n]
            self.agents[n].backend("b", kind, config.with_dataplane(kind.split("/")[1]), self.iface(n))
            if workers != 1:  # what WEFT_ENGINE_WORKERS sets (read at construction, in weftd)
                self.agents[n].call("b", "__setattr__", "workers", workers)
            attrs = self.agents[n].call("b", "lease_attrs", None)
            self.leases[n] = Lease(NO_IPV4, attrs, time.time() + 3600, subnet6=self.subnet6(n))
        for n in NODES:
            self.agents[n].call("b", "setup", self.leases[n])
            for m in NODES:
                if m != n:
                    self.agents[n].call("b", "add_peer", self.leases[m])
        return self.leases


@pytest.fixture(scope="module")
def lab():
    with built(Lab()) as lab:
        yield lab


@pytest.fixture
def net(lab):
    yield lab
    lab.stop()


def _drops(s: dict) -> dict:
    return {k: v for k, v in s.items() if k.startswith("rx_drop_") and v}


def _no_ipv4_on(lab: Lab, n: int, dev: str) -> None:
    """Nothing IPv4 for the overlay on node n: no IPv4 address on ``dev``, no IPv4 route through it
    or to the pod Network, and no IPv4 socket on the VXLAN port."""
    assert [a for link in ipj(lab.node[n], "-4", "addr", "show", "dev", dev) for a in link["addr_info"]] == []
    assert sh("ip", "-n", lab.node[n], "-4", "route", "show", "table", "all", "dev", dev) == ""
    assert sh("ip", "-n", lab.node[n], "-4", "route", "show", "table", "all", "exact", "10.244.0.0/16") == ""
    socks = sh("ss", "-H", "-u", "-a", "-n", ns=lab.node[n])
    assert ":8472 " in socks and not any(":8472" in line and "[" not in line for line in socks.splitlines()), socks


def test_ipv6only_fastpath_nodes(net, tmp_path):
    leases = net.start({n: "vxlan/fastpath" for n in NODES})
    assert net.ping_failures(v6=True) == []
    assert net.ping_failures([(1, 2), (2, 3)]) == [(1, 2), (2, 3)]       # no IPv4 overlay at all
    for n in NODES:
        attrs = leases[n].attrs
        assert attrs.public_ip == NO_PUBLIC_IP and attrs.backend_data is None, attrs
        assert attrs.public_ipv6 == net.node_ip6(n) and attrs.backend_v6_data["VNI"] == 1
        assert parse_unicast_mac(attrs.backend_v6_data["VtepMAC"]) == attrs.backend_v6_data["VtepMAC"]
        _no_ipv4_on(net, n, "flannel.1")
        link = ipj(net.node[n], "-6", "addr", "show", "dev", "flannel.1")[0]
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]] == [(str(net.subnet6(n).network_address), 128)]
        route = sh("ip", "-n", net.node[n], "-6", "route", "show", "exact", "fd10:244::/56")
        assert "dev flannel.1" in route and "mtu 1430" in route, route
        s = net.stats(n)
        assert (s["peers6_programmed"], s["peers6_failed"], s["routes"], s["peers_bad_backend_data"]) == (2, 0, 2, 0), s
    sent, got = net.transfer6(1, 2, 8 << 20, tmp_path)
    assert sent == got
    s1, s2 = net.stats(1), net.stats(2)
    assert s1["tx_ipv6_packets"] > 1000 and s2["rx_ipv6_packets"] > 1000 and s1["tx_super_packets"] > 0, (s1, s2)
    assert _drops(s1) == {} and _drops(s2) == {}

    # an IPv4 packet routed into the TUN by hand: answered net unreachable, counted, nothing sent
    before = net.stats(1)
    sh("ip", "-n", net.node[1], "route", "add", "10.244.2.0/24", "dev", "flannel.1")
    try:
        out = subprocess.run(["ip", "netns", "exec", net.node[1], "ping", "-n", "-c", "1", "-W", "2", "10.244.2.2"],
                             capture_output=True, text=True, timeout=10).stdout
    finally:
        sh("ip", "-n", net.node[1], "route", "del", "10.244.2.0/24", "dev", "flannel.1")
    assert "Unreachable" in out, out
    d = delta(before, net.stats(1))
    assert d.get("tx_drop_no_route", 0) >= 1 and d.get("tx_packets", 0) == 0 and d.get("tx_ipv6_packets", 0) == 0, d

    # an IPv4 packet in a VXLAN frame from node 2's IPv6 address: counted, never written
    before = net.stats(1)
    frame = vxlan6(raw(IP(src="10.244.2.2", dst="10.244.1.2") / UDP() / b"x"), ethertype=0x0800,
                   dst_mac=leases[1].attrs.backend_v6_data["VtepMAC"],
                   src_mac=leases[2].attrs.backend_v6_data["VtepMAC"])
    send = ("import socket,sys; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
            "s.bind((sys.argv[1], 0)); s.sendto(bytes.fromhex(sys.argv[2]), (sys.argv[3], 8472))")
    sh(sys.executable, "-c", send, str(net.node_ip6(2)), frame.hex(), str(net.node_ip6(1)), ns=net.node[2])
    deadline = time.monotonic() + 5
    while net.stats(1)["rx_drop_not_ipv6"] == before["rx_drop_not_ipv6"] and time.monotonic() < deadline:
        time.sleep(0.05)
    d = delta(before, net.stats(1))
    assert d.get("rx_drop_not_ipv6") == 1 and d.get("rx_packets", 0) == 0, d
    assert net.stats(1)["engine_pid"] == before["engine_pid"] and net.ping_failures([(1, 2)], v6=True) == []

    # a removed lease takes its peer out; the other stays
    net.agents[1].call("b", "remove_peer", leases[3])
    s = net.stats(1)
    assert (s["routes"], s["peers6_programmed"]) == (1, 1), s
    assert net.ping_failures([(1, 3)], v6=True) == [(1, 3)] and net.ping_failures([(1, 2)], v6=True) == []

    # resync after someone deleted the IPv6 route: it comes back, and still nothing IPv4
    sh("ip", "-n", net.node[1], "-6", "route", "del", "fd10:244::/56", "dev", "flannel.1")
    net.agents[1].call("b", "resync")
    assert "mtu 1430" in sh("ip", "-n", net.node[1], "-6", "route", "show", "exact", "fd10:244::/56")
    _no_ipv4_on(net, 1, "flannel.1")

    # the engine process killed: the supervisor starts a new one at once, with the IPv6 route
    dead = net.stats(1)["engine_pid"]
    os.kill(int(dead), 9)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and net.stats(1).get("engine_pid") in (None, dead):
        time.sleep(0.1)
    s = net.stats(1)
    assert s["engine_restarts"] == 1 and s["routes"] == 1 and s["peers6_programmed"] == 1, s
    assert net.ping_failures([(1, 2)], v6=True) == [] and net.ping_failures([(2, 1)], v6=True) == []
    _no_ipv4_on(net, 1, "flannel.1")

    # a restart (a new backend given the previous lease) adopts the running IPv6-only engine
    engine = net.stats(1)["engine_pid"]
    net.agents[1].backend("again", "vxlan/fastpath", V6ONLY.with_dataplane("fastpath"), net.iface(1))
    again = net.agents[1].call("again", "lease_attrs", leases[1])
    assert again.backend_v6_data == leases[1].attrs.backend_v6_data and again.backend_data is None
    net.agents[1].call("again", "setup", leases[1])
    assert net.agents[1].call("again", "stats")["engine_pid"] == engine
    net.agents[1].call("again", "teardown")
    net.agents[1].drop("again")


def test_ipv6only_fastpath_beside_kernel(net, tmp_path):
    """Node 1 runs the kernel's flannel-v6.1 (and no flannel.1); nodes 2 and 3 the engine."""
    net.start({1: "vxlan/kernel", 2: "vxlan/fastpath", 3: "vxlan/fastpath"})
    assert ipj(net.node[1], "-d", "link", "show", "flannel-v6.1")
    assert "flannel.1" not in {link["ifname"] for link in ipj(net.node[1], "link", "show")}
    assert net.ping_failures(v6=True) == []
    for a, b in ((1, 2), (2, 1)):
        sent, got = net.transfer6(a, b, 8 << 20, tmp_path, port=7900 + a)
        assert sent == got, (a, b)
    for n in (2, 3):
        _no_ipv4_on(net, n, "flannel.1")
    s2 = net.stats(2)
    assert s2["rx_ipv6_packets"] > 100 and s2["tx_ipv6_packets"] > 1000 and _drops(s2) == {}, s2


def test_ipv6only_fastpath_two_workers_and_direct_routing(net, tmp_path):
    """Two workers: a multiqueue TUN and two SO_REUSEPORT IPv6 sockets, still no IPv4 one. Then
    DirectRouting: every peer is on the IPv6 underlay's subnet, so each gets a kernel route via its
    PublicIPv6 and the engine holds none."""
    net.start({n: "vxlan/fastpath" for n in NODES}, workers=2)
    socks = sh("ss", "-H", "-u", "-a", "-n", ns=net.node[1])
    assert socks.count(f"[{net.node_ip6(1)}]:8472") == 2, socks
    _no_ipv4_on(net, 1, "flannel.1")
    assert net.ping_failures(v6=True) == []
    sent, got = net.transfer6(2, 1, 4 << 20, tmp_path, port=7950)
    assert sent == got
    s = net.stats(1)
    assert s["workers"] == 2 and s["rx_ipv6_packets"] > 100 and _drops(s) == {}, s
    net.stop()

    net.start({n: "vxlan/fastpath" for n in NODES}, V6ONLY_DIRECT)
    for n in NODES:
        for m in NODES:
            if m != n:
                route = sh("ip", "-n", net.node[n], "-6", "route", "show", "exact", str(net.subnet6(m)))
                assert route.startswith(f"{net.subnet6(m)} via {net.node_ip6(m)} dev eth0"), route
        s = net.stats(n)
        assert (s["routes"], s["peers_direct"], s["peers6_programmed"]) == (0, 2, 2), s
        _no_ipv4_on(net, n, "flannel.1")
    assert net.ping_failures(v6=True) == []


def test_ipv6only_node_without_public_ipv6_is_refused_in_one_line(ns):
    """An IPv6-only network carried by a node without a PublicIPv6 (weftd exits before, with
    flanneld's message; a backend handed one anyway): setup refuses in one line, starts nothing."""
    from controlplane.backends import BackendError, ExternalInterface, load_backend
    from controlplane.lease import LeaseAttrs

    def attempt():
        iface = ExternalInterface(name="lo", index=socket.if_nametoindex("lo"),
                                  address=ipaddress.IPv4Address("198.18.0.1"), public_ip=NO_PUBLIC_IP, mtu=1500)
        b = load_backend("vxlan/fastpath")(V6ONLY.with_dataplane("fastpath"), iface)
        lease = Lease(NO_IPV4, LeaseAttrs(NO_PUBLIC_IP, "vxlan", None, ipaddress.IPv6Address(A6),
                                          {"VNI": 1, "VtepMAC": A_MAC6}),
                      time.time() + 60, subnet6=ipaddress.IPv6Network(A_SUB6))
        try:
            with pytest.raises(BackendError, match="IPv6-only network needs this node's PublicIPv6") as err:
                b.setup(lease)
            return str(err.value), b.engine
        finally:
            b.close()
    text, engine = in_netns(ns, attempt)
    assert "\n" not in text and engine is None
