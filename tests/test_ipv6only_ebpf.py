"""vxlan/ebpf on an IPv6-only network (flannel's ``EnableIPv4: false``).

Part 1, the programs (BPF_PROG_TEST_RUN, like tests/test_bpf_programs.py, whose frame builders this
reuses): with weft_config's IPv4 netmask zero (what vxlan/ebpf writes on an IPv6-only network) and
the IPv6 fields set, IPv4 frames pass every program untouched and uncounted (weft_to_overlay, which
the stack routes nothing IPv4 into, drops one as not overlay traffic, never as a peer miss), even
with a stale IPv4 peer entry in weft_peers; the IPv6 paths work as on a dual-stack node.

Part 2, the data plane (real kernel, bcc, namespaces, real packets; the dual-stack testbed of
tests/test_ebpf_e2e.py run as an IPv6-only network, prefix ``wev<pid%1000>-``: leases
``0.0.0.0-0&fd10:244:0:N::-64``, PublicIP 0.0.0.0; the pods also have 10.244.N.2, which nothing may
carry): pods and nodes ping over IPv6 and never over IPv4; 64 MiB cross byte-identical both ways;
the live maps and the node hold nothing IPv4 for the overlay (no weft_peers, weft_peer_ips or
weft_endpoints entry, zero IPv4 fields in weft_config, no IPv4 address or route on flannel.1); a
removed lease takes exactly its weft_peers6/weft_peer_ips6 entries out (every lease has the same
IPv4 part); a node restarted from dual-stack to IPv6-only drops its IPv4 side and inherits only
the IPv6 peers; and a vxlan/kernel IPv6-only node (flannel-v6.1 only) interoperates on the wire.

Part 3, weftd (bench/lab.py, scenarios/ipv6only.toml; pods get IPv6 only, from CNI): vxlan/ebpf
nodes with a vxlan/kernel node: every pod pair pings, 64 MiB cross eBPF<->kernel both ways,
nothing IPv4 in the maps, a released lease leaves the eBPF map and the kernel's routes in 2 s.
"""
from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import json
import os
import socket
import subprocess
import time

import pytest

import fastpath.bpf as fb
from controlplane.backends.base import BackendError, ExternalInterface
from controlplane.config import parse_config
from controlplane.lease import NO_IPV4, NO_PUBLIC_IP, Lease, LeaseAttrs
from fastpath.bpf import sysbpf
from fastpath.vxlan.ebpf import VXLANEBPFBackend

from .conftest import needs_bcc, needs_root
from .e2e import built, in_netns
from .nsagent import ipj, sh
from .test_bpf_programs import (CNI_MAC, NETWORK6, OUR_IP, OUR_IP6, OUR_MAC6, PEER6_MAC, PEER_IP6,
                                PEER_MAC, POD_MAC, PORT, PUBLIC_IP6, RX_NO_CHECK, VNI, frame, frame6,
                                ip6_of, run, skb_ctx, vxlan_datagram, vxlan_datagram6)
from .test_bpf_programs import scratch_ns  # noqa: F401  (a fixture)
from .test_ebpf_e2e import (CONFIG6, NODES, PY, REPO, RX_BUCKETS, _RECEIVER6, _SENDER6, Cluster, _capture_vxlan6,
                            _outer6, ping6_failures)

pytestmark = [needs_root, needs_bcc]


# -- part 1: the programs with no IPv4 in weft_config ----------------------------------------------

def config_v6only(flags: int = fb.CFG_DEFAULT, mtu: int = 1450) -> fb.Config:
    """weft_config as vxlan/ebpf writes it on an IPv6-only network: network and netmask zero, no
    PublicIP; the underlay interface keeps an IPv4 address (local_ipv4), as the lab's nodes do."""
    return fb.Config(vtep_mac=(ctypes.c_uint8 * 6)(*fb.mac_bytes(OUR_MAC6)), vxlan_ifindex=7,
                     local_ipv4=int(ipaddress.IPv4Address(OUR_IP)), network=0, netmask=0, mtu=mtu,
                     flags=flags, vxlan_port=socket.htons(PORT), vni=VNI, public_ipv4=0,
                     vtep_mac6=(ctypes.c_uint8 * 6)(*fb.mac_bytes(OUR_MAC6)), mtu6=mtu - 20,
                     network6=fb.ip6_bytes(NETWORK6.network_address), netmask6=fb.ip6_bytes(NETWORK6.netmask),
                     local_ipv6=fb.ip6_bytes(ipaddress.IPv6Address(OUR_IP6)),
                     public_ipv6=fb.ip6_bytes(ipaddress.IPv6Address(PUBLIC_IP6)))


@pytest.fixture(scope="module")
def progs():
    p = fb.Programs()
    yield p
    p.close()


@pytest.fixture
def v6only(progs):
    """An IPv6-only node's maps: its own IPv6 subnet (local) and one IPv6 peer; nothing IPv4 but
    ``stale``, a weft_peers entry left by an earlier dual-stack run, which no program may use."""
    for e in progs.peer_entries():
        progs.delete_peer(fb.peer_key(ipaddress.ip_network(e["subnet"])))
    progs.set_endpoints({})
    progs.clear_counters()
    progs.set_config(config_v6only())
    v6 = ipaddress.IPv6Network
    progs.put_peer(fb.peer_key(v6("fd10:244:0:1::/64")),
                   fb.peer_value(ipaddress.IPv6Address(OUR_IP6), VNI, OUR_MAC6, fb.PEER_LOCAL))
    progs.put_peer(fb.peer_key(v6("fd10:244:0:2::/64")),
                   fb.peer_value(ipaddress.IPv6Address(PEER_IP6), VNI, PEER6_MAC))
    progs.put_peer(fb.peer_key(ipaddress.IPv4Network("10.244.2.0/24")),  # stale
                   fb.peer_value(ipaddress.IPv4Address("198.18.0.2"), VNI, PEER_MAC))
    return progs


def totals(progs) -> tuple[int, int]:
    return sum(progs.counter_sums().values()), sum(progs.drop_sums().values())


# IPv4 a pod or the node could send: to a stale peer's subnet, anywhere, to the bridge's own address
IPV4_FRAMES = {
    "to-stale-peer-subnet": frame("10.244.1.2", "10.244.2.7"),
    "to-the-internet": frame("10.244.1.2", "192.0.2.1"),
    "ttl-1": frame("10.244.1.2", "10.244.2.7", ttl=1),
}


@pytest.mark.parametrize("name", sorted(IPV4_FRAMES))
def test_from_pods_leaves_ipv4_alone(v6only, name):
    pkt = IPV4_FRAMES[name]
    assert run(v6only, "weft_from_pods", pkt) == (sysbpf.TC_ACT_OK, pkt)
    assert totals(v6only) == (0, 0), (v6only.counter_sums(), v6only.drop_sums())


def test_to_overlay_drops_ipv4_as_not_overlay(v6only):
    """Nothing routes IPv4 into flannel.<VNI> on an IPv6-only node; what gets there anyway is not
    overlay traffic (never a peer miss, never encapsulated toward a stale entry)."""
    for name, pkt in IPV4_FRAMES.items():
        assert run(v6only, "weft_to_overlay", pkt)[0] == sysbpf.TC_ACT_SHOT, name
    drops, counters = v6only.drop_sums(), v6only.counter_sums()
    assert drops["not_overlay"] == len(IPV4_FRAMES) and sum(drops.values()) == len(IPV4_FRAMES), drops
    assert counters["map_miss"] == 0 and counters["tx_packets"] == 0, counters


def test_from_overlay_leaves_ipv4_to_the_stack(v6only, scratch_ns):  # noqa: F811
    """Without the receive check (which drops an IPv4 sender: weft_peer_ips is empty), an IPv4
    frame meets the stack: no FIB lookup, no redirect (the scratch namespace has a route and a
    neighbour for the destination, so a lookup would redirect)."""
    v6only.set_config(config_v6only(RX_NO_CHECK))
    pkt = frame("10.244.2.7", "10.244.1.2", dmac=OUR_MAC6, smac=PEER_MAC)

    def go():
        d1 = socket.if_nametoindex("d1")
        v6only.set_endpoints({ipaddress.IPv4Address("10.244.1.2"): (d1, POD_MAC, CNI_MAC)})
        return sysbpf.test_run(v6only.fns["weft_from_overlay"].fd, pkt, skb_ctx(1))[:2]
    assert in_netns(scratch_ns, go) == (sysbpf.TC_ACT_OK, pkt)
    c = v6only.counter_sums()
    assert (c["rx_stack"], c["rx_redirect"], c["rx_peer"]) == (1, 0, 0), c


def test_from_underlay_leaves_ipv4_datagrams_alone(v6only):
    """An IPv4 VXLAN datagram to our port passes untouched and uncounted (the kernel's device
    gets it, and weft_from_overlay's check drops it: no IPv4 sender is a peer), as IPv6 does on
    an IPv4-only node; an IPv6 peer's datagram is checked and passes."""
    for pkt in (vxlan_datagram(inner_dmac=OUR_MAC6), vxlan_datagram(outer_src="198.18.0.9", inner_dmac=OUR_MAC6)):
        assert run(v6only, "weft_from_underlay", pkt) == (sysbpf.TC_ACT_OK, pkt)
    assert totals(v6only) == (0, 0), (v6only.counter_sums(), v6only.drop_sums())
    pkt = vxlan_datagram6()
    assert run(v6only, "weft_from_underlay", pkt) == (sysbpf.TC_ACT_OK, pkt)
    assert v6only.counter_sums()["underlay_passed"] == 1 and totals(v6only) == (1, 0)
    assert run(v6only, "weft_from_underlay", vxlan_datagram6(outer_src="2001:db8:198:18::66"))[0] == sysbpf.TC_ACT_SHOT
    assert v6only.drop_sums()["unknown_peer"] == 1


def test_ipv6_paths_work_as_on_a_dual_stack_node(v6only):
    rc, out = run(v6only, "weft_from_pods", frame6("fd10:244:0:1::2", "fd10:244:0:2::7", hlim=64))
    assert rc == sysbpf.TC_ACT_REDIRECT
    assert (ip6_of(out)["dmac"], ip6_of(out)["smac"], ip6_of(out)["hlim"]) == (PEER6_MAC, OUR_MAC6, 63)
    rc, out = run(v6only, "weft_to_overlay", frame6("fd10:244:0:1::", "fd10:244:0:2::7", dmac=OUR_MAC6))
    assert rc == sysbpf.TC_ACT_OK and ip6_of(out)["dmac"] == PEER6_MAC
    assert run(v6only, "weft_to_overlay", frame6("fd10:244:0:1::", "fd10:244:0:9::7"))[0] == sysbpf.TC_ACT_SHOT
    c, d = v6only.counter_sums(), v6only.drop_sums()
    assert (c["pods_redirect"], c["tx_packets"], c["map_miss"], d["no_peer"]) == (1, 2, 1, 1)


# -- the backend without a network (no netlink is touched) ------------------------------------------

ONLY6 = parse_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd10:244::/56", '
                     '"Backend": {"Type": "vxlan", "Dataplane": "ebpf"}}')


def _iface(public_ipv6: bool = True) -> ExternalInterface:
    v6 = ipaddress.IPv6Address("2001:db8:198:18::1")
    return ExternalInterface("eth0", 7, ipaddress.IPv4Address("198.18.0.1"), NO_PUBLIC_IP, 1500, v6,
                             v6 if public_ipv6 else None)


def test_lease_attrs_are_flanneld_ipv6only():
    """One VTEP, one MAC: the lease has flanneld's IPv6-only form (PublicIP 0.0.0.0, no
    BackendData), and the device will carry the IPv6 VtepMAC (the previous lease's)."""
    prev = Lease(NO_IPV4, LeaseAttrs(NO_PUBLIC_IP, "vxlan", None, _iface().public_ipv6,
                                     {"VNI": 1, "VtepMAC": "02:00:00:00:06:01"}),
                 None, subnet6=ipaddress.IPv6Network("fd10:244:0:1::/64"))
    b = VXLANEBPFBackend(ONLY6, _iface())
    assert b.lease_attrs(prev).to_json() == (
        '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:198:18::1","BackendType":"vxlan",'
        '"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:06:01"}}')
    assert b.vtep_mac == b.vtep_mac6 == "02:00:00:00:06:01"


def test_refusals_are_one_line():
    with pytest.raises(BackendError) as exc:
        VXLANEBPFBackend(ONLY6, _iface(public_ipv6=False)).setup(
            Lease(NO_IPV4, LeaseAttrs(NO_PUBLIC_IP, "vxlan"), None, subnet6=ipaddress.IPv6Network("fd10:244:0:1::/64")))
    assert str(exc.value) == ("vxlan/ebpf: the network is IPv6-only (EnableIPv4 false) but this node has no "
                              "public IPv6 address")
    # a zero netmask means "no such family" to the programs: a /0 network cannot be told apart
    for text in ('{"Network": "0.0.0.0/0", "SubnetLen": 24}',
                 '{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "::/0", "IPv6SubnetLen": 64}'):
        with pytest.raises(BackendError) as exc:
            VXLANEBPFBackend(parse_config(text), _iface())
        assert "has length 0" in str(exc.value) and "\n" not in str(exc.value)


# -- part 2: IPv6-only nodes on the real kernel ---------------------------------------------------------

PREFIX = f"wev{os.getpid() % 1000}-"
EBPF3 = {1: "vxlan/ebpf", 2: "vxlan/ebpf", 3: "vxlan/ebpf"}
MIXED = {1: "vxlan/ebpf", 2: "vxlan/ebpf", 3: "vxlan/kernel"}
CONFIG = ONLY6
IPV4_MAPS = ("weft_peers", "weft_peer_ips", "weft_endpoints")
IPV6_MAPS = ("weft_peers6", "weft_peer_ips6", "weft_endpoints6")


class Cluster6(Cluster):
    """The dual-stack testbed (pods also have 10.244.N.2, which nothing may carry here) run as an
    IPv6-only network: leases ``0.0.0.0-0&fd10:244:0:N::-64`` and interfaces as weftd resolves
    them there (PublicIP 0.0.0.0; eth0 keeps its IPv4 address)."""

    def iface(self, n: int) -> dict:
        return dict(super().iface(n), public_ip=NO_PUBLIC_IP)

    def lease(self, n: int, attrs) -> Lease:
        return Lease(NO_IPV4, attrs, time.time() + 3600, subnet6=self.subnet6(n))


@pytest.fixture(scope="module")
def only6():
    with built(Cluster6(PREFIX, dual_stack=True)) as c:
        yield c


@pytest.fixture
def net(only6):
    yield only6
    only6.stop()


def live_maps(ns: str) -> dict:
    """What the programs attached to node ``ns``'s flannel.1 hold, read from the kernel (as
    weftctl peermap finds them, not through the backend): entries per map, and weft_config's IPv4
    fields."""
    from fastpath.bpf.live import attached_prog_ids
    from fastpath.bpf.sysbpf import map_items, maps_of_prog

    def read():
        out = {}
        for prog in attached_prog_ids("flannel.1"):  # egress and ingress: one compile, shared maps
            for name, (fd, info) in maps_of_prog(prog).items():
                try:
                    if name not in out:
                        read_map(out, name, map_items(fd, info.key_size, info.value_size))
                finally:
                    os.close(fd)
        return out

    def read_map(out, name, items):
        if name == "weft_config":
            cfg = fb.Config.from_buffer_copy(items[0][1][:ctypes.sizeof(fb.Config)])
            out["config_ipv4"] = (cfg.network, cfg.netmask, cfg.local_ipv4, cfg.public_ipv4)
            out["config_netmask6"] = bytes(cfg.netmask6)
        elif name in IPV4_MAPS + IPV6_MAPS:
            out[name] = len(items)
    return in_netns(ns, read)


def overlay_ipv4(net, n: int) -> dict:
    """Everything IPv4 node n has for the overlay: flannel.1's IPv4 addresses and IPv4 routes, and
    the routes into 10.244.0.0/16 other than its own cni0's (the testbed's pods' IPv4)."""
    routes = ipj(net.node[n], "-4", "route", "show")
    return {"addr": [a["local"] for link in ipj(net.node[n], "-4", "addr", "show", "dev", "flannel.1")
                     for a in link.get("addr_info", [])],
            "flannel.1 routes": [r["dst"] for r in routes if r.get("dev") == "flannel.1"],
            "10.244 routes": sorted(r["dst"] for r in routes
                                    if r["dst"].startswith("10.244.") and r["dst"] != f"10.244.{n}.0/24")}


NOTHING_IPV4 = {"addr": [], "flannel.1 routes": [], "10.244 routes": []}


def test_ipv6only_ebpf_nodes_ping_over_ipv6_and_program_nothing_ipv4(net):
    """Three vxlan/ebpf nodes, IPv6-only: every pod pair and node -> remote pod pings over IPv6,
    no pair over IPv4; weft_config has no IPv4 side, the IPv4 maps are empty, flannel.1 has no IPv4
    address or route, the IPv6 side is what a dual-stack node has."""
    net.start(EBPF3, CONFIG)
    assert ping6_failures(net) == []
    assert ping6_failures(net, src_ns=net.node) == []
    assert sorted(net.ping_failures()) == sorted((a, b) for a in NODES for b in NODES if a != b)
    for n in NODES:
        net.call(n, "sync_endpoints")  # the pods' IPv6 (and IPv4) neighbour entries exist now
        live = live_maps(net.node[n])
        assert live["config_ipv4"] == (0, 0, 0, 0) and any(live["config_netmask6"]), live
        assert {m: live[m] for m in IPV4_MAPS} == dict.fromkeys(IPV4_MAPS, 0), live
        assert (live["weft_peers6"], live["weft_peer_ips6"]) == (3, 2) and live["weft_endpoints6"] >= 1, live
        assert overlay_ipv4(net, n) == NOTHING_IPV4
        routes = json.loads(sh("ip", "-n", net.node[n], "-j", "-6", "route", "show", "dev", "flannel.1"))
        assert [(r["dst"], r.get("metrics", [{}])[0].get("mtu")) for r in routes
                if r.get("protocol") != "kernel"] == [("fd10:244::/56", 1430)], routes
        s = net.call(n, "stats")
        assert s["peers6_programmed"] == 2 and s["peers6_failed"] == 0 and "peers_programmed" not in s, s
        assert s["peer_ips"] == 2 and s["tx_packets"] > 0 and s["pods_redirect"] > 0, s
        assert s["drops_not_overlay"] == 0 and s["drops_not_ipv4"] == 0, s
    lease = net.leases[1]
    assert json.loads(lease.attrs.to_json()) == {
        "PublicIP": "0.0.0.0", "PublicIPv6": str(net.node_ip6(1)), "BackendType": "vxlan",
        "BackendV6Data": {"VNI": 1, "VtepMAC": net.call(1, "peer_map", True)[0]["vtep_mac"]}}
    link = ipj(net.node[1], "link", "show", "dev", "flannel.1")[0]
    assert link["address"] == lease.attrs.backend_v6_data["VtepMAC"]
    doc = json.loads(sh(PY, "-m", "controlplane.ctl", "peermap", "--json", ns=net.node[1], timeout=30))
    assert [(e["subnet"], e["local"]) for e in doc["peers"]] == [
        ("fd10:244:0:1::/64", True), ("fd10:244:0:2::/64", False), ("fd10:244:0:3::/64", False)]
    assert doc["peer_ips"] == {str(net.node_ip6(2)): 1, str(net.node_ip6(3)): 1}


def test_ipv6only_bulk_transfer_both_ways(net):
    """64 MiB over TCP between IPv6 pods, both ways: node 2 receives through bpf_redirect_peer,
    node 1 through the FIB redirect; every datagram crossed weft_from_underlay and passed."""
    net.start({1: "vxlan/ebpf", 2: "vxlan/ebpf"}, CONFIG)
    net.call(1, "set_flags", fb.CFG_DEFAULT & ~fb.CFG_RX_PEER)
    assert ping6_failures(net) == []
    net.call(2, "sync_endpoints")
    for a, b in ((1, 2), (2, 1)):
        sent, got = transfer6(net, a, b)
        assert sent and sent == got, (a, b)
    s1, s2 = net.call(1, "stats"), net.call(2, "stats")
    assert s2["rx_peer"] > 1000 and s1["rx_redirect"] > 1000, (s1, s2)
    for s in (s1, s2):
        assert s["pods_redirect"] > 1000, {k: v for k, v in s.items() if v}
        assert s["underlay_passed"] == s["rx_packets"] > 1000, s
        assert all(s[k] == 0 for k in RX_BUCKETS if k.startswith("drops_")), {k: s[k] for k in RX_BUCKETS}


def transfer6(net, a: int, b: int, mib: int = 64, port: int = 5703) -> tuple[str, str]:
    server = subprocess.Popen(["ip", "netns", "exec", net.pod[b], PY, "-c", _RECEIVER6, net.pod_ip6(b), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        sent = sh(PY, "-c", _SENDER6, net.pod_ip6(b), str(port), str(mib), ns=net.pod[a], timeout=90)
        got, _ = server.communicate(timeout=90)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return sent.strip(), got.strip()


def test_lease_removal_takes_out_exactly_its_entries(net):
    """Every lease here has the same IPv4 part (0.0.0.0-0): removing node 3's lease takes out its
    weft_peers6 and weft_peer_ips6 entries and nothing of node 2's; adding it back restores it."""
    net.start(EBPF3, CONFIG)
    assert ping6_failures(net, [(1, 2), (1, 3)]) == []
    net.call(1, "remove_peer", net.leases[3])
    assert {e["subnet"] for e in net.call(1, "peer_map")} == {"fd10:244:0:2::/64"}
    live = live_maps(net.node[1])
    assert (live["weft_peers6"], live["weft_peer_ips6"]) == (2, 1), live  # our own entry + node 2's
    doc = json.loads(sh(PY, "-m", "controlplane.ctl", "peermap", "--json", ns=net.node[1], timeout=30))
    assert doc["peer_ips"] == {str(net.node_ip6(2)): 1}
    assert ping6_failures(net, [(1, 3), (1, 2)]) == [(1, 3)]
    net.call(1, "add_peer", net.leases[3])
    assert ping6_failures(net) == []
    assert net.call(1, "stats")["peers6_programmed"] == 2


def test_restart_from_dual_stack_leaves_nothing_ipv4(net):
    """Node 1 ran dual-stack; restarted on the IPv6-only network (same flannel.1, programs left
    attached): the old IPv4 address and Network route go, the old programs' IPv4 peers are not
    inherited, the IPv6 peers are (IPv6 forwards before any lease event), and the IPv6 VtepMAC is
    kept."""
    rest = (2, 3)
    for m in rest:
        net.agents[m].backend("b", "vxlan/ebpf", CONFIG, net.iface(m))
        net.leases[m] = net.lease(m, net.agents[m].call("b", "lease_attrs", None))
    net.kinds = dict.fromkeys(NODES, "vxlan/ebpf")  # for the fixture's teardown
    net.agents[1].backend("b", "vxlan/ebpf", CONFIG6, Cluster.iface(net, 1))  # dual-stack node 1
    old1 = Lease(ipaddress.IPv4Network("10.244.1.0/24"), net.agents[1].call("b", "lease_attrs", None),
                 time.time() + 3600, subnet6=net.subnet6(1))
    net.call(1, "setup", old1)
    for m in rest:  # what node 1 saw then: dual-stack leases of nodes 2 and 3
        net.call(1, "add_peer", Lease(ipaddress.IPv4Network(f"10.244.{m}.0/24"), dataclasses.replace(
            net.leases[m].attrs, public_ip=ipaddress.IPv4Address(f"198.18.0.{m}"),
            backend_data={"VNI": 1, "VtepMAC": net.leases[m].attrs.backend_v6_data["VtepMAC"]}),
            time.time() + 3600, subnet6=net.subnet6(m)))
    before = live_maps(net.node[1])
    assert (before["weft_peers"], before["weft_peers6"]) == (3, 3), before
    assert overlay_ipv4(net, 1)["addr"] == ["10.244.1.0"]
    assert overlay_ipv4(net, 1)["flannel.1 routes"] == ["10.244.0.0/16"]
    mac6 = old1.attrs.backend_v6_data["VtepMAC"]
    net.agents[1].drop("b")  # the daemon dies; device and filters stay
    net.agents[1].backend("b", "vxlan/ebpf", CONFIG, net.iface(1))
    attrs = net.agents[1].call("b", "lease_attrs", old1)
    assert attrs.backend_v6_data["VtepMAC"] == mac6 and attrs.backend_data is None
    net.leases[1] = net.lease(1, attrs)
    net.call(1, "setup", net.leases[1])
    for m in rest:
        net.call(m, "setup", net.leases[m])
        for k in NODES:
            if k != m:
                net.call(m, "add_peer", net.leases[k])
    # before node 1 sees any lease: the inherited IPv6 peers forward, nothing IPv4 came along
    assert ping6_failures(net, [(1, 2), (1, 3)]) == []
    after = live_maps(net.node[1])
    assert {m: after[m] for m in IPV4_MAPS} == dict.fromkeys(IPV4_MAPS, 0), after
    assert after["config_ipv4"] == (0, 0, 0, 0)
    assert overlay_ipv4(net, 1) == NOTHING_IPV4
    assert ipj(net.node[1], "link", "show", "dev", "flannel.1")[0]["address"] == mac6
    net.call(1, "add_peer", net.leases[2])  # node 3's lease is gone meanwhile: never re-added
    net.call(1, "resync")  # the first resync drops inherited peers no lease re-added
    assert {e["subnet"] for e in net.call(1, "peer_map")} == {"fd10:244:0:2::/64"}
    net.call(1, "add_peer", net.leases[3])
    assert ping6_failures(net) == []


def test_mixed_with_a_vxlan_kernel_ipv6only_node(net):
    """eBPF nodes 1, 2 and a vxlan/kernel node 3 (flannel-v6.1 only, as flanneld on an IPv6-only
    network): IPv6 pods reach each other in every direction, no pair over IPv4; on the wire both
    data planes send the same IPv6-underlay VXLAN (port, VNI, flags, inner MACs = the IPv6 VtepMACs)."""
    net.start(MIXED, CONFIG)
    assert net.leases[3].attrs.backend_data is None and net.leases[3].attrs.backend_v6_data
    assert ping6_failures(net) == []
    assert sorted(net.ping_failures()) == sorted((a, b) for a in NODES for b in NODES if a != b)
    assert sh("ip", "-n", net.node[3], "link", "show", "flannel.1", check=False) == ""  # kernel: v6 device only
    mac6 = {n: net.leases[n].attrs.backend_v6_data["VtepMAC"] for n in NODES}
    frames = _capture_vxlan6(net.wire, "w2", 2.0, lambda: ping6_failures(net, [(1, 2), (3, 2)]))
    by_src = {}
    for f in frames:
        o = _outer6(f)
        by_src.setdefault(o["src"], o)
    ebpf, kernel = by_src.get(str(net.node_ip6(1))), by_src.get(str(net.node_ip6(3)))
    assert ebpf and kernel, by_src
    assert ebpf["inner_dmac"] == kernel["inner_dmac"] == mac6[2]
    assert (ebpf["inner_smac"], kernel["inner_smac"]) == (mac6[1], mac6[3])
    for field in ("dst", "dport", "vx_flags", "vni", "hlim", "tclass", "inner_type"):
        assert ebpf[field] == kernel[field], (field, ebpf, kernel)
    assert (ebpf["dport"], ebpf["vni"], ebpf["vx_flags"], ebpf["inner_type"]) == (8472, 1, 0x08, 0x86DD)
    for n in (1, 2):
        assert overlay_ipv4(net, n) == NOTHING_IPV4
        s = net.call(n, "stats")
        assert s["drops_unknown_peer"] == 0 and s["drops_wrong_mac"] == 0 and s["drops_spoofed_src"] == 0, s


# -- part 3: weftd on a lab (bench/lab.py), scenarios/ipv6only.toml -------------------------------------

def test_lab_ipv6only_mixed_ebpf_and_kernel():
    """weftd on 3 nodes of the IPv6-only scenario, nodes 1 and 3 vxlan/ebpf, node 2 vxlan/kernel:
    pods (IPv6 only, from CNI) reach each other in every direction, 64 MiB cross eBPF<->kernel both
    ways byte-identical, the eBPF nodes' maps hold nothing IPv4, and a released lease leaves node
    1's weft_peers6 and node 2's IPv6 routes within 2 s."""
    from bench.scenario import load
    from .e2e import assert_answering, ebpf_map_has, lab_for, metrics, nothing_left, transfer, weftctl
    lab = lab_for(load(os.path.join(REPO, "scenarios", "ipv6only.toml")), "vxlan/ebpf", {2: "kernel"})
    lab.up()
    try:
        for n, kind in ((1, "ebpf"), (2, "kernel"), (3, "ebpf")):
            links = {link["ifname"]: link for link in ipj(lab.node(n).namespace, "-d", "link", "show")}
            assert ("flannel.1" in links) == (kind == "ebpf") and ("flannel-v6.1" in links) == (kind == "kernel")
        pods = {p.node: p for p in lab.pods}
        assert all(p.ip6 and not p.ip for p in lab.pods), lab.pods
        bad = [(a, b) for a in pods for b in pods if a != b and not lab.ping(pods[a], pods[b].ip6, count=2, timeout=2)]
        assert bad == []
        for a, b, port in ((1, 2, 7781), (2, 1, 7782)):
            sent, got = transfer(lab, pods[a], pods[b], port=port, family=6)
            assert sent == got, (a, b)
        for n in (1, 3):
            live = live_maps(lab.node(n).namespace)
            assert {m: live[m] for m in IPV4_MAPS} == dict.fromkeys(IPV4_MAPS, 0) and live["config_ipv4"] == (0, 0, 0, 0)
            assert live["weft_peers6"] == 3 and live["weft_peer_ips6"] == 2, live
        m = metrics(lab, 1)
        assert m["weft_backend_underlay_passed_total"] > 1000 and m["weft_backend_peers6_programmed"] == 2, m
        assert "weft_backend_peers_programmed" not in m, m  # no IPv4 side, so no IPv4 numbers

        victim = lab.node(3).subnet6

        def route6(n: int) -> bool:
            out = lab.exec(lab.node(n).namespace, ["ip", "-6", "route", "show", "exact", victim], check=True).stdout
            if out.strip():
                return True
            assert_answering(lab, n)
            return False
        assert ebpf_map_has(lab, 1, victim) and route6(2)
        t0 = time.monotonic()
        r = weftctl(lab, "release", victim)
        assert r.returncode == 0, r.stderr
        while time.monotonic() < t0 + 2 and (ebpf_map_has(lab, 1, victim) or route6(2)):
            time.sleep(0.05)
        took = time.monotonic() - t0
        assert not ebpf_map_has(lab, 1, victim) and not route6(2), f"{victim} still programmed after {took:.1f} s"
        assert ebpf_map_has(lab, 1, lab.node(2).subnet6)  # only the released lease went
        print(f"\nIPv6-only lease removal reached nodes 1 (eBPF) and 2 (kernel) in {took * 1000:.0f} ms")
    finally:
        problems = lab.down()
    assert not problems and not nothing_left(lab)
