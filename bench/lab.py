"""The lab: one machine turned into a cluster of network namespaces, built from a Scenario.

Topology (the one measured in machine-measurements.md section 1, with a per-run prefix ``w<4 hex>-``)::

    <prefix>wire   bridge br0, one port wN per node (and wst for the store)
    <prefix>nN     node N: eth0 = underlay's Nth address (veth to wN), weftd, bridge cni0
    <prefix>pNxK   pod K of node N: eth0 (veth to vethpK on cni0), .K+1 of the node's subnet
    <prefix>st     the store's namespace when the store is etcd (last underlay address)

Every veth is created directly between two of the run's namespaces, so nothing ever appears in,
moves through or is routed by the root namespace; sysctls are set inside the namespaces only.

One CPU per node (``lab.node_cpus``, the default): node N is a host with CPU (N-1) mod the CPU
count. Its weftd runs there, and so does every packet received into node N or its pods: RPS on
each veth that delivers into node N's realm (its eth0 and its vethpK, its pods' eth0, and the
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

Use::

    lab = Lab(scenario.load("scenarios/default.toml"))
    with lab:                                   # up() ... down()
        lab.ping(lab.pods[0], lab.pods[1].ip)
        lab.exec("n1", ["ip", "route"])
"""
from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from .scenario import Scenario, expand_exec_start, substitute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEALTHZ_PORT = 9180
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
IFNAMSIZ = 15

from .errors import LabError, LabNotFound
from .ledger import LAB_ROOT, LEDGER, STATE, Ledger, _write_json, down, list_labs, resolve_lab, teardown
from .netns import NETNS_DIR, http_status, netns_inode, netns_socket
from .procs import STOP_TIMEOUT, _signal, alive, proc_start_time, stat_fields

# What callers import from here, including names that live in the modules above.
__all__ = ["Lab", "Node", "Pod", "LabError", "LabNotFound", "LAB_ROOT", "NETNS_DIR", "REPO", "HEALTHZ_PORT",
           "down", "list_labs", "resolve_lab", "teardown", "netns_socket", "http_status", "alive",
           "proc_start_time", "venv_python", "default_daemon", "log_tail"]


# -- small helpers ------------------------------------------------------------------------------

def venv_python() -> str:
    candidate = os.path.join(REPO, ".venv", "bin", "python")
    return candidate if os.access(candidate, os.X_OK) else sys.executable


def default_daemon() -> list[str]:
    """weftd as the lab runs it: the venv's Python on the repo's controlplane.daemon."""
    return [venv_python(), "-m", "controlplane.daemon"]


def log_tail(path: str, lines: int = 8, limit: int = 800) -> str:
    """The last lines of a log as one line (' | ' between lines), for one-line errors."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    tail = " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())
    return (tail[-limit:] if len(tail) > limit else tail) or "(log is empty)"


def _run(argv: Sequence[str], timeout: float = 15.0, input: str | None = None) -> subprocess.CompletedProcess:
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


# -- what a lab holds -----------------------------------------------------------------------------

@dataclass
class Node:
    index: int
    namespace: str
    public_ip: str
    dataplane: str
    subnet: str = ""        # the lease, e.g. 10.244.5.0/24 (from subnet.env)
    gateway: str = ""       # cni0's address, FLANNEL_SUBNET's address (10.244.5.1)
    mtu: int = 0            # FLANNEL_MTU
    pid: int | None = None
    start: int | None = None
    log: str = ""
    subnet_file: str = ""
    argv: list[str] = field(default_factory=list)


@dataclass
class Pod:
    namespace: str
    ip: str
    node: int
    index: int
    gateway: str = ""
    mtu: int = 0


def _cpu_mask(cpu: int) -> str:
    """A sysfs CPU bitmap (hex, a comma between 32-bit words) with only ``cpu`` set."""
    digits = f"{1 << cpu:x}"
    digits = digits.zfill(-(-len(digits) // 8) * 8)
    return ",".join(digits[i:i + 8] for i in range(0, len(digits), 8))


# -- the builder ----------------------------------------------------------------------------------

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
        self._children: dict[int, subprocess.Popen] = {}
        self._namespaces: set[str] = set()
        self._etcd = None
        self.etcd_members: list = []   # every member when the scenario's etcd_members > 1 (_etcd: the first)

    # -- names ------------------------------------------------------------------------------
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

    def ns(self, name: str) -> str:
        """A namespace of this lab, by full name or short name (``n1``, ``p2x1``, ``wire``, ``st``)."""
        full = name if name.startswith(self.prefix) else self.prefix + name
        if full not in self._namespaces:
            raise LabError(f"{name}: not a namespace of lab {self.id}")
        return full

    def node_cpu(self, n: int) -> int | None:
        """The CPU that stands for node n's host, or None (node_cpus off, or a single CPU)."""
        cpus = sorted(os.sched_getaffinity(0))
        if not self.scenario.node_cpus or len(cpus) < 2:
            return None
        return cpus[(n - 1) % len(cpus)]

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
            self._build_underlay()
            self._build_store()
            for node in self.nodes:
                self._start(node)
            self._wait_ready([n.index for n in self.nodes])
            self._build_pods()
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
        try:
            with open(os.path.join(path, STATE)) as f:
                state = json.load(f)
        except (OSError, ValueError) as exc:
            raise LabError(f"{path}: no usable {STATE} ({exc})") from None
        scenario = from_dict(state["scenario"], state.get("scenario_path", "<state>"))
        lab = cls(scenario, directory=path, daemon=daemon or state.get("daemon"), root=root)
        lab.id, lab.prefix, lab.dir = state["id"], state["prefix"], path
        lab.ledger = Ledger.load(os.path.join(path, LEDGER))
        lab.nodes = [Node(**n) for n in state["nodes"]]
        lab.pods = [Pod(**p) for p in state["pods"]]
        lab.store = state.get("store", {})
        lab._namespaces = {e["name"] for e in lab.ledger.of_kind("netns")}
        return lab

    # -- state ------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "id": self.id, "prefix": self.prefix, "dir": self.dir, "name": self.scenario.name,
            "scenario_path": self.scenario.path, "scenario": self._scenario_doc(),
            "daemon": self.daemon, "wire": self.wire, "store": self.store,
            "underlay": str(self.scenario.underlay), "backend": self.scenario.network.backend.name,
            "nodes": [asdict(n) for n in self.nodes], "pods": [asdict(p) for p in self.pods],
        }

    def save_state(self) -> None:
        _write_json(os.path.join(self.dir, STATE), self.state())

    def _scenario_doc(self) -> dict:
        """The scenario as a dict that ``scenario.from_dict`` reads back (for ``attach``)."""
        s = self.scenario
        lab = {"nodes": s.nodes, "pods_per_node": s.pods_per_node, "underlay": str(s.underlay),
               "mtu": s.mtu, "store": s.store, "etcd_tls": s.etcd_tls, "etcd_members": s.etcd_members,
               "prefix": s.prefix,
               "pod_offloads": s.pod_offloads, "node_cpus": s.node_cpus}
        if s.store_address:
            lab["store_address"] = str(s.store_address)
        weftd = {"flags": list(s.weftd.flags), "env": dict(s.weftd.env)}
        if s.weftd.exec_start:
            weftd["exec_start"] = s.weftd.exec_start
        doc = {"name": s.name, "lab": lab, "network": {"config": s.config_text}, "weftd": weftd,
               "nodes": {str(k): {"dataplane": v.dataplane} for k, v in s.node_overrides.items()
                         if v.dataplane}}
        if s.description:
            doc["description"] = s.description
        return doc

    # -- building -----------------------------------------------------------------------------
    def _claim(self) -> None:
        """Pick a free id and claim it atomically (mkdir or symlink under the lab root)."""
        os.makedirs(self.root, exist_ok=True)
        existing = set(os.listdir(NETNS_DIR)) if os.path.isdir(NETNS_DIR) else set()
        for _ in range(64):
            lab_id = "w" + secrets.token_hex(2)
            prefix = lab_id + "-"
            if any(name.startswith(prefix) for name in existing):
                continue
            entry = os.path.join(self.root, lab_id)
            try:
                if self.requested_dir:
                    os.symlink(self.requested_dir, entry)
                else:
                    os.mkdir(entry, 0o755)
            except FileExistsError:
                continue
            break
        else:
            raise LabError(f"no free lab id under {self.root}")
        self.id, self.prefix = lab_id, prefix
        longest = self.pod_ns(self.scenario.nodes, max(self.scenario.pods_per_node, 1))
        assert len(longest) <= IFNAMSIZ, longest
        header = {"version": 1, "id": lab_id, "prefix": prefix, "created": time.time(),
                  "owner_pid": os.getpid(), "scenario": self.scenario.path}
        if self.requested_dir:
            self.dir = self.requested_dir
            created = not os.path.exists(self.dir)
            if not created and (not os.path.isdir(self.dir) or os.listdir(self.dir)):
                os.unlink(entry)
                raise LabError(f"--dir {self.dir}: exists and is not an empty directory")
            if created:
                os.makedirs(self.dir, 0o755)
            self.ledger = Ledger(os.path.join(self.dir, LEDGER), header)
            self.ledger.add("link", path=entry)
            self.ledger.add("dir", path=self.dir, created=created)
        else:
            self.dir = entry
            self.ledger = Ledger(os.path.join(self.dir, LEDGER), header)
            self.ledger.add("dir", path=self.dir, created=True)

    def _add_netns(self, names: Iterable[str]) -> None:
        """Record, then create, namespaces (one ``ip -batch`` for all), then record their inodes."""
        names = list(names)
        entries = []
        for name in names:
            if len(name) > IFNAMSIZ or netns_inode(name) is not None:
                raise LabError(f"namespace {name}: too long or already exists")
            entries.append(self.ledger.add("netns", name=name, inode=None))
        _run(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in names))
        for e in entries:
            e["inode"] = netns_inode(e["name"])
            self._namespaces.add(e["name"])
        self.ledger.save()
        for name in names:
            self._sysctl(name)

    def _sysctl(self, ns: str) -> None:
        _run(["ip", "netns", "exec", self.ns(ns), "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
              "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"])

    def _ip(self, ns: str, lines: Iterable[str]) -> None:
        """Run ``ip`` commands inside one of the lab's namespaces (never the root namespace)."""
        _run(["ip", "-n", self.ns(ns), "-batch", "-"], input="".join(line + "\n" for line in lines))

    def _file(self, path: str) -> str:
        self.ledger.add("file", path=path)
        return path

    def _build_underlay(self) -> None:
        s = self.scenario
        plen = s.underlay.prefixlen
        names = [self.wire] + [self.node_ns(n) for n in range(1, s.nodes + 1)]
        if s.store == "etcd":
            names.append(self.store_ns)
        self._add_netns(names)
        wire = ["link set lo up", "link add br0 type bridge", "link set br0 up"]
        ports = [(f"w{n}", self.node_ns(n)) for n in range(1, s.nodes + 1)]
        if s.store == "etcd":
            ports.append(("wst", self.store_ns))
        for port, ns in ports:
            wire.append(f"link add {port} mtu {s.mtu} type veth peer name eth0 mtu {s.mtu} netns {ns}")
            wire.append(f"link set {port} master br0 up")
        self._ip(self.wire, wire)
        for n in range(1, s.nodes + 1):
            ns = self.node_ns(n)
            self._ip(ns, ["link set lo up", f"addr add {s.node_ip(n)}/{plen} dev eth0", "link set eth0 up"])
            node_dir = os.path.join(self.dir, f"n{n}")
            os.makedirs(node_dir, exist_ok=True)
            self.nodes.append(Node(index=n, namespace=ns, public_ip=str(s.node_ip(n)),
                                   dataplane=s.dataplane(n),
                                   log=os.path.join(node_dir, "weftd.log"),
                                   subnet_file=os.path.join(node_dir, "subnet.env")))
        if s.store == "etcd":
            self._ip(self.store_ns, ["link set lo up", f"addr add {s.store_ip}/{plen} dev eth0",
                                     "link set eth0 up"])

    def add_underlay_host(self, short: str, address: str) -> str:
        """One more namespace on the underlay, a host that is not a node (``bench flood``'s
        sender): ``<prefix><short>``, eth0 = ``address``, port ``w<short>`` on br0. Recorded in the
        ledger like every other namespace, so down() removes it. Returns the namespace's name."""
        s = self.scenario
        ns = self.prefix + short
        self._add_netns([ns])
        self._ip(self.wire, [f"link add w{short} mtu {s.mtu} type veth peer name eth0 mtu {s.mtu} netns {ns}",
                             f"link set w{short} master br0 up"])
        self._ip(ns, ["link set lo up", f"addr add {address}/{s.underlay.prefixlen} dev eth0", "link set eth0 up"])
        return ns

    def _build_store(self) -> None:
        s = self.scenario
        if s.store == "sqlite":
            db = self._file(os.path.join(self.dir, "store.db"))
            url = f"sqlite://{db}"
            self.store = {"kind": "sqlite", "url": url, "path": db, "prefix": s.prefix}
            self._put_config_sqlite(url)
            return
        from .etcdserver import EtcdServer, EtcdServerError
        pki = None
        if s.etcd_tls:
            from .pki import make_pki
            pki_dir = self._file(os.path.join(self.dir, "pki"))
            pki = make_pki(pki_dir, [str(s.store_ip)])
        # etcd keeps its data in a temp dir of its own: recorded as soon as it exists; its process
        # runs in <prefix>st, so even a crash before it is recorded leaves nothing down() misses.
        # members = 3: a cluster in the same namespace, member i on ports 2379/2380 + 10000 * i
        members = [EtcdServer(tls=s.etcd_tls, pki=pki, netns=self.store_ns, client_host=str(s.store_ip),
                              client_port=ETCD_CLIENT_PORT + 10000 * i, peer_port=ETCD_PEER_PORT + 10000 * i,
                              name=f"{self.prefix}etcd" + (f"{i}" if i else ""), start=False,
                              wait_healthy=s.etcd_members == 1)
                   for i in range(s.etcd_members)]
        if s.etcd_members > 1:
            cluster = ",".join(f"{m.name}={m.peer_url}" for m in members)
            for m in members:
                m.initial_cluster, m.cluster_token = cluster, f"{self.prefix}etcd-cluster"
        etcd = members[0]
        self._etcd, self.etcd_members = etcd, members
        try:
            for m in members:
                try:
                    m.start()
                    atexit.unregister(m.stop)  # the lab outlives `bench up`; down() stops it (ledger)
                finally:
                    if m.tmpdir:
                        self.ledger.add("file", path=m.tmpdir)
                    if m.pid:
                        self.ledger.add("process", pid=m.pid, start=proc_start_time(m.pid),
                                        role="etcd", ns=self.store_ns)
            for m in members:
                m._wait_healthy()
            etcd.etcdctl("put", f"{s.prefix}/config", s.config_text)
        except EtcdServerError as exc:
            raise LabError(f"etcd in {self.store_ns}: {exc}".replace("\n", " | ")) from None
        self.store = {"kind": "etcd", "namespace": self.store_ns,
                      "endpoint": ",".join(m.endpoint for m in members),
                      "prefix": s.prefix, "pid": etcd.pid, "data": etcd.tmpdir,
                      "pki": ({"ca": pki["ca"], "cert": pki["client"], "key": pki["client_key"]}
                              if pki else None)}

    def _put_config_sqlite(self, url: str) -> None:
        s = self.scenario
        if os.path.exists(os.path.join(REPO, "controlplane", "ctl.py")):
            cfg = self._file(os.path.join(self.dir, "network-config.json"))
            with open(cfg, "w") as f:
                f.write(s.config_text)
            _run([venv_python(), "-m", "controlplane.ctl", "--store", url, "--etcd-prefix", s.prefix,
                  "config", "put", cfg], timeout=30)
            return
        from controlplane.store import open_store
        with open_store(url, prefix=s.prefix) as store:
            store.put_config(s.config_text)

    # -- weftd --------------------------------------------------------------------------------
    def store_flags(self) -> list[str]:
        """The flags weftd and weftctl take for this lab's store, -etcd-prefix included."""
        s = self.scenario
        if s.store == "sqlite":
            return ["--store", self.store["url"], "-etcd-prefix", s.prefix]
        flags = ["-etcd-endpoints", self.store["endpoint"], "-etcd-prefix", s.prefix]
        pki = self.store.get("pki")
        if pki:
            flags += ["-etcd-cafile", pki["ca"], "-etcd-certfile", pki["cert"], "-etcd-keyfile", pki["key"]]
        return flags

    def variables(self, node: Node) -> dict[str, str]:
        """The LAB_* variables ``[weftd].env`` values may use (see bench.scenario)."""
        s = self.scenario
        v = {"LAB_DIR": self.dir, "LAB_PREFIX": s.prefix, "LAB_NODE": str(node.index),
             "LAB_NODE_IP": node.public_ip, "LAB_STORE_IP": str(s.store_ip),
             "LAB_STORE_ENDPOINT": self.store.get("endpoint", self.store.get("url", "")),
             "LAB_PKI": os.path.join(self.dir, "pki")}
        return v

    def daemon_command(self, node: Node) -> tuple[list[str], dict[str, str]]:
        """weftd's argv and environment for ``node``."""
        s = self.scenario
        variables = self.variables(node)
        sysconfig = {k: substitute(v, variables) for k, v in s.weftd.env.items()}
        if s.weftd.exec_start:
            words = expand_exec_start(s.weftd.exec_start, {**variables, **sysconfig})
            argv = self.daemon + words[1:]
        else:
            argv = self.daemon + self.store_flags()
        argv += ["-iface", "eth0", "-public-ip", node.public_ip, "-subnet-file", node.subnet_file,
                 "-healthz-ip", "0.0.0.0", "-healthz-port", str(HEALTHZ_PORT)]
        if s.node(node.index).dataplane:
            argv += ["--dataplane", s.node(node.index).dataplane]
        argv += list(s.weftd.flags)
        # the caller's FLANNEL*/WEFT* settings must not leak into a reproducible lab
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FLANNELD_", "FLANNEL_", "WEFT_"))}
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(sysconfig)
        return argv, env

    def _start(self, node: Node) -> None:
        argv, env = self.daemon_command(node)
        node.argv = argv
        entry = self.ledger.add("process", pid=None, start=None, role=f"weftd n{node.index}",
                                ns=node.namespace)
        if not os.path.exists(node.log):
            self._file(node.log)
        with open(node.log, "ab") as log:  # the child keeps its own descriptor
            log.write(f"--- {time.strftime('%H:%M:%S')} lab: starting {' '.join(argv)}\n".encode())
            log.flush()
            cpu = self.node_cpu(node.index)
            pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
            proc = subprocess.Popen(["ip", "netns", "exec", node.namespace, *pin, *argv],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=REPO, start_new_session=True)
        self._children[proc.pid] = proc
        node.pid, node.start = proc.pid, proc_start_time(proc.pid)
        self.ledger.update(entry, pid=proc.pid, start=node.start)

    def _exit_status(self, node: Node) -> int | None:
        """The exit code once node's weftd is gone (-1 when not our child), None while it runs."""
        proc = self._children.get(node.pid or -1)
        if proc is not None:
            return proc.poll()
        return None if node.pid and alive(node.pid, node.start) else -1

    def _wait_ready(self, indexes: list[int], timeout: float | None = None) -> None:
        timeout = timeout or self.ready_timeout
        deadline = time.monotonic() + timeout
        waiting = {n: self.node(n) for n in indexes}
        while waiting:
            for n, node in list(waiting.items()):
                code = self._exit_status(node)
                if code is not None:
                    raise LabError(f"node {n} ({node.namespace}): weftd exited with status {code} "
                                   f"before it was ready; log {node.log}: {log_tail(node.log)}")
                if os.path.exists(node.subnet_file) and \
                        http_status(node.namespace, "127.0.0.1", HEALTHZ_PORT, "/readyz") == 200:
                    self._read_subnet(node)
                    del waiting[n]
            if not waiting:
                break
            if time.monotonic() > deadline:
                n, node = next(iter(waiting.items()))
                why = "no subnet.env" if not os.path.exists(node.subnet_file) else "/readyz is not 200"
                raise LabError(f"node {n} ({node.namespace}) not ready after {timeout:.0f}s ({why}, "
                               f"{len(waiting)} node(s) waiting); log {node.log}: {log_tail(node.log)}")
            time.sleep(0.1)

    def _read_subnet(self, node: Node) -> None:
        env = {}
        with open(node.subnet_file) as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                env[key] = value.strip().strip('"')
        try:
            iface = ipaddress.IPv4Interface(env["FLANNEL_SUBNET"])
            node.mtu = int(env["FLANNEL_MTU"])
        except (KeyError, ValueError):
            raise LabError(f"node {node.index}: {node.subnet_file} lacks a valid FLANNEL_SUBNET/FLANNEL_MTU") from None
        node.subnet = str(iface.network)
        node.gateway = str(iface.ip)

    # -- pods ---------------------------------------------------------------------------------
    def _build_pods(self) -> None:
        s = self.scenario
        if not s.pods_per_node:
            return
        self._add_netns(self.pod_ns(n.index, k) for n in self.nodes for k in range(1, s.pods_per_node + 1))
        for node in self.nodes:
            net = ipaddress.IPv4Network(node.subnet)
            lines = ["link add cni0 type bridge", f"addr add {node.gateway}/{net.prefixlen} dev cni0",
                     f"link set cni0 mtu {node.mtu}", "link set cni0 up"]
            for k in range(1, s.pods_per_node + 1):
                lines += [f"link add vethp{k} mtu {node.mtu} type veth peer name eth0 mtu {node.mtu} "
                          f"netns {self.pod_ns(node.index, k)}",
                          f"link set vethp{k} master cni0 up"]
            self._ip(node.namespace, lines)
            for k in range(1, s.pods_per_node + 1):
                pod = Pod(namespace=self.pod_ns(node.index, k), ip=str(net.network_address + 1 + k),
                          node=node.index, index=k, gateway=node.gateway, mtu=node.mtu)
                self._ip(pod.namespace, ["link set lo up", f"addr add {pod.ip}/{net.prefixlen} dev eth0",
                                         "link set eth0 up", f"route add default via {pod.gateway}"])
                if not s.pod_offloads:
                    _run(["ip", "netns", "exec", pod.namespace, "ethtool", "-K", "eth0", "tso", "off",
                          "gso", "off"])
                self.pods.append(pod)

    def steer_receive(self, on: bool = True) -> None:
        """RPS: every packet received into node N's realm is processed on node N's CPU (on), or
        on the CPU that sent it (off: a probe pinned to one CPU keeps the whole path there)."""
        if self.node_cpu(1) is None:
            return
        wire_ports = []
        for node in self.nodes:
            mask = _cpu_mask(self.node_cpu(node.index)) if on else "0"
            pods = [p for p in self.pods if p.node == node.index]
            self._rps(node.namespace, ["eth0"] + [f"vethp{p.index}" for p in pods], mask)
            for pod in pods:
                self._rps(pod.namespace, ["eth0"], mask)
            wire_ports.append((f"w{node.index}", mask))
        for port, mask in wire_ports:
            self._rps(self.wire, [port], mask)

    def _rps(self, ns: str, devices: list[str], mask: str) -> None:
        # `ip netns exec` mounts the namespace's own sysfs, so these paths are the namespace's devices
        script = "; ".join(f"for q in /sys/class/net/{d}/queues/rx-*; do echo {mask} > $q/rps_cpus; done"
                           for d in devices)
        result = self.exec(ns, ["sh", "-ec", script], timeout=15)
        if result.returncode != 0:
            raise LabError(f"{ns}: cannot set RPS CPUs ({(result.stderr.strip() or 'failed').splitlines()[-1]}); "
                           f"set lab.node_cpus = false in the scenario")

    # -- using a lab ----------------------------------------------------------------------------
    def exec(self, ns: str, argv: Sequence[str], timeout: float = 10.0, check: bool = False,
             input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` inside one of the lab's namespaces, bounded by ``timeout`` (killed after)."""
        full = self.ns(ns)
        try:
            res = subprocess.run(["ip", "netns", "exec", full, *argv], capture_output=True, text=True,
                                 timeout=timeout, input=input,
                                 stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise LabError(f"{full}: {' '.join(argv)}: still running after {timeout:.0f}s (killed)") from None
        if check and res.returncode != 0:
            raise LabError(f"{full}: {' '.join(argv)}: exit {res.returncode}: "
                           f"{(res.stderr or res.stdout).strip().splitlines()[-1:] or ''}")
        return res

    def spawn(self, ns: str, argv: Sequence[str], log: str | None = None, role: str = "") -> subprocess.Popen:
        """Start a background process in a lab namespace, recorded in the ledger (down() stops it).

        The caller bounds its run time (e.g. ``iperf3 -t``, ``-1``); down() ends it in any case.
        """
        full = self.ns(ns)
        entry = self.ledger.add("process", pid=None, start=None, role=role or argv[0], ns=full)
        out = open(self._file(log), "ab") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", full, *argv], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                    start_new_session=True)
        finally:
            if log:
                out.close()
        self._children[proc.pid] = proc
        self.ledger.update(entry, pid=proc.pid, start=proc_start_time(proc.pid))
        return proc

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
        node = self.node(n)
        if not node.pid or not _signal(node.pid, node.start, sig):
            return
        if sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
            deadline = time.monotonic() + wait
            while self._exit_status(node) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._exit_status(node) is None:
                _signal(node.pid, node.start, signal.SIGKILL)
                deadline = time.monotonic() + wait
                while self._exit_status(node) is None and time.monotonic() < deadline:
                    time.sleep(0.05)
            self._children.pop(node.pid, None)

    def pause(self) -> None:
        """Stop every node's weftd (SIGSTOP): a lab kept up while another one is measured costs
        no CPU. Kernel data planes keep working; a userspace engine stops until ``resume``."""
        stopping = [n for n in self.nodes if n.pid and _signal(n.pid, n.start, signal.SIGSTOP)]
        deadline = time.monotonic() + 2.0  # the signal is asynchronous: wait until all have stopped
        while stopping and time.monotonic() < deadline:
            stopping = [n for n in stopping if (stat_fields(n.pid) or [b"X"])[0] not in (b"T", b"t", b"X", b"Z")]
            if stopping:
                time.sleep(0.005)

    def resume(self) -> None:
        for node in self.nodes:
            if node.pid:
                _signal(node.pid, node.start, signal.SIGCONT)

    def start_node(self, n: int, wait: bool = True) -> None:
        """Start node ``n``'s weftd again (after kill_node) and, by default, wait until ready."""
        node = self.node(n)
        if node.pid and alive(node.pid, node.start):
            raise LabError(f"node {n}: weftd is still running (pid {node.pid})")
        old_subnet = node.subnet
        self._start(node)
        if wait:
            self._wait_ready([n])
            if old_subnet and node.subnet != old_subnet:
                self._log_note(node, f"subnet changed from {old_subnet} to {node.subnet} "
                                     "(pods keep their old addresses)")
        self.save_state()

    def restart_node(self, n: int, sig: int = signal.SIGTERM, wait: bool = True) -> None:
        self.kill_node(n, sig)
        self.start_node(n, wait=wait)

    def _log_note(self, node: Node, text: str) -> None:
        with open(node.log, "ab") as f:
            f.write(f"--- {time.strftime('%H:%M:%S')} lab: {text}\n".encode())
