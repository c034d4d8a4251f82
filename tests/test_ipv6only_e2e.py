"""IPv6-only end to end (issue 16, last item): scenarios/ipv6only.toml (EnableIPv4 false,
IPv6Network fd10:244::/56) on every data plane that carries IPv6, with real weftd per node and
pods from CNI.

Each lab: the leases are IPv6-only (no IPv4 subnet, no IPv4 public address), subnet.env has no
IPv4 line, no pod has an IPv4 address or route, the nodes hold no IPv4 address or route but their
underlay's (nothing IPv4 is programmed for the overlay), every pod pings every other over IPv6,
and 4 MiB cross the nodes each way byte-identical. udp refuses an IPv6-only config: weftd exits 1
with one line and writes no lease. About 40 s on the lab VM (a lab up and down is ~5 s, ~8 s with
bcc compiling the eBPF programs).
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

from bench.scenario import load

from .conftest import needs_bcc
from .daemons import REPO
from .e2e import Testbed, built, transfer, up_check_down, weftctl

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
IPV6ONLY = os.path.join(REPO, "scenarios", "ipv6only.toml")
V6_BYTES = 4 * 1024 * 1024


def ipv4_of(lab, ns: str) -> tuple[list[str], list[str]]:
    """A namespace's IPv4 addresses (``dev address/len``, lo's left out) and main-table IPv4 routes."""
    addrs = json.loads(lab.exec(ns, ["ip", "-j", "-4", "addr", "show"], check=True).stdout)
    found = [f"{link['ifname']} {a['local']}/{a['prefixlen']}" for link in addrs if link["ifname"] != "lo"
             for a in link.get("addr_info", [])]
    routes = json.loads(lab.exec(ns, ["ip", "-j", "-4", "route", "show"], check=True).stdout)
    return found, [f"{r['dst']} dev {r.get('dev', '?')}" for r in routes]


def ipv6_only_leases(lab) -> list[dict]:
    """The store's leases as weftctl prints them."""
    r = weftctl(lab, "leases", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def pods_ping6(lab) -> list[str]:
    """Pod pairs that do not reach each other over IPv6 (empty: full mesh). A pod without an
    IPv6 address is a failure, never a pair skipped."""
    if len({p.node for p in lab.pods}) < 2:
        raise AssertionError("the pods sit on fewer than 2 nodes: no pair crosses nodes")
    bad = [f"{p.namespace}: no IPv6 address" for p in lab.pods if not p.ip6]
    for a in lab.pods:
        for b in lab.pods:
            if a is not b and b.ip6 and not lab.ping(a, b.ip6, count=2, timeout=2):
                bad.append(f"{a.namespace}->{b.ip6}")
    return bad


def _check_lab(lab) -> None:
    network6 = lab.scenario.network.ipv6_network
    subnets6 = [ipaddress.IPv6Network(n.subnet6) for n in lab.nodes]
    assert all(s.subnet_of(network6) for s in subnets6) and len(set(subnets6)) == len(lab.nodes), subnets6
    # the leases: IPv6 only, each node's by its PublicIPv6 (flanneld's 0.0.0.0-0&... key and PublicIP 0.0.0.0)
    leases = ipv6_only_leases(lab)
    assert sorted((l["subnet"], l["public_ip"], l["subnet6"], l["public_ipv6"]) for l in leases) == \
        sorted((None, None, n.subnet6, n.public_ipv6) for n in lab.nodes), leases
    for node in lab.nodes:
        with open(node.subnet_file) as f:
            keys = [line.split("=", 1)[0] for line in f.read().splitlines() if "=" in line]
        assert sorted(keys) == ["FLANNEL_IPMASQ", "FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU"], keys
        # nothing IPv4 for the overlay on the node: its only IPv4 is the underlay's (store, harness)
        addrs, routes = ipv4_of(lab, node.namespace)
        assert addrs == [f"eth0 {node.public_ip}/{lab.scenario.underlay.prefixlen}"], (node.index, addrs)
        assert routes == [f"{lab.scenario.underlay} dev eth0"], (node.index, routes)
    for pod in lab.pods:
        assert pod.ip == "" and ipaddress.IPv6Address(pod.ip6) in ipaddress.IPv6Network(lab.node(pod.node).subnet6)
        assert ipv4_of(lab, pod.namespace) == ([], []), f"{pod.namespace} has IPv4 on an IPv6-only network"
    bad = pods_ping6(lab)
    assert not bad, bad
    a = next(p for p in lab.pods if p.node == 1)
    b = next(p for p in lab.pods if p.node == 2)
    for src, dst, port in ((a, b, 7796), (b, a, 7797)):
        sent, got = transfer(lab, src, dst, V6_BYTES, port=port, family=6)
        assert sent == got, f"IPv6 transfer {src.namespace} -> {dst.namespace} corrupted"


def _up_check_down(backend: str, dataplanes: dict[int, str] | None = None) -> None:
    up_check_down(load(IPV6ONLY), backend, _check_lab, dataplanes)


@pytest.mark.parametrize("backend", ["vxlan/kernel", "host-gw/kernel", "vxlan/fastpath"])
def test_ipv6_only_pods_reach_each_other(backend):
    _up_check_down(backend)


@needs_bcc
def test_ipv6_only_pods_reach_each_other_ebpf():
    _up_check_down("vxlan/ebpf")


def test_ipv6_only_mixed_kernel_and_fastpath_nodes():
    """vxlan on the wire: node 2's userspace engine and the kernel's vxlan on nodes 1 and 3."""
    _up_check_down("vxlan/kernel", dataplanes={2: "fastpath"})


@pytest.mark.parametrize("dataplane", ["fastpath", "python"])
def test_udp_refuses_ipv6_only_with_one_line(dataplane):
    """A store whose config is IPv6-only on udp (put there directly: weftctl refuses it, as the
    scenario loader does): weftd on a node with an IPv6 underlay exits 1, its last line says why,
    and it wrote no lease and no subnet.env."""
    from controlplane.store.sqlite import SQLiteStore
    with built(Testbed(f"wv{dataplane[0]}{os.getpid() % 100}-", nodes=(1, 2), dual_stack=True)) as bed:
        db = os.path.join(bed.topology.dir, "store.db")
        store = SQLiteStore(db, create="file")
        store.put_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd10:244::/56", '
                         f'"Backend": {{"Type": "udp", "Dataplane": "{dataplane}"}}}}')
        subnet_file = os.path.join(bed.topology.dir, "udp-subnet.env")
        r = subprocess.run(["ip", "netns", "exec", bed.node[1], sys.executable, "-m", "controlplane.daemon",
                            "--store", f"sqlite://{db}", "-iface", "eth0",
                            "-public-ipv6", str(bed.node_ip6(1)), "-subnet-file", subnet_file,
                            "-healthz-port", "0"],
                           capture_output=True, text=True, timeout=30, cwd=REPO,
                           env=dict(os.environ, PYTHONPATH=REPO))
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert lines and f"udp/{dataplane} carries IPv4 only" in lines[-1], r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        assert not store.scan_subnets().records and not os.path.exists(subnet_file)
        store.close()
