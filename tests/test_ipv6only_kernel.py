"""vxlan/kernel and host-gw/kernel on an IPv6-only network (flannel's ``EnableIPv4: false``).

The testbed is the dual-stack one of tests/test_kernel_backends.py (``<p>`` = ``wk6<pid%1000>-``):
node N's eth0 has 198.18.0.N/24 and 2001:db8:198:18::N/64, its pod fd10:244:0:N::2 (and
10.244.N.2, which no backend here may carry) behind cni0. The network config is IPv6-only, so every
lease is flanneld's ``0.0.0.0-0&fd10:244:0:N::-64`` with PublicIP 0.0.0.0 (``NO_PUBLIC_IP``), fed
to the backends directly; each node's ExternalInterface is what weftd resolves on such a network
(``public_ip`` 0.0.0.0, ``address`` whatever IPv4 eth0 has).

What is checked on the real kernel: the nodes program each other (IPv6 routes, neighbours, FDB
entries on ``flannel-v6.1`` only), pods ping over IPv6 and not over IPv4, nothing IPv4 exists for
the overlay (no flannel.1, no IPv4 route, neighbour or FDB entry), a removed lease takes exactly its
entries out (every lease has the same IPv4 part, so this is where a lease named by its IPv4 subnet
goes wrong), a restart keeps the VtepMAC, resync puts back a deleted IPv6 route and a deleted
device, and a lease with an IPv4 part never gets an IPv4 route on such a network.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import time

import pytest

from controlplane.backends import BackendError
from controlplane.backends.base import BackendOptions, ExternalInterface
from controlplane.config import parse_config
from controlplane.lease import NO_IPV4, NO_PUBLIC_IP, Lease, LeaseAttrs
from fastpath.hostgw.kernel import HostGWKernelBackend
from fastpath.vxlan.kernel import VXLANKernelBackend
from fastpath.vxlan.vtep import parse_unicast_mac

from .conftest import needs_root
from .nsagent import ipj, sh
from .test_kernel_backends import NODES, Lab, gw6, mac6_of

PREFIX = f"wk6{os.getpid() % 1000}-"
ONLY6 = '"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd10:244::/56"'
VXLAN = parse_config('{%s, "Backend": {"Type": "vxlan"}}' % ONLY6)
VXLAN_DIRECT = parse_config('{%s, "Backend": {"Type": "vxlan", "DirectRouting": true}}' % ONLY6)
HOSTGW = parse_config('{%s, "Backend": {"Type": "host-gw"}}' % ONLY6)
DEV6 = "flannel-v6.1"


class Lab6(Lab):
    """The dual-stack testbed run as an IPv6-only network: IPv6-only interfaces and leases."""

    def iface(self, n: int) -> dict:
        return {"name": "eth0", "address": ipaddress.IPv4Address(f"198.18.0.{n}"), "public_ip": NO_PUBLIC_IP,
                "mtu": 1500, "address6": self.node_ip6(n), "public_ipv6": self.node_ip6(n)}

    def lease(self, n: int, attrs: LeaseAttrs, subnet6: ipaddress.IPv6Network | None = None,
              v6: bool = True) -> Lease:
        return Lease(NO_IPV4, attrs, time.time() + 3600, subnet6=subnet6 or self.subnet6(n))

    def overlay_ipv4(self, n: int) -> dict:
        """Everything IPv4 node n has for the overlay: routes into 10.244.0.0/16 other than its
        own cni0's, a flannel.1 device, IPv4 neighbours and FDB entries on flannel-v6.1."""
        return {"routes": sorted(d for d in self.routes(n) if d.startswith("10.244.") and d != f"10.244.{n}.0/24"),
                "flannel.1": self.link(n, "flannel.1"),
                "neigh": [e for e in ipj(self.node[n], "-4", "neigh", "show", "dev", DEV6)]
                if self.link(n, DEV6) else [],
                "fdb": sorted(dst for _, dst in self.fdb(n, DEV6) if "." in dst) if self.link(n, DEV6) else []}


NOTHING_IPV4 = {"routes": [], "flannel.1": None, "neigh": [], "fdb": []}


@pytest.fixture(scope="module")
def lab6():
    from .e2e import built
    with built(Lab6(PREFIX, dual_stack=True)) as lab:
        yield lab


@pytest.fixture
def net(lab6):
    yield lab6
    lab6.stop()


def peer_routes6(net, n: int) -> list[str]:
    """Node n's IPv6 routes to subnets in the IPv6Network other than its own (not flannel-v6.1's
    own /128, which the kernel lists as a bare address)."""
    return sorted(d for d in net.routes(n, v6=True)
                  if d.startswith("fd10:244:") and "/" in d and d != str(net.subnet6(n)))


# -- no root needed ---------------------------------------------------------------------------------

V6 = {n: ipaddress.IPv6Address(f"2001:db8:198:18::{n}") for n in (1, 2)}


def _iface(n: int = 1, public_ipv6=True) -> ExternalInterface:
    return ExternalInterface("eth0", 7, ipaddress.IPv4Address(f"198.18.0.{n}"), NO_PUBLIC_IP, 1500, V6[n],
                             V6[n] if public_ipv6 else None)


def test_lease_attrs_are_flanneld_ipv6only():
    prev = Lease(NO_IPV4, LeaseAttrs(NO_PUBLIC_IP, "vxlan", None, V6[1], {"VNI": 1, "VtepMAC": "02:00:00:00:06:01"}),
                 None, subnet6=ipaddress.IPv6Network("fd10:244:0:1::/64"))
    b = VXLANKernelBackend(VXLAN, _iface())
    assert not b.has_ipv4 and b.has_ipv6
    assert b.lease_attrs(prev).to_json() == (
        '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:198:18::1","BackendType":"vxlan",'
        '"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:06:01"}}')
    assert b.vtep_mac is None  # no IPv4 VTEP to name
    assert HostGWKernelBackend(HOSTGW, _iface()).lease_attrs(None).to_json() == (
        '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:198:18::1","BackendType":"host-gw"}')
    with pytest.raises(BackendError) as exc:  # weftd refuses this first; the backend says it too
        VXLANKernelBackend(VXLAN, _iface(public_ipv6=False)).lease_attrs(None)
    assert str(exc.value) == ("vxlan/kernel: the network is IPv6-only (EnableIPv4 false) but this node has "
                              "no public IPv6 address")


@pytest.mark.parametrize("cls,config,wire", [(VXLANKernelBackend, VXLAN, "vxlan:"),
                                             (HostGWKernelBackend, HOSTGW, "host-gw backend:")])
def test_setup_without_a_public_ipv6_is_refused_on_ipv6only(cls, config, wire):
    """Nothing could be carried: one line, before any netlink call (weftd refuses this first)."""
    lease = Lease(NO_IPV4, LeaseAttrs(NO_PUBLIC_IP, wire.split()[0].rstrip(":")), None,
                  subnet6=ipaddress.IPv6Network("fd10:244:0:1::/64"))
    with pytest.raises(BackendError) as exc:
        cls(config, _iface(public_ipv6=False)).setup(lease)
    assert str(exc.value) == (f"{wire} the network is IPv6-only (EnableIPv4 false) but this node has "
                              "no public IPv6 address")


@pytest.mark.parametrize("cls,config", [(VXLANKernelBackend, VXLAN), (HostGWKernelBackend, HOSTGW)])
def test_source_guard_is_refused_on_ipv6only(cls, config):
    """The source guard checks IPv4 packets only: on an IPv6-only network it is refused when the
    backend is made (before any lease or device), in one line naming why."""
    with pytest.raises(BackendError) as exc:
        cls(config, _iface(), BackendOptions(source_guard=True))
    assert str(exc.value) == (f"{cls.name()}: --source-guard checks IPv4 packets only; this network is "
                              "IPv6-only (EnableIPv4 false), so there is nothing for it to guard")
    assert cls(config, _iface()).guard is None  # without the flag: made, and no guard


# -- vxlan ------------------------------------------------------------------------------------------

@needs_root
def test_vxlan_ipv6only_mesh_has_nothing_ipv4(net):
    leases = net.start("vxlan/kernel", VXLAN)
    assert net.ping_failures(v6=True) == []
    all_pairs = [(a, b) for a in NODES for b in NODES if a != b]
    assert net.ping_failures() == all_pairs  # nothing carries the pods' IPv4 addresses
    for n in NODES:
        attrs = leases[n].attrs
        assert attrs.public_ip == NO_PUBLIC_IP and attrs.backend_data is None
        mac6 = mac6_of(leases[n])
        assert parse_unicast_mac(mac6) == mac6
        assert net.overlay_ipv4(n) == NOTHING_IPV4
        link = net.link(n, DEV6)
        assert link["address"] == mac6 and link["mtu"] == 1430
        assert link["linkinfo"]["info_data"]["local6"] == str(net.node_ip6(n))
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]
                if a["family"] == "inet6" and a["scope"] == "global"] == [(gw6(net, n), 128)]
        routes = net.routes(n, v6=True)
        for m in NODES:
            if m != n:
                r = routes[str(net.subnet6(m))]
                assert r["gateway"] == gw6(net, m) and r["dev"] == DEV6 and "onlink" in r["flags"]
        assert net.neigh(n, DEV6, v6=True) == {gw6(net, m): mac6_of(leases[m]) for m in NODES if m != n}
        assert net.fdb(n, DEV6) == {(mac6_of(leases[m]), str(net.node_ip6(m))) for m in NODES if m != n}
        s = net.stats(n)
        assert (s["peers6_programmed"], s["peers6_failed"], s["peers_bad_backend_data"], s["peer_errors"]) \
            == (2, 0, 0, 0)
        assert "peers_programmed" not in s and "peers_direct" not in s  # no IPv4 numbers, not zeros
    net.agents[1].call("b", "add_peer", leases[2])  # a renewal changes nothing
    assert peer_routes6(net, 1) == sorted(str(net.subnet6(m)) for m in (2, 3))


@needs_root
def test_vxlan_ipv6only_remove_resync_restart_teardown(net):
    leases = net.start("vxlan/kernel", VXLAN)
    a1, ns = net.agents[1], net.node[1]
    # every lease's IPv4 part is 0.0.0.0/0: removing node 2's takes out node 2's entries, not 3's
    a1.call("b", "remove_peer", leases[2])
    assert peer_routes6(net, 1) == [str(net.subnet6(3))]
    assert net.neigh(1, DEV6, v6=True) == {gw6(net, 3): mac6_of(leases[3])}
    assert net.fdb(1, DEV6) == {(mac6_of(leases[3]), str(net.node_ip6(3)))}
    assert net.stats(1)["peers6_programmed"] == 1
    assert net.ping_failures([(1, 3), (3, 1)], v6=True) == []
    a1.call("b", "add_peer", leases[2])
    # resync puts back a deleted IPv6 route, neighbour and FDB entry
    sh("ip", "-n", ns, "-6", "route", "del", str(net.subnet6(2)))
    sh("ip", "-n", ns, "-6", "neigh", "del", gw6(net, 3), "dev", DEV6)
    sh("bridge", "-n", ns, "fdb", "del", mac6_of(leases[3]), "dev", DEV6, "dst", str(net.node_ip6(3)))
    before = net.stats(1)["entries_restored"]
    a1.call("b", "resync")
    assert net.stats(1)["entries_restored"] == before + 3
    assert net.routes(1, v6=True)[str(net.subnet6(2))]["gateway"] == gw6(net, 2)
    assert net.ping_failures(v6=True) == []
    # the device vanishes: recreated with its MAC, fully reprogrammed, still no flannel.1
    sh("ip", "-n", ns, "link", "del", DEV6)
    a1.call("b", "resync")
    assert net.stats(1)["device_recreated"] == 1
    assert net.link(1, DEV6)["address"] == mac6_of(leases[1]) and net.overlay_ipv4(1) == NOTHING_IPV4
    assert net.ping_failures(v6=True) == []
    # weftd killed and restarted: the previous lease's MAC, or else flannel-v6.1's, is kept
    a1.drop("b")
    a1.backend("b", "vxlan/kernel", VXLAN, net.iface(1))
    assert a1.call("b", "lease_attrs", leases[1]) == leases[1].attrs
    a1.drop("b")
    a1.backend("b", "vxlan/kernel", VXLAN, net.iface(1))
    attrs = a1.call("b", "lease_attrs", None)
    assert attrs == leases[1].attrs
    a1.call("b", "setup", net.lease(1, attrs))
    for m in (2, 3):
        a1.call("b", "add_peer", leases[m])
    assert net.link(1, DEV6)["address"] == mac6_of(leases[1]) and net.ping_failures(v6=True) == []
    net.stop()
    for n in NODES:
        assert net.link(n, DEV6) is None and peer_routes6(net, n) == [] and net.overlay_ipv4(n) == NOTHING_IPV4


@needs_root
def test_vxlan_ipv6only_removes_a_flannel1_left_by_an_ipv4_run(net):
    ns = net.node[1]
    sh("ip", "-n", ns, "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", "198.18.0.1",
       "dev", "eth0", "dstport", "8472")
    sh("ip", "-n", ns, "link", "set", "flannel.1", "up")
    sh("ip", "-n", ns, "route", "add", "10.244.2.0/24", "via", "10.244.2.0", "dev", "flannel.1", "onlink")
    try:
        net.start("vxlan/kernel", VXLAN)
        assert net.overlay_ipv4(1) == NOTHING_IPV4 and net.link(1, DEV6) is not None
    finally:
        sh("ip", "-n", ns, "link", "del", "flannel.1", check=False)


@needs_root
def test_vxlan_ipv6only_direct_routing(net):
    net.start("vxlan/kernel", VXLAN_DIRECT)
    for m in (2, 3):
        r = net.routes(1, v6=True)[str(net.subnet6(m))]
        assert r["gateway"] == str(net.node_ip6(m)) and r["dev"] == "eth0"
    assert net.neigh(1, DEV6, v6=True) == {} and net.fdb(1, DEV6) == set()
    s = net.stats(1)
    assert s["peers6_direct"] == 2 and s["peers6_programmed"] == 2 and "peers_direct" not in s
    assert net.overlay_ipv4(1) == NOTHING_IPV4
    assert net.ping_failures(v6=True) == []
    # a peer beyond our IPv6 L2 subnet still goes through flannel-v6.1
    far = net.lease(9, LeaseAttrs(NO_PUBLIC_IP, "vxlan", None, ipaddress.IPv6Address("2001:db8:ffff::9"),
                                  {"VNI": 1, "VtepMAC": "02:00:00:00:06:09"}))
    net.agents[1].call("b", "add_peer", far)
    r = net.routes(1, v6=True)[str(net.subnet6(9))]
    assert r["gateway"] == gw6(net, 9) and r["dev"] == DEV6
    assert net.fdb(1, DEV6) == {("02:00:00:00:06:09", "2001:db8:ffff::9")}
    sh("ip", "-n", net.node[1], "-6", "route", "del", str(net.subnet6(2)))
    net.agents[1].call("b", "resync")
    assert net.routes(1, v6=True)[str(net.subnet6(2))]["gateway"] == str(net.node_ip6(2))
    net.agents[1].call("b", "remove_peer", far)
    assert str(net.subnet6(9)) not in net.routes(1, v6=True) and net.fdb(1, DEV6) == set()
    net.agents[1].call("b", "teardown")
    assert peer_routes6(net, 1) == [] and net.link(1, DEV6) is None


# -- host-gw ----------------------------------------------------------------------------------------

@needs_root
def test_hostgw_ipv6only_routes_only_ipv6(net):
    leases = net.start("host-gw/kernel", HOSTGW)
    assert net.ping_failures(v6=True) == []
    for n in NODES:
        routes = net.routes(n, v6=True)
        for m in NODES:
            if m != n:
                r = routes[str(net.subnet6(m))]
                assert r["gateway"] == str(net.node_ip6(m)) and r["dev"] == "eth0"
        assert net.overlay_ipv4(n) == NOTHING_IPV4
        s = net.stats(n)
        assert s["peers6_programmed"] == 2 and "peers_programmed" not in s and s["peer_errors"] == 0
    a1, ns = net.agents[1], net.node[1]
    a1.call("b", "remove_peer", leases[2])
    assert peer_routes6(net, 1) == [str(net.subnet6(3))]
    a1.call("b", "add_peer", leases[2])
    sh("ip", "-n", ns, "-6", "route", "del", str(net.subnet6(3)))
    a1.call("b", "resync")
    assert net.stats(1)["entries_restored"] == 1 and peer_routes6(net, 1) == sorted(
        str(net.subnet6(m)) for m in (2, 3))
    assert net.ping_failures([(1, 3), (3, 1)], v6=True) == []
    net.stop()
    for n in NODES:
        assert peer_routes6(net, n) == []


# -- a lease with an IPv4 part on an IPv6-only network ----------------------------------------------

@needs_root
@pytest.mark.parametrize("kind,config", [("vxlan/kernel", VXLAN), ("host-gw/kernel", HOSTGW)])
def test_ipv6only_never_programs_a_leases_ipv4_part(net, kind, config):
    """The lease judge refuses such a lease before a backend sees it; if one gets here anyway its
    IPv4 part is no subnet to program (and its BackendData is not even read)."""
    net.start(kind, config)
    a1 = net.agents[1]
    v4 = ipaddress.IPv4Network("10.244.9.0/24")
    for backend_data in ({"VNI": 1, "VtepMAC": "02:00:00:00:04:09"}, "not even an object"):
        mixed = Lease(v4, LeaseAttrs(ipaddress.IPv4Address("198.18.0.2"), kind.split("/")[0], backend_data,
                                     net.node_ip6(2), {"VNI": 1, "VtepMAC": "02:00:00:00:06:09"}
                                     if kind == "vxlan/kernel" else None),
                      time.time() + 3600, subnet6=net.subnet6(9))
        a1.call("b", "add_peer", mixed)
        assert net.overlay_ipv4(1) == NOTHING_IPV4 and "10.244.9.0/24" not in net.routes(1)
        assert net.stats(1)["peers_bad_backend_data"] == 0
        assert str(net.subnet6(9)) in net.routes(1, v6=True)  # its IPv6 side is judged on its own
        a1.call("b", "remove_peer", mixed)
        assert str(net.subnet6(9)) not in net.routes(1, v6=True)
    assert peer_routes6(net, 1) == sorted(str(net.subnet6(m)) for m in (2, 3))
    # a lease claiming our own IPv6 subnet under another name: no route that would take our pods' traffic
    own = dataclasses.replace(net.leases[2], subnet=ipaddress.IPv4Network("10.244.7.0/24"), subnet6=net.subnet6(1))
    a1.call("b", "add_peer", own)
    assert net.routes(1, v6=True)[str(net.subnet6(1))].get("gateway") is None
    assert net.ping_failures([(1, 2), (2, 1)], v6=True) == []


# -- a device of an IPv4-capable kind on an IPv6-only node (vxlan/ebpf's flannel.<VNI>) ---------------

@needs_root
def test_remove_addresses_leaves_no_ipv4_and_the_link_local(net):
    """``ensure_vxlan_device(v6=False)`` on an IPv6-only node: the device keeps no IPv4 address
    (an older run's 10.244.N.0/32 included); removing IPv6 ones keeps the kernel's link-local."""
    import socket

    from pyroute2 import NetNS

    from fastpath.netlink import remove_addresses
    ns = net.node[1]
    sh("ip", "-n", ns, "link", "add", "wk6vx", "type", "vxlan", "id", "77", "dstport", "4799", "dev", "eth0")
    try:
        for addr in ("10.244.1.0/32", "10.9.9.9/24"):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", "wk6vx")
        sh("ip", "-n", ns, "-6", "addr", "add", "fd10:244:0:1::/128", "dev", "wk6vx", "nodad")
        sh("ip", "-n", ns, "link", "set", "wk6vx", "up")

        def addrs():
            return sorted((a["family"], a["local"], a["scope"]) for link in ipj(ns, "addr", "show", "dev", "wk6vx")
                          for a in link["addr_info"])
        with NetNS(ns) as ipr:
            idx = ipr.link_lookup(ifname="wk6vx")[0]
            assert remove_addresses(ipr, idx) == 2
            assert [a for a in addrs() if a[0] == "inet"] == []
            assert ("inet6", "fd10:244:0:1::", "global") in addrs()
            assert remove_addresses(ipr, idx, socket.AF_INET6) == 1
            assert [a[2] for a in addrs()] == ["link"]
            assert remove_addresses(ipr, idx) == 0
    finally:
        sh("ip", "-n", ns, "link", "del", "wk6vx", check=False)


# -- an IPv6-only lease on a dual-stack network ------------------------------------------------------

DUAL = '"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd10:244::/56"'


@needs_root
@pytest.mark.parametrize("kind", ["vxlan/kernel", "host-gw/kernel"])
def test_dualstack_gives_an_ipv6only_lease_no_ipv4_side(net, kind):
    """Its IPv4 part 0.0.0.0/0 is no subnet: a route to it would be a default route through that
    peer. The lease judge refuses such a lease on a dual-stack network; the data plane, asked
    anyway, programs its IPv6 side only and counts nothing bad."""
    wire = kind.split("/")[0]
    config = parse_config('{%s, "Backend": {"Type": "%s"}}' % (DUAL, wire))
    a1 = net.agents[1]
    before = net.routes(1)
    a1.backend("b", kind, config, Lab.iface(net, 1))
    net.kind = kind  # the fixture tears it down
    a1.call("b", "setup", Lease(ipaddress.IPv4Network("10.244.1.0/24"), a1.call("b", "lease_attrs", None),
                                time.time() + 3600, subnet6=net.subnet6(1)))
    only6 = net.lease(2, LeaseAttrs(NO_PUBLIC_IP, wire, None, net.node_ip6(2),
                                    {"VNI": 1, "VtepMAC": "02:00:00:00:06:02"} if wire == "vxlan" else None))
    a1.call("b", "add_peer", only6)
    routes = net.routes(1)
    assert routes.get("default") == before.get("default") and "0.0.0.0/0" not in routes
    assert peer_routes6(net, 1) == [str(net.subnet6(2))]
    s = net.stats(1)
    assert (s["peers_programmed"], s["peers6_programmed"], s["peers_bad_backend_data"], s["peer_errors"]) \
        == (0, 1, 0, 0)
    a1.call("b", "remove_peer", only6)
    assert peer_routes6(net, 1) == [] and net.stats(1)["peers6_programmed"] == 0
