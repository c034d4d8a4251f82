"""The lab e2e suite on the userspace data planes: udp/fastpath, vxlan/fastpath, udp/python on three
nodes, and mixed vxlan/kernel + vxlan/fastpath clusters in both directions.

Per lab (tests/e2e.run_suite): all pod pairs ping, a 64 MiB TCP transfer each way is
byte-identical, a restarted weftd keeps its subnet and the mesh, and a lease released with weftctl
leaves every other node's data plane within 2 s. A userspace node programs its peers in the
engine, not in the kernel's routing table, so "programmed" is read from its /metrics
(``weft_backend_routes``, the engine's route count); a kernel node is checked as before.
"""
from __future__ import annotations

import os

import pytest

from bench.scenario import load

from .conftest import needs_root
from .daemons import REPO
from .e2e import all_pairs_ping, lab_for, metrics, nothing_left, run_suite

pytestmark = needs_root
DEFAULT = os.path.join(REPO, "scenarios", "default.toml")


def _run(lab) -> dict:
    lab.up()
    try:
        out = run_suite(lab)
        out["metrics"] = {n: metrics(lab, n) for n in (1, 2)}  # node 3 exited: lease released
        return out
    finally:
        problems = lab.down()
        assert not problems and not nothing_left(lab), (problems, nothing_left(lab))


@pytest.mark.parametrize("backend", ["udp/fastpath", "vxlan/fastpath", "udp/python"])
def test_e2e_suite(backend):
    out = _run(lab_for(load(DEFAULT), backend))
    assert out["removal_s"] < 2.0
    m1 = out["metrics"][1]
    # the traffic went through the engine, and nothing valid was dropped as malformed
    assert m1.get("weft_backend_tx_packets", 0) > 1000 and m1.get("weft_backend_rx_packets", 0) > 1000
    assert m1.get("weft_backend_rx_drop_bad_ip", 0) == 0
    assert m1.get("weft_backend_rx_drop_spoofed_src", 0) == 0


@pytest.mark.parametrize("dataplanes", [
    pytest.param({1: "kernel", 2: "fastpath", 3: "fastpath"}, id="kernel-to-fastpath"),
    pytest.param({1: "fastpath", 2: "kernel", 3: "kernel"}, id="fastpath-to-kernel"),
])
def test_mixed_vxlan_kernel_and_fastpath(dataplanes):
    lab = lab_for(load(DEFAULT), "vxlan/kernel", dataplanes)
    out = _run(lab)
    assert out["removal_s"] < 2.0


def test_fastpath_lab_mtu_and_device():
    lab = lab_for(load(DEFAULT), "udp/fastpath")
    lab.up()
    try:
        assert not all_pairs_ping(lab)
        for node in lab.nodes:
            assert node.mtu == 1472
            link = lab.exec(node.namespace, ["ip", "-d", "addr", "show", "flannel0"], check=True).stdout
            assert "mtu 1472" in link and f"inet {node.subnet.split('/')[0]}/32" in link
            assert "qlen 10000" in link and "tun" in link
            route = lab.exec(node.namespace, ["ip", "-4", "route", "show", "exact", "10.244.0.0/16"]).stdout
            assert "dev flannel0" in route
    finally:
        problems = lab.down()
    assert not problems and not nothing_left(lab)


@pytest.mark.skipif(not os.path.exists(f"/lib/modules/{os.uname().release}/build"),
                    reason="needs kernel headers for bcc: run ./bootstrap")
def test_mixed_kernel_ebpf_and_fastpath_nodes():
    """One cluster, three data planes behind one wire format: every direction works."""
    lab = lab_for(load(DEFAULT), "vxlan/kernel", {1: "kernel", 2: "ebpf", 3: "fastpath"})
    out = _run(lab)
    assert out["removal_s"] < 2.0
