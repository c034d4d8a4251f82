"""The lab's topology: names, namespaces, the underlay and the pods (the picture is in bench.lab);
the pods' network comes from CNI ADD (bench.lab_cni).

``Topology`` builds namespaces and links only: every namespace is recorded in the ledger before
it is made, and every veth is created directly between two of the run's namespaces, so nothing
appears in, moves through or is routed by the root namespace; sysctls are set inside the
namespaces only.
"""
from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from . import lab_cni
from .errors import LabError
from .ledger import Ledger
from .netns import netns_inode
from .scenario import Scenario

IFNAMSIZ = 15


def run(argv: Sequence[str], timeout: float = 15.0, input: str | None = None) -> subprocess.CompletedProcess:
    """A command on the host (``ip``, ``ethtool``, weftctl), bounded; a failure is a LabError."""
    try:
        res = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout,
                             stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv[:6])}: no answer after {timeout:.0f}s") from None
    except FileNotFoundError:
        raise LabError(f"{argv[0]}: not found") from None
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().replace("\n", " | ")
        raise LabError(f"{' '.join(argv[:8])}: exit {res.returncode}: {msg}")
    return res


@dataclass
class Node:
    index: int
    namespace: str
    public_ip: str
    dataplane: str
    subnet: str = ""        # the lease, e.g. 10.244.5.0/24 (from subnet.env); "" when IPv6-only
    gateway: str = ""       # cni0's address, FLANNEL_SUBNET's address (10.244.5.1); "" when IPv6-only
    mtu: int = 0            # FLANNEL_MTU
    pid: int | None = None
    start: int | None = None
    log: str = ""
    subnet_file: str = ""
    argv: list[str] = field(default_factory=list)
    public_ipv6: str = ""   # dual-stack: eth0's underlay6 address ("" when the lab is IPv4 only)
    subnet6: str = ""       # dual-stack: the lease's IPv6 part, e.g. fd10:244:0:5::/64 (FLANNEL_IPV6_SUBNET)
    gateway6: str = ""      # dual-stack: cni0's IPv6 address (fd10:244:0:5::1)
    ipv6_only: bool = False  # the network has no IPv4 side: subnet.env has FLANNEL_IPV6_* lines only


@dataclass
class Pod:
    namespace: str
    ip: str                 # its IPv4 address; "" on an IPv6-only network (it has none)
    node: int
    index: int
    gateway: str = ""
    mtu: int = 0
    host_veth: str = ""     # its veth's host end on cni0 (the bridge plugin's name, from ADD's result)
    ip6: str = ""           # dual-stack and IPv6-only: its IPv6 address (host-local's, from ADD's result)
    gateway6: str = ""


@dataclass(frozen=True)
class Names:
    """Every namespace name of a run, from its prefix (``w1a2b-``)."""
    prefix: str

    @property
    def wire(self) -> str:
        return f"{self.prefix}wire"

    @property
    def store_ns(self) -> str:
        return f"{self.prefix}st"

    def node_ns(self, n: int) -> str:
        return f"{self.prefix}n{n}"

    def pod_ns(self, n: int, k: int) -> str:
        return f"{self.prefix}p{n}x{k}"


def check_name_lengths(scenario: Scenario, prefix: str) -> None:
    """The longest namespace name must fit where the kernel keeps names (IFNAMSIZ)."""
    longest = Names(prefix).pod_ns(scenario.nodes, max(scenario.pods_per_node, 1))
    if len(longest) > IFNAMSIZ:
        raise LabError(f"namespace {longest}: longer than {IFNAMSIZ} characters")


class Topology:
    """Builds the namespaces of one run. ``namespaces`` are the ones made (recorded) so far."""

    def __init__(self, scenario: Scenario, names: Names, directory: str, ledger: Ledger,
                 namespaces: set[str]):
        self.scenario = scenario
        self.names = names
        self.dir = directory
        self.ledger = ledger
        self.namespaces = namespaces

    def add_netns(self, names: Iterable[str]) -> None:
        """Record, then create, namespaces (one ``ip -batch`` for all), then record their inodes."""
        names = list(names)
        entries = []
        for name in names:
            if len(name) > IFNAMSIZ or netns_inode(name) is not None:
                raise LabError(f"namespace {name}: too long or already exists")
            entries.append(self.ledger.add("netns", name=name, inode=None))
        run(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in names))
        for e in entries:
            e["inode"] = netns_inode(e["name"])
            self.namespaces.add(e["name"])
        self.ledger.save()
        # Dual-stack and IPv6-only: no duplicate address detection anywhere in the run. Every address is
        # unique by construction, and DAD would leave each new one (eth0's, cni0's gateway, a
        # pod's, a flannel-v6 device's) "tentative" for a second or more: unusable as a source
        # and unanswered as a neighbour, so the first packets of a fresh lab would be lost.
        # The kernel skips DAD when both "all" and the device's value are 0; "default" is what
        # every interface made later (cni0, veths, flannel-v6.N) starts with.
        v6 = (["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
              if self.scenario.has_ipv6 else [])
        for name in names:
            run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                 "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0", *v6])

    def ip(self, ns: str, lines: Iterable[str]) -> None:
        """Run ``ip`` commands inside one of the run's namespaces (never the root namespace)."""
        if ns not in self.namespaces:
            raise LabError(f"{ns}: not a namespace of this lab")
        run(["ip", "-n", ns, "-batch", "-"], input="".join(line + "\n" for line in lines))

    # -- the underlay -----------------------------------------------------------------------
    def build_underlay(self) -> list[Node]:
        """The wire (bridge br0, port wN per node, wst for an etcd store), each node's namespace
        with eth0 on it; returns the nodes (weftd not started yet)."""
        s, names = self.scenario, self.names
        plen = s.underlay.prefixlen
        namespaces = [names.wire] + [names.node_ns(n) for n in range(1, s.nodes + 1)]
        if s.store == "etcd":
            namespaces.append(names.store_ns)
        self.add_netns(namespaces)
        # IPv6 (dual-stack or IPv6-only): no MLD snooping on the wire, so neighbour solicitations reach every node
        # whether or not the bridge saw its multicast listener report (there is no querier).
        bridge = "link add br0 type bridge" + (" mcast_snooping 0" if s.has_ipv6 else "")
        wire = ["link set lo up", bridge, "link set br0 up"]
        ports = [(f"w{n}", names.node_ns(n)) for n in range(1, s.nodes + 1)]
        if s.store == "etcd":
            ports.append(("wst", names.store_ns))
        for port, ns in ports:
            wire.append(f"link add {port} mtu {s.mtu} type veth peer name eth0 mtu {s.mtu} netns {ns}")
            wire.append(f"link set {port} master br0 up")
        self.ip(names.wire, wire)
        nodes = []
        for n in range(1, s.nodes + 1):
            ns = names.node_ns(n)
            addrs = ["link set lo up", f"addr add {s.node_ip(n)}/{plen} dev eth0"]
            if s.has_ipv6:
                addrs.append(f"addr add {s.node_ip6(n)}/{s.underlay6.prefixlen} dev eth0 nodad")
                run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])
            self.ip(ns, addrs + ["link set eth0 up"])
            node_dir = os.path.join(self.dir, f"n{n}")
            os.makedirs(node_dir, exist_ok=True)
            nodes.append(Node(index=n, namespace=ns, public_ip=str(s.node_ip(n)), dataplane=s.dataplane(n),
                              log=os.path.join(node_dir, "weftd.log"),
                              subnet_file=os.path.join(node_dir, "subnet.env"),
                              public_ipv6=str(s.node_ip6(n)) if s.has_ipv6 else "", ipv6_only=s.ipv6_only))
        if s.store == "etcd":
            self.ip(names.store_ns, ["link set lo up", f"addr add {s.store_ip}/{plen} dev eth0",
                                     "link set eth0 up"])
        return nodes

    def add_underlay_host(self, short: str, address: str) -> str:
        """One more namespace on the underlay: ``<prefix><short>``, eth0 = ``address``, port
        ``w<short>`` on br0. Returns the namespace's name."""
        s = self.scenario
        ns = self.names.prefix + short
        self.add_netns([ns])
        self.ip(self.names.wire, [f"link add w{short} mtu {s.mtu} type veth peer name eth0 mtu {s.mtu} netns {ns}",
                                  f"link set w{short} master br0 up"])
        self.ip(ns, ["link set lo up", f"addr add {address}/{s.underlay.prefixlen} dev eth0", "link set eth0 up"])
        return ns

    # -- pods -------------------------------------------------------------------------------
    def build_pods(self, nodes: list[Node]) -> list[Pod]:
        """Every pod through CNI ADD, as a runtime makes it (bench.lab_cni): the pod's namespace,
        then ADD with container id = its name and ifname eth0; the plugins make cni0 (the node's
        gateway address, from its subnet.env), the veth, the address and the routes. Nodes in
        parallel, each node's pods in order, so on a fresh store pod K gets .K+1."""
        s = self.scenario
        if not s.pods_per_node:
            return []
        per_node = range(1, s.pods_per_node + 1)
        cni_path = lab_cni.bin_path(self.dir)
        for node in nodes:
            lab_cni.write_conflist(self.dir, node)
        self.add_netns(self.names.pod_ns(n.index, k) for n in nodes for k in per_node)

        def node_pods(node: Node) -> list[Pod]:
            pods = []
            for k in per_node:
                ns = self.names.pod_ns(node.index, k)
                self.ip(ns, ["link set lo up"])
                result = lab_cni.add(self.ledger, lab_cni.pod_entry(self.dir, node, ns, cni_path))
                ip, gateway = lab_cni.no_address(result, ns) if s.ipv6_only else lab_cni.address(result)
                ip6, gateway6 = lab_cni.address6(result) if s.has_ipv6 else ("", "")
                if not s.pod_offloads:
                    run(["ip", "netns", "exec", ns, "ethtool", "-K", lab_cni.IFNAME, "tso", "off", "gso", "off"])
                pods.append(Pod(namespace=ns, ip=ip, node=node.index, index=k, gateway=gateway, mtu=node.mtu,
                                host_veth=lab_cni.host_veth(result), ip6=ip6, gateway6=gateway6))
            return pods

        with ThreadPoolExecutor(max_workers=min(lab_cni.PARALLEL_NODES, len(nodes))) as pool:
            return [pod for pods in pool.map(node_pods, nodes) for pod in pods]
