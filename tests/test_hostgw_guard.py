"""host-gw/kernel's opt-in source guard (``source_guard``, weftd ``--source-guard``) end to end.

Three namespaced host-gw nodes (the cluster of tests/test_ebpf_e2e.py, a tests.e2e.Testbed: node ``<p>nN`` has eth0 =
198.18.0.N/24 on one bridge, cni0 10.244.N.1/24, pod 10.244.N.2) with each backend in an agent
inside its node's namespace, and an intruder (198.18.0.66, no lease) on the same segment.

Spoofed packets are plain IPv4 sent with a raw socket (IP_HDRINCL) toward node 1's pod: from peer
2 claiming peer 3's subnet, from the intruder claiming peer 2's subnet, node 1's own subnet, or a
subnet no lease holds. rp_filter cannot stop the first two (the reverse route is eth0 either way).
Without the guard each reaches the pod (its Icmp InEchos), as with flannel; with it each is dropped
and counted in exactly its counter. Legit pod-to-pod traffic flows every way with the guard on
every node. Restart, resync and teardown leave exactly one filter of ours on eth0, or none.

The guard's cost (not a test): ``.venv/bin/python -m tests.test_hostgw_guard bench [ROUNDS]``
measures TCP 1-stream pod 1 -> pod 2 (iperf3 -t 3) with and without the guard on both nodes,
alternating, ROUNDS (3) times each, in one lab.

Teardown (the lab's, from the testbed's ledger) deletes exactly the namespaces this run created.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from controlplane.config import parse_config

from .conftest import needs_bcc, needs_root
from .e2e import built
from .nsagent import sh
from .test_ebpf_e2e import PY, Cluster, icmp_echo, in_echos, intruder

pytestmark = [needs_root, needs_bcc]

PREFIX = f"whg{os.getpid() % 1000}-"
CONFIG = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')
HOSTGW3 = {1: "host-gw/kernel", 2: "host-gw/kernel", 3: "host-gw/kernel"}
GUARD = {"source_guard": True}
BUCKETS = ("hostgw_passed", "drops_hostgw_spoofed", "drops_hostgw_own_subnet", "drops_hostgw_no_peer",
           "drops_hostgw_no_neigh", "drops_hostgw_not_routed")

_SEND_RAW = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL: our source
s.sendto(bytes.fromhex(sys.argv[2]), (sys.argv[1], 0))
"""


def send_raw(ns: str, packet: bytes) -> None:
    """One IPv4 packet, header included, from namespace ``ns`` (routed by its own FIB)."""
    dst = ".".join(str(b) for b in packet[16:20])
    sh(PY, "-c", _SEND_RAW, dst, packet.hex(), ns=ns, timeout=30)


@pytest.fixture(scope="module")
def cluster():
    with built(Cluster(prefix=PREFIX)) as c:
        x = intruder(c)
        sh("ip", "-n", x, "route", "add", "10.244.0.0/16", "via", "198.18.0.1")
        yield c


@pytest.fixture
def net(cluster):
    yield cluster
    cluster.stop()


def start(net: Cluster, options=None) -> None:
    net.start(HOSTGW3, config=CONFIG, options=options)


def spoofs(net: Cluster) -> list[tuple[str, str, str, str]]:
    """(name, sending namespace, claimed source, the counter node 1's guard puts it in), each an
    echo request to node 1's pod."""
    x = intruder(net)
    return [("peer 2 claims peer 3's subnet", net.node[2], "10.244.3.2", "drops_hostgw_spoofed"),
            ("the intruder claims peer 2's subnet", x, "10.244.2.2", "drops_hostgw_spoofed"),
            ("the intruder claims node 1's own subnet", x, "10.244.1.77", "drops_hostgw_own_subnet"),
            ("the intruder claims a subnet no lease holds", x, "10.244.99.2", "drops_hostgw_no_peer")]


def _buckets(net: Cluster, n: int) -> dict[str, float]:
    s = net.call(n, "stats")
    return {k: s[k] for k in BUCKETS}


def _echo_arrives(pod_ns: str, before: int) -> bool:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if in_echos(pod_ns) > before:
            return True
        time.sleep(0.05)
    return False


def test_without_the_guard_spoofed_packets_reach_the_pod(net):
    """host-gw as flannel's: whatever arrives with a Network source is forwarded to the pod."""
    start(net)
    assert net.ping_failures() == []
    for seq, (name, ns, src, _) in enumerate(spoofs(net), 1):
        echos = in_echos(net.pod[1])
        send_raw(ns, icmp_echo(src, "10.244.1.2", seq))
        assert _echo_arrives(net.pod[1], echos), name
    assert "bpf" not in sh("tc", "-n", net.node[1], "filter", "show", "dev", "eth0", "ingress")
    assert "hostgw_passed" not in net.call(1, "stats")


def test_with_the_guard_spoofed_packets_are_dropped_and_counted(net):
    start(net, options={1: GUARD})
    assert net.ping_failures() == []  # the guard learnt nothing per peer; the leases suffice
    for seq, (name, ns, src, bucket) in enumerate(spoofs(net), 1):
        before, echos = _buckets(net, 1), in_echos(net.pod[1])
        send_raw(ns, icmp_echo(src, "10.244.1.2", seq))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and _buckets(net, 1) == before:
            time.sleep(0.05)
        after = _buckets(net, 1)
        assert {k: after[k] - before[k] for k in BUCKETS if after[k] != before[k]} == {bucket: 1}, name
        assert not _echo_arrives(net.pod[1], echos), name
    # the same packet with the right source passes (a raw packet from peer 2's own subnet)
    before, echos = _buckets(net, 1), in_echos(net.pod[1])
    send_raw(net.node[2], icmp_echo("10.244.2.2", "10.244.1.2", 9))
    assert _echo_arrives(net.pod[1], echos)
    assert _buckets(net, 1)["hostgw_passed"] > before["hostgw_passed"]
    text = sh(PY, "-m", "controlplane.ctl", "peermap", "--dev", "eth0", ns=net.node[1], timeout=30)
    assert re.search(r"drops_hostgw_spoofed\s+2\b", text) and re.search(r"hostgw_passed\s+[1-9]", text), text
    doc = json.loads(sh(PY, "-m", "controlplane.ctl", "peermap", "--dev", "eth0", "--json",
                        ns=net.node[1], timeout=30))
    assert {e["subnet"]: e["public_ip"] for e in doc["peers"] if not e["local"]} == {
        "10.244.2.0/24": "198.18.0.2", "10.244.3.0/24": "198.18.0.3"}
    assert doc["drops"]["hostgw_own_subnet"] == doc["drops"]["hostgw_no_peer"] == 1


def test_legit_traffic_flows_every_way_with_the_guard_everywhere(net):
    start(net, options={n: GUARD for n in HOSTGW3})
    assert net.ping_failures() == []
    assert net.ping_failures(src_ns=net.node) == []
    for a, b in ((1, 2), (2, 1)):
        sent, got = net.transfer(a, b, 16)
        assert sent and sent == got
    for n in HOSTGW3:
        s = _buckets(net, n)
        assert s["hostgw_passed"] > 0 and all(s[k] == 0 for k in BUCKETS[1:]), (n, s)


def test_restart_resync_teardown_leave_one_filter_or_none(net):
    tc = lambda: sh("tc", "-n", net.node[1], "filter", "show", "dev", "eth0", "ingress")  # noqa: E731
    start(net, options={1: GUARD})
    assert tc().count("direct-action") == 1
    net.agents[1].drop("b")  # the daemon dies; the guard stays attached
    net.agents[1].backend("b", "host-gw/kernel", CONFIG, net.iface(1), GUARD)
    net.agents[1].call("b", "lease_attrs", net.leases[1])
    net.call(1, "setup", net.leases[1])
    assert tc().count("direct-action") == 1
    assert net.call(1, "stats")["guard_peers"] == 2  # inherited before any lease event
    assert net.ping_failures([(2, 1), (3, 1)]) == []
    net.call(1, "add_peer", net.leases[2])  # node 3's lease is gone meanwhile: never re-added
    net.call(1, "resync")
    assert net.call(1, "stats")["guard_peers"] == 1
    before = net.call(1, "stats")["drops_hostgw_no_peer"]
    assert net.ping_failures([(3, 1)]) == [(3, 1)]  # 10.244.3.0/24 holds no lease here now
    assert net.call(1, "stats")["drops_hostgw_no_peer"] > before
    net.call(1, "add_peer", net.leases[3])
    sh("tc", "filter", "del", "dev", "eth0", "ingress", ns=net.node[1])
    net.call(1, "resync")
    assert tc().count("direct-action") == 1 and net.ping_failures([(3, 1)]) == []
    net.call(1, "teardown")
    net.agents[1].drop("b")
    assert "bpf" not in tc()
    # a guard left by a run that stopped without teardown, then a run without the guard
    net.agents[1].backend("b", "host-gw/kernel", CONFIG, net.iface(1), GUARD)
    net.agents[1].call("b", "lease_attrs", net.leases[1])
    net.call(1, "setup", net.leases[1])
    net.agents[1].drop("b")
    assert tc().count("direct-action") == 1
    net.agents[1].backend("b", "host-gw/kernel", CONFIG, net.iface(1))
    net.agents[1].call("b", "lease_attrs", net.leases[1])
    net.call(1, "setup", net.leases[1])
    assert "bpf" not in tc()


def test_a_peer_the_node_never_talked_to_is_resolved_ahead(net):
    """No neighbour entry for a peer's PublicIP means the guard cannot check its packets
    (drops_hostgw_no_neigh): the backend asks the kernel to resolve every peer when its lease
    arrives and on resync, so a peer that already knows our MAC is not dropped."""
    start(net, options={1: GUARD})
    assert net.ping_failures([(2, 1), (3, 1)]) == []  # nodes 2 and 3 learn node 1's MAC
    sh("ip", "-n", net.node[1], "neigh", "flush", "dev", "eth0")
    net.call(1, "resync")
    deadline = time.monotonic() + 3
    want = {"198.18.0.2", "198.18.0.3"}
    while time.monotonic() < deadline and not want <= resolved(net, 1):
        time.sleep(0.05)
    before = net.call(1, "stats")["drops_hostgw_no_neigh"]
    assert net.ping_failures([(2, 1)]) == []  # node 2 still knows node 1's MAC: it sends at once
    assert net.call(1, "stats")["drops_hostgw_no_neigh"] == before
    assert want <= resolved(net, 1)


def resolved(net: Cluster, n: int) -> set[str]:
    """The addresses node n has a MAC for on eth0."""
    return {e["dst"] for e in json.loads(sh("ip", "-n", net.node[n], "-j", "neigh", "show", "dev", "eth0"))
            if e.get("lladdr") and "FAILED" not in e.get("state", [])}


# -- the guard's cost: python -m tests.test_hostgw_guard bench ----------------------------------------

def _iperf(net: Cluster, seconds: int = 3) -> float:
    """TCP 1 stream pod 1 -> pod 2 (sender on CPU 0, receiver on CPU 1), Gbit/s received."""
    server = "10.244.2.2"
    srv = subprocess.Popen(["ip", "netns", "exec", net.pod[2], "taskset", "-c", "1", "iperf3", "-s", "-1",
                            "-B", server], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = sh("taskset", "-c", "0", "iperf3", "-c", server, "-t", str(seconds), "-J",
                 ns=net.pod[1], timeout=seconds + 20)
    finally:
        srv.wait(timeout=10)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def bench(rounds: int = 3) -> None:
    c = Cluster(prefix=PREFIX)
    try:
        c.build()
        results: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(rounds):
            for label, opts in (("without", None), ("with", {1: GUARD, 2: GUARD})):
                c.start(HOSTGW3, config=CONFIG, options=opts)
                assert c.ping_failures([(1, 2), (2, 1)]) == []
                results[label].append(_iperf(c))
                if opts:
                    s = c.call(2, "stats")
                    print(f"  node 2 guard: passed {s['hostgw_passed']:.0f}, drops "
                          f"{sum(s[k] for k in BUCKETS[1:]):.0f}")
                c.stop()
                print(f"{label:8s} guard: {results[label][-1]:.2f} Gbit/s", flush=True)
        for label, v in results.items():
            print(f"{label:8s} guard: " + " ".join(f"{x:.2f}" for x in v)
                  + f"  median {sorted(v)[len(v) // 2]:.2f} Gbit/s")
    finally:
        c.destroy()


if __name__ == "__main__" and sys.argv[1:2] == ["bench"]:
    bench(int(sys.argv[2]) if len(sys.argv) > 2 else 3)


def test_weftd_source_guard_on_host_gw():
    """weftd --source-guard on a host-gw lab (real daemons): every pod reaches every other, each
    node's guard passes their traffic with no drop (/metrics weft_backend_*), a restart keeps
    exactly one filter on eth0."""
    import dataclasses
    from bench.scenario import WeftdSpec, load
    from .e2e import all_pairs_ping, lab_for, metrics, nothing_left, restart_keeps_subnet_and_mesh
    from .test_ebpf_e2e import REPO
    scn = load(os.path.join(REPO, "scenarios", "default.toml"))
    scn = dataclasses.replace(scn, weftd=WeftdSpec(flags=("--source-guard",)))
    lab = lab_for(scn, "host-gw/kernel")
    lab.up()
    try:
        assert all_pairs_ping(lab) == []
        for n in (1, 2, 3):
            m = metrics(lab, n)
            assert m["weft_backend_hostgw_passed_total"] > 0, (n, m)
            assert sum(m[f"weft_backend_drops_hostgw_{r}_total"] for r in
                       ("spoofed", "own_subnet", "no_peer", "no_neigh", "not_routed")) == 0, (n, m)
        restart_keeps_subnet_and_mesh(lab, 2)
        tc = sh("tc", "-n", lab.node(2).namespace, "filter", "show", "dev", "eth0", "ingress")
        assert tc.count("direct-action") == 1, tc
    finally:
        problems = lab.down()
    assert not problems and not nothing_left(lab)


def test_a_new_lease_moves_the_guards_own_subnet(net):
    """setup with another lease (the old one expired): the guard's own-subnet entry follows, so
    the old subnet, once a peer's, is not dropped as ours."""
    import ipaddress
    from fastpath.bpf.live import read
    from controlplane.lease import Lease
    from .e2e import in_netns
    start(net, options={1: GUARD})
    new = Lease(ipaddress.IPv4Network("10.244.11.0/24"), net.leases[1].attrs, net.leases[1].expiration)
    net.call(1, "setup", new)
    local = [e["subnet"] for e in in_netns(net.node[1], lambda: read("eth0"))["peers"] if e["local"]]
    assert local == ["10.244.11.0/24"]


@pytest.mark.parametrize("backend", ["host-gw/kernel", "vxlan/kernel"])
def test_weftd_source_guard_is_refused_on_ipv6only(backend):
    """The guard checks IPv4 packets only: weftd --source-guard on an IPv6-only network exits 1
    with one line naming why, before it takes a lease."""
    import dataclasses
    from bench.errors import LabError
    from bench.scenario import WeftdSpec, load
    from .e2e import lab_for, nothing_left
    from .test_ebpf_e2e import REPO
    scn = load(os.path.join(REPO, "scenarios", "ipv6only.toml"))
    scn = dataclasses.replace(scn, weftd=WeftdSpec(flags=("--source-guard",)))
    lab = lab_for(scn, backend)
    try:
        with pytest.raises(LabError) as exc:
            lab.up()
        want = (f"ERROR weft.daemon: {backend}: --source-guard checks IPv4 packets only; this network is "
                "IPv6-only (EnableIPv4 false), so there is nothing for it to guard")
        # the lab's message ends with the node's log tail: one error line, no lease taken first
        msg = str(exc.value)
        assert "exited with status 1" in msg and msg.count(want) == 1, msg
        assert "Traceback" not in msg and "acquired lease" not in msg, msg
    finally:
        problems = lab.down()
    assert not problems and not nothing_left(lab)
