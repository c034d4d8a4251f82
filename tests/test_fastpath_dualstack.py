"""vxlan/fastpath dual-stack (EnableIPv6) on three namespaced nodes, alone and beside vxlan/kernel.

Topology: ``tests.e2e.Testbed(dual_stack=True)`` (every name prefixed ``wfd<pid%1000>-``): node N's
eth0 has 198.18.0.N/24 and 2001:db8:198:18::N/64 on one bridge (no DAD), its pod 10.244.N.2 and
fd10:244:0:N::2 behind cni0; the network config has EnableIPv6 with IPv6Network fd10:244::/56, and
each lease its subnet6 fd10:244:0:N::/64. Each node's backend runs in an ``Agent`` (a forked child
in the node's namespace, tests/nsagent.py), so the engine process it starts runs there too.

- three vxlan/fastpath nodes: pods reach each other over both families (ping, and a TCP transfer
  over IPv6 that is byte-identical: TSO6 cut by the sender's engine, merged by nobody), the lease
  advertises PublicIPv6 and BackendV6Data, the TUN holds the IPv6 address and route (MTU - 20),
  the engine counts IPv6 packets both ways and drops nothing; resync puts back a deleted IPv6
  route, a removed lease takes both families' routes out, and a restart keeps the v6 VTEP MAC;
- node 1 vxlan/kernel (``flannel-v6.1``), nodes 2 and 3 vxlan/fastpath: the same over both
  families in every direction, TCP over IPv6 both ways between the kernel node and a userspace
  node (the kernel's unsegmented GSO datagrams and partial checksums over an IPv6 underlay).
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import random
import subprocess
import sys
import time

import pytest

from controlplane.config import parse_config
from controlplane.lease import Lease
from fastpath.vxlan.vtep import parse_unicast_mac

from .conftest import needs_root
from .e2e import Testbed, built
from .nsagent import Agent, ipj, sh

pytestmark = needs_root
PREFIX = f"wfd{os.getpid() % 1000}-"
NODES = (1, 2, 3)
DUAL = '"EnableIPv6": true, "IPv6Network": "fd10:244::/56"'
VXLAN6 = parse_config('{"Network": "10.244.0.0/16", %s, "Backend": {"Type": "vxlan"}}' % DUAL)
VXLAN6_DIRECT = parse_config('{"Network": "10.244.0.0/16", %s, '
                             '"Backend": {"Type": "vxlan", "DirectRouting": true}}' % DUAL)

SERVER = r"""
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(1)
s.settimeout(60)
print("listening", flush=True)
c, _ = s.accept()
c.settimeout(60)
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
print(n, h.hexdigest(), flush=True)
"""
CLIENT = r"""
import socket, sys, time
data = open(sys.argv[3], "rb").read()
deadline = time.monotonic() + 20
while True:
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
c.sendall(data)
c.close()
"""


class Lab(Testbed):
    """The dual-stack testbed with a backend Agent per node."""

    def __init__(self):
        super().__init__(PREFIX, NODES, dual_stack=True)
        self.agents: dict[int, Agent] = {}
        self.leases: dict[int, Lease] = {}
        self.running = False

    def build(self) -> None:
        super().build()
        for n in NODES:
            self.agents[n] = Agent(self.node[n])

    def destroy(self) -> list[str]:
        for agent in self.agents.values():
            agent.stop()
        return super().destroy()

    def iface(self, n: int) -> dict:
        addr = ipaddress.IPv4Address(f"198.18.0.{n}")
        return {"name": "eth0", "address": addr, "public_ip": addr, "mtu": 1500,
                "address6": self.node_ip6(n), "public_ipv6": self.node_ip6(n)}

    def start(self, kinds: dict[int, str], config=VXLAN6, workers: int = 1) -> dict[int, Lease]:
        self.running = True
        for n in NODES:
            kind = kinds[n]
            self.agents[n].backend("b", kind, config.with_dataplane(kind.split("/")[1]), self.iface(n))
            if workers != 1:  # what WEFT_ENGINE_WORKERS sets (read at construction, in weftd)
                self.agents[n].call("b", "__setattr__", "workers", workers)
            attrs = self.agents[n].call("b", "lease_attrs", None)
            self.leases[n] = Lease(ipaddress.IPv4Network(f"10.244.{n}.0/24"), attrs, time.time() + 3600,
                                   subnet6=self.subnet6(n))
        for n in NODES:
            self.agents[n].call("b", "setup", self.leases[n])
            for m in NODES:
                if m != n:
                    self.agents[n].call("b", "add_peer", self.leases[m])
        return self.leases

    def stop(self) -> None:
        if not self.running:
            return
        for n in NODES:
            try:
                self.agents[n].call("b", "teardown")
                self.agents[n].drop("b")
            except Exception:
                pass
        self.running = False

    def ping_failures(self, pairs=None, v6: bool = False) -> list[tuple[int, int]]:
        pairs = pairs or [(a, b) for a in NODES for b in NODES if a != b]
        procs = {(a, b): subprocess.Popen(
            ["ip", "netns", "exec", self.pod[a], "ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1",
             self.pod_ip6(b) if v6 else f"10.244.{b}.2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for a, b in pairs}
        failed = []
        for pair, proc in procs.items():
            try:
                if proc.wait(timeout=15) != 0:
                    failed.append(pair)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                failed.append(pair)
        return failed

    def transfer6(self, a: int, b: int, nbytes: int, tmp_path, port: int = 7600) -> tuple[str, str]:
        """A TCP connection over IPv6 from node a's pod to node b's pod carrying ``nbytes``:
        (sha256 sent, sha256 received)."""
        data = random.Random(f"{a}-{b}").randbytes(nbytes)
        path = tmp_path / f"data-{a}-{b}"
        path.write_bytes(data)
        server = subprocess.Popen(["ip", "netns", "exec", self.pod[b], sys.executable, "-S", "-c", SERVER, str(port)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "listening", server.stderr.read()
            client = subprocess.run(["ip", "netns", "exec", self.pod[a], sys.executable, "-S", "-c", CLIENT,
                                     self.pod_ip6(b), str(port), str(path)],
                                    capture_output=True, text=True, timeout=90)
            assert client.returncode == 0, client.stderr[-1000:]
            out, err = server.communicate(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate()
        got = out.split()
        assert len(got) == 2 and int(got[0]) == nbytes, (out, err)
        return hashlib.sha256(data).hexdigest(), got[1]

    def stats(self, n: int) -> dict:
        return self.agents[n].call("b", "stats")


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


def test_dualstack_fastpath_nodes(net, tmp_path):
    leases = net.start({n: "vxlan/fastpath" for n in NODES})
    assert net.ping_failures(v6=True) == [] and net.ping_failures() == []
    for n in NODES:
        attrs = leases[n].attrs
        assert attrs.public_ipv6 == net.node_ip6(n)
        v4, v6 = attrs.backend_data, attrs.backend_v6_data
        assert v6["VNI"] == 1 and parse_unicast_mac(v6["VtepMAC"]) == v6["VtepMAC"] != v4["VtepMAC"]
        link = ipj(net.node[n], "-6", "addr", "show", "dev", "flannel.1")[0]
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet6"] \
            == [(str(net.subnet6(n).network_address), 128)]          # no link-local on the TUN
        route = sh("ip", "-n", net.node[n], "-6", "route", "show", "exact", "fd10:244::/56")
        assert "dev flannel.1" in route and "mtu 1430" in route, route
        s = net.stats(n)
        assert (s["peers_programmed"], s["peers6_programmed"], s["peers6_failed"], s["routes"]) == (2, 2, 0, 4)
    sent, got = net.transfer6(1, 2, 8 << 20, tmp_path)
    assert sent == got
    s1, s2 = net.stats(1), net.stats(2)
    assert s1["tx_ipv6_packets"] > 1000 and s2["rx_ipv6_packets"] > 1000, (s1, s2)
    assert s1["tx_super_packets"] > 0            # the TUN handed over TSO6 super-packets
    assert _drops(s1) == {} and _drops(s2) == {}

    # no node holds fd10:244:0:9::/64: the engine answers ICMPv6 no route, and the pod's ping says so
    out = subprocess.run(["ip", "netns", "exec", net.pod[1], "ping", "-n", "-c", "1", "-W", "2", "fd10:244:0:9::2"],
                         capture_output=True, text=True, timeout=10).stdout
    assert "Destination unreachable: No route" in out, out
    assert net.stats(1)["tx_icmp_unreachable_sent"] >= 1

    # resync puts back the IPv6 route someone deleted
    sh("ip", "-n", net.node[1], "-6", "route", "del", "fd10:244::/56", "dev", "flannel.1")
    before = net.stats(1)["entries_restored"]
    net.agents[1].call("b", "resync")
    assert net.stats(1)["entries_restored"] == before + 1
    assert "mtu 1430" in sh("ip", "-n", net.node[1], "-6", "route", "show", "exact", "fd10:244::/56")
    assert net.ping_failures([(1, 2)], v6=True) == []

    # a removed lease takes both of its routes out of the engine
    net.agents[1].call("b", "remove_peer", leases[3])
    s = net.stats(1)
    assert (s["routes"], s["peers6_programmed"]) == (2, 1)
    assert net.ping_failures([(1, 3)], v6=True) == [(1, 3)] and net.ping_failures([(1, 2)], v6=True) == []

    # a restart (a new backend, given the previous lease) keeps both VTEP MACs and adopts the
    # running dual-stack engine (its config, IPv6 part included, is the new backend's)
    engine = net.stats(1)["engine_pid"]
    net.agents[1].backend("again", "vxlan/fastpath", VXLAN6.with_dataplane("fastpath"), net.iface(1))
    again = net.agents[1].call("again", "lease_attrs", leases[1])
    assert again.backend_v6_data == leases[1].attrs.backend_v6_data
    assert again.backend_data == leases[1].attrs.backend_data
    net.agents[1].call("again", "setup", leases[1])
    assert net.agents[1].call("again", "stats")["engine_pid"] == engine
    net.agents[1].call("again", "teardown")   # the first backend's supervisor restarts it; net.stop ends it
    net.agents[1].drop("again")


def test_dualstack_fastpath_beside_kernel(net, tmp_path):
    """Node 1 runs the kernel's flannel.1 and flannel-v6.1; nodes 2 and 3 the userspace engine."""
    kinds = {1: "vxlan/kernel", 2: "vxlan/fastpath", 3: "vxlan/fastpath"}
    net.start(kinds)
    assert ipj(net.node[1], "-d", "link", "show", "flannel-v6.1")      # a kernel device there
    assert net.ping_failures(v6=True) == [] and net.ping_failures() == []
    for a, b in ((1, 2), (2, 1)):
        sent, got = net.transfer6(a, b, 8 << 20, tmp_path, port=7700 + a)
        assert sent == got, (a, b)
    s2 = net.stats(2)
    # the kernel's TSO6 packets crossed the veth whole and were written whole (8 MiB in far fewer
    # packets than segments); every one of its frames passed the checks
    assert s2["rx_super_packets"] > 0 and s2["rx_ipv6_packets"] > 100, s2
    assert s2["tx_ipv6_packets"] > 1000, s2
    assert _drops(s2) == {}, s2


def test_dualstack_fastpath_two_workers(net, tmp_path):
    """Two engine workers: a multiqueue TUN and, per family, two SO_REUSEPORT sockets on one port."""
    net.start({n: "vxlan/fastpath" for n in NODES}, workers=2)
    socks = sh("ss", "-H", "-u", "-a", "-n", ns=net.node[1])
    assert socks.count("[2001:db8:198:18::1]:8472") == 2 and socks.count("198.18.0.1:8472") == 2, socks
    assert net.ping_failures(v6=True) == [] and net.ping_failures() == []
    sent, got = net.transfer6(2, 1, 4 << 20, tmp_path, port=7800)
    assert sent == got
    s = net.stats(1)
    assert s["workers"] == 2 and s["rx_ipv6_packets"] > 100 and _drops(s) == {}, s


def test_dualstack_fastpath_direct_routing(net):
    """DirectRouting: every peer is on both underlay subnets, so each family's peer gets a kernel
    route via its PublicIP(v6) on eth0 and the engine holds no route."""
    net.start({n: "vxlan/fastpath" for n in NODES}, VXLAN6_DIRECT)
    for n in NODES:
        for m in NODES:
            if m != n:
                route = sh("ip", "-n", net.node[n], "-6", "route", "show", "exact", str(net.subnet6(m)))
                assert route.startswith(f"{net.subnet6(m)} via {net.node_ip6(m)} dev eth0"), route
        s = net.stats(n)
        assert (s["routes"], s["peers_direct"], s["peers6_programmed"]) == (0, 4, 2), s
    assert net.ping_failures(v6=True) == [] and net.ping_failures() == []
    net.stop()
    assert sh("ip", "-n", net.node[1], "-6", "route", "show", "exact", str(net.subnet6(2))) == ""


@pytest.mark.parametrize("name", ["udp/fastpath", "udp/python"])
def test_udp_backends_refuse_ipv6(name):
    """flannel's udp format carries IPv4 only: the config refuses EnableIPv6 with udp (cp's
    check); the backend itself refuses an IPv6 interface or lease with one line, touching nothing."""
    from controlplane.backends import BackendError, ExternalInterface, load_backend
    from controlplane.lease import LeaseAttrs
    udp = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}').with_dataplane(name.split("/")[1])
    addr = ipaddress.IPv4Address("198.18.0.1")
    v6 = ExternalInterface(name="eth0", index=1, address=addr, public_ip=addr, mtu=1500,
                           address6=ipaddress.IPv6Address("2001:db8:198:18::1"),
                           public_ipv6=ipaddress.IPv6Address("2001:db8:198:18::1"))
    with pytest.raises(BackendError, match="IPv4 only") as err:
        load_backend(name)(udp, v6)
    assert "\n" not in str(err.value)
    b = load_backend(name)(udp, ExternalInterface(name="eth0", index=1, address=addr, public_ip=addr, mtu=1500))
    lease = Lease(ipaddress.IPv4Network("10.244.1.0/24"), LeaseAttrs(addr), time.time() + 60,
                  subnet6=ipaddress.IPv6Network("fd10:244:0:1::/64"))
    with pytest.raises(BackendError, match="has IPv6 subnet fd10:244:0:1::/64") as err:
        b.setup(lease)
    assert "\n" not in str(err.value) and b.engine is None
