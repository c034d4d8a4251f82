"""vxlan/kernel, host-gw/kernel and the masquerade rules, on three namespaced "nodes".

The dual-stack tests run on a second testbed (``<p>`` = ``wkd<pid%1000>-``, ``Testbed(dual_stack=True)``):
node N's eth0 also has 2001:db8:198:18::N/64, its pod fd10:244:0:N::2 behind cni0 fd10:244:0:N::1,
the network config has EnableIPv6 with IPv6Network fd10:244::/56, and each lease its subnet6
fd10:244:0:N::/64. No DAD in any of its namespaces.

Topology (``tests.e2e.Testbed``, built by the lab's own builder), every name prefixed with
``wkb<pid%1000>-``: ``<p>wire`` holds bridge br0, the underlay switch; node ``<p>nN`` has eth0 =
198.18.0.N/24 (a veth to br0), ip_forward on, and a cni0 bridge 10.244.N.1/24 with pod ``<p>pNx1``
behind it (10.244.N.2/24, default via 10.244.N.1). ``<p>m`` is a bare namespace for the
masquerade rules.

Each node's backend runs in an ``Agent``: a forked child that entered the node's namespace
(pyroute2 ``netns.setns``) and executes calls sent over a pipe, so the backends program their own
namespace exactly as weftd would on a real node. Nothing touches the root namespace; teardown
(the lab's, from the testbed's ledger) deletes exactly the namespaces this run created.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import subprocess
import time

import pytest

from controlplane.backends import BackendError, ExternalInterface, load_backend
from controlplane.backends.base import BadBackendData
from controlplane.config import parse_config
from controlplane.lease import Lease, LeaseAttrs
from fastpath.hostgw.kernel import HostGWKernelBackend
from fastpath.vxlan.kernel import VXLANKernelBackend
from fastpath.vxlan.vtep import parse_unicast_mac, random_mac

from .conftest import needs_bcc, needs_root
from .e2e import Testbed, built
from .nsagent import Agent, ipj, sh

PREFIX = f"wkb{os.getpid() % 1000}-"
PREFIX6 = f"wkd{os.getpid() % 1000}-"
NODES = (1, 2, 3)
VXLAN = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
VXLAN_DIRECT = parse_config('{"Network": "10.244.0.0/16", '
                            '"Backend": {"Type": "vxlan", "DirectRouting": true}}')
HOSTGW = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')
DUAL = '"EnableIPv6": true, "IPv6Network": "fd10:244::/56"'
VXLAN6 = parse_config('{"Network": "10.244.0.0/16", %s, "Backend": {"Type": "vxlan"}}' % DUAL)
VXLAN6_DIRECT = parse_config('{"Network": "10.244.0.0/16", %s, '
                             '"Backend": {"Type": "vxlan", "DirectRouting": true}}' % DUAL)
HOSTGW6 = parse_config('{"Network": "10.244.0.0/16", %s, "Backend": {"Type": "host-gw"}}' % DUAL)


# -- the lab ----------------------------------------------------------------------------------------

class Lab(Testbed):
    """The testbed (tests.e2e) with a backend Agent per node and a bare namespace for masquerade."""

    def __init__(self, prefix: str = PREFIX, dual_stack: bool = False):
        super().__init__(prefix, NODES, dual_stack=dual_stack)
        self.agents: dict[int | str, Agent] = {}
        self.masq_ns = prefix + "m"
        self.leases: dict[int, Lease] = {}
        self.kind: str | None = None

    def build(self) -> None:
        super().build()
        self.add_netns("m")
        for n in NODES:
            self.agents[n] = Agent(self.node[n])
        self.agents["m"] = Agent(self.masq_ns)

    def destroy(self) -> list[str]:
        for agent in self.agents.values():
            agent.stop()
        return super().destroy()

    # -- backends on all nodes --

    def iface(self, n: int) -> dict:
        addr = ipaddress.IPv4Address(f"198.18.0.{n}")
        v6 = {"address6": self.node_ip6(n), "public_ipv6": self.node_ip6(n)} if self.dual_stack else {}
        return {"name": "eth0", "address": addr, "public_ip": addr, "mtu": 1500, **v6}

    def lease(self, n: int, attrs: LeaseAttrs, subnet6: ipaddress.IPv6Network | None = None,
              v6: bool = True) -> Lease:
        """Node n's lease (dual-stack: with ``subnet6``, by default subnet6(n); none if not ``v6``)."""
        if subnet6 is None and self.dual_stack and v6:
            subnet6 = self.subnet6(n)
        return Lease(ipaddress.IPv4Network(f"10.244.{n}.0/24"), attrs, time.time() + 3600, subnet6=subnet6)

    def start(self, kind: str, config, options: dict | None = None) -> dict[int, Lease]:
        self.kind = kind
        for n in NODES:
            self.agents[n].backend("b", kind, config, self.iface(n), options)
            self.leases[n] = self.lease(n, self.agents[n].call("b", "lease_attrs", None))
        for n in NODES:
            self.agents[n].call("b", "setup", self.leases[n])
            for m in NODES:
                if m != n:
                    self.agents[n].call("b", "add_peer", self.leases[m])
        return self.leases

    def stop(self) -> None:
        if self.kind is None:
            return
        for n in NODES:
            try:
                self.agents[n].call("b", "teardown")
                self.agents[n].drop("b")
            except Exception:
                pass
        self.kind = None

    def ping_failures(self, pairs=None, v6: bool = False) -> list[tuple[int, int]]:
        pairs = pairs or [(a, b) for a in NODES for b in NODES if a != b]
        procs = {(a, b): subprocess.Popen(
            ["ip", "netns", "exec", self.pod[a], "ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1",
              self.pod_ip6(b) if v6 else f"10.244.{b}.2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for a, b in pairs}
        failed = []
        for pair, proc in procs.items():
            try:
                if proc.wait(timeout=10) != 0:
                    failed.append(pair)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                failed.append(pair)
        return failed

    # -- what a node has --

    def routes(self, n: int, v6: bool = False) -> dict[str, dict]:
        family = "-6" if v6 else "-4"
        return {r["dst"]: r for r in ipj(self.node[n], family, "route", "show", "table", "main")}

    def neigh(self, n: int, dev: str = "flannel.1", v6: bool = False) -> dict[str, str]:
        return {e["dst"]: e.get("lladdr") for e in ipj(self.node[n], "-6" if v6 else "-4", "neigh", "show",
                                                       "dev", dev)
                if "PERMANENT" in e.get("state", [])}

    def fdb(self, n: int, dev: str = "flannel.1") -> set[tuple[str, str]]:
        return {(e["mac"], e["dst"]) for e in ipj(self.node[n], "fdb", "show", "dev", dev, tool="bridge")
                if "dst" in e}

    def link(self, n: int, dev: str) -> dict | None:
        out = subprocess.run(["ip", "-n", self.node[n], "-d", "-j", "addr", "show", "dev", dev],
                             capture_output=True, text=True, timeout=10)
        return json.loads(out.stdout)[0] if out.returncode == 0 and out.stdout.strip() else None

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


@pytest.fixture(scope="module")
def lab6():
    with built(Lab(PREFIX6, dual_stack=True)) as lab:
        yield lab


@pytest.fixture
def net6(lab6):
    yield lab6
    lab6.stop()


def mac_of(lease: Lease) -> str:
    return lease.attrs.backend_data["VtepMAC"]


# -- no root needed ---------------------------------------------------------------------------------

def test_registry_has_kernel_backends():
    assert load_backend("vxlan/kernel") is VXLANKernelBackend
    assert load_backend("host-gw/kernel") is HostGWKernelBackend
    assert VXLANKernelBackend.name() == "vxlan/kernel" and HostGWKernelBackend.name() == "host-gw/kernel"


def test_mac_helpers():
    assert parse_unicast_mac("02:AA:bb:cc:dd:ee") == "02:aa:bb:cc:dd:ee"
    assert parse_unicast_mac("02-aa-bb-cc-dd-ee") == "02:aa:bb:cc:dd:ee"
    for bad in (None, 5, "", "zz:aa:bb:cc:dd:ee", "01:00:5e:00:00:01", "00:00:00:00:00:00",
                "ff:ff:ff:ff:ff:ff", "02:aa:bb:cc:dd"):
        assert parse_unicast_mac(bad) is None, bad
    for _ in range(50):
        mac = random_mac()
        first = int(mac[:2], 16)
        assert parse_unicast_mac(mac) == mac and first & 2 and not first & 1


def test_hostgw_refuses_nat():
    iface = ExternalInterface("eth0", 7, ipaddress.IPv4Address("198.18.0.1"),
                              ipaddress.IPv4Address("203.0.113.9"), 1500)
    b = HostGWKernelBackend(HOSTGW, iface)
    lease = Lease(ipaddress.IPv4Network("10.244.1.0/24"), b.lease_attrs(None), None)
    with pytest.raises(BackendError) as exc:
        b.setup(lease)
    assert str(exc.value) == ("host-gw backend requires the public IP (203.0.113.9) to be the "
                              "address of interface eth0 (198.18.0.1)")
    assert HostGWKernelBackend(HOSTGW, iface).mtu == 1500 and VXLANKernelBackend(VXLAN, iface).mtu == 1450


# -- vxlan ------------------------------------------------------------------------------------------

@needs_root
def test_vxlan_pods_ping_and_device(net):
    leases = net.start("vxlan/kernel", VXLAN)
    assert net.ping_failures() == []
    for n in NODES:
        attrs = leases[n].attrs
        assert attrs.backend_type == "vxlan" and attrs.backend_data["VNI"] == 1
        mac = mac_of(leases[n])
        assert parse_unicast_mac(mac) == mac
        link = net.link(n, "flannel.1")
        assert link["mtu"] == 1450 and link["address"] == mac
        info = link["linkinfo"]["info_data"]
        assert info["id"] == 1 and info["port"] == 8472 and info["local"] == f"198.18.0.{n}"
        assert not info.get("learning")
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] \
            == [(f"10.244.{n}.0", 32)]
        routes, neigh, fdb = net.routes(n), net.neigh(n), net.fdb(n)
        for m in NODES:
            if m == n:
                continue
            r = routes[f"10.244.{m}.0/24"]
            assert r["gateway"] == f"10.244.{m}.0" and r["dev"] == "flannel.1" and "onlink" in r["flags"]
            assert neigh[f"10.244.{m}.0"] == mac_of(leases[m])
            assert (mac_of(leases[m]), f"198.18.0.{m}") in fdb
        s = net.stats(n)
        assert s["peers_programmed"] == 2 and s["peers_bad_backend_data"] == 0
    # add_peer again (a renewal) changes nothing
    net.agents[1].call("b", "add_peer", leases[2])
    assert net.fdb(1) == {(mac_of(leases[m]), f"198.18.0.{m}") for m in (2, 3)}


@needs_root
def test_vxlan_restart_keeps_vtep_mac(net):
    leases = net.start("vxlan/kernel", VXLAN)
    a1, mac1 = net.agents[1], mac_of(leases[1])
    # weftd killed: the object goes, the device stays; the new one gets the previous lease
    a1.drop("b")
    a1.backend("b", "vxlan/kernel", VXLAN, net.iface(1))
    attrs = a1.call("b", "lease_attrs", leases[1])
    assert attrs.backend_data == {"VNI": 1, "VtepMAC": mac1}
    a1.call("b", "setup", net.lease(1, attrs))
    assert net.link(1, "flannel.1")["address"] == mac1
    # no previous lease at all: the existing device's MAC
    a1.drop("b")
    a1.backend("b", "vxlan/kernel", VXLAN, net.iface(1))
    assert mac_of(net.lease(1, a1.call("b", "lease_attrs", None))) == mac1
    # a previous lease with a garbage MAC and no device: a fresh locally administered one
    a1.call("b", "teardown")
    a1.drop("b")
    assert net.link(1, "flannel.1") is None
    a1.backend("b", "vxlan/kernel", VXLAN, net.iface(1))
    bad_prev = net.lease(1, LeaseAttrs(leases[1].attrs.public_ip, "vxlan", {"VNI": 1, "VtepMAC": "nope"}))
    new = a1.call("b", "lease_attrs", bad_prev).backend_data["VtepMAC"]
    assert parse_unicast_mac(new) == new and int(new[:2], 16) & 2 and new != mac1
    # the previous lease wins over the device's MAC
    a1.call("b", "setup", net.lease(1, a1.call("b", "lease_attrs", None)))
    a1.drop("b")
    a1.backend("b", "vxlan/kernel", VXLAN, net.iface(1))
    assert mac_of(net.lease(1, a1.call("b", "lease_attrs", leases[1]))) == mac1
    a1.call("b", "setup", leases[1])
    assert net.link(1, "flannel.1")["address"] == mac1
    for m in (2, 3):
        a1.call("b", "add_peer", leases[m])
    assert net.ping_failures() == []


@needs_root
def test_vxlan_remove_peer_and_resync(net):
    leases = net.start("vxlan/kernel", VXLAN)
    a1 = net.agents[1]
    a1.call("b", "remove_peer", leases[2])
    assert "10.244.2.0/24" not in net.routes(1)
    assert "10.244.2.0" not in net.neigh(1)
    assert net.fdb(1) == {(mac_of(leases[3]), "198.18.0.3")}
    assert "10.244.3.0/24" in net.routes(1) and "10.244.3.0" in net.neigh(1)
    assert net.stats(1)["peers_programmed"] == 1
    assert net.ping_failures([(1, 3), (3, 1)]) == []
    a1.call("b", "add_peer", leases[2])
    # someone deletes entries behind our back; resync puts exactly those back
    sh("ip", "-n", net.node[1], "route", "del", "10.244.2.0/24")
    sh("ip", "-n", net.node[1], "neigh", "del", "10.244.3.0", "dev", "flannel.1")
    sh("bridge", "-n", net.node[1], "fdb", "del", mac_of(leases[3]), "dev", "flannel.1",
       "dst", "198.18.0.3")
    before = net.stats(1)["entries_restored"]
    a1.call("b", "resync")
    assert net.stats(1)["entries_restored"] == before + 3
    assert net.routes(1)["10.244.2.0/24"]["gateway"] == "10.244.2.0"
    assert net.neigh(1)["10.244.3.0"] == mac_of(leases[3])
    assert (mac_of(leases[3]), "198.18.0.3") in net.fdb(1)
    a1.call("b", "resync")  # nothing missing: nothing counted
    assert net.stats(1)["entries_restored"] == before + 3
    # the device itself vanishes: recreated and fully reprogrammed
    sh("ip", "-n", net.node[1], "link", "del", "flannel.1")
    a1.call("b", "resync")
    assert net.stats(1)["device_recreated"] == 1
    assert net.link(1, "flannel.1")["address"] == mac_of(leases[1])
    assert net.ping_failures() == []


@needs_root
def test_vxlan_peer_change_replaces_stale_entries(net):
    leases = net.start("vxlan/kernel", VXLAN)
    a1 = net.agents[1]
    moved = net.lease(2, LeaseAttrs(leases[2].attrs.public_ip, "vxlan",
                                    {"VNI": 1, "VtepMAC": "02:00:00:00:99:99"}))
    a1.call("b", "add_peer", moved)
    assert net.neigh(1)["10.244.2.0"] == "02:00:00:00:99:99"
    assert net.fdb(1) == {("02:00:00:00:99:99", "198.18.0.2"), (mac_of(leases[3]), "198.18.0.3")}
    readdressed = net.lease(2, LeaseAttrs(ipaddress.IPv4Address("198.18.0.77"), "vxlan",
                                          {"VNI": 1, "VtepMAC": "02:00:00:00:99:99"}))
    a1.call("b", "add_peer", readdressed)
    assert net.fdb(1) == {("02:00:00:00:99:99", "198.18.0.77"), (mac_of(leases[3]), "198.18.0.3")}
    a1.call("b", "add_peer", leases[2])
    assert net.fdb(1) == {(mac_of(leases[m]), f"198.18.0.{m}") for m in (2, 3)}
    assert net.neigh(1)["10.244.2.0"] == mac_of(leases[2])
    assert net.ping_failures([(1, 2), (2, 1)]) == []


@needs_root
def test_vxlan_bad_backend_data_is_counted_not_raised(net):
    net.start("vxlan/kernel", VXLAN)
    pub = ipaddress.IPv4Address("198.18.0.9")
    bad = [None, "a string", {"VNI": 1}, {"VtepMAC": "zz:zz:zz:zz:zz:zz"}, {"VtepMAC": "01:00:5e:00:00:01"},
           {"VtepMAC": 42}]
    for data in bad:
        net.agents[1].call("b", "add_peer", net.lease(9, LeaseAttrs(pub, "vxlan", data)))
    s = net.stats(1)
    assert s["peers_bad_backend_data"] == len(bad) and s["peers_programmed"] == 2
    assert "10.244.9.0/24" not in net.routes(1) and "10.244.9.0" not in net.neigh(1)


@needs_root
def test_vxlan_direct_routing(net):
    leases = net.start("vxlan/kernel", VXLAN_DIRECT)
    routes = net.routes(1)
    for m in (2, 3):
        assert routes[f"10.244.{m}.0/24"]["gateway"] == f"198.18.0.{m}"
        assert routes[f"10.244.{m}.0/24"]["dev"] == "eth0"
    assert net.neigh(1) == {} and net.fdb(1) == set()
    assert net.ping_failures() == []
    # a peer beyond our L2 subnet still goes through the tunnel
    far = net.lease(9, LeaseAttrs(ipaddress.IPv4Address("198.19.0.9"), "vxlan",
                                  {"VNI": 1, "VtepMAC": "02:00:00:00:09:09"}))
    net.agents[1].call("b", "add_peer", far)
    r = net.routes(1)["10.244.9.0/24"]
    assert r["gateway"] == "10.244.9.0" and r["dev"] == "flannel.1"
    assert net.fdb(1) == {("02:00:00:00:09:09", "198.19.0.9")}
    net.agents[1].call("b", "remove_peer", far)
    assert "10.244.9.0/24" not in net.routes(1) and net.fdb(1) == set() and net.neigh(1) == {}
    # resync restores a vanished direct route; teardown removes the direct routes too
    sh("ip", "-n", net.node[1], "route", "del", "10.244.2.0/24")
    net.agents[1].call("b", "resync")
    assert net.routes(1)["10.244.2.0/24"]["gateway"] == "198.18.0.2"
    net.agents[1].call("b", "teardown")
    assert "10.244.2.0/24" not in net.routes(1) and net.link(1, "flannel.1") is None
    assert leases[1].attrs.backend_data["VNI"] == 1


@needs_root
def test_vxlan_recreates_incompatible_device_and_csum_off(net):
    sh("ip", "-n", net.node[1], "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local",
       "198.18.0.1", "dev", "eth0", "dstport", "4789", "nolearning")
    net.start("vxlan/kernel", VXLAN, options={"vxlan_tx_csum_off": True})
    assert net.link(1, "flannel.1")["linkinfo"]["info_data"]["port"] == 8472
    for n in NODES:
        feats = sh("ethtool", "-k", "flannel.1", ns=net.node[n])
        assert "tx-checksum-ip-generic: off" in feats
        assert net.stats(n)["tx_csum_off_failed"] == 0
    assert net.ping_failures() == []


@needs_root
def test_vxlan_teardown_removes_device(net):
    net.start("vxlan/kernel", VXLAN)
    net.stop()
    for n in NODES:
        assert net.link(n, "flannel.1") is None
        assert not [d for d in net.routes(n) if d.startswith("10.244.") and not d.startswith(f"10.244.{n}.")]


# -- host-gw ----------------------------------------------------------------------------------------

@needs_root
def test_hostgw_pods_ping_remove_resync(net):
    # a conflicting route to a peer subnet (another gateway, another metric) is removed first
    sh("ip", "-n", net.node[1], "route", "add", "10.244.3.0/24", "via", "198.18.0.99", "dev", "eth0",
       "metric", "50")
    leases = net.start("host-gw/kernel", HOSTGW)
    assert net.ping_failures() == []
    for n in NODES:
        routes = net.routes(n)
        for m in NODES:
            if m != n:
                r = routes[f"10.244.{m}.0/24"]
                assert r["gateway"] == f"198.18.0.{m}" and r["dev"] == "eth0"
        assert net.link(n, "flannel.1") is None
    assert [(r["gateway"], r["dev"]) for r in ipj(net.node[1], "-4", "route", "show", "10.244.3.0/24")] \
        == [("198.18.0.3", "eth0")]
    assert net.stats(1)["conflicts_removed"] == 1
    a1 = net.agents[1]
    a1.call("b", "remove_peer", leases[2])
    assert "10.244.2.0/24" not in net.routes(1) and "10.244.3.0/24" in net.routes(1)
    a1.call("b", "add_peer", leases[2])
    sh("ip", "-n", net.node[1], "route", "del", "10.244.3.0/24")
    a1.call("b", "resync")
    assert net.stats(1)["entries_restored"] == 1 and "10.244.3.0/24" in net.routes(1)
    # A conflict added behind ours (a higher metric: ours stays the one in use, so adding a peer
    # cannot see it) goes at the next resync, and ours stays.
    sh("ip", "-n", net.node[1], "route", "add", "10.244.2.0/24", "via", "198.18.0.98", "dev", "eth0",
       "metric", "100")
    a1.call("b", "resync")
    assert [(r["gateway"], r["dev"]) for r in ipj(net.node[1], "-4", "route", "show", "10.244.2.0/24")] \
        == [("198.18.0.2", "eth0")]
    assert net.stats(1)["conflicts_removed"] == 2 and net.stats(1)["entries_restored"] == 1
    assert net.ping_failures([(1, 3), (3, 1)]) == []
    net.stop()
    for n in NODES:
        assert not [d for d in net.routes(n) if d.startswith("10.244.") and not d.startswith(f"10.244.{n}.")]


# -- dual-stack: no root needed ---------------------------------------------------------------------

V6 = {n: ipaddress.IPv6Address(f"2001:db8:198:18::{n}") for n in (1, 2, 9)}


def _iface6(n: int = 1, address6=None, public_ipv6=None) -> ExternalInterface:
    ip = ipaddress.IPv4Address(f"198.18.0.{n}")
    return ExternalInterface("eth0", 7, ip, ip, 1500, V6[n] if address6 is None else address6,
                             V6[n] if public_ipv6 is None else public_ipv6)


def _lease6(n: int, v6_data="mac", subnet6=True, public_ipv6=True) -> Lease:
    """Peer n's dual-stack vxlan lease; ``v6_data`` "mac": a valid BackendV6Data, else that value."""
    data6 = {"VNI": 1, "VtepMAC": f"02:00:00:00:06:0{n}"} if v6_data == "mac" else v6_data
    attrs = LeaseAttrs(ipaddress.IPv4Address(f"198.18.0.{n}"), "vxlan",
                       {"VNI": 1, "VtepMAC": f"02:00:00:00:04:0{n}"}, V6[n] if public_ipv6 else None, data6)
    return Lease(ipaddress.IPv4Network(f"10.244.{n}.0/24"), attrs, None,
                 subnet6=ipaddress.IPv6Network(f"fd10:244:0:{n}::/64") if subnet6 else None)


def test_decode6_sides():
    from fastpath.routing import Peer
    b = VXLANKernelBackend(VXLAN6, _iface6())
    assert b.has_ipv6
    assert b.decode6(_lease6(2)) == Peer(ipaddress.IPv6Network("fd10:244:0:2::/64"), V6[2],
                                         "02:00:00:00:06:02")
    assert b.decode(_lease6(2)) == Peer(ipaddress.IPv4Network("10.244.2.0/24"),
                                        ipaddress.IPv4Address("198.18.0.2"), "02:00:00:00:04:02")
    # the lease has no IPv6 side: none, and nothing bad about it
    assert b.decode6(_lease6(2, subnet6=False)) is None
    assert b.decode6(_lease6(2, public_ipv6=False)) is None
    # this node has no IPv6 (EnableIPv6 false, or no PublicIPv6): no IPv6 side for any lease
    assert not VXLANKernelBackend(VXLAN, _iface6()).has_ipv6
    assert VXLANKernelBackend(VXLAN, _iface6()).decode6(_lease6(2)) is None
    ip1 = ipaddress.IPv4Address("198.18.0.1")
    v4only = VXLANKernelBackend(VXLAN6, ExternalInterface("eth0", 7, ip1, ip1, 1500))
    assert not v4only.has_ipv6 and v4only.decode6(_lease6(2)) is None
    # BackendV6Data this data plane cannot use: BadBackendData naming it, the v4 side unaffected
    for data, why in ((None, "no BackendV6Data object"), ("x", "no BackendV6Data object"),
                      ({"VNI": 1}, "no VtepMAC"),
                      ({"VtepMAC": "01:00:5e:00:00:01"}, "VtepMAC '01:00:5e:00:00:01' is not a unicast MAC")):
        with pytest.raises(BadBackendData) as exc:
            b.decode6(_lease6(2, data))
        assert str(exc.value) == why
        assert b.decode(_lease6(2, data)).mac == "02:00:00:00:04:02"
    # host-gw: the IPv6 side is the route via PublicIPv6
    h = HostGWKernelBackend(HOSTGW6, _iface6())
    assert h.decode6(_lease6(2)) == Peer(ipaddress.IPv6Network("fd10:244:0:2::/64"), V6[2])


def test_lease_attrs_dual_stack():
    prev = _lease6(1)
    b = VXLANKernelBackend(VXLAN6, _iface6())
    attrs = b.lease_attrs(prev)  # both MACs come from the previous lease: no device is looked up
    assert attrs.to_json() == ('{"PublicIP":"198.18.0.1","PublicIPv6":"2001:db8:198:18::1",'
                               '"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:04:01"},'
                               '"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:06:01"}}')
    # IPv4 only: exactly the lease of before
    v4 = VXLANKernelBackend(VXLAN, _iface6()).lease_attrs(prev)
    assert v4.to_json() == ('{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan",'
                            '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:04:01"}}')
    assert HostGWKernelBackend(HOSTGW6, _iface6()).lease_attrs(None).to_json() == (
        '{"PublicIP":"198.18.0.1","PublicIPv6":"2001:db8:198:18::1","BackendType":"host-gw"}')


def test_hostgw_refuses_ipv6_nat():
    lease = _lease6(1)
    nat6 = ipaddress.IPv6Address("2001:db8:ffff::9")
    for iface, have in ((_iface6(public_ipv6=nat6), "2001:db8:198:18::1"),
                        (ExternalInterface("eth0", 7, ipaddress.IPv4Address("198.18.0.1"),
                                           ipaddress.IPv4Address("198.18.0.1"), 1500, None,
                                           ipaddress.IPv6Address("2001:db8:ffff::9")), "no IPv6 address")):
        with pytest.raises(BackendError) as exc:
            HostGWKernelBackend(HOSTGW6, iface).setup(lease)
        assert str(exc.value) == ("host-gw backend requires the public IPv6 (2001:db8:ffff::9) to be the "
                                  f"address of interface eth0 ({have})")


# -- dual-stack: vxlan ------------------------------------------------------------------------------

def mac6_of(lease: Lease) -> str:
    return lease.attrs.backend_v6_data["VtepMAC"]


def gw6(net, n: int) -> str:
    return str(net.subnet6(n).network_address)


def peer_routes6(net, n: int) -> list[str]:
    """Node n's IPv6 routes into the IPv6Network other than to its own subnet6."""
    return [d for d in net.routes(n, v6=True) if d.startswith("fd10:244:") and d != str(net.subnet6(n))]


@needs_root
def test_dualstack_vxlan_pods_ping_and_entries(net6):
    leases = net6.start("vxlan/kernel", VXLAN6)
    assert net6.ping_failures(v6=True) == [] and net6.ping_failures() == []
    for n in NODES:
        attrs = leases[n].attrs
        assert attrs.public_ipv6 == net6.node_ip6(n) and attrs.backend_v6_data["VNI"] == 1
        mac6 = mac6_of(leases[n])
        assert parse_unicast_mac(mac6) == mac6 and mac6 != mac_of(leases[n])
        link = net6.link(n, "flannel-v6.1")
        assert link["mtu"] == 1430 and link["address"] == mac6
        info = link["linkinfo"]["info_data"]
        assert info["id"] == 1 and info["port"] == 8472 and info["local6"] == str(net6.node_ip6(n))
        assert not info.get("learning")
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]
                if a["family"] == "inet6" and a["scope"] == "global"] == [(gw6(net6, n), 128)]
        assert net6.link(n, "flannel.1")["linkinfo"]["info_data"]["local"] == f"198.18.0.{n}"
        routes, neigh = net6.routes(n, v6=True), net6.neigh(n, "flannel-v6.1", v6=True)
        fdb = net6.fdb(n, "flannel-v6.1")
        for m in NODES:
            if m == n:
                continue
            r = routes[str(net6.subnet6(m))]
            assert r["gateway"] == gw6(net6, m) and r["dev"] == "flannel-v6.1" and "onlink" in r["flags"]
            assert neigh[gw6(net6, m)] == mac6_of(leases[m])
            assert net6.routes(n)[f"10.244.{m}.0/24"]["dev"] == "flannel.1"
        assert fdb == {(mac6_of(leases[m]), str(net6.node_ip6(m))) for m in NODES if m != n}
        assert net6.fdb(n) == {(mac_of(leases[m]), f"198.18.0.{m}") for m in NODES if m != n}
        s = net6.stats(n)
        assert (s["peers_programmed"], s["peers6_programmed"], s["peers6_failed"],
                s["peers_bad_backend_data"]) == (2, 2, 0, 0)
    net6.agents[1].call("b", "add_peer", leases[2])  # a renewal changes nothing
    assert net6.fdb(1, "flannel-v6.1") == {(mac6_of(leases[m]), str(net6.node_ip6(m))) for m in (2, 3)}


@needs_root
def test_dualstack_vxlan_resync_remove_change(net6):
    leases = net6.start("vxlan/kernel", VXLAN6)
    a1, ns = net6.agents[1], net6.node[1]
    # someone deletes IPv6 entries behind our back; resync puts exactly those back
    sh("ip", "-n", ns, "-6", "route", "del", str(net6.subnet6(2)))
    sh("ip", "-n", ns, "-6", "neigh", "del", gw6(net6, 3), "dev", "flannel-v6.1")
    sh("bridge", "-n", ns, "fdb", "del", mac6_of(leases[3]), "dev", "flannel-v6.1", "dst",
       str(net6.node_ip6(3)))
    before = net6.stats(1)["entries_restored"]
    a1.call("b", "resync")
    assert net6.stats(1)["entries_restored"] == before + 3
    assert net6.routes(1, v6=True)[str(net6.subnet6(2))]["gateway"] == gw6(net6, 2)
    assert net6.neigh(1, "flannel-v6.1", v6=True)[gw6(net6, 3)] == mac6_of(leases[3])
    assert (mac6_of(leases[3]), str(net6.node_ip6(3))) in net6.fdb(1, "flannel-v6.1")
    a1.call("b", "resync")
    assert net6.stats(1)["entries_restored"] == before + 3
    # a removed peer's IPv6 entries go with its IPv4 ones; the other peer's stay
    a1.call("b", "remove_peer", leases[2])
    assert str(net6.subnet6(2)) not in net6.routes(1, v6=True) and "10.244.2.0/24" not in net6.routes(1)
    assert gw6(net6, 2) not in net6.neigh(1, "flannel-v6.1", v6=True)
    assert net6.fdb(1, "flannel-v6.1") == {(mac6_of(leases[3]), str(net6.node_ip6(3)))}
    s = net6.stats(1)
    assert (s["peers_programmed"], s["peers6_programmed"]) == (1, 1)
    assert net6.ping_failures([(1, 3), (3, 1)], v6=True) == []
    # a peer's lease whose IPv6 side changes (another subnet6, another MAC): the old entries go
    a1.call("b", "add_peer", leases[2])
    moved_attrs = dataclasses.replace(leases[2].attrs,
                                      backend_v6_data={"VNI": 1, "VtepMAC": "02:00:00:00:99:99"})
    moved = dataclasses.replace(leases[2], subnet6=ipaddress.IPv6Network("fd10:244:0:99::/64"),
                                attrs=moved_attrs)
    a1.call("b", "add_peer", moved)
    routes6 = net6.routes(1, v6=True)
    assert "fd10:244:0:99::/64" in routes6 and str(net6.subnet6(2)) not in routes6
    assert ("02:00:00:00:99:99", str(net6.node_ip6(2))) in net6.fdb(1, "flannel-v6.1")
    assert (mac6_of(leases[2]), str(net6.node_ip6(2))) not in net6.fdb(1, "flannel-v6.1")
    # ... and a lease that drops its IPv6 side: its IPv6 entries go, its IPv4 ones stay
    a1.call("b", "add_peer", net6.lease(2, leases[2].attrs, v6=False))
    assert not [d for d in net6.routes(1, v6=True) if d.startswith("fd10:244:0:99:")]
    assert "10.244.2.0/24" in net6.routes(1)
    assert net6.stats(1)["peers6_programmed"] == 1
    a1.call("b", "add_peer", leases[2])
    # the device itself vanishes: recreated with its MAC and fully reprogrammed
    sh("ip", "-n", ns, "link", "del", "flannel-v6.1")
    a1.call("b", "resync")
    assert net6.stats(1)["device_recreated"] == 1
    assert net6.link(1, "flannel-v6.1")["address"] == mac6_of(leases[1])
    assert net6.ping_failures(v6=True) == []


@needs_root
def test_dualstack_vxlan_bad_v6_data_skips_only_that_side(net6):
    net6.start("vxlan/kernel", VXLAN6)
    a1 = net6.agents[1]
    pub, pub6 = ipaddress.IPv4Address("198.18.0.9"), ipaddress.IPv6Address("2001:db8:198:18::9")
    good4 = {"VNI": 1, "VtepMAC": "02:00:00:00:04:09"}
    bad = [None, "a string", {"VNI": 1}, {"VtepMAC": "zz:zz:zz:zz:zz:zz"}, {"VtepMAC": 42}]
    for data in bad:
        a1.call("b", "add_peer", net6.lease(9, LeaseAttrs(pub, "vxlan", good4, pub6, data)))
    s = net6.stats(1)
    assert s["peers_bad_backend_data"] == len(bad)
    assert (s["peers_programmed"], s["peers6_programmed"]) == (3, 2)
    assert net6.routes(1)["10.244.9.0/24"]["dev"] == "flannel.1"  # the IPv4 side is programmed
    assert str(net6.subnet6(9)) not in net6.routes(1, v6=True) and gw6(net6, 9) not in \
        net6.neigh(1, "flannel-v6.1", v6=True)
    # a peer without IPv6 (no PublicIPv6, or no subnet6): only its IPv4 side, nothing counted
    a1.call("b", "add_peer", net6.lease(9, LeaseAttrs(pub, "vxlan", good4)))
    a1.call("b", "add_peer", net6.lease(8, LeaseAttrs(ipaddress.IPv4Address("198.18.0.8"), "vxlan",
                                                       {"VNI": 1, "VtepMAC": "02:00:00:00:04:08"}, pub6,
                                                       {"VNI": 1, "VtepMAC": "02:00:00:00:06:08"}), v6=False))
    s = net6.stats(1)
    assert (s["peers_bad_backend_data"], s["peers_programmed"], s["peers6_programmed"]) == (len(bad), 4, 2)
    # a peer claiming our own IPv6 subnet gets no IPv6 route (it would take our pods' traffic away)
    a1.call("b", "add_peer", net6.lease(7, LeaseAttrs(ipaddress.IPv4Address("198.18.0.7"), "vxlan",
                                                       {"VNI": 1, "VtepMAC": "02:00:00:00:04:07"}, pub6,
                                                       {"VNI": 1, "VtepMAC": "02:00:00:00:06:07"}),
                                        subnet6=net6.subnet6(1)))
    assert net6.routes(1, v6=True)[str(net6.subnet6(1))].get("gateway") is None
    assert net6.stats(1)["peers6_programmed"] == 2
    assert net6.ping_failures([(1, 2), (2, 1)], v6=True) == []


@needs_root
def test_dualstack_vxlan_restart_keeps_v6_mac_and_teardown(net6):
    leases = net6.start("vxlan/kernel", VXLAN6)
    a1, mac6 = net6.agents[1], mac6_of(leases[1])
    a1.drop("b")  # weftd killed: the devices stay; the new one gets the previous lease
    a1.backend("b", "vxlan/kernel", VXLAN6, net6.iface(1))
    assert a1.call("b", "lease_attrs", leases[1]).backend_v6_data == {"VNI": 1, "VtepMAC": mac6}
    a1.drop("b")  # no previous lease: flannel-v6.1's MAC
    a1.backend("b", "vxlan/kernel", VXLAN6, net6.iface(1))
    attrs = a1.call("b", "lease_attrs", None)
    assert attrs.backend_v6_data == {"VNI": 1, "VtepMAC": mac6}
    assert attrs.backend_data == leases[1].attrs.backend_data
    a1.call("b", "setup", net6.lease(1, attrs))
    for m in (2, 3):
        a1.call("b", "add_peer", leases[m])
    assert net6.link(1, "flannel-v6.1")["address"] == mac6
    assert net6.ping_failures(v6=True) == []
    net6.stop()
    for n in NODES:
        assert net6.link(n, "flannel-v6.1") is None and net6.link(n, "flannel.1") is None
        assert peer_routes6(net6, n) == []
    # a node that runs without IPv6 now removes the flannel-v6.1 a run with IPv6 left
    net6.start("vxlan/kernel", VXLAN6)
    a1.drop("b")
    a1.backend("b", "vxlan/kernel", VXLAN, net6.iface(1))
    a1.call("b", "setup", net6.lease(1, a1.call("b", "lease_attrs", None), v6=False))
    assert net6.link(1, "flannel-v6.1") is None and net6.link(1, "flannel.1") is not None
    assert "peers6_programmed" not in net6.stats(1)


@needs_root
def test_dualstack_vxlan_direct_routing(net6):
    net6.start("vxlan/kernel", VXLAN6_DIRECT)
    routes6 = net6.routes(1, v6=True)
    for m in (2, 3):
        r = routes6[str(net6.subnet6(m))]
        assert r["gateway"] == str(net6.node_ip6(m)) and r["dev"] == "eth0"
    assert net6.neigh(1, "flannel-v6.1", v6=True) == {} and net6.fdb(1, "flannel-v6.1") == set()
    assert net6.stats(1)["peers6_direct"] == 2 and net6.stats(1)["peers_direct"] == 2
    assert net6.ping_failures(v6=True) == []
    # a peer beyond our IPv6 L2 subnet still goes through flannel-v6.1
    far = net6.lease(9, LeaseAttrs(ipaddress.IPv4Address("198.18.0.9"), "vxlan",
                                   {"VNI": 1, "VtepMAC": "02:00:00:00:04:09"},
                                   ipaddress.IPv6Address("2001:db8:ffff::9"),
                                   {"VNI": 1, "VtepMAC": "02:00:00:00:06:09"}))
    net6.agents[1].call("b", "add_peer", far)
    r = net6.routes(1, v6=True)[str(net6.subnet6(9))]
    assert r["gateway"] == gw6(net6, 9) and r["dev"] == "flannel-v6.1"
    assert net6.fdb(1, "flannel-v6.1") == {("02:00:00:00:06:09", "2001:db8:ffff::9")}
    sh("ip", "-n", net6.node[1], "-6", "route", "del", str(net6.subnet6(2)))
    net6.agents[1].call("b", "resync")
    assert net6.routes(1, v6=True)[str(net6.subnet6(2))]["gateway"] == str(net6.node_ip6(2))
    net6.agents[1].call("b", "teardown")
    assert str(net6.subnet6(2)) not in net6.routes(1, v6=True) and net6.link(1, "flannel-v6.1") is None


# -- dual-stack: host-gw ----------------------------------------------------------------------------

@needs_root
def test_dualstack_hostgw_pods_ping_remove_resync(net6):
    ns = net6.node[1]
    sh("ip", "-n", ns, "-6", "route", "add", str(net6.subnet6(3)), "via", "2001:db8:198:18::99",
       "dev", "eth0", "metric", "50")
    leases = net6.start("host-gw/kernel", HOSTGW6)
    assert net6.ping_failures(v6=True) == [] and net6.ping_failures() == []
    for n in NODES:
        routes6 = net6.routes(n, v6=True)
        for m in NODES:
            if m != n:
                r = routes6[str(net6.subnet6(m))]
                assert r["gateway"] == str(net6.node_ip6(m)) and r["dev"] == "eth0"
                assert net6.routes(n)[f"10.244.{m}.0/24"]["gateway"] == f"198.18.0.{m}"
        assert (net6.stats(n)["peers_programmed"], net6.stats(n)["peers6_programmed"]) == (2, 2)
    assert [(r["gateway"], r["dev"]) for r in ipj(ns, "-6", "route", "show", str(net6.subnet6(3)))] \
        == [(str(net6.node_ip6(3)), "eth0")]
    assert net6.stats(1)["conflicts_removed"] == 1
    a1 = net6.agents[1]
    a1.call("b", "remove_peer", leases[2])
    routes6 = net6.routes(1, v6=True)
    assert str(net6.subnet6(2)) not in routes6 and str(net6.subnet6(3)) in routes6
    a1.call("b", "add_peer", leases[2])
    sh("ip", "-n", ns, "-6", "route", "del", str(net6.subnet6(3)))
    a1.call("b", "resync")
    assert net6.stats(1)["entries_restored"] == 1 and str(net6.subnet6(3)) in net6.routes(1, v6=True)
    assert net6.ping_failures([(1, 3), (3, 1)], v6=True) == []
    net6.stop()
    for n in NODES:
        assert peer_routes6(net6, n) == []


@needs_root
@needs_bcc
@pytest.mark.parametrize("kind,config", [("vxlan/kernel", VXLAN6), ("host-gw/kernel", HOSTGW6)])
def test_dualstack_source_guard_holds_ipv4_sides_only(net6, kind, config):
    """The source guard is an IPv4 guard: its maps follow the IPv4 sides of the leases, and IPv6
    traffic passes it (checked by neither the guard nor its counters)."""
    net6.start(kind, config, options={"source_guard": True})
    assert net6.ping_failures(v6=True) == [] and net6.ping_failures() == []
    s = net6.stats(1)
    in_guard = s["guard_peer_ips"] if kind == "vxlan/kernel" else s["guard_peers"]  # the peers' IPv4 sides
    assert in_guard == 2 and (s["peers_programmed"], s["peers6_programmed"], s["peer_errors"]) == (2, 2, 0)
    assert {k: v for k, v in s.items() if k.startswith("drops_") and v} == {}


# -- masquerade -------------------------------------------------------------------------------------

def _ruleset(ns: str) -> tuple[str, str]:
    ipt = [line for line in sh("iptables-save", ns=ns).splitlines() if not line.startswith("#")]
    ipt = [line.split(" [")[0] if line.startswith(":") else line for line in ipt]  # drop counters
    return "\n".join(ipt), sh("nft", "list", "ruleset", ns=ns)


@needs_root
@pytest.mark.parametrize("tool", ["iptables", "nft"])
def test_masq_setup_teardown(lab, tool):
    ns, agent = lab.masq_ns, lab.agents["m"]
    # a node's nat table is rarely empty: something else's rule is there before us, and stays
    sh("iptables", "-w", "5", "-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24", "-j", "RETURN", ns=ns)
    try:
        before = _ruleset(ns)
        agent.masq(tool, tool)
        agent.call(tool, "setup", "10.244.0.0/16", "10.244.1.0/24")
        once = _ruleset(ns)
        agent.call(tool, "setup", "10.244.0.0/16", "10.244.1.0/24")
        assert _ruleset(ns) == once != before
        if tool == "iptables":
            chain = sh("iptables", "-w", "5", "-t", "nat", "-S", "WEFT-POSTRTG", ns=ns)
            rules = [line for line in chain.splitlines() if line.startswith("-A")]
            assert len(rules) == 6
            assert "--mark 0x4000/0x4000" in rules[0] and "-j RETURN" in rules[0]
            assert "-s 10.244.1.0/24 -d 10.244.0.0/16" in rules[1]
            assert "! -s 10.244.0.0/16 -d 10.244.1.0/24" in rules[3]
            assert "! -d 224.0.0.0/4" in rules[4] and "MASQUERADE" in rules[4] and "--random-fully" in rules[4]
            post = sh("iptables", "-w", "5", "-t", "nat", "-S", "POSTROUTING", ns=ns).splitlines()
            assert "-j WEFT-POSTRTG" in post[1]  # first rule, ahead of what was there
            sh("iptables", "-w", "5", "-t", "nat", "-D", "WEFT-POSTRTG", "3", ns=ns)
        else:
            table = sh("nft", "list", "table", "ip", "weft", ns=ns)
            assert "jump WEFT-POSTRTG" in table and table.count("fully-random") == 2
            assert "ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return" in table
            sh("nft", "flush", "chain", "ip", "weft", "WEFT-POSTRTG", ns=ns)
        assert agent.call(tool, "ensure") is True
        assert _ruleset(ns) == once
        assert agent.call(tool, "ensure") is False
        agent.call(tool, "teardown")
        assert _ruleset(ns) == before
        agent.call(tool, "teardown")  # twice is fine
    finally:
        sh("iptables", "-w", "5", "-t", "nat", "-D", "POSTROUTING", "-s", "192.0.2.0/24", "-j", "RETURN",
           ns=ns, check=False)
