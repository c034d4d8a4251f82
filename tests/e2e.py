"""The lab's end-to-end suite, shared by every data plane's tests.

Each check runs against a lab that is up (``bench.lab.Lab``): all pod pairs ping, a 64 MiB TCP
transfer across nodes arrives byte-identical, a lease removed with weftctl disappears from the
other nodes' data planes within 2 s, a restarted weftd keeps its subnet and the mesh, and after
``down`` nothing of the run is left.

An absence is evidence only from a daemon that is there: a weftd that died loses its engine's
peers and answers no /metrics without removing anything. So every probe here that reports a peer
absent (``kernel_route``, ``ebpf_map_has``, ``engine_has_all``, hence ``programmed``), and
``lease_removal_propagates`` before it accepts a removal, proves the node's weftd still running and
answering /healthz (``assert_answering``) and raises otherwise; a metric the probe needs and
/metrics lacks is an error, never a count of 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import threading
import time

from bench.lab import HEALTHZ_PORT, Lab, log_tail, proc_start_time, venv_python
from bench.netns import http_status
from bench.procs import alive
from controlplane.config import parse_config

TRANSFER_BYTES = 64 * 1024 * 1024
CHUNK = 1 << 20


def lab_for(scenario, backend: str | None = None, dataplanes: dict[int, str] | None = None,
            backend_options: dict | None = None, env: dict[str, str] | None = None) -> Lab:
    """A lab of ``scenario`` with its backend switched to ``wire/dataplane`` and per-node overrides;
    ``backend_options`` go into the config's Backend object (e.g. ``{"DirectRouting": True}``),
    ``env`` into every weftd's environment (the scenario's ``[weftd.env]``)."""
    from bench.scenario import NodeSpec
    scn = scenario
    if backend or backend_options:
        doc = json.loads(scn.config_text)
        if backend:
            wire, _, dp = backend.partition("/")
            doc["Backend"] = {"Type": wire, "Dataplane": dp}
        doc["Backend"] = {**doc.get("Backend", {}), **(backend_options or {})}
        text = json.dumps(doc)
        scn = dataclasses.replace(scn, config_text=text, network=parse_config(text))
    if dataplanes:
        scn = dataclasses.replace(scn, node_overrides={n: NodeSpec(n, dp) for n, dp in dataplanes.items()})
    if env:
        scn = dataclasses.replace(scn, weftd=dataclasses.replace(scn.weftd, env={**scn.weftd.env, **env}))
    return Lab(scn)


def up_check_down(scenario, backend: str, check, dataplanes: dict[int, str] | None = None) -> None:
    """Bring up a lab of ``scenario`` on ``backend`` (per-node ``dataplanes``), run ``check(lab)``,
    and tear it down: nothing it made may be left, whatever the check found."""
    lab = lab_for(scenario, backend, dataplanes=dataplanes)
    lab.up()
    try:
        check(lab)
    finally:
        problems = lab.down()
    assert not problems and not nothing_left(lab)


def weftctl(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    """weftctl against the lab's store, run in node 1's namespace (where the store is reachable)."""
    return lab.exec(lab.node(1).namespace, [venv_python(), "-m", "controlplane.ctl", *lab.store_flags(), *args],
                    timeout=30)


def all_pairs_ping(lab: Lab) -> list[str]:
    """Pod pairs that do not reach each other (empty: full mesh)."""
    if len({p.node for p in lab.pods}) < 2:  # else an empty list would claim a mesh never tried
        raise AssertionError(f"pods on {len({p.node for p in lab.pods})} node(s): no pair crosses nodes")
    bad = []
    for a in lab.pods:
        for b in lab.pods:
            if a is not b and not lab.ping(a, b.ip, count=2, timeout=2):
                bad.append(f"{a.namespace}->{b.ip}")
    return bad


def all_pairs_ping_both(lab: Lab) -> list[str]:
    """Pod pairs of a dual-stack lab that do not reach each other, per family (empty: full mesh
    over IPv4 and IPv6). A pod without an IPv6 address is a failure, never a pair skipped."""
    bad = all_pairs_ping(lab)
    bad += [f"{p.namespace}: no IPv6 address" for p in lab.pods if not p.ip6]
    for a in lab.pods:
        for b in lab.pods:
            if a is not b and b.ip6 and not lab.ping(a, b.ip6, count=2, timeout=2):
                bad.append(f"{a.namespace}->{b.ip6}")
    return bad


def transfer(lab: Lab, src, dst, nbytes: int = TRANSFER_BYTES, port: int = 7777,
             family: int = 4) -> tuple[str, str]:
    """Send ``nbytes`` of pseudo-random data over TCP from pod src to pod dst (to its IPv6
    address with ``family`` 6); both sides' SHA-256."""
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    dst_ip = dst.ip6 if family == 6 else dst.ip
    server = lab.socket(dst.namespace, af)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((dst_ip, port))
    server.listen(1)
    server.settimeout(30)
    got = {}

    def receive():
        conn, _ = server.accept()
        conn.settimeout(30)
        h, n = hashlib.sha256(), 0
        with conn:
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                h.update(data)
                n += len(data)
        got["digest"], got["bytes"] = h.hexdigest(), n

    t = threading.Thread(target=receive)
    t.start()
    sent = hashlib.sha256()
    block = hashlib.sha256(b"weft").digest() * (CHUNK // 32)
    try:
        client = lab.socket(src.namespace, af)
        client.settimeout(30)
        client.connect((dst_ip, port))
        with client:
            left, i = nbytes, 0
            while left:
                # Vary every chunk so a reordered or duplicated chunk changes the digest.
                chunk = (i.to_bytes(8, "big") + block)[:min(CHUNK, left)]
                client.sendall(chunk)
                sent.update(chunk)
                left -= len(chunk)
                i += 1
    finally:
        t.join(60)
        server.close()
    assert got.get("bytes") == nbytes, f"received {got.get('bytes')} of {nbytes} bytes"
    return sent.hexdigest(), got["digest"]


def assert_answering(lab: Lab, n: int) -> None:
    """Node n's weftd is still the process the lab started and answers /healthz; raises otherwise.

    Call it after reading an absence on node n (no route, no peer, no metric), not before: a daemon
    alive after the read was alive during it (a PID is checked with its start time)."""
    node = lab.node(n)
    if not node.pid or not alive(node.pid, node.start):
        raise AssertionError(f"node {n} ({node.namespace}): weftd is not running (pid {node.pid}), so "
                             f"what its data plane lacks proves nothing; log {node.log}: {log_tail(node.log)}")
    status = http_status(node.namespace, "127.0.0.1", HEALTHZ_PORT, "/healthz", timeout=5.0)
    if status != 200:
        raise AssertionError(f"node {n} ({node.namespace}): weftd (pid {node.pid}) does not answer "
                             f"/healthz ({status or 'unreachable'}), so what its data plane lacks proves "
                             f"nothing; log {node.log}: {log_tail(node.log)}")


def kernel_route(lab: Lab, node: int, subnet: str, check_daemon: bool = True) -> bool:
    """Whether node's main table has a route for exactly ``subnet`` (vxlan and host-gw kernel paths).
    No route counts only while the node's weftd runs (``check_daemon=False``: the table alone)."""
    out = lab.exec(lab.node(node).namespace, ["ip", "-4", "route", "show", "exact", subnet], check=True).stdout
    if out.strip():
        return True
    if check_daemon:
        assert_answering(lab, node)
    return False


def metrics(lab: Lab, n: int) -> dict[str, float]:
    """weftd's /metrics on node n, as name -> value (label sets summed)."""
    from bench.scale import metrics as fetch
    return fetch(lab.node(n).namespace)


def in_netns(ns: str, fn):
    """fn() in a thread that entered ``ns`` (its subprocesses inherit it); this process stays put."""
    box = {}

    def body():
        from pyroute2 import netns
        try:
            netns.setns(ns, flags=0)
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc
    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def ebpf_map_has(lab: Lab, n: int, subnet: str) -> bool:
    """Whether node n's live weft_peers map (read as weftctl peermap reads it) holds ``subnet``."""
    from fastpath.bpf.live import read
    doc = in_netns(lab.node(n).namespace, read)
    if any(e["subnet"] == subnet and not e["local"] for e in doc["peers"]):
        return True
    assert_answering(lab, n)
    return False


def engine_has_all(lab: Lab, n: int, subnet: str) -> bool:
    """A userspace node programs peers in its engine, or (DirectRouting) as direct kernel routes:
    together they cover every other node. (The engine counts routes, it does not name them: this
    holds while one lease at a time is removed.)"""
    try:
        m = metrics(lab, n)
    except Exception:
        assert_answering(lab, n)  # a dead or silent weftd says so; else the error itself
        raise
    needed = ["weft_backend_routes"]
    if lab.scenario.network.backend.type == "vxlan":  # udp has no DirectRouting, so no such count
        needed.append("weft_backend_peers_direct")
    missing = [k for k in needed if k not in m]
    if missing:
        raise AssertionError(f"node {n}: /metrics has no {', '.join(missing)} (is node {n} a userspace "
                             f"data plane? it runs {lab.scenario.dataplane(n)})")
    if sum(m[k] for k in needed) >= len(lab.nodes) - 1:
        return True
    assert_answering(lab, n)
    return False


def programmed(lab: Lab, n: int, subnet: str) -> bool:
    """Whether node n has ``subnet`` in its data plane, wherever that data plane keeps peers."""
    dataplane = lab.scenario.dataplane(n)
    if dataplane == "ebpf":
        return ebpf_map_has(lab, n, subnet)
    if dataplane in ("fastpath", "python"):
        return engine_has_all(lab, n, subnet)
    return kernel_route(lab, n, subnet)


def lease_removal_propagates(lab: Lab, victim: int, has_peer=programmed, within: float = 2.0) -> float:
    """Release node ``victim``'s lease with weftctl; seconds until no other node has it programmed,
    each of them with its weftd still running and answering (a dead one removed nothing)."""
    subnet = lab.node(victim).subnet
    others = [n.index for n in lab.nodes if n.index != victim]
    assert all(has_peer(lab, n, subnet) for n in others), "peer not programmed before removal"
    t0 = time.monotonic()
    r = weftctl(lab, "release", subnet)
    assert r.returncode == 0, r.stderr
    deadline = t0 + within
    while time.monotonic() < deadline:
        if not any(has_peer(lab, n, subnet) for n in others):
            took = time.monotonic() - t0
            for n in others:  # also when has_peer is a caller's own probe that does not check
                assert_answering(lab, n)
            return took
        time.sleep(0.05)
    raise AssertionError(f"{subnet} still programmed on some of nodes {others} after {within} s")


def restart_keeps_subnet_and_mesh(lab: Lab, node: int) -> None:
    before = lab.node(node).subnet
    lab.restart_node(node)
    assert lab.node(node).subnet == before
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        bad = all_pairs_ping(lab)
        if not bad:
            return
    raise AssertionError(f"mesh broken after restarting node {node}: {bad}")


def nothing_left(lab: Lab) -> list[str]:
    """What of the run still exists after down(): namespaces, processes, the lab directory."""
    left = []
    names = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split())
    left += [n for n in names if n.startswith(lab.prefix)]
    left += [f"pid {n.pid}" for n in lab.nodes if n.pid and os.path.exists(f"/proc/{n.pid}")
             and proc_start_time(n.pid) == n.start]
    if lab.dir and os.path.exists(lab.dir):
        left.append(lab.dir)
    return left


def run_suite(lab: Lab, has_peer=programmed) -> dict:
    """The whole suite on a 3-node lab that is up; returns what it measured."""
    bad = all_pairs_ping(lab)
    assert not bad, bad
    a = next(p for p in lab.pods if p.node == 1)
    b = next(p for p in lab.pods if p.node == 2)
    sent, got = transfer(lab, a, b)
    assert sent == got, "64 MiB transfer corrupted"
    sent, got = transfer(lab, b, a, port=7778)
    assert sent == got, "64 MiB transfer corrupted (reverse)"
    restart_keeps_subnet_and_mesh(lab, 2)
    removal_s = lease_removal_propagates(lab, 3, has_peer)
    return {"removal_s": removal_s}


def in_network(lab: Lab, ip: str) -> bool:
    return ipaddress.IPv4Address(ip) in lab.scenario.network.network


# -- a testbed: the lab's namespaces without weftd ------------------------------------------------

class Testbed:
    """Nodes and pods in namespaces, built by the lab's own builder (``bench.lab_topology``) but
    with no store and no weftd: a test runs the backends itself (``tests.nsagent.Agent``).

    Node N (``<prefix>nN``): eth0 = 198.18.0.N/24, a port of the wire's bridge (``<prefix>wire``),
    and cni0 = 10.244.N.1/24 with pod ``<prefix>pNx1`` (10.244.N.2, MTU ``pod_mtu``) behind it,
    made by CNI ADD from the subnet.env weftd would write (``pods``: the lab's Pod records).
    Every namespace is recorded in a ledger before it is made, and ``destroy`` is the lab's own
    teardown: whatever still runs in them is stopped, then exactly those namespaces go.

    ``dual_stack=True`` builds what a dual-stack lab has (the network config's EnableIPv6 with
    IPv6Network ``NETWORK6``): node N's eth0 also has ``UNDERLAY6`` + N (2001:db8:198:18::N/64,
    no DAD), IPv6 forwarding, and subnet.env's FLANNEL_IPV6_* lines for ``subnet6(N)``
    (fd10:244:0:N::/64), so CNI gives cni0 fd10:244:0:N::1 and the pod fd10:244:0:N::2 with a
    default route via cni0 in both families. ``node_ip6(n)``, ``pod_ip6(n)``; the Pod records
    carry ``ip6``. No DAD anywhere in the testbed, so every address is usable at once::

        with built(Testbed("wds-", dual_stack=True)) as bed:   # then run backends with
            ...  # ExternalInterface(address6=bed.node_ip6(n), public_ipv6=bed.node_ip6(n)), ping bed.pod_ip6(m)
    """
    __test__ = False  # not a test class, whatever its name
    NETWORK6 = ipaddress.IPv6Network("fd10:244::/56")
    UNDERLAY6 = ipaddress.IPv6Network("2001:db8:198:18::/64")

    def __init__(self, prefix: str, nodes=(1, 2, 3), pod_mtu: int = 1500, dual_stack: bool = False):
        from bench.lab_topology import Names
        self.prefix = prefix
        self.nodes = tuple(nodes)
        self.pod_mtu = pod_mtu
        self.dual_stack = dual_stack
        names = Names(prefix)
        self.wire = names.wire
        self.node = {n: names.node_ns(n) for n in self.nodes}
        self.pod = {n: names.pod_ns(n, 1) for n in self.nodes}
        self.namespaces: set[str] = set()
        self.ledger = None
        self.topology = None
        self.pods: list = []

    def build(self) -> None:
        import tempfile
        from bench.lab_topology import Names, Topology
        from bench.lab_weftd import read_subnet
        from bench.ledger import LEDGER, Ledger
        from bench.scenario import from_dict
        from controlplane import subnetenv
        if self.nodes != tuple(range(1, len(self.nodes) + 1)):
            raise ValueError(f"nodes {self.nodes}: must be 1..N")
        directory = tempfile.mkdtemp(prefix=f"{self.prefix}testbed-")
        self.ledger = Ledger(os.path.join(directory, LEDGER), {"version": 1, "id": self.prefix.rstrip("-"),
                                                               "prefix": self.prefix, "created": time.time(),
                                                               "owner_pid": os.getpid(), "scenario": "testbed"})
        self.ledger.add("dir", path=directory, created=True)
        scenario = from_dict({"name": "testbed", "lab": {"nodes": len(self.nodes), "pods_per_node": 1,
                                                         "underlay": "198.18.0.0/24", "node_cpus": False,
                                                         "underlay6": str(self.UNDERLAY6)}})
        if self.dual_stack:  # what parsing EnableIPv6 + IPv6Network gives (no weftd reads it here)
            scenario = dataclasses.replace(scenario, network=dataclasses.replace(
                scenario.network, ipv6_network=self.NETWORK6, ipv6_subnet_len=64))
        self.topology = Topology(scenario, Names(self.prefix), directory, self.ledger, self.namespaces)
        nodes = self.topology.build_underlay()
        for node in nodes:  # the subnet.env weftd would write (FLANNEL_IPMASQ=true: -ip-masq, as the lab)
            subnetenv.write(node.subnet_file, ipaddress.IPv4Network("10.244.0.0/16"),
                            ipaddress.IPv4Network(f"10.244.{node.index}.0/24"), self.pod_mtu, True)
            if self.dual_stack:
                self._add_ipv6_lines(node.subnet_file, node.index)
            read_subnet(node)
        self.pods = self.topology.build_pods(nodes)  # through CNI ADD, as the lab's pods

    def node_ip6(self, n: int) -> ipaddress.IPv6Address:
        return self.UNDERLAY6.network_address + n

    def subnet6(self, n: int) -> ipaddress.IPv6Network:
        return ipaddress.IPv6Network((int(self.NETWORK6.network_address) + (n << 64), 64))

    def pod_ip6(self, n: int) -> str:
        return str(self.subnet6(n).network_address + 2)

    def _add_ipv6_lines(self, path: str, n: int) -> None:
        """flanneld's IPv6 lines of subnet.env (WriteSubnetFile), after FLANNEL_SUBNET."""
        with open(path) as f:
            lines = f.read().splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("FLANNEL_SUBNET=")) + 1
        lines[at:at] = [f"FLANNEL_IPV6_NETWORK={self.NETWORK6}",
                        f"FLANNEL_IPV6_SUBNET={self.subnet6(n).network_address + 1}/64"]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def add_netns(self, short: str) -> str:
        """One more namespace (``<prefix><short>``, only lo up), recorded like the others."""
        name = self.prefix + short
        self.topology.add_netns([name])
        self.topology.ip(name, ["link set lo up"])
        return name

    def add_underlay_host(self, short: str, address: str) -> str:
        """A host on the wire that is no node: ``<prefix><short>``, eth0 = ``address``/24."""
        return self.topology.add_underlay_host(short, address)

    def destroy(self) -> list[str]:
        """The lab's teardown from the ledger; its problems (none: all gone)."""
        from bench.ledger import teardown
        return teardown(self.ledger) if self.ledger else []

    def left(self) -> list[str]:
        """The testbed's namespaces that still exist."""
        names = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                   check=True).stdout.split())
        return sorted(n for n in self.namespaces if n in names)


@contextlib.contextmanager
def built(bed: Testbed):
    """Build ``bed``, hand it out, tear it down; then nothing of it may be left."""
    try:
        bed.build()
        yield bed
    finally:
        problems = bed.destroy()
        left = bed.left()
        assert not problems and not left, f"testbed {bed.prefix} left behind: {problems or left}"
