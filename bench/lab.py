"""The lab: one machine turned into a cluster of network namespaces, built from a Scenario.

Topology (with a per-run prefix ``w<4 hex>-``)::

    <prefix>wire   bridge br0, one port wN per node (and wst for the store)
    <prefix>nN     node N: eth0 = underlay's Nth address (veth to wN), weftd, bridge cni0
    <prefix>pNxK   pod K of node N: eth0 (veth to vethXXXXXXXX on cni0), .K+1 of the node's subnet

Pods come from CNI, as in a cluster (bench.lab_cni): once node N's weftd has written its
subnet.env, each pod's namespace is made and weft's CNI plugin (``weft-cni``, as ``flannel``)
is run with ADD under the conflist users deploy; it delegates to Debian's bridge and host-local
plugins, which make cni0, the veth, the address and the routes. weftd runs with ``-ip-masq``, as
flannel deployments run flanneld, so subnet.env says FLANNEL_IPMASQ=true and the bridge plugin
adds no NAT of its own (pod to pod keeps its addresses). Teardown runs DEL for every pod before
the namespaces go.
    <prefix>st     the store's namespace when the store is etcd (last underlay address)

Dual-stack (the network config's EnableIPv6): each node's eth0 also has the Nth address of the
scenario's ``underlay6`` (2001:db8:198:18::N/64, no DAD), IPv6 forwarding is on in the nodes,
weftd gets ``-public-ipv6``, and CNI gives every pod an address of its node's IPv6 subnet too
(FLANNEL_IPV6_SUBNET) with a default route via cni0 in both families. DAD is off in every
namespace of such a run (every address is unique by construction; DAD would leave each new one
tentative, unusable, for a second or more), and the wire's bridge does no MLD snooping.

IPv6-only (EnableIPv4 false): the same IPv6 underlay, and the nodes keep their IPv4 underlay
address, used only by the store and the harness (weftd gets -public-ipv6 and no -public-ip); weftd
writes subnet.env with FLANNEL_IPV6_* lines only, so CNI gives every pod one IPv6 address and a
default route via cni0's IPv6 address, and nothing IPv4 (``Pod.ip`` and ``Node.subnet`` are "").
A subnet.env with an IPv4 line, or a pod with an IPv4 address, fails ``up`` with one line.

Every veth is created directly between two of the run's namespaces, so nothing ever appears in,
moves through or is routed by the root namespace; sysctls are set inside the namespaces only.

One CPU per node (``lab.node_cpus``, the default): node N is a host with CPU (N-1) mod the CPU
count. Its weftd runs there, and so does every packet received into node N or its pods: RPS on
each veth that delivers into node N's realm (its eth0 and its pods' veths, their eth0, and the
wire's port wN, which stands for node N's NIC) steers the receive work to that CPU. Without it a
veth hands a packet to the backlog of whichever CPU sent it, so one TCP flow's data is forwarded
on both CPUs (the sender's, and the receiver's whenever an ACK releases more data from softirq):
the flow is reordered, SACK recovery and spurious retransmits follow, and single-stream
throughput jumps between levels from run to run. Measured (host-gw, 1 stream, 3 s): without it
8.6-17.7 Gbit/s and hundreds of retransmits per run; with it 12.4-12.7 Gbit/s and none.

The ledger
  ``<lab dir>/ledger.json`` lists every resource the run creates, and each entry is written (and
  fsynced) *before* the resource exists: the lab directory, each namespace by exact name (plus
  its inode once made), each process by PID and /proc start time, each file. ``down()`` removes
  exactly those: it signals a PID only while its start time still matches, kills what is still
  running inside the run's own namespaces (found by namespace inode, never by name), deletes the
  namespaces by recorded name and removes the lab directory. It works from the ledger alone, so
  ``bench down`` cleans up after a crashed or killed ``bench up``, and running it twice is harmless.

  The lab directory is ``/run/weft-lab/<id>/`` (or ``--dir``, then ``/run/weft-lab/<id>`` is a
  symlink to it, so ``bench inspect`` and ``bench down --all`` see every lab and only labs).

The pieces, each readable alone: bench.ledger (claiming an id, the ledger, teardown),
bench.lab_topology (names, namespaces, underlay, pods), bench.lab_cni (pods through CNI ADD and
DEL), bench.lab_store (SQLite or etcd, config
put), bench.lab_weftd (weftd's command line, subnet.env), bench.lab_processes (starting, waiting
for, signalling processes; exec), bench.lab_steering (one CPU per node), bench.lab_state (the
state document). ``Lab`` is the facade the rest of bench uses.

Use::

    lab = Lab(scenario.load("scenarios/default.toml"))
    with lab:                                   # up() ... down()
        lab.ping(lab.pods[0], lab.pods[1].ip)
        lab.exec("n1", ["ip", "route"])
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
from typing import Callable, Sequence

from . import lab_steering, lab_store, lab_weftd
from .errors import LabError, LabNotFound
from .lab_processes import Processes, run_in
from .lab_state import read_state, save_state, state_doc
from .lab_topology import Names, Node, Pod, Topology, check_name_lengths
from .lab_weftd import HEALTHZ_PORT, REPO, default_daemon, log_tail, venv_python
from .ledger import LAB_ROOT, LEDGER, Ledger, claim, down, list_labs, resolve_lab, teardown
from .netns import NETNS_DIR, http_status, netns_socket
from .procs import STOP_TIMEOUT, alive, proc_start_time
from .scenario import Scenario

# What callers import from here, including names that live in the modules above.
__all__ = ["Lab", "Node", "Pod", "LabError", "LabNotFound", "LAB_ROOT", "NETNS_DIR", "REPO", "HEALTHZ_PORT",
           "down", "list_labs", "resolve_lab", "teardown", "netns_socket", "http_status", "alive",
           "proc_start_time", "venv_python", "default_daemon", "log_tail"]


class Lab:
    """Builds, runs and removes one lab. Not thread-safe: one thread drives a Lab."""

    def __init__(self, scenario: Scenario, directory: str | None = None,
                 daemon: Sequence[str] | None = None, ready_timeout: float | None = None,
                 root: str = LAB_ROOT, keep_on_failure: bool = False):
        self.scenario = scenario
        self.root = root
        self.requested_dir = os.path.abspath(directory) if directory else None
        self.daemon = list(daemon) if daemon else default_daemon()
        self.ready_timeout = ready_timeout or (20.0 + 0.5 * scenario.nodes)
        self.keep_on_failure = keep_on_failure
        self.id = ""
        self.prefix = ""
        self.dir = ""
        self.ledger: Ledger | None = None
        self.nodes: list[Node] = []
        self.pods: list[Pod] = []
        self.store: dict = {}
        self.processes = Processes()
        self._children = self.processes.children  # what teardown waits for
        self._namespaces: set[str] = set()
        self.topology: Topology | None = None
        self._etcd = None
        self.etcd_members: list = []   # every member when the scenario's etcd_members > 1 (_etcd: the first)
        # Called with the lab once its store holds the config, before any weftd starts (bench's
        # scale measurements put leases there, as nodes that joined earlier would have).
        self.before_start: Callable[["Lab"], None] | None = None

    # -- names ------------------------------------------------------------------------------
    @property
    def names(self) -> Names:
        return Names(self.prefix)

    @property
    def wire(self) -> str:
        return self.names.wire

    @property
    def store_ns(self) -> str:
        return self.names.store_ns

    def node_ns(self, n: int) -> str:
        return self.names.node_ns(n)

    def pod_ns(self, n: int, k: int) -> str:
        return self.names.pod_ns(n, k)

    def ns(self, name: str) -> str:
        """A namespace of this lab, by full name or short name (``n1``, ``p2x1``, ``wire``, ``st``)."""
        full = name if name.startswith(self.prefix) else self.prefix + name
        if full not in self._namespaces:
            raise LabError(f"{name}: not a namespace of lab {self.id}")
        return full

    def node_cpu(self, n: int) -> int | None:
        """The CPU that stands for node n's host, or None (node_cpus off, or a single CPU)."""
        return lab_steering.node_cpu(self.scenario.node_cpus, n)

    def node(self, n: int) -> Node:
        for node in self.nodes:
            if node.index == n:
                return node
        raise LabError(f"node {n}: lab {self.id} has nodes 1..{len(self.nodes)}")

    def pod(self, name: str | Pod) -> Pod:
        if isinstance(name, Pod):
            return name
        full = name if name.startswith(self.prefix) else self.prefix + name
        for pod in self.pods:
            if pod.namespace == full:
                return pod
        raise LabError(f"{name}: not a pod of lab {self.id}")

    # -- life cycle -------------------------------------------------------------------------
    def __enter__(self) -> "Lab":
        if not self.ledger:
            self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> "Lab":
        """Build everything and wait until every node is ready; on any failure, remove it all."""
        if os.geteuid() != 0:
            raise LabError("needs root (network namespaces)")
        if self.ledger is not None:
            raise LabError(f"lab {self.id} is already up")
        try:
            self._claim()
            self.nodes = self.topology.build_underlay()
            self._build_store()
            if self.before_start is not None:
                self.before_start(self)
            for node in self.nodes:
                self._start(node)
            self._wait_ready([n.index for n in self.nodes])
            self.pods = self.topology.build_pods(self.nodes)
            self.steer_receive()
            self.save_state()
        except BaseException:
            if not self.keep_on_failure:
                self.down()
            raise
        return self

    def down(self) -> list[str]:
        """Remove exactly what the ledger lists; idempotent. Returns problems (none: all gone)."""
        if self.ledger is None:
            return []
        members = self.etcd_members or ([self._etcd] if self._etcd is not None else [])
        for m in members:
            atexit.unregister(m.stop)
        problems = teardown(self.ledger, self._children)
        for m in members:
            # its process is gone (recorded and stopped above); this only closes its log handle
            with contextlib.suppress(Exception):
                m.stop()
        self._etcd, self.etcd_members = None, []
        self._children.clear()
        return problems

    @classmethod
    def attach(cls, target: str, root: str = LAB_ROOT, daemon: Sequence[str] | None = None) -> "Lab":
        """The running lab with this id or directory (from its state file and ledger)."""
        from .scenario import from_dict
        path = os.path.realpath(resolve_lab(target, root))
        state = read_state(path)
        scenario = from_dict(state["scenario"], state.get("scenario_path", "<state>"))
        lab = cls(scenario, directory=path, daemon=daemon or state.get("daemon"), root=root)
        lab.id, lab.prefix, lab.dir = state["id"], state["prefix"], path
        lab._use_ledger(Ledger.load(os.path.join(path, LEDGER)))
        lab.nodes = [Node(**n) for n in state["nodes"]]
        lab.pods = [Pod(**p) for p in state["pods"]]
        lab.store = state.get("store", {})
        lab._namespaces.update(e["name"] for e in lab.ledger.of_kind("netns"))
        return lab

    def _claim(self) -> None:
        check_name_lengths(self.scenario, "w0000-")
        self.id, self.dir, ledger = claim(self.root, self.requested_dir, self.scenario.path)
        self.prefix = self.id + "-"
        self._use_ledger(ledger)

    def _use_ledger(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.processes.ledger = ledger
        self.topology = Topology(self.scenario, self.names, self.dir, ledger, self._namespaces)

    # -- state ------------------------------------------------------------------------------
    def state(self) -> dict:
        return state_doc(self)

    def save_state(self) -> None:
        save_state(self.dir, self.state())

    # -- building -----------------------------------------------------------------------------
    def _file(self, path: str) -> str:
        return self.ledger.add_file(path)

    def add_underlay_host(self, short: str, address: str) -> str:
        """One more namespace on the underlay, a host that is not a node (``bench flood``'s
        sender): ``<prefix><short>``, eth0 = ``address``, port ``w<short>`` on br0. Recorded in the
        ledger like every other namespace, so down() removes it. Returns the namespace's name."""
        return self.topology.add_underlay_host(short, address)

    def _build_store(self) -> None:
        s = self.scenario
        if s.store == "sqlite":
            self.store = lab_store.build_sqlite(s, self.dir, self.ledger, self.id)
            return
        members = lab_store.etcd_members(s, self.dir, self.ledger, self.store_ns, self.prefix)
        self._etcd, self.etcd_members = members[0], members  # down() closes them, also after a failure
        self.store = lab_store.start_etcd(s, members, self.ledger)

    def steer_receive(self, on: bool = True) -> None:
        """RPS: every packet received into node N's realm is processed on node N's CPU (on), or
        on the CPU that sent it (off: a probe pinned to one CPU keeps the whole path there)."""
        lab_steering.steer_receive(self.exec, self.wire, self.nodes, self.pods, self.node_cpu, on)

    # -- weftd --------------------------------------------------------------------------------
    def store_flags(self) -> list[str]:
        """The flags weftd and weftctl take for this lab's store, -etcd-prefix included."""
        return lab_store.store_flags(self.scenario, self.store)

    def variables(self, node: Node) -> dict[str, str]:
        """The LAB_* variables ``[weftd].env`` values may use (see bench.scenario)."""
        return lab_weftd.variables(self.scenario, self.dir, self.store, node)

    def daemon_command(self, node: Node) -> tuple[list[str], dict[str, str]]:
        """weftd's argv and environment for ``node``."""
        return lab_weftd.daemon_command(self.scenario, self.daemon, self.store_flags(), self.variables(node), node)

    def _start(self, node: Node) -> None:
        argv, env = self.daemon_command(node)
        self.processes.start_weftd(node, argv, env, self.node_cpu(node.index))

    def _exit_status(self, node: Node) -> int | None:
        """The exit code once node's weftd is gone (-1 when not our child), None while it runs."""
        return self.processes.exit_status(node)

    def _wait_ready(self, indexes: list[int], timeout: float | None = None) -> None:
        self.processes.wait_ready([self.node(n) for n in indexes], timeout or self.ready_timeout)

    def _read_subnet(self, node: Node) -> None:
        lab_weftd.read_subnet(node)

    # -- using a lab ----------------------------------------------------------------------------
    def exec(self, ns: str, argv: Sequence[str], timeout: float = 10.0, check: bool = False,
             input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` inside one of the lab's namespaces, bounded by ``timeout`` (killed after)."""
        return run_in(self.ns(ns), argv, timeout=timeout, check=check, input=input)

    def spawn(self, ns: str, argv: Sequence[str], log: str | None = None, role: str = "") -> subprocess.Popen:
        """Start a background process in a lab namespace, recorded in the ledger (down() stops it).

        The caller bounds its run time (e.g. ``iperf3 -t``, ``-1``); down() ends it in any case.
        """
        return self.processes.spawn(self.ns(ns), argv, log=log, role=role)

    def socket(self, ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket inside one of the lab's namespaces, usable from this process."""
        return netns_socket(self.ns(ns), family, type)

    def ping(self, src: str | Pod, dst_ip: str, count: int = 1, timeout: float = 2.0) -> bool:
        """True when ``count`` pings from pod (or namespace) ``src`` to ``dst_ip`` are answered."""
        ns = src.namespace if isinstance(src, Pod) else src
        wait = max(1, int(timeout))
        res = self.exec(ns, ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(wait), dst_ip],
                        timeout=timeout * count + 5)
        return res.returncode == 0

    def ready(self, n: int) -> bool:
        node = self.node(n)
        return http_status(node.namespace, "127.0.0.1", HEALTHZ_PORT, "/readyz") == 200

    def kill_node(self, n: int, sig: int = signal.SIGTERM, wait: float = STOP_TIMEOUT) -> None:
        """Signal node ``n``'s weftd (only if its PID is still the process started); for SIGTERM and
        SIGKILL also wait (bounded) until it is gone, SIGKILL after ``wait`` seconds."""
        self.processes.signal_weftd(self.node(n), sig, wait)

    def pause(self) -> None:
        """Stop every node's weftd (SIGSTOP): a lab kept up while another one is measured costs
        no daemon CPU. A data plane outside weftd (the kernel's, an engine in its own process) keeps
        forwarding; one inside weftd stops until ``resume``."""
        self.processes.pause(self.nodes)

    def resume(self) -> None:
        self.processes.resume(self.nodes)

    def start_node(self, n: int, wait: bool = True) -> None:
        """Start node ``n``'s weftd again (after kill_node) and, by default, wait until ready."""
        node = self.node(n)
        if node.pid and alive(node.pid, node.start):
            raise LabError(f"node {n}: weftd is still running (pid {node.pid})")
        old_subnet = node.subnet or node.subnet6  # IPv6-only: the IPv6 subnet names the lease
        self._start(node)
        if wait:
            self._wait_ready([n])
            new_subnet = node.subnet or node.subnet6
            if old_subnet and new_subnet != old_subnet:
                self.processes.log_note(node, f"subnet changed from {old_subnet} to {new_subnet} "
                                              "(pods keep their old addresses)")
        self.save_state()

    def restart_node(self, n: int, sig: int = signal.SIGTERM, wait: bool = True) -> None:
        self.kill_node(n, sig)
        self.start_node(n, wait=wait)
