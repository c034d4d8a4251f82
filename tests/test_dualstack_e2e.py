"""Dual-stack end to end (issue 16): scenarios/dualstack.toml (EnableIPv6, IPv6Network
fd10:244::/56) on every data plane that carries IPv6, with real weftd per node and pods from CNI.

Each lab: every pod pings every other over IPv4 and IPv6, and 8 MiB cross the nodes over IPv6
byte-identical (a pod's MTU is its IPv4 one, so IPv6 over an IPv6 underlay leans on path MTU
discovery: a data plane that loses the "packet too big" stalls here, not in a ping). udp refuses
EnableIPv6: weftd exits non-zero with one line and writes no lease. Takes about 60 s on the lab VM
(a lab up and down is ~5 s, ~8 s with bcc compiling the eBPF programs).
"""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest

from bench.scenario import load

from .conftest import needs_bcc
from .daemons import REPO
from .e2e import Testbed, all_pairs_ping_both, built, transfer, up_check_down

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
DUALSTACK = os.path.join(REPO, "scenarios", "dualstack.toml")
V6_BYTES = 8 * 1024 * 1024


def _check_lab(lab) -> None:
    """Both families everywhere: each node's IPv6 subnet in IPv6Network, its pods' addresses in
    it, every pair reaching every other in both families, and a TCP transfer over IPv6."""
    network6 = lab.scenario.network.ipv6_network
    subnets6 = [ipaddress.IPv6Network(n.subnet6) for n in lab.nodes]
    assert all(s.subnet_of(network6) for s in subnets6) and len(set(subnets6)) == len(lab.nodes), subnets6
    for pod in lab.pods:
        assert ipaddress.IPv6Address(pod.ip6) in ipaddress.IPv6Network(lab.node(pod.node).subnet6), pod
    bad = all_pairs_ping_both(lab)
    assert not bad, bad
    a = next(p for p in lab.pods if p.node == 1)
    b = next(p for p in lab.pods if p.node == 2)
    sent, got = transfer(lab, a, b, V6_BYTES, port=7786, family=6)
    assert sent == got, "IPv6 transfer corrupted"


def _up_check_down(backend: str, dataplanes: dict[int, str] | None = None) -> None:
    up_check_down(load(DUALSTACK), backend, _check_lab, dataplanes)


@pytest.mark.parametrize("backend", ["vxlan/kernel", "host-gw/kernel", "vxlan/fastpath"])
def test_pods_reach_each_other_over_both_families(backend):
    _up_check_down(backend)


@needs_bcc
def test_pods_reach_each_other_over_both_families_ebpf():
    _up_check_down("vxlan/ebpf")


def test_mixed_kernel_and_fastpath_nodes_over_both_families():
    """vxlan on the wire: node 2's userspace engine and the kernel's vxlan on nodes 1 and 3
    exchange both families (the same VNI, port and BackendV6Data MACs)."""
    _up_check_down("vxlan/kernel", dataplanes={2: "fastpath"})


@pytest.mark.parametrize("dataplane", ["fastpath", "python"])
def test_udp_refuses_ipv6_with_one_line(dataplane):
    """A store whose config enables IPv6 on udp (put there directly: weftctl refuses it, as the
    scenario loader does): weftd on a dual-stack node exits non-zero, its last line says why,
    and it wrote no lease and no subnet.env."""
    from controlplane.store.sqlite import SQLiteStore
    with built(Testbed(f"wu{dataplane[0]}{os.getpid() % 100}-", nodes=(1, 2), dual_stack=True)) as bed:
        db = os.path.join(bed.topology.dir, "store.db")
        store = SQLiteStore(db, create="file")
        store.put_config('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd10:244::/56", '
                         f'"Backend": {{"Type": "udp", "Dataplane": "{dataplane}"}}}}')
        subnet_file = os.path.join(bed.topology.dir, "udp-subnet.env")
        r = subprocess.run(["ip", "netns", "exec", bed.node[1], sys.executable, "-m", "controlplane.daemon",
                            "--store", f"sqlite://{db}", "-iface", "eth0", "-public-ip", "198.18.0.1",
                            "-public-ipv6", str(bed.node_ip6(1)), "-subnet-file", subnet_file,
                            "-healthz-port", "0"],
                           capture_output=True, text=True, timeout=30, cwd=REPO,
                           env=dict(os.environ, PYTHONPATH=REPO))
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode != 0, r.stderr
        assert lines and f"udp/{dataplane} carries IPv4 only" in lines[-1], r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        assert not store.scan_subnets().records and not os.path.exists(subnet_file)
        store.close()
