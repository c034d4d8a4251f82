"""vxlan/ebpf end to end: three namespaced nodes, all-eBPF and mixed with vxlan/kernel.

Part 1 (backend level, like tests/test_kernel_backends.py): every name carries the per-run prefix
``web<pid%1000>-`` (``tests.e2e.Testbed``, built by the lab's own builder). ``<p>wire`` holds
bridge br0 (the underlay switch); node ``<p>nN`` has eth0 = 198.18.0.N/24, ip_forward on, a cni0
bridge 10.244.N.1/24 and pod ``<p>pNx1`` (10.244.N.2/24, MTU 1450 like cni0 and its port, default
via 10.244.N.1). Each node's backend runs in an agent: a forked child that entered the
node's namespace, so the backend programs that namespace exactly as weftd would. Checked: all pod
pairs ping (every direction, eBPF<->eBPF and eBPF<->kernel), node -> remote pod, a 64 MiB TCP
transfer byte-identical, the map follows add/remove, no per-peer neighbour/FDB/route entry,
``weftctl peermap``, a restart keeps the VtepMAC and forwards before any lease event (it inherits
the old programs' map),
resync puts back a removed device or filter, the outer headers on the wire equal vxlan/kernel's,
teardown leaves nothing. Hostile input: spoofed, foreign and malformed datagrams (from a peer, from
a host with no lease, from a pod to its own node) sent to an eBPF node and to a vxlan/kernel node
with the source guard land in exactly their counter and never reach the pod; a vxlan/fastpath
peer's UDP GSO batches are checked datagram by datagram; without the guard a kernel node takes a
spoofed datagram (flannel's behaviour).

Dual-stack (EnableIPv6, ``Testbed(dual_stack=True)``, prefix ``wed<pid%1000>-``): IPv6 pods reach each
other over the IPv6 underlay between eBPF nodes and with a vxlan/kernel node (flannel-v6.1; outer
headers compared on the wire), 64 MiB over IPv6 both ways (redirect_peer and FIB receive paths),
the lease's PublicIPv6/BackendV6Data, weft_peers6 in ``weftctl peermap``, hostile IPv6 datagrams
each in exactly its counter, restart and resync of the IPv6 side.

Part 2 (daemon level, bench/lab.py + tests/e2e.py): the lab suite on 3 weftd nodes with vxlan/ebpf
and on a mixed lab (node 2 vxlan/kernel): all pod pairs ping, 64 MiB each way byte-identical,
restart keeps the subnet and the mesh, a released lease leaves every map within 2 s (read as
weftctl peermap reads it), counters on /metrics; and an expired lease (SIGKILL, TTL 4 s) leaves
the maps too.

Benchmarks against vxlan/kernel (iperf3 -t 5 and ping, pod to pod) are not tests; run them by hand:
``.venv/bin/python -m tests.test_ebpf_e2e ab`` (both data planes at once, sides swapped each round).

Teardown (the lab's, from the testbed's ledger) deletes exactly the namespaces this run created.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import time

import pytest

from controlplane.backends import BackendError, ExternalInterface, load_backend
from controlplane.config import parse_config
from controlplane.lease import Lease
from fastpath.engine.reference import ip_checksum as _csum

from .conftest import needs_bcc, needs_root
from .e2e import Testbed, built, ebpf_map_has, in_netns, metrics
from .nsagent import Agent, sh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = os.path.join(REPO, ".venv", "bin", "python") if os.path.exists(
    os.path.join(REPO, ".venv", "bin", "python")) else sys.executable
PREFIX = f"web{os.getpid() % 1000}-"
NODES = (1, 2, 3)
CONFIG = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')

pytestmark = [needs_root, needs_bcc]


# -- the cluster --------------------------------------------------------------------------------------

class Cluster(Testbed):
    """The testbed (tests.e2e) with a backend Agent per node; pods' eth0 MTU 1450 (vxlan's)."""

    def __init__(self, prefix: str = PREFIX, nodes=NODES, dual_stack: bool = False):
        super().__init__(prefix, nodes, pod_mtu=1450, dual_stack=dual_stack)
        self.agents: dict[int, Agent] = {}
        self.leases: dict[int, Lease] = {}
        self.kinds: dict[int, str] = {}

    def build(self) -> None:
        super().build()
        for n in self.nodes:
            self.agents[n] = Agent(self.node[n])

    def destroy(self) -> list[str]:
        self.stop()
        for agent in self.agents.values():
            agent.stop()
        return super().destroy()

    def iface(self, n: int) -> dict:
        addr = ipaddress.IPv4Address(f"198.18.0.{n}")
        fields = {"name": "eth0", "address": addr, "public_ip": addr, "mtu": 1500}
        if self.dual_stack:  # what weftd finds with EnableIPv6: the interface's global IPv6 address
            fields.update(address6=self.node_ip6(n), public_ipv6=self.node_ip6(n))
        return fields

    def lease(self, n: int, attrs) -> Lease:
        return Lease(ipaddress.IPv4Network(f"10.244.{n}.0/24"), attrs, time.time() + 3600,
                     subnet6=self.subnet6(n) if self.dual_stack else None)

    def start(self, kinds: dict[int, str], config=CONFIG, options: dict[int, dict] | None = None) -> None:
        """Start a backend per node (``{1: "vxlan/ebpf", ...}``, with BackendOptions fields per node
        in ``options``) and program every peer."""
        self.kinds = dict(kinds)
        for n, kind in kinds.items():
            self.agents[n].backend("b", kind, config, self.iface(n), (options or {}).get(n))
            attrs = self.agents[n].call("b", "lease_attrs", None)
            self.leases[n] = self.lease(n, attrs)
        for n in kinds:
            self.agents[n].call("b", "setup", self.leases[n])
            for m in kinds:
                if m != n:
                    self.agents[n].call("b", "add_peer", self.leases[m])

    def stop(self) -> None:
        for n in list(self.kinds):
            try:
                self.agents[n].call("b", "teardown")
                self.agents[n].drop("b")
            except Exception:
                pass
        self.kinds = {}

    def call(self, n: int, method: str, *args):
        return self.agents[n].call("b", method, *args)

    # -- traffic --

    def ping_failures(self, pairs=None, src_ns=None, v6: bool = False) -> list[tuple[int, int]]:
        pairs = pairs or [(a, b) for a in self.kinds for b in self.kinds if a != b]
        procs = {(a, b): subprocess.Popen(
            ["ip", "netns", "exec", (src_ns or self.pod)[a], "ping", "-n", "-q", "-c", "2", "-i", "0.2",
             "-W", "1", self.pod_ip6(b) if v6 else f"10.244.{b}.2"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
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

    def transfer(self, a: int, b: int, mib: int = 64, port: int = 5701) -> tuple[str, str]:
        """A ``mib`` MiB TCP transfer from pod a to pod b: (sender's sha256, receiver's sha256)."""
        server = subprocess.Popen(
            ["ip", "netns", "exec", self.pod[b], PY, "-c", _RECEIVER, f"10.244.{b}.2", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.3)
            sent = sh(PY, "-c", _SENDER, f"10.244.{b}.2", str(port), str(mib), ns=self.pod[a], timeout=60)
            got, _ = server.communicate(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        return sent.strip(), got.strip()


_RECEIVER = r"""
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(30)
c, _ = s.accept(); c.settimeout(30); h = hashlib.sha256()
while True:
    b = c.recv(1 << 20)
    if not b: break
    h.update(b)
print(h.hexdigest())
"""

_SENDER = r"""
import hashlib, os, random, socket, sys
rng = random.Random(7); h = hashlib.sha256()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
for _ in range(int(sys.argv[3])):
    b = rng.randbytes(1 << 20); h.update(b); c.sendall(b)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
print(h.hexdigest())
"""


@pytest.fixture(scope="module")
def cluster():
    with built(Cluster()) as c:
        yield c


@pytest.fixture
def net(cluster):
    yield cluster
    cluster.stop()


# -- part 1: backend level ------------------------------------------------------------------------------

EBPF3 = {1: "vxlan/ebpf", 2: "vxlan/ebpf", 3: "vxlan/ebpf"}
MIXED = {1: "vxlan/ebpf", 2: "vxlan/ebpf", 3: "vxlan/kernel"}


def test_three_ebpf_nodes_ping_and_no_per_peer_entries(net):
    net.start(EBPF3)
    assert net.ping_failures() == []
    # host-originated traffic takes the Network route through flannel.1 (weft_to_overlay)
    assert net.ping_failures(src_ns=net.node) == []
    for n in NODES:
        routes = json.loads(sh("ip", "-n", net.node[n], "-j", "-4", "route", "show", "dev", "flannel.1"))
        assert [r["dst"] for r in routes] == ["10.244.0.0/16"], routes
        assert sh("ip", "-n", net.node[n], "-4", "neigh", "show", "nud", "permanent").strip() == ""
        assert "dst" not in sh("bridge", "-n", net.node[n], "fdb", "show", "dev", "flannel.1")
        link = json.loads(sh("ip", "-n", net.node[n], "-d", "-j", "addr", "show", "dev", "flannel.1"))[0]
        assert link["mtu"] == 1450
        assert link["linkinfo"]["info_data"].get("external") is True
        assert [a["local"] for a in link["addr_info"] if a["family"] == "inet"] == [f"10.244.{n}.0"]
        assert link["address"] == net.leases[n].attrs.backend_data["VtepMAC"]
        s = net.call(n, "stats")
        assert s["tx_packets"] > 0 and s["rx_packets"] > 0 and s["pods_redirect"] > 0
        assert s["rx_redirect"] > 0
        assert s["drops_tunnel_key"] == 0 and s["drops_no_config"] == 0


def test_map_follows_add_and_remove_and_peermap_cli(net):
    net.start(EBPF3)
    entries = {e["subnet"]: e for e in net.call(1, "peer_map")}
    assert set(entries) == {"10.244.2.0/24", "10.244.3.0/24"}
    assert entries["10.244.2.0/24"]["public_ip"] == "198.18.0.2"
    assert entries["10.244.2.0/24"]["vtep_mac"] == net.leases[2].attrs.backend_data["VtepMAC"]
    # weftctl peermap, from another process in the node's namespace, reads the live map
    out = json.loads(sh(PY, "-m", "controlplane.ctl", "peermap", "--json", ns=net.node[1], timeout=30))
    assert {e["subnet"] for e in out["peers"] if not e["local"]} == set(entries)
    assert [e["subnet"] for e in out["peers"] if e["local"]] == ["10.244.1.0/24"]
    net.call(1, "remove_peer", net.leases[3])
    assert {e["subnet"] for e in net.call(1, "peer_map")} == {"10.244.2.0/24"}
    assert net.ping_failures([(1, 3)]) == [(1, 3)]
    assert net.call(1, "stats")["map_miss"] > 0
    net.call(1, "add_peer", net.leases[3])
    assert net.ping_failures([(1, 3), (3, 1)]) == []


def test_mixed_cluster_every_direction(net):
    net.start(MIXED)
    assert net.ping_failures() == []
    assert net.ping_failures(src_ns=net.node) == []
    # the kernel node programs flannel's three entries per peer; the eBPF nodes none
    assert sh("ip", "-n", net.node[3], "-4", "neigh", "show", "dev", "flannel.1").count("PERMANENT") == 2


@pytest.mark.parametrize("a,b", [(1, 2), (1, 3), (3, 1)])
@pytest.mark.parametrize("learn", [False, True], ids=["fib", "redirect_peer"])
def test_64mib_transfer_byte_identical(net, a, b, learn):
    import fastpath.bpf as fb
    net.start(MIXED)
    if not learn:  # switched off through the config map: receive takes the FIB redirect
        for n in NODES:
            if MIXED[n] == "vxlan/ebpf":
                net.call(n, "set_flags", fb.CFG_DEFAULT & ~fb.CFG_RX_PEER)
    else:  # the pods' neighbour entries exist after a ping; then the endpoints are learnt
        assert net.ping_failures([(a, b), (b, a)]) == []
        for n in NODES:
            if MIXED[n] == "vxlan/ebpf":
                net.call(n, "sync_endpoints")
                assert net.call(n, "stats")["endpoints"] == 1
    sent, got = net.transfer(a, b, 64)
    assert sent and sent == got
    if MIXED[b] == "vxlan/ebpf":
        s = net.call(b, "stats")
        assert s["rx_peer" if learn else "rx_redirect"] > 1000, s


def _rx_packets(ns: str, dev: str) -> int:
    return json.loads(sh("ip", "-n", ns, "-s", "-j", "link", "show", dev))[0]["stats64"]["rx"]["packets"]


def _pod_ports(ns: str) -> list[str]:
    return [link["ifname"] for link in json.loads(sh("ip", "-n", ns, "-j", "link", "show", "master", "cni0"))]


def test_pod_traffic_to_a_peer_skips_the_bridge(net):
    """A learnt pod's frames to a peer are encapsulated on the pod's own port (weft_from_pod_port on
    its host veth's ingress), before the bridge: cni0 is handed none of a 16 MiB transfer (on cni0's
    ingress every data skb would be), the bytes arrive intact, and teardown removes the port's filter."""
    net.start(EBPF3)
    assert net.ping_failures([(1, 2), (2, 1)]) == []
    net.call(1, "sync_endpoints")  # what the bridge watcher does every second
    ports = _pod_ports(net.node[1])
    assert ports and all("weft_from_pod_port" in sh("tc", "-n", net.node[1], "filter", "show", "dev", p, "ingress")
                         for p in ports)
    before = _rx_packets(net.node[1], "cni0")
    sent, got = net.transfer(1, 2, 16)
    assert sent and sent == got
    assert _rx_packets(net.node[1], "cni0") - before < 20  # ARP, neighbour probes at most
    assert net.call(1, "stats")["tx_packets"] > 10000  # 16 MiB in 1,398-byte segments: ~12,000
    net.stop()
    for p in ports:
        assert "bpf" not in sh("tc", "-n", net.node[1], "filter", "show", "dev", p, "ingress")


def test_teardown_leaves_nothing(net):
    net.start(EBPF3)
    net.stop()
    for n in NODES:
        assert "flannel.1" not in sh("ip", "-n", net.node[n], "link", "show")
        assert "bpf" not in sh("tc", "-n", net.node[n], "filter", "show", "dev", "cni0", "ingress")
        assert "bpf" not in sh("tc", "-n", net.node[n], "filter", "show", "dev", "eth0", "ingress")
        assert "10.244.0.0/16" not in sh("ip", "-n", net.node[n], "route", "show")


def test_restart_keeps_vtep_mac_and_mesh(net):
    net.start(EBPF3)
    mac = net.leases[1].attrs.backend_data["VtepMAC"]
    net.agents[1].drop("b")  # the daemon dies; device and filters stay
    net.agents[1].backend("b", "vxlan/ebpf", CONFIG, net.iface(1))
    assert net.agents[1].call("b", "lease_attrs", net.leases[1]).backend_data["VtepMAC"] == mac
    net.call(1, "setup", net.leases[1])
    # before any lease event: the peers come from the map the old programs left attached
    assert {e["subnet"] for e in net.call(1, "peer_map")} == {"10.244.2.0/24", "10.244.3.0/24"}
    assert net.ping_failures([(1, 2), (1, 3)]) == []
    net.call(1, "add_peer", net.leases[2])  # node 3's lease is gone meanwhile: never re-added
    net.call(1, "resync")  # the first resync drops inherited peers that no lease re-added
    assert {e["subnet"] for e in net.call(1, "peer_map")} == {"10.244.2.0/24"}
    net.call(1, "add_peer", net.leases[3])
    assert net.ping_failures() == []
    # exactly one filter of ours per hook after the restart
    for dev, hook in (("flannel.1", "egress"), ("flannel.1", "ingress"), ("cni0", "ingress"), ("eth0", "ingress")):
        assert sh("tc", "-n", net.node[1], "filter", "show", "dev", dev, hook).count("direct-action") == 1


def test_missing_bcc_is_one_line_error(monkeypatch):
    import fastpath.bpf as fb
    monkeypatch.setitem(sys.modules, "bcc", None)
    with pytest.raises(fb.BpfUnavailable) as exc:
        fb.check_toolchain()
    assert "\n" not in str(exc.value) and "python3-bpfcc" in str(exc.value)
    b = load_backend("vxlan/ebpf")(CONFIG, ExternalInterface("eth0", 1, None, ipaddress.IPv4Address("198.18.0.9"), 1500))
    with pytest.raises(BackendError) as exc:
        b._programs()
    assert "./bootstrap" in str(exc.value)


# -- benchmarks: not tests (CI runs every test); run them by hand --------------------------------------
#   .venv/bin/python -m tests.test_ebpf_e2e ab [--sides kernel,ebpf] [--rounds 6]
#   .venv/bin/python -m tests.test_ebpf_e2e sequential [--which main|all] [--rounds 3]

def iperf(c: Cluster, a: int, b: int, seconds: int = 5) -> dict:
    """iperf3 TCP 1 stream pod a -> pod b: Gbit/s and retransmits."""
    server = subprocess.Popen(["ip", "netns", "exec", c.pod[b], "iperf3", "-s", "-1", "-B", f"10.244.{b}.2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = sh("iperf3", "-c", f"10.244.{b}.2", "-t", str(seconds), "-J", ns=c.pod[a], timeout=seconds + 30)
    finally:
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    end = json.loads(out)["end"]
    return {"gbit": end["sum_received"]["bits_per_second"] / 1e9,
            "retrans": end["sum_sent"].get("retransmits", 0)}


def ping_p50(c: Cluster, a: int, b: int, count: int = 300) -> float:
    """Median ping RTT in microseconds, pod a -> pod b."""
    out = sh("ping", "-n", "-c", str(count), "-i", "0.005", f"10.244.{b}.2", ns=c.pod[a], timeout=60)
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
    return statistics.median(rtts) * 1000


def link_sizes(c: Cluster, n: int) -> str:
    d = json.loads(sh("ip", "-n", c.node[n], "-d", "-j", "link", "show", "dev", "flannel.1"))[0]
    return f"gso_max_size={d.get('gso_max_size')} tso_max_size={d.get('tso_max_size')} gro_max_size={d.get('gro_max_size')}"


def bench_sequential(net: Cluster, rounds: int = 3, which: str = "") -> None:
    """Backends one after the other on nodes 1-2 (noisy on a shared machine: see bench_concurrent_ab)."""
    import fastpath.bpf as fb
    variants = [
        ("vxlan/kernel", None),
        ("vxlan/ebpf", fb.CFG_DEFAULT),  # from_pods redirect; rx: redirect_peer / fib redirect
        ("vxlan/ebpf", fb.CFG_DEFAULT & ~fb.CFG_RX_PEER),  # rx: fib redirect to the bridge
        ("vxlan/ebpf", fb.CFG_DEFAULT & ~fb.CFG_PODS_REDIRECT),  # tx via the stack + to_overlay
    ]
    if which == "main":  # the headline comparison only
        variants = [variants[0], variants[1], ("vxlan/ebpf", fb.CFG_DEFAULT & ~fb.CFG_OUTER_CSUM)]
    elif which == "all":
        variants += [("vxlan/ebpf", fb.CFG_DEFAULT & ~fb.CFG_OUTER_CSUM),  # outer UDP checksum 0
                     ("vxlan/ebpf", fb.CFG_DEFAULT & ~(fb.CFG_RX_REDIRECT | fb.CFG_RX_PEER)),  # rx: stack
                     ("vxlan/ebpf", (fb.CFG_DEFAULT & ~fb.CFG_RX_PEER) | fb.CFG_RX_NEIGH)]
    rows = {}
    for r in range(rounds):
        for kind, flags in variants:
            net.start({1: kind, 2: kind})
            if flags is not None:
                for n in (1, 2):
                    net.call(n, "set_flags", flags)
            assert net.ping_failures([(1, 2), (2, 1)]) == []
            if kind == "vxlan/ebpf":
                for n in (1, 2):
                    net.call(n, "sync_endpoints")  # the pods' neighbour entries exist now
            res = iperf(net, 1, 2)
            rtt = ping_p50(net, 1, 2)
            key = f"{kind} flags={flags}"
            rows.setdefault(key, []).append((res["gbit"], res["retrans"], rtt))
            if r == 0:
                print(f"\n{key}: {link_sizes(net, 1)}")
            print(f"{key}: {res['gbit']:.2f} Gbit/s retrans {res['retrans']} rtt p50 {rtt:.1f} us")
            if kind == "vxlan/ebpf" and r == 0:
                for n in (1, 2):
                    s = net.call(n, "stats")
                    print(f"  n{n}:", {k: int(v) for k, v in s.items() if v})
            net.stop()
    base = statistics.median(g for g, _, _ in rows["vxlan/kernel flags=None"])
    base_rtt = statistics.median(t for _, _, t in rows["vxlan/kernel flags=None"])
    print("\n| variant | TCP x1 Gbit/s (runs) | ratio | ping p50 us | delta us |")
    for key, vals in rows.items():
        g = statistics.median(v[0] for v in vals)
        t = statistics.median(v[2] for v in vals)
        runs = ", ".join(f"{v[0]:.2f}" for v in vals)
        print(f"| {key} | {g:.2f} ({runs}) | {g / base:.2f} | {t:.1f} | {t - base_rtt:+.1f} |")


# -- part 2: weftd in the lab (bench/lab.py, tests/e2e.py) ---------------------------------------------

def _lab_suite(dataplanes: dict[int, str] | None):
    import fastpath.bpf as fb
    from bench.scenario import load
    from .e2e import lab_for, nothing_left, run_suite
    lab = lab_for(load(os.path.join(REPO, "scenarios", "default.toml")), "vxlan/ebpf", dataplanes)
    kinds = {n: (dataplanes or {}).get(n, "ebpf") for n in NODES}
    lab.up()
    try:
        for n in NODES:  # what each node runs
            link = lab.exec(lab.node(n).namespace, ["ip", "-d", "link", "show", "flannel.1"], check=True).stdout
            assert ("external" in link) == (kinds[n] == "ebpf"), link
        result = run_suite(lab)
        print(f"\nlease removal reached every node in {result['removal_s'] * 1000:.0f} ms")
        # the per-CPU counters reach /metrics (node 1 runs vxlan/ebpf in both labs)
        m = metrics(lab, 1)
        assert m["weft_backend_tx_packets_total"] > 1000 and m["weft_backend_rx_packets_total"] > 1000, m
        assert m["weft_backend_pods_redirect_total"] + m["weft_backend_tx_packets_total"] > 0
        assert m["weft_backend_rx_peer_total"] + m["weft_backend_rx_redirect_total"] > 0, m
        assert m["weft_backend_drops_tunnel_key_total"] == 0 and "weft_backend_drops_no_peer_total" in m, m
        # every datagram the peers sent crossed weft_from_underlay and passed; none was dropped
        assert m["weft_backend_underlay_passed_total"] > 1000, m
        for r in fb.UNDERLAY_REASONS:
            assert m[f"weft_backend_drops_{r.name.lower()}_total"] == 0, (r.name, m)
        # weftctl peermap works from the node's namespace (its own process, own mount namespace)
        out = lab.exec(lab.node(1).namespace, [PY, "-m", "controlplane.ctl", "peermap"], timeout=30, check=True)
        assert "10.244." in out.stdout and "VTEP MAC" in out.stdout
    finally:
        problems = lab.down()
    assert not problems and not nothing_left(lab)


def test_lab_suite_three_ebpf_nodes():
    _lab_suite(None)


def test_lab_suite_mixed_with_kernel_nodes():
    # node 2 runs vxlan/kernel: the suite's transfers (1<->2) cross eBPF<->kernel both ways, the
    # restart is the kernel node's, the released lease (node 3, eBPF) leaves an eBPF map and a
    # kernel routing table
    _lab_suite({2: "kernel"})


def test_resync_puts_back_what_was_removed(net):
    net.start(EBPF3)
    node = net.node[1]
    sh("tc", "filter", "del", "dev", "flannel.1", "egress", ns=node)
    sh("tc", "filter", "del", "dev", "cni0", "ingress", ns=node)
    sh("tc", "filter", "del", "dev", "eth0", "ingress", ns=node)
    net.call(1, "resync")
    assert net.call(1, "stats")["filters_restored"] == 2  # the device's, then the underlay's
    assert sh("tc", "-n", node, "filter", "show", "dev", "cni0", "ingress").count("direct-action") == 1
    assert sh("tc", "-n", node, "filter", "show", "dev", "eth0", "ingress").count("direct-action") == 1
    assert net.ping_failures([(1, 2), (2, 1)]) == []
    sh("ip", "link", "del", "flannel.1", ns=node)
    net.call(1, "resync")
    assert net.call(1, "stats")["device_recreated"] == 1
    assert net.ping_failures([(1, 2), (2, 1), (1, 3)]) == []
    assert net.ping_failures([(1, 2)], src_ns=net.node) == []


# -- hostile input: spoofed, foreign and malformed datagrams ---------------------------------------------

def icmp_echo(src: str, dst: str, seq: int) -> bytes:
    """An IPv4 ICMP echo request (checksums right): a pod that gets it counts Icmp InEchos."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x77, seq) + b"weft-hostile-input"
    icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + icmp


def vxlan_payload(inner: bytes, dmac: str, smac: str, vni: int = 1, flags: int = 0x08000000,
                  ethertype: int = 0x0800) -> bytes:
    """The UDP payload of a VXLAN datagram: VXLAN header + inner Ethernet frame."""
    mac = lambda m: bytes(int(x, 16) for x in m.split(":"))  # noqa: E731
    return struct.pack("!II", flags, vni << 8) + mac(dmac) + mac(smac) + struct.pack("!H", ethertype) + inner


_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
"""


def send_udp(ns: str, dst: str, payload: bytes, port: int = 8472) -> None:
    """One UDP datagram from namespace ``ns`` (outer source: its own address) to dst:port."""
    sh(PY, "-c", _SEND, dst, str(port), payload.hex(), ns=ns, timeout=30)


def in_echos(ns: str) -> int:
    """Icmp InEchos of a namespace (/proc/net/snmp is per network namespace)."""
    lines = [l.split() for l in sh("cat", "/proc/net/snmp", ns=ns).splitlines() if l.startswith("Icmp:")]
    return int(lines[1][lines[0].index("InEchos")])


RX_BUCKETS = ("underlay_passed", "drops_fragment", "drops_malformed", "drops_unknown_peer", "drops_truncated",
              "drops_bad_vxlan", "drops_wrong_vni", "drops_wrong_mac", "drops_inner_not_ipv4", "drops_ecn",
              "drops_spoofed_src", "drops_gso_batch")


def intruder(net: "Cluster") -> str:
    """A host on the underlay that holds no lease: namespace <p>x, 198.18.0.66 on the wire's bridge."""
    name = net.prefix + "x"
    if name not in net.namespaces:
        net.add_underlay_host("x", "198.18.0.66")
    return name


def hostile_cases(net: "Cluster", t: int) -> list[tuple[str, str, str, bytes, str | None]]:
    """(name, sending namespace, destination, UDP payload, the one counter it must land in) for node t.
    Node 2 is a real peer; the intruder is no peer; ``other`` is a third node's subnet."""
    mac = {n: net.leases[n].attrs.backend_data["VtepMAC"] for n in net.kinds}
    other = 3 if t == 1 else 1
    to = f"198.18.0.{t}"
    pod = f"10.244.{t}.2"
    legit = lambda seq: icmp_echo("10.244.2.2", pod, seq)  # noqa: E731
    n2, x = net.node[2], intruder(net)
    return [
        ("legit", n2, to, vxlan_payload(legit(1), mac[t], mac[2]), "underlay_passed"),
        ("spoofed: another peer's subnet", n2, to,
         vxlan_payload(icmp_echo(f"10.244.{other}.2", pod, 2), mac[t], mac[2]), "drops_spoofed_src"),
        ("spoofed: outside the Network", n2, to,
         vxlan_payload(icmp_echo("192.0.2.1", pod, 3), mac[t], mac[2]), "drops_spoofed_src"),
        ("non-peer", x, to, vxlan_payload(legit(4), mac[t], mac[2]), "drops_unknown_peer"),
        ("wrong VNI", n2, to, vxlan_payload(legit(5), mac[t], mac[2], vni=7), "drops_wrong_vni"),
        ("bad VXLAN flags", n2, to, vxlan_payload(legit(6), mac[t], mac[2], flags=0x0C000000), "drops_bad_vxlan"),
        ("truncated", n2, to, b"\x08\x00\x00\x00\x00\x00", "drops_truncated"),
        ("inner not IPv4", n2, to, vxlan_payload(legit(7), mac[t], mac[2], ethertype=0x86DD),
         "drops_inner_not_ipv4"),
        ("inner MAC not ours", n2, to, vxlan_payload(legit(8), "02:00:00:00:00:99", mac[2]), "drops_wrong_mac"),
        ("oversized (fragmented)", n2, to, vxlan_payload(legit(9), mac[t], mac[2]) + b"x" * 2000,
         "drops_fragment"),
    ]


def _buckets(net: "Cluster", n: int) -> dict[str, float]:
    s = net.call(n, "stats")
    return {k: s[k] for k in RX_BUCKETS}


def _check_cases(net: "Cluster", t: int) -> None:
    for name, ns, dst, payload, bucket in hostile_cases(net, t):
        before, echos = _buckets(net, t), in_echos(net.pod[t])
        send_udp(ns, dst, payload)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and _buckets(net, t) == before:
            time.sleep(0.05)
        after = _buckets(net, t)
        delta = {k: after[k] - before[k] for k in RX_BUCKETS if after[k] != before[k]}
        assert delta == {bucket: 1}, (t, name, delta)
        time.sleep(0.2)  # a delivered echo is counted by the pod at once; give a dropped one the same
        assert in_echos(net.pod[t]) - echos == (1 if bucket == "underlay_passed" else 0), (t, name)


def test_hostile_datagrams_dropped_and_counted(net):
    """Every class of hostile datagram sent to an eBPF node (1) and to a kernel node with the source
    guard (3) lands in exactly its counter; the spoofed and foreign ones never reach the pod (its
    Icmp InEchos), the legit one does; weftctl peermap shows the counters; the mesh still works."""
    net.start(MIXED, options={3: {"source_guard": True}})
    for t in (1, 3):
        _check_cases(net, t)
    assert net.ping_failures() == []
    doc = json.loads(sh(PY, "-m", "controlplane.ctl", "peermap", "--json", ns=net.node[1], timeout=30))
    assert doc["drops"]["spoofed_src"] == 2 and doc["drops"]["unknown_peer"] == 1, doc["drops"]
    assert doc["peer_ips"] == {"198.18.0.2": 1, "198.18.0.3": 1}
    text = sh(PY, "-m", "controlplane.ctl", "peermap", "--dev", "eth0", ns=net.node[3], timeout=30)
    assert re.search(r"drops_spoofed_src\s+2\b", text) and re.search(r"underlay_passed\s+[1-9]", text), text


def test_pod_cannot_inject_through_its_node(net):
    """A pod that sends VXLAN to its own node (the datagram never crosses the underlay interface)
    claiming a peer's pod as source: weft_from_overlay drops it (the tunnel source is the pod, no
    peer), counted; the pod never sees its own forged echo."""
    net.start(EBPF3)
    mac1, mac2 = (net.leases[n].attrs.backend_data["VtepMAC"] for n in (1, 2))
    before, echos = net.call(1, "stats"), in_echos(net.pod[1])
    send_udp(net.pod[1], "10.244.1.1", vxlan_payload(icmp_echo("10.244.2.2", "10.244.1.2", 1), mac1, mac2))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and net.call(1, "stats")["drops_unknown_peer"] == before["drops_unknown_peer"]:
        time.sleep(0.05)
    after = net.call(1, "stats")
    assert after["drops_unknown_peer"] - before["drops_unknown_peer"] == 1
    assert after["underlay_passed"] == before["underlay_passed"]  # it never crossed eth0
    assert in_echos(net.pod[1]) == echos


def test_source_guard_restart_resync_teardown(net):
    """vxlan/kernel with the source guard: a restart keeps guarding with the previous run's peers
    until the leases are back (then drops the rest), resync re-attaches a removed filter, teardown
    removes it, and a later start without the guard removes a guard left behind."""
    guarded = {3: {"source_guard": True}}
    net.start(MIXED, options=guarded)
    tc = lambda: sh("tc", "-n", net.node[3], "filter", "show", "dev", "eth0", "ingress")  # noqa: E731
    assert tc().count("direct-action") == 1
    net.agents[3].drop("b")  # the daemon dies; the guard stays attached
    net.agents[3].backend("b", "vxlan/kernel", CONFIG, net.iface(3), guarded[3])
    net.agents[3].call("b", "lease_attrs", net.leases[3])
    net.call(3, "setup", net.leases[3])
    assert net.call(3, "stats")["guard_peer_ips"] == 2  # inherited before any lease event
    net.call(3, "add_peer", net.leases[1])
    net.call(3, "add_peer", net.leases[2])
    assert net.ping_failures([(1, 3), (2, 3), (3, 1)]) == []
    net.call(3, "remove_peer", net.leases[2])
    net.call(3, "resync")
    assert net.call(3, "stats")["guard_peer_ips"] == 1
    assert net.ping_failures([(2, 3)]) == [(2, 3)]  # node 2 is no peer any more: dropped at eth0
    assert net.call(3, "stats")["drops_unknown_peer"] > 0
    net.call(3, "add_peer", net.leases[2])
    sh("tc", "filter", "del", "dev", "eth0", "ingress", ns=net.node[3])
    net.call(3, "resync")
    assert tc().count("direct-action") == 1 and net.ping_failures([(2, 3)]) == []
    net.call(3, "teardown")
    net.agents[3].drop("b")
    assert "bpf" not in tc()
    # a guard left by a run that stopped without teardown, then a run without the guard
    net.agents[3].backend("b", "vxlan/kernel", CONFIG, net.iface(3), guarded[3])
    net.agents[3].call("b", "lease_attrs", net.leases[3])
    net.call(3, "setup", net.leases[3])
    net.agents[3].drop("b")
    assert tc().count("direct-action") == 1
    net.agents[3].backend("b", "vxlan/kernel", CONFIG, net.iface(3))
    net.agents[3].call("b", "lease_attrs", net.leases[3])
    net.call(3, "setup", net.leases[3])
    assert "bpf" not in tc()


def test_fastpath_peer_batches_are_checked_per_datagram(net):
    """A vxlan/fastpath peer sends UDP_SEGMENT batches (up to 64 datagrams per send); over the veth
    underlay each batch reaches weft_from_underlay as one skb. Every datagram is checked and counted:
    what passed the underlay equals what flannel.1 received, nothing is dropped, bytes are intact."""
    net.start({1: "vxlan/ebpf", 2: "vxlan/fastpath"})
    assert net.ping_failures() == []
    before = net.call(1, "stats")
    sent, got = net.transfer(2, 1, 64)
    assert sent and sent == got
    after = net.call(1, "stats")
    delta = {k: after[k] - before[k] for k in RX_BUCKETS + ("rx_packets",)}
    assert delta["underlay_passed"] > 40000 and delta["underlay_passed"] == delta["rx_packets"], delta
    assert all(delta[k] == 0 for k in RX_BUCKETS if k.startswith("drops_")), delta
    fp = net.call(2, "stats")
    assert fp["tx_datagram_sends"] * 4 < fp["tx_packets"], fp  # batches, not single datagrams


def test_kernel_node_without_guard_takes_spoofed_input(net):
    """vxlan/kernel as flannel: no check; a spoofed datagram from a peer reaches the pod. (What the
    source guard is for: the same datagram is dropped with it, see above.)"""
    net.start(MIXED)
    mac = {n: net.leases[n].attrs.backend_data["VtepMAC"] for n in NODES}
    echos = in_echos(net.pod[3])
    send_udp(net.node[2], "198.18.0.3", vxlan_payload(icmp_echo("10.244.1.2", "10.244.3.2", 1), mac[3], mac[2]))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and in_echos(net.pod[3]) == echos:
        time.sleep(0.05)
    assert in_echos(net.pod[3]) == echos + 1
    assert "drops_spoofed_src" not in net.call(3, "stats")
    assert "bpf" not in sh("tc", "-n", net.node[3], "filter", "show", "dev", "eth0", "ingress")


def _capture_vxlan(ns: str, iface: str, seconds: float, during) -> list[bytes]:
    """Raw frames with UDP dst 8472 seen on ``iface`` of ``ns`` while ``during()`` runs."""
    import threading
    frames: list[bytes] = []
    ready = threading.Event()

    def grab():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL: also outgoing
        s.bind((iface, 0))
        s.settimeout(0.2)
        ready.set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                f = s.recv(65535)
            except socket.timeout:
                continue
            if len(f) > 50 and f[12:14] == b"\x08\x00" and f[23] == 17 and int.from_bytes(f[36:38], "big") == 8472:
                frames.append(f)
        s.close()
    t = threading.Thread(target=lambda: in_netns(ns, grab))
    t.start()
    ready.wait(5)
    during()
    t.join(seconds + 10)
    return frames


def _outer(f: bytes) -> dict:
    ihl = (f[14] & 0x0F) * 4
    udp = 14 + ihl
    vx = udp + 8
    inner = vx + 8
    return {"tos": f[15], "df": bool(f[20] & 0x40), "ttl": f[22], "src": socket.inet_ntoa(f[26:30]),
            "dst": socket.inet_ntoa(f[30:34]), "dport": int.from_bytes(f[udp + 2:udp + 4], "big"),
            "udp_csum": int.from_bytes(f[udp + 6:udp + 8], "big"), "vx_flags": f[vx],
            "vni": int.from_bytes(f[vx + 4:vx + 7], "big"),
            "inner_dmac": ":".join(f"{b:02x}" for b in f[inner:inner + 6]),
            "inner_smac": ":".join(f"{b:02x}" for b in f[inner + 6:inner + 12])}


def test_wire_identical_to_vxlan_kernel(net):
    """Outer headers an eBPF node sends equal what a kernel node sends (same fields, same values)."""
    net.start(MIXED)
    mac = {n: net.leases[n].attrs.backend_data["VtepMAC"] for n in NODES}
    frames = _capture_vxlan(net.wire, "w2", 2.0, lambda: net.ping_failures([(1, 2), (3, 2)]))
    by_src = {}
    for f in frames:
        o = _outer(f)
        by_src.setdefault(o["src"], o)
    ebpf, kernel = by_src.get("198.18.0.1"), by_src.get("198.18.0.3")
    assert ebpf and kernel, by_src
    assert ebpf["inner_dmac"] == kernel["inner_dmac"] == mac[2]
    assert (ebpf["inner_smac"], kernel["inner_smac"]) == (mac[1], mac[3])
    for field in ("tos", "df", "ttl", "dst", "dport", "vx_flags", "vni"):
        assert ebpf[field] == kernel[field], (field, ebpf, kernel)
    assert (ebpf["dport"], ebpf["vni"], ebpf["vx_flags"]) == (8472, 1, 0x08)
    # both carry an outer UDP checksum (the kernel device's udpcsum default, which flannel keeps)
    assert ebpf["udp_csum"] != 0 and kernel["udp_csum"] != 0


def _side(spec: str) -> tuple[str, int | None]:
    """``kernel``, ``ebpf`` or ``ebpf:<weft_config flags>`` -> (backend, flags or None)."""
    import fastpath.bpf as fb
    kind, _, flags = spec.partition(":")
    return f"vxlan/{kind}", (int(flags, 0) if flags else (fb.CFG_DEFAULT if kind == "ebpf" else None))


def bench_concurrent_ab(spec: str = "kernel,ebpf", rounds: int = 4, no_tso: bool = False) -> None:
    """Two data planes at once: pods 1->2 over side A, 3->4 over side B, iperf3 running at the same
    time, so other load on the machine hits both alike; the sides swap every round. The ratio B/A
    is then a comparison of cost per byte that a noisy neighbour does not skew.
    ``spec``: "kernel,ebpf" (default) or e.g. "ebpf,ebpf:0x2c" for an ablation."""
    import math
    label = [x.strip() for x in spec.split(",")]
    sides = [_side(x) for x in label]
    seconds = 5
    c = Cluster(prefix=PREFIX + "b", nodes=(1, 2, 3, 4))
    ratios, rows = [], []
    try:
        c.build()
        if no_tso:  # per-packet cost made visible: the pods send MTU-sized packets
            for n in c.nodes:
                sh("ethtool", "-K", "eth0", "tso", "off", "gso", "off", ns=c.pod[n])
        for r in range(rounds):
            pos = {0: (1, 2), 1: (3, 4)} if r % 2 == 0 else {0: (3, 4), 1: (1, 2)}  # side -> nodes
            kinds = {n: sides[i][0] for i in (0, 1) for n in pos[i]}
            c.start(kinds)
            for i in (0, 1):
                if sides[i][1] is not None:
                    for n in pos[i]:
                        c.call(n, "set_flags", sides[i][1])
            assert c.ping_failures([(1, 2), (3, 4), (2, 1), (4, 3)]) == []
            for n, k in kinds.items():
                if k == "vxlan/ebpf":
                    c.call(n, "sync_endpoints")
            servers = [subprocess.Popen(["ip", "netns", "exec", c.pod[b], "iperf3", "-s", "-1", "-B",
                                         f"10.244.{b}.2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                       for b in (2, 4)]
            time.sleep(0.3)
            clients = {i: subprocess.Popen(["ip", "netns", "exec", c.pod[pos[i][0]], "iperf3", "-c",
                                            f"10.244.{pos[i][1]}.2", "-t", str(seconds), "-J"],
                                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                       for i in (0, 1)}
            gbit = {}
            for i, p in clients.items():
                out, _ = p.communicate(timeout=seconds + 30)
                gbit[i] = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
            for srv in servers:
                try:
                    srv.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    srv.kill()
                    srv.wait()
            rtt = {i: ping_p50(c, *pos[i]) for i in (0, 1)}
            ratio = gbit[1] / gbit[0]
            ratios.append(ratio)
            rows.append((gbit[0], gbit[1], ratio, rtt[0], rtt[1]))
            print(f"\nround {r} ({label[1]} on {pos[1]}): {label[0]} {gbit[0]:.2f} {label[1]} {gbit[1]:.2f} "
                  f"Gbit/s, ratio {ratio:.2f}; ping p50 {rtt[0]:.1f} / {rtt[1]:.1f} us")
            c.stop()
    finally:
        c.destroy()
    print(f"\n| round | {label[0]} Gbit/s | {label[1]} Gbit/s | ratio | ping p50 {label[0]} us | ping p50 {label[1]} us |")
    for i, row in enumerate(rows):
        print(f"| {i} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} | {row[3]:.1f} | {row[4]:.1f} |")
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    print(f"{label[1]} / {label[0]}: geometric mean ratio {geo:.2f} (sides alternate, so the pair-position "
          f"bias cancels); median ratio {statistics.median(ratios):.2f}; median RTT delta "
          f"{statistics.median(r[4] - r[3] for r in rows):+.1f} us")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(prog="python -m tests.test_ebpf_e2e",
                                 description="vxlan/ebpf against vxlan/kernel, pod to pod (iperf3 -t 5, ping)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ab = sub.add_parser("ab", help="two data planes at once, sides swapped every round (robust to noise)")
    ab.add_argument("--sides", default="kernel,ebpf", help="A,B: kernel | ebpf | ebpf:<weft_config flags>")
    ab.add_argument("--rounds", type=int, default=6)
    ab.add_argument("--no-tso", action="store_true", help="pods without TSO/GSO (per-packet cost)")
    sq = sub.add_parser("sequential", help="one data plane after the other")
    sq.add_argument("--which", choices=("", "main", "all"), default="")
    sq.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    if a.cmd == "ab":
        bench_concurrent_ab(a.sides, a.rounds, a.no_tso)
    else:
        cl = Cluster()
        try:
            cl.build()
            bench_sequential(cl, a.rounds, a.which)
        finally:
            cl.destroy()


def test_lab_lease_expiry_leaves_the_map():
    """A node that dies without releasing (SIGKILL) leaves the others' maps when its lease expires
    (lease TTL 4 s here), as a released lease does."""
    import dataclasses
    import signal
    from bench.scenario import WeftdSpec, load
    from .e2e import lab_for, nothing_left
    scn = load(os.path.join(REPO, "scenarios", "default.toml"))
    scn = dataclasses.replace(scn, weftd=WeftdSpec(flags=("--lease-ttl", "4")))
    lab = lab_for(scn, "vxlan/ebpf")
    lab.up()
    try:
        subnet = lab.node(3).subnet
        assert ebpf_map_has(lab, 1, subnet) and ebpf_map_has(lab, 2, subnet)
        t0 = time.monotonic()
        lab.kill_node(3, signal.SIGKILL)
        deadline = t0 + 4 + 5
        while time.monotonic() < deadline and (ebpf_map_has(lab, 1, subnet) or ebpf_map_has(lab, 2, subnet)):
            time.sleep(0.1)
        gone_after = time.monotonic() - t0
        assert not ebpf_map_has(lab, 1, subnet) and not ebpf_map_has(lab, 2, subnet), \
            f"{subnet} still in a map {gone_after:.1f} s after its holder died (TTL 4 s)"
        print(f"\nexpired lease left the maps {gone_after:.1f} s after SIGKILL (TTL 4 s)")
    finally:
        problems = lab.down()
    assert not problems and not nothing_left(lab)


# -- dual-stack (EnableIPv6): IPv6 pods over the IPv6 underlay ------------------------------------------
# The testbed's dual-stack form (tests.e2e.Testbed): node N also has 2001:db8:198:18::N/64 on eth0 and
# fd10:244:0:N::/64 as its IPv6 subnet; pod <p>pNx1 is fd10:244:0:N::2, its IPv6 gateway cni0's
# fd10:244:0:N::1 (resolved by neighbour discovery with the bridge, as with the CNI bridge plugin).

CONFIG6 = parse_config('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd10:244::/56", '
                       '"Backend": {"Type": "vxlan"}}')
PREFIX6 = f"wed{os.getpid() % 1000}-"


@pytest.fixture(scope="module")
def cluster6():
    with built(Cluster(PREFIX6, dual_stack=True)) as c:
        yield c


@pytest.fixture
def net6(cluster6):
    yield cluster6
    cluster6.stop()


def ping6_failures(net: Cluster, pairs=None, src_ns=None) -> list[tuple[int, int]]:
    return net.ping_failures(pairs, src_ns, v6=True)


def test_dual_stack_ebpf_nodes_both_families(net6):
    """Three vxlan/ebpf nodes with EnableIPv6: every pod pair pings over IPv4 and IPv6, the node
    reaches remote pods over IPv6 (weft_to_overlay), the lease carries PublicIPv6 and
    BackendV6Data, the IPv6 peers are weft_peers6 entries (weftctl peermap shows them), and still
    no per-peer route, neighbour or FDB entry in either family."""
    net6.start(EBPF3, CONFIG6)
    assert ping6_failures(net6) == []
    assert net6.ping_failures() == []
    assert ping6_failures(net6, src_ns=net6.node) == []
    attrs = net6.leases[1].attrs
    assert attrs.public_ipv6 == net6.node_ip6(1)
    assert attrs.backend_v6_data == {"VNI": 1, "VtepMAC": attrs.backend_data["VtepMAC"]}
    assert json.loads(attrs.to_json())["BackendV6Data"]["VtepMAC"] == attrs.backend_data["VtepMAC"]
    entries = {e["subnet"]: e for e in net6.call(1, "peer_map")}
    assert entries["fd10:244:0:2::/64"]["public_ip"] == str(net6.node_ip6(2))
    assert entries["fd10:244:0:2::/64"]["vtep_mac"] == net6.leases[2].attrs.backend_v6_data["VtepMAC"]
    assert set(entries) == {"10.244.2.0/24", "10.244.3.0/24", "fd10:244:0:2::/64", "fd10:244:0:3::/64"}
    doc = json.loads(sh(PY, "-m", "controlplane.ctl", "peermap", "--json", ns=net6.node[1], timeout=30))
    assert [e["subnet"] for e in doc["peers"] if e["local"]] == ["10.244.1.0/24", "fd10:244:0:1::/64"]
    assert doc["peer_ips"] == {"198.18.0.2": 1, "198.18.0.3": 1, str(net6.node_ip6(2)): 1, str(net6.node_ip6(3)): 1}
    text = sh(PY, "-m", "controlplane.ctl", "peermap", ns=net6.node[1], timeout=30)
    assert re.search(r"fd10:244:0:3::/64\s+2001:db8:198:18::3\s", text), text
    for n in NODES:
        routes = json.loads(sh("ip", "-n", net6.node[n], "-j", "-6", "route", "show", "dev", "flannel.1"))
        assert [(r["dst"], r.get("metrics", [{}])[0].get("mtu")) for r in routes
                if r.get("protocol") != "kernel"] == [("fd10:244::/56", 1430)], routes
        assert sh("ip", "-n", net6.node[n], "-6", "neigh", "show", "nud", "permanent").strip() == ""
        assert "dst" not in sh("bridge", "-n", net6.node[n], "fdb", "show", "dev", "flannel.1")
        link = json.loads(sh("ip", "-n", net6.node[n], "-j", "addr", "show", "dev", "flannel.1"))[0]
        assert [a["local"] for a in link["addr_info"] if a["family"] == "inet6"] == [f"fd10:244:0:{n}::"]
        s = net6.call(n, "stats")
        assert s["peers6_programmed"] == 2 and s["peers6_failed"] == 0
        assert s["tx_packets"] > 0 and s["pods_redirect"] > 0 and s["rx_redirect"] > 0
        assert s["drops_tunnel_key"] == 0 and s["drops_no_config"] == 0 and s["drops_not_ipv4"] == 0
        assert s["drops_not_overlay"] == 0, s  # IPv6 on the device sends nothing of its own (no MLD, no DAD)
    # the IPv6 side follows the lease: removed with it, back with it
    net6.call(1, "remove_peer", net6.leases[3])
    assert "fd10:244:0:3::/64" not in {e["subnet"] for e in net6.call(1, "peer_map")}
    assert ping6_failures(net6, [(1, 3)]) == [(1, 3)]
    net6.call(1, "add_peer", net6.leases[3])
    assert ping6_failures(net6, [(1, 3), (3, 1)]) == []


def test_dual_stack_tcp_transfer_v6_byte_identical(net6):
    """64 MiB over TCP between IPv6 pods, both ways, eBPF to eBPF: the IPv6 overlay MTU (1430: pods
    with MTU 1450 learn it from the stack's Packet Too Big) and GSO hold. Node 2 receives through
    bpf_redirect_peer (its pod learnt in weft_endpoints6), node 1 through the FIB redirect
    (redirect_peer switched off in its config map)."""
    import fastpath.bpf as fb
    net6.start({1: "vxlan/ebpf", 2: "vxlan/ebpf"}, CONFIG6)
    net6.call(1, "set_flags", fb.CFG_DEFAULT & ~fb.CFG_RX_PEER)
    assert ping6_failures(net6) == []
    net6.call(2, "sync_endpoints")  # the pod's IPv6 neighbour entry exists after the ping
    assert net6.call(2, "stats")["endpoints"] >= 1
    for a, b in ((1, 2), (2, 1)):
        server = subprocess.Popen(["ip", "netns", "exec", net6.pod[b], PY, "-c", _RECEIVER6, net6.pod_ip6(b), "5702"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.3)
            sent = sh(PY, "-c", _SENDER6, net6.pod_ip6(b), "5702", "64", ns=net6.pod[a], timeout=90)
            got, _ = server.communicate(timeout=90)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        assert sent.strip() and sent.strip() == got.strip(), (a, b)
    s1, s2 = net6.call(1, "stats"), net6.call(2, "stats")
    assert s2["rx_peer"] > 1000 and s1["rx_redirect"] > 1000, (s1, s2)
    for s in (s1, s2):
        assert s["pods_redirect"] > 1000, {k: v for k, v in s.items() if v}
        # every IPv6-underlay datagram (GRO: by its segments) crossed weft_from_underlay and passed
        assert s["underlay_passed"] == s["rx_packets"] > 1000, s
        assert all(s[k] == 0 for k in RX_BUCKETS if k.startswith("drops_")), {k: s[k] for k in RX_BUCKETS}


_RECEIVER6 = _RECEIVER.replace("s = socket.socket()", "s = socket.socket(socket.AF_INET6)")
_SENDER6 = _SENDER


def test_dual_stack_interop_with_vxlan_kernel_over_the_v6_wire(net6):
    """eBPF nodes 1, 2 and a vxlan/kernel node 3 (flannel's flannel-v6.1): IPv6 pods reach each
    other in every direction; on the wire both send IPv6-underlay VXLAN with the same port, VNI and
    flags, inner destination = the receiver's IPv6 VtepMAC (BackendV6Data)."""
    net6.start(MIXED, CONFIG6)
    if net6.leases[3].attrs.backend_v6_data is None:
        pytest.fail("vxlan/kernel advertises no BackendV6Data: its dual-stack side is missing")
    assert ping6_failures(net6) == []
    assert net6.ping_failures() == []
    mac6 = {n: net6.leases[n].attrs.backend_v6_data["VtepMAC"] for n in NODES}
    frames = _capture_vxlan6(net6.wire, "w2", 2.0, lambda: ping6_failures(net6, [(1, 2), (3, 2)]))
    by_src = {}
    for f in frames:
        o = _outer6(f)
        by_src.setdefault(o["src"], o)
    ebpf, kernel = by_src.get(str(net6.node_ip6(1))), by_src.get(str(net6.node_ip6(3)))
    assert ebpf and kernel, by_src
    assert ebpf["inner_dmac"] == kernel["inner_dmac"] == mac6[2]
    assert (ebpf["inner_smac"], kernel["inner_smac"]) == (mac6[1], mac6[3])
    for field in ("dst", "dport", "vx_flags", "vni", "hlim", "tclass", "inner_type"):
        assert ebpf[field] == kernel[field], (field, ebpf, kernel)
    assert (ebpf["dport"], ebpf["vni"], ebpf["vx_flags"], ebpf["inner_type"]) == (8472, 1, 0x08, 0x86DD)
    assert ebpf["udp_csum"] != 0 and kernel["udp_csum"] != 0  # mandatory over IPv6


def _capture_vxlan6(ns: str, iface: str, seconds: float, during) -> list[bytes]:
    """Raw IPv6-underlay VXLAN frames (UDP dst 8472 right after the IPv6 header) seen on ``iface``."""
    import threading
    frames: list[bytes] = []
    ready = threading.Event()

    def grab():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        s.bind((iface, 0))
        s.settimeout(0.2)
        ready.set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                f = s.recv(65535)
            except socket.timeout:
                continue
            if len(f) > 70 and f[12:14] == b"\x86\xdd" and f[20] == 17 and int.from_bytes(f[56:58], "big") == 8472:
                frames.append(f)
        s.close()
    t = threading.Thread(target=lambda: in_netns(ns, grab))
    t.start()
    ready.wait(5)
    during()
    t.join(seconds + 10)
    return frames


def _outer6(f: bytes) -> dict:
    vx, inner = 62, 70
    return {"src": str(ipaddress.IPv6Address(f[22:38])), "dst": str(ipaddress.IPv6Address(f[38:54])),
            "hlim": f[21], "tclass": ((f[14] & 0x0F) << 4) | (f[15] >> 4),
            "dport": int.from_bytes(f[56:58], "big"), "udp_csum": int.from_bytes(f[60:62], "big"),
            "vx_flags": f[vx], "vni": int.from_bytes(f[vx + 4:vx + 7], "big"),
            "inner_dmac": ":".join(f"{b:02x}" for b in f[inner:inner + 6]),
            "inner_smac": ":".join(f"{b:02x}" for b in f[inner + 6:inner + 12]),
            "inner_type": int.from_bytes(f[inner + 12:inner + 14], "big")}


def icmp6_echo(src: str, dst: str, seq: int) -> bytes:
    """An IPv6 ICMPv6 echo request, checksum right: a pod that gets it counts Icmp6InEchos."""
    s6, d6 = (socket.inet_pton(socket.AF_INET6, a) for a in (src, dst))
    body = struct.pack("!BBHHH", 128, 0, 0, 0x66, seq) + b"weft-hostile-v6"
    pseudo = s6 + d6 + struct.pack("!IxxxB", len(body), 58)
    data = pseudo + body + (b"\0" if len(body) % 2 else b"")
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    body = body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]
    return struct.pack("!IHBB", 6 << 28, len(body), 58, 64) + s6 + d6 + body


_SEND6 = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
"""


def in_echos6(ns: str) -> int:
    for line in sh("cat", "/proc/net/snmp6", ns=ns).splitlines():
        if line.startswith("Icmp6InEchos "):
            return int(line.split()[1])
    raise AssertionError(f"{ns}: no Icmp6InEchos in /proc/net/snmp6")


def test_dual_stack_hostile_v6_datagrams_land_in_their_counter(net6):
    """IPv6-underlay VXLAN datagrams sent to eBPF node 1: each lands in exactly its counter, only
    the legit one reaches the pod (Icmp6InEchos); nothing crashes, the mesh works after."""
    net6.start(EBPF3, CONFIG6)
    assert ping6_failures(net6, [(2, 1)]) == []
    mac6 = {n: net6.leases[n].attrs.backend_v6_data["VtepMAC"] for n in NODES}
    x = intruder(net6)
    if "2001:db8:198:18::66" not in sh("ip", "-n", x, "-6", "addr", "show", "dev", "eth0"):
        sh("ip", "-n", x, "addr", "add", "2001:db8:198:18::66/64", "dev", "eth0", "nodad")
    to, pod, n2 = str(net6.node_ip6(1)), net6.pod_ip6(1), net6.node[2]
    legit = lambda seq, dst=pod: icmp6_echo(net6.pod_ip6(2), dst, seq)  # noqa: E731
    v6 = lambda inner, **kw: vxlan_payload(inner, mac6[1], mac6[2], ethertype=0x86DD, **kw)  # noqa: E731
    cases = [
        ("legit", n2, v6(legit(1)), "underlay_passed", True),
        ("wrong VNI", n2, v6(legit(2), vni=7), "drops_wrong_vni", False),
        ("spoofed: node 3's IPv6 subnet", n2, v6(icmp6_echo(net6.pod_ip6(3), pod, 3)), "drops_spoofed_src", False),
        ("non-peer", x, v6(legit(4)), "drops_unknown_peer", False),
        ("truncated: VXLAN header only", n2, v6(b"")[:8], "drops_truncated", False),
        ("truncated: inner IPv6 header cut", n2, v6(legit(5))[:8 + 14 + 30], "drops_truncated", False),
        ("inner IPv4 over the IPv6 underlay", n2,
         vxlan_payload(icmp_echo("10.244.2.2", "10.244.1.2", 6), mac6[1], mac6[2]), "drops_inner_not_ipv4", False),
        ("inner destination MAC not our IPv6 VtepMAC", n2,
         vxlan_payload(legit(7), "02:0e:00:00:00:77", mac6[2], ethertype=0x86DD), "drops_wrong_mac", False),
    ]
    for name, src, payload, counter, reaches in cases:
        before, echos = net6.call(1, "stats"), in_echos6(net6.pod[1])
        sh(PY, "-c", _SEND6, to, "8472", payload.hex(), ns=src, timeout=30)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and net6.call(1, "stats")[counter] == before[counter]:
            time.sleep(0.05)
        time.sleep(0.2)
        after = net6.call(1, "stats")
        moved = {k: after[k] - before[k] for k in RX_BUCKETS if after[k] != before[k]}
        assert moved == {counter: 1}, (name, moved)
        if reaches:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and in_echos6(net6.pod[1]) == echos:
                time.sleep(0.05)
        assert in_echos6(net6.pod[1]) == echos + (1 if reaches else 0), name
    # an inner destination in the IPv6Network that no lease holds: passes the underlay checks (a
    # peer's own pod), then the stack routes it back into the overlay, where it is a counted miss
    before = net6.call(1, "stats")
    sh(PY, "-c", _SEND6, to, "8472", v6(legit(8, dst="fd10:244:0:9::1")).hex(), ns=n2, timeout=30)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and net6.call(1, "stats")["drops_no_peer"] == before["drops_no_peer"]:
        time.sleep(0.05)
    after = net6.call(1, "stats")
    assert after["drops_no_peer"] - before["drops_no_peer"] == 1 and after["map_miss"] > before["map_miss"]
    assert ping6_failures(net6) == [] and net6.ping_failures() == []


def test_dual_stack_restart_keeps_v6_mac_and_peers(net6):
    """A restarted eBPF node keeps its IPv6 VtepMAC (from the previous lease) and forwards IPv6
    before any lease event (the old programs' weft_peers6 is inherited); a node switching from
    vxlan/kernel keeps that data plane's own flannel-v6 MAC and still receives."""
    net6.start(EBPF3, CONFIG6)
    mac6 = net6.leases[1].attrs.backend_v6_data["VtepMAC"]
    net6.agents[1].drop("b")
    net6.agents[1].backend("b", "vxlan/ebpf", CONFIG6, net6.iface(1))
    assert net6.agents[1].call("b", "lease_attrs", net6.leases[1]).backend_v6_data["VtepMAC"] == mac6
    net6.call(1, "setup", net6.leases[1])
    assert {"fd10:244:0:2::/64", "fd10:244:0:3::/64"} <= {e["subnet"] for e in net6.call(1, "peer_map")}
    assert ping6_failures(net6, [(1, 2), (2, 1)]) == []
    # a previous lease with an IPv6 VtepMAC other than the device's (made by vxlan/kernel)
    import dataclasses
    other = "02:0e:00:00:66:01"
    prev = dataclasses.replace(net6.leases[1], attrs=dataclasses.replace(
        net6.leases[1].attrs, backend_v6_data={"VNI": 1, "VtepMAC": other}))
    net6.call(1, "teardown")
    net6.agents[1].drop("b")
    net6.agents[1].backend("b", "vxlan/ebpf", CONFIG6, net6.iface(1))
    attrs = net6.agents[1].call("b", "lease_attrs", prev)
    assert attrs.backend_v6_data["VtepMAC"] == other != attrs.backend_data["VtepMAC"]
    net6.leases[1] = net6.lease(1, attrs)
    net6.call(1, "setup", net6.leases[1])
    for m in (2, 3):
        net6.call(1, "add_peer", net6.leases[m])
        net6.call(m, "add_peer", net6.leases[1])
    assert ping6_failures(net6) == []
    assert net6.ping_failures() == []
    # to the node itself (cni0's IPv6 address): the stack's path, which needs the device's MAC
    sh("ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", "fd10:244:0:1::1", ns=net6.pod[2])
    assert net6.call(1, "stats")["rx_stack"] > 0


def test_dual_stack_resync_recreates_the_v6_side(net6):
    """A removed flannel.1 comes back with its IPv6 address, route (MTU 1430) and IPv6 settings;
    IPv6 pods reach each other again, and the recreated device sends nothing of its own."""
    net6.start({1: "vxlan/ebpf", 2: "vxlan/ebpf"}, CONFIG6)
    assert ping6_failures(net6) == []
    sh("ip", "link", "del", "flannel.1", ns=net6.node[1])
    assert ping6_failures(net6, [(1, 2)]) == [(1, 2)]
    before = net6.call(1, "stats")
    net6.call(1, "resync")
    assert net6.call(1, "stats")["device_recreated"] == before["device_recreated"] + 1
    assert "fd10:244::/56 dev flannel.1 proto static metric 1024 mtu 1430" in sh(
        "ip", "-n", net6.node[1], "-6", "route", "show", "fd10:244::/56")
    assert "fd10:244:0:1::/128" in sh("ip", "-n", net6.node[1], "-6", "addr", "show", "dev", "flannel.1")
    assert ping6_failures(net6) == [] and net6.ping_failures() == []
    time.sleep(1.5)  # MLD's unsolicited report interval: a listener report would have come by now
    s = net6.call(1, "stats")
    assert s["drops_not_overlay"] == before["drops_not_overlay"] and s["drops_not_ipv4"] == 0, s
