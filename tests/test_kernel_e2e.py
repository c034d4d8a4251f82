"""The lab e2e suite on the kernel data planes (vxlan, host-gw), and the seed walk-through."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from bench.scenario import load

from .daemons import REPO
from .e2e import (all_pairs_ping, engine_has_all, kernel_route, lab_for, lease_removal_propagates,
                  nothing_left, programmed, run_suite)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
DEFAULT = os.path.join(REPO, "scenarios", "default.toml")


@pytest.mark.parametrize("backend", ["vxlan/kernel", "host-gw/kernel"])
def test_e2e_suite(backend):
    lab = lab_for(load(DEFAULT), backend)
    lab.up()
    try:
        run_suite(lab)
    finally:
        problems = lab.down()
    assert not problems and not nothing_left(lab)


@pytest.mark.parametrize("name", ["seed.toml", "seed-host-gw.toml"])
def test_seed_walkthrough(name):
    """The seed document end to end: etcd with TLS, /kube-centos/network, sysconfig-style flags."""
    scn = load(os.path.join(REPO, "scenarios", name))
    lab = lab_for(scn)
    lab.up()
    try:
        assert not all_pairs_ping(lab)
        store_ns = lab.store["namespace"]
        pki = lab.store["pki"]
        out = lab.exec(store_ns, ["etcdctl", "--endpoints", lab.store["endpoint"], "--cacert", pki["ca"],
                                  "--cert", pki["cert"], "--key", pki["key"], "get", "--prefix",
                                  "/kube-centos/network/subnets"],
                       timeout=15, check=True).stdout.splitlines()
        keys = [l for l in out if l.startswith("/kube-centos/network/subnets/172.30.")]
        assert len(keys) == 3, out
        wire = "vxlan" if name == "seed.toml" else "host-gw"
        values = [l for l in out if l.startswith("{")]
        assert len(values) == 3 and all(f'"BackendType":"{wire}"' in l for l in values), out
        for node in lab.nodes:
            assert node.subnet.startswith("172.30.") and node.subnet.endswith("/24")
            if wire == "vxlan":
                link = lab.exec(node.namespace, ["ip", "-d", "addr", "show", "flannel.1"], check=True).stdout
                assert "mtu 1450" in link and f"inet {node.subnet.split('/')[0]}/32" in link
                assert "vxlan id 1 " in link and "dstport 8472" in link
            assert node.mtu == (1450 if wire == "vxlan" else 1500)
    finally:
        problems = lab.down()
    assert not problems and not nothing_left(lab)


def test_peer_of_another_wire_format_is_counted_not_programmed():
    """A lease whose BackendType differs from ours is logged and counted, never mis-programmed."""
    from bench.scale import metrics

    from .e2e import kernel_route, weftctl
    lab = lab_for(load(DEFAULT), "vxlan/kernel")
    lab.up()
    try:
        r = weftctl(lab, "reserve", "10.244.200.0/24", "--public-ip", "198.18.0.99", "--backend-type", "host-gw")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if all(metrics(n.namespace).get("weft_peers_incompatible") == 1 for n in lab.nodes):
                break
            time.sleep(0.1)
        for n in lab.nodes:
            m = metrics(n.namespace)
            assert m["weft_peers_incompatible"] == 1 and m["weft_peers"] == 2
            assert not kernel_route(lab, n.index, "10.244.200.0/24")
        with open(lab.node(1).log) as f:
            assert "speaks host-gw, not vxlan: not programmed" in f.read()
        assert not all_pairs_ping(lab)
    finally:
        lab.down()


def test_an_absence_on_a_dead_daemon_is_not_a_removal():
    """A node whose weftd died has not "removed" a peer: every check that accepts an absence (no
    route, no peer in the engine, a metric missing) proves the node's weftd alive and answering
    first. Node 2 runs the userspace engine, which dies with its daemon: its peers really vanish."""
    lab = lab_for(load(DEFAULT), "vxlan/kernel", {2: "fastpath"})
    lab.up()
    try:
        looks = []

        def node2_dies_after_the_release(lab_, n, subnet):
            # lease_removal_propagates looks at nodes 1 and 2 before it releases node 3's lease; on
            # its first look after that node 2's weftd dies, as one crashing on the event would
            looks.append(n)
            if len(looks) == 3:
                lab.kill_node(2, signal.SIGKILL)
            return programmed(lab_, n, subnet)

        with pytest.raises(AssertionError, match=r"node 2 .*weftd is not running"):
            lease_removal_propagates(lab, 3, node2_dies_after_the_release)
        never_programmed = "10.244.250.0/24"
        with pytest.raises(AssertionError, match=r"node 2 .*weftd is not running"):
            kernel_route(lab, 2, never_programmed)
        with pytest.raises(AssertionError, match=r"node 2 .*weftd is not running"):
            engine_has_all(lab, 2, never_programmed)
        # node 1 is alive but runs the kernel data plane: its /metrics has no engine route count,
        # and a count that is not there is no count of 0
        assert not kernel_route(lab, 1, never_programmed)
        with pytest.raises(AssertionError, match="weft_backend_routes"):
            engine_has_all(lab, 1, never_programmed)
    finally:
        problems = lab.down()
    assert not problems and not nothing_left(lab)


IPV6ONLY = os.path.join(REPO, "scenarios", "ipv6only.toml")


def kernel_route6(lab, node: int, subnet6: str) -> bool:
    """Whether node's main table has an IPv6 route for exactly ``subnet6``; no route counts only
    while the node's weftd runs."""
    from .e2e import assert_answering
    out = lab.exec(lab.node(node).namespace, ["ip", "-6", "route", "show", "exact", subnet6], check=True).stdout
    if out.strip():
        return True
    assert_answering(lab, node)
    return False


@pytest.mark.parametrize("backend,options", [("vxlan/kernel", None), ("vxlan/kernel", {"DirectRouting": True}),
                                             ("host-gw/kernel", None)], ids=["vxlan", "vxlan-direct", "host-gw"])
def test_ipv6only_weftd(backend, options):
    """weftd on an IPv6-only network (EnableIPv4 false): pods (IPv6 only) reach each other and carry
    64 MiB intact, flanneld's leases, nothing IPv4 in any node's overlay (no flannel.1, no IPv4 route
    but the underlay's), and a lease released with weftctl leaves every other node."""
    from .e2e import transfer, weftctl
    lab = lab_for(load(IPV6ONLY), backend, backend_options=options)
    lab.up()
    try:
        assert all(p.ip6 and not p.ip for p in lab.pods)
        bad = [f"{a.namespace}->{b.ip6}" for a in lab.pods for b in lab.pods
               if a is not b and not lab.ping(a, b.ip6, count=2, timeout=2)]
        assert not bad, bad
        a = next(p for p in lab.pods if p.node == 1)
        b = next(p for p in lab.pods if p.node == 2)
        sent, got = transfer(lab, a, b, family=6)
        assert sent == got, "64 MiB transfer over IPv6 corrupted"
        leases = weftctl(lab, "leases", "--json")
        assert leases.returncode == 0, leases.stderr
        wire = backend.split("/")[0]
        got = sorted((l["subnet"], l["public_ip"], l["backend_type"], l["backend_data"], l["subnet6"],
                      l["public_ipv6"], sorted((l["backend_v6_data"] or {}).keys()))
                     for l in json.loads(leases.stdout))
        assert got == sorted((None, None, wire, None, n.subnet6, n.public_ipv6,
                              ["VNI", "VtepMAC"] if wire == "vxlan" else []) for n in lab.nodes)
        for node in lab.nodes:
            assert not node.subnet and node.subnet6
            ns = node.namespace
            links = lab.exec(ns, ["ip", "-o", "link", "show"], check=True).stdout
            assert " flannel.1:" not in links and (" flannel-v6.1:" in links) == backend.startswith("vxlan")
            routes4 = lab.exec(ns, ["ip", "-4", "route", "show"], check=True).stdout.splitlines()
            assert [r for r in routes4 if not r.startswith(("198.18.", "default"))] == [], routes4
            for other in lab.nodes:
                if other is not node:
                    assert kernel_route6(lab, node.index, other.subnet6)
        victim = lab.node(3).subnet6
        r = weftctl(lab, "release", victim)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and any(kernel_route6(lab, n, victim) for n in (1, 2)):
            time.sleep(0.05)
        assert not any(kernel_route6(lab, n, victim) for n in (1, 2))
        assert kernel_route6(lab, 1, lab.node(2).subnet6) and lab.ping(a, b.ip6, count=1)
    finally:
        problems = lab.down()
    assert not problems and not nothing_left(lab)
