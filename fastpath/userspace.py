"""What the userspace backends (``udp/fastpath``, ``udp/python``, ``vxlan/fastpath``) share.

Their wire formats' folders (``fastpath/udp/``, ``fastpath/vxlan/``) hold the backends; the engine
itself (``fastpath/engine/``) knows nothing of leases or netlink. The lease-to-peer bookkeeping is
``fastpath.routing.RoutingBackend``'s: a peer is an engine route, or (DirectRouting) a kernel route.

A userspace backend is a TUN device plus a UDP socket with an engine between them:

- setup: open the TUN (``flannel0`` or ``flannel.<VNI>``; IFF_VNET_HDR and offloads for the
  compiled engine), give it ``<subnet network address>/32``, MTU = underlay MTU - overhead, a
  txqueuelen of 10,000 (the default 500 overflows under TCP load), IPv6 off, and one route for the
  whole Network through it; bind the UDP socket to the underlay address and the wire format's
  port; start the engine.
- dual-stack (EnableIPv6, vxlan/fastpath only; ``carries_ipv6``: this node has a PublicIPv6 and
  its lease a subnet6): the same TUN also gets ``<subnet6 network address>/128`` (IPv6 on, no
  link-local address, no DAD) and the IPv6Network routed through it with MTU = TUN MTU - 20 (the
  outer IPv6 header is 20 bytes longer; pods learn it by path MTU discovery); the engine binds a
  second UDP socket (IPV6_V6ONLY) to the IPv6 underlay address on the same port. A lease maps to
  up to two peers (``fastpath.routing``): each is one engine route of its family.
- IPv6-only (EnableIPv4 false, ``config.network`` None; vxlan/fastpath only): the dual-stack
  setup without its IPv4 half. The TUN gets only ``<subnet6 network address>/128`` and the
  IPv6Network route (no IPv4 address, no IPv4 route), and the engine runs with only its IPv6 side:
  no IPv4 Network or route table and no IPv4 socket (an IPv4 packet routed into the TUN by hand is
  answered net unreachable and counted in ``tx_drop_no_route``; one inside a frame from the IPv6
  underlay in ``rx_drop_not_ipv6``). A lease is one peer, its IPv6 side. This node must have a
  PublicIPv6 and its lease an IPv6 subnet (else setup fails with one line).
- add_peer / remove_peer: one ``engine.set_route`` / ``remove_route`` (constant time; the engine's
  threads keep running).
- DirectRouting (backends with ``supports_direct_routing``, i.e. ``vxlan/fastpath``, as flannel's
  vxlan): a peer whose PublicIP is on the underlay interface's own L2 subnet gets a kernel route
  ``<peer subnet> via <PublicIP> dev <underlay>`` (``fastpath/direct.py``, shared with
  ``vxlan/kernel``) and no engine route; being more specific than the Network route, it takes that
  peer's traffic past the TUN. A lease update that moves a peer across the boundary puts the new
  path in before it takes the old one out. If the direct route cannot be added, an engine route the
  peer already had stays until resync manages it. The engine only accepts datagrams from peers it
  has a route for, so a peer that sends us VXLAN although we route to it directly (its view of the
  L2 subnet differs from ours) is dropped, where a kernel VXLAN device would take it.
- resync: put back the address and the Network route if someone removed them; reopen everything
  if the device itself was deleted; put back direct routes someone removed.
- teardown: stop the engine process; the TUN is not persistent, so it disappears with its address
  and routes; the direct routes on the underlay interface are removed. A daemon stopped without
  --teardown (or killed) leaves the engine process forwarding with the routes it has, and the
  direct routes, as vxlan/kernel leaves its entries. The lease (and so the subnet) survives.

The engine process (``fastpath/engine/proc.py``, protocol in ``control.py``): the TUN queues, the
UDP socket(s) and the engine live in a process of their own, started in its own session, so pod
traffic outlives weftd. setup() connects to the engine of our device if one runs (its abstract
socket ``weft-engine-<dev>`` is per network namespace) and adopts it when its config (mode,
Network, SubnetLen, our subnet, bind address, port, VNI, VTEP MAC, workers, MTU, vnet_hdr, busy
poll, which engine) is ours: its TUN and sockets are not touched, and the routes it has stay
until the daemon has listed the leases (``peers_synced``), which prunes the ones no lease holds.
Another config: it is stopped and a new one started. A supervisor thread waits on the engine's
pidfd; when the process dies, a new one is started at once with every route (``engine_restarts``).

Engine workers: ``WEFT_ENGINE_WORKERS`` (default ``auto``: one per CPU weftd may run on, at most
8; a node pinned to one CPU gets one) > 1 opens a multiqueue TUN and one SO_REUSEPORT socket per
queue, one worker (one thread) per queue. ``WEFT_ENGINE_BUSY_POLL_US``:
how long the compiled engine keeps polling after the last packet before it sleeps.

``stats``: the engine's counters (summed over its workers, over the control channel; absent while
the engine does not answer), ``engine_pid`` and ``engine_restarts``, and per worker
``worker<i>_*``: the bytes its thread read from the TUN (what it encapsulated and sent), the bytes
it wrote to the TUN (what it received and decapsulated) and its CPU seconds, from the kernel's
per-thread accounting (``/proc/<engine pid>/task/<tid>/io`` and ``stat``), so the spread over
workers is visible in /metrics.
Which worker carries what: the TUN hands a flow to the queue that last wrote a packet of it (its
"automq"), else to a hash of it. With several workers each sends from a port of its own (worker
i's is i modulo the worker count) and the receiving group takes a datagram into socket
``source port % workers`` (fastpath/engine/spread.py): worker i of one node is received by
worker i of the other, so flows are spread on both ends (before, the outer addresses and ports
between two userspace nodes were fixed, and all traffic from a peer arrived at one worker).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import threading

from controlplane.backends.base import BackendError, BackendOptions, ExternalInterface
from controlplane.config import NetworkConfig
from controlplane.lease import Lease

from . import direct as direct_routes
from .engine import control
from .engine.control import MAX_WORKERS
from .netlink import GONE, nl_errno, only_address
from .routing import Peer, RoutingBackend

log = logging.getLogger("weft.backend.engine")

TXQUEUELEN = 10000
# Default of WEFT_ENGINE_BUSY_POLL_US (0: off). Long enough to catch the answer to a packet just
# forwarded (the pinned request/response round trip through two engines is ~43 us; with 0 it is
# ~150 us, every hop a wake-up), short enough not to spin through idle time under load: measured
# in the bench lab, 1000 us cost ~0.03 core-s/Gbit more (the receiving engine spent ~40 % of its
# time in sched_yield) for no gain in throughput or ping RTT; 50-200 us all kept the 43 us.
BUSY_POLL_US = 100
MAX_AUTO_WORKERS = 8  # WEFT_ENGINE_WORKERS unset: one per CPU weftd may run on, at most this many
CLK_TCK = os.sysconf("SC_CLK_TCK")
RESTART_RETRY = 1.0  # seconds between tries to start a new engine after one died


def _thread_usage(pid: int, tid: int) -> tuple[int, int, float] | None:
    """(bytes read, bytes written, CPU seconds) of one thread of process ``pid``; None when gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/io") as f:
            io = dict(line.split(": ", 1) for line in f.read().splitlines() if ": " in line)
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (OSError, ValueError):
        return None
    try:
        # after "pid (comm)": state is fields[0], utime and stime are fields 14 and 15 of stat(5)
        return int(io["rchar"]), int(io["wchar"]), (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (KeyError, IndexError, ValueError):
        return None


def engine_workers(value: str) -> int:
    """WEFT_ENGINE_WORKERS: a number of workers; unset, empty or ``auto``: one per CPU this daemon
    may run on (its affinity, which the engine inherits: a node pinned to one CPU gets one), at
    most MAX_AUTO_WORKERS. BackendError naming the variable for anything else."""
    value = value.strip()
    if value in ("", "auto"):
        return max(1, min(len(os.sched_getaffinity(0)), MAX_AUTO_WORKERS))
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if not 1 <= workers <= MAX_WORKERS:
        raise BackendError(f"WEFT_ENGINE_WORKERS={value!r}: must be 'auto' or a number of engine "
                           f"workers from 1 to {MAX_WORKERS}")
    return workers


class TunEngineBackend(RoutingBackend):
    """Base of the userspace backends; subclasses set ``mode``, ``vnet_hdr`` and the engine."""
    mode = "udp"
    vnet_hdr = True
    supports_direct_routing = False  # Backend.DirectRouting (flannel: vxlan only)
    COUNTERS = ("device_recreated", "engine_restarts")
    # stats()'s levels; the engine's counts (reset when a new engine process starts) only grow
    GAUGES = RoutingBackend.GAUGES | {"peers_direct", "engine_pid", "routes", "workers"}

    def __init__(self, config: NetworkConfig, iface: ExternalInterface,
                 options: BackendOptions = BackendOptions()):
        super().__init__(config, iface, options)
        self.port = config.backend.effective_port
        self.vni = getattr(config.backend, "vni", None)  # a vxlan key; the udp format has none
        self.local = iface.address or iface.public_ip
        self.local6 = iface.address6 or iface.public_ipv6  # dual-stack: the IPv6 socket's address
        self.engine: control.EngineClient | None = None  # the engine process's control channel
        self._engine_proc = None       # its Popen when this process started it (to reap it)
        self._engine_pid: int | None = None
        self._engine_pidfd: int | None = None
        self._engine_gen = 0           # bumped whenever the engine is replaced on purpose
        self._engine_name = ""         # the engine class it runs
        self._restart_pending = False  # the engine died and a new one could not start yet
        self._unconfirmed = False      # an adopted engine's routes await the listing of leases
        self._supervisor: threading.Thread | None = None
        self._closing = threading.Event()
        self.workers = engine_workers(os.environ.get("WEFT_ENGINE_WORKERS", ""))
        self.busy_poll_us = max(0, int(os.environ.get("WEFT_ENGINE_BUSY_POLL_US", str(BUSY_POLL_US)) or 0))
        self._l2_net: ipaddress.IPv4Network | None = None
        self._l2_net6: ipaddress.IPv6Network | None = None
        self._worker_threads: list[tuple[int, int]] = []  # (worker index, engine thread id)

    # -- to override ---------------------------------------------------------------------------
    @property
    def dev_name(self) -> str:
        raise NotImplementedError

    def engine_class(self):
        raise NotImplementedError

    def engine_kwargs(self) -> dict:
        return {}

    def engine_kwargs6(self) -> dict:
        """The engine's IPv6 options besides its Network and subnets (vxlan: the v6 VTEP MAC)."""
        raise BackendError(f"{self.name()}: carries IPv4 only")

    @property
    def carries_ipv6(self) -> bool:
        """Dual-stack: this node has IPv6 and its lease an IPv6 subnet; the TUN and the engine
        carry both families."""
        return self.has_ipv6 and self.lease is not None and self.lease.subnet6 is not None

    @property
    def carries_ipv4(self) -> bool:
        """The network has an IPv4 side (not IPv6-only): the TUN and the engine carry IPv4."""
        return self.config.network is not None

    @property
    def mtu6(self) -> int:
        """The IPv6 route's MTU: an outer IPv6 header is 20 bytes longer than an IPv4 one, so an
        inner IPv6 packet must be 20 bytes shorter (flannel-v6.<VNI>'s MTU; pods find it by path
        MTU discovery: the TUN itself has the IPv4 MTU)."""
        return self.mtu - 20

    # -- netlink -------------------------------------------------------------------------------

    def _configure_device(self) -> int:
        ipr = self.ipr
        idx = self.link_index(self.dev_name)
        if idx is None:
            raise BackendError(f"{self.name()}: TUN {self.dev_name} vanished right after it was opened")
        ipr.link("set", index=idx, mtu=self.mtu, txqlen=TXQUEUELEN)
        # IPv4 only: IPv6 off. Dual-stack: on, but without a link-local address (addr_gen_mode 1)
        # and without DAD: nothing on a TUN answers neighbour or router solicitations.
        v6 = self.carries_ipv6
        for key, value in ((("addr_gen_mode", "1"), ("accept_dad", "0"), ("disable_ipv6", "0")) if v6
                           else (("disable_ipv6", "1"),)):
            try:
                with open(f"/proc/sys/net/ipv6/conf/{self.dev_name}/{key}", "w") as f:
                    f.write(value)
            except OSError:
                if v6:
                    raise
        ipr.link("set", index=idx, state="up")
        self._ensure_addr_route(idx)
        return idx

    def _ensure_addr_route(self, idx: int) -> list[str]:
        """Exactly <subnet>.0/32 on the TUN and the Network routed through it (dual-stack also
        <subnet6 network address>/128 and the IPv6Network, with the IPv6 MTU); what was missing."""
        ipr = self.ipr
        missing = []
        net = self.config.network
        if net is not None:  # IPv6-only: nothing IPv4 on the TUN
            if only_address(ipr, idx, str(self.lease.subnet.network_address)):
                missing.append("address")
            if (str(net.network_address), net.prefixlen, None, idx) not in direct_routes.main_routes(ipr):
                ipr.route("replace", dst=str(net), oif=idx)
                missing.append("route")
        if self.carries_ipv6:
            if only_address(ipr, idx, str(self.lease.subnet6.network_address), 128, socket.AF_INET6):
                missing.append("IPv6 address")
            net6 = self.config.ipv6_network
            if ((str(net6.network_address), net6.prefixlen, None, idx)
                    not in direct_routes.main_routes(ipr, socket.AF_INET6)):
                ipr.route("replace", dst=str(net6), oif=idx, family=socket.AF_INET6,
                          metrics={"mtu": self.mtu6})
                missing.append("IPv6 route")
        return missing

    # -- lifecycle -----------------------------------------------------------------------------
    def _remove_stale_device(self) -> None:
        """A device of our name that is not ours (a kernel vxlan device left by vxlan/kernel, a
        persistent TUN): it would hold our name or our UDP port."""
        idx = self.link_index(self.dev_name)
        if idx is not None:
            log.info("removing the existing %s before opening the TUN", self.dev_name)
            try:
                self.ipr.link("del", index=idx)
            except Exception as exc:
                if nl_errno(exc) not in GONE:
                    raise

    def _engine_config(self) -> dict:
        """What the engine process runs with; an engine found running is adopted only when its
        config is exactly this (JSON-normalised, as it comes back over the channel)."""
        from .engine.reference import ReferenceEngine
        cls = self.engine_class()  # ImportError with the fix when the compiled engine is not built
        v4 = self.carries_ipv4  # IPv6-only: null, and the engine has no IPv4 side nor socket
        if not v4 and not self.carries_ipv6:
            raise BackendError(f"{self.name()}: an IPv6-only network needs this node's PublicIPv6 and an "
                               f"IPv6 subnet in its lease (lease {self.lease.shown}, PublicIPv6 "
                               f"{self.iface.public_ipv6})")
        config = {"dev": self.dev_name, "engine": "reference" if cls is ReferenceEngine else "compiled",
                  "mode": self.mode, "network": str(self.config.network) if v4 else None,
                  "subnet_len": self.config.subnet_len, "local_subnet": str(self.lease.subnet) if v4 else None,
                  "local": str(self.local) if v4 else None, "port": self.port, "workers": self.workers,
                  "mtu": self.mtu, "vnet_hdr": self.vnet_hdr, "busy_poll_us": self.busy_poll_us,
                  "kwargs": self.engine_kwargs()}
        if self.carries_ipv6:  # absent otherwise: an IPv4-only engine's config stays as it was
            config["local6"] = str(self.local6)
            config["kwargs"].update(network6=str(self.config.ipv6_network),
                                    subnet6_len=self.config.ipv6_subnet_len,
                                    local_subnet6=str(self.lease.subnet6), **self.engine_kwargs6())
        return json.loads(json.dumps(config))

    def _attach(self, client: control.EngineClient, info: dict, proc=None) -> None:
        self.engine = client
        self._engine_proc = proc
        self._engine_pid = client.pid
        self._engine_pidfd = control.pidfd_of(client.pid)
        self._engine_gen += 1
        self._engine_name = str(info.get("engine"))
        self._worker_threads = [(int(i), int(tid)) for i, tid in info.get("tids") or []]
        self._restart_pending = False

    def _detach(self) -> None:
        """Forget the engine process (it runs on, or is gone); close our ends."""
        self._engine_gen += 1
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        if self._engine_pidfd is not None:
            os.close(self._engine_pidfd)
        self._engine_pidfd = None
        if self._engine_proc is not None:
            self._engine_proc.poll()  # reap it if it exited
        self._engine_proc = None
        self._engine_pid = None
        self._worker_threads = []

    @property
    def engine_name(self) -> str:
        """The abstract socket name of this backend's engine process (see control.py)."""
        return control.socket_name(self.dev_name)

    def _retire(self, client: control.EngineClient, proc=None) -> None:
        """Stop an engine process and wait until it is gone (SIGKILL if it does not go)."""
        pidfd = control.pidfd_of(client.pid)
        try:
            client.stop()
        except (control.EngineError, ValueError):
            pass
        client.close()
        if pidfd is not None:
            try:
                if not control.wait_exit(pidfd, control.STOP_TIMEOUT):
                    log.warning("engine of %s (pid %d) did not stop; killing it", self.dev_name, client.pid)
                    control.kill(pidfd)
                    control.wait_exit(pidfd, control.STOP_TIMEOUT)
            finally:
                os.close(pidfd)
        if proc is not None:
            proc.wait()

    def _start(self) -> None:
        """Adopt the engine process of our device when it runs our config, else start one."""
        config = self._engine_config()
        name = self.engine_name
        control.stop_engines(keep=name, log=log)  # another userspace data plane's, from before
        own = self._engine_proc  # setup again (another lease): the engine we started may fit
        self._detach()
        client = control.EngineClient.connect(name)
        own = own if own is not None and client is not None and own.pid == client.pid else None
        if client is not None:
            try:
                info = client.hello()
            except (control.EngineError, ValueError) as exc:
                info = {"running": False, "config": f"unknown ({exc})"}
            if info.get("running") and info.get("config") == config:
                self._attach(client, info, own)
                self._unconfirmed = True
                self._configure_device()
                log.info("%s: adopted the running engine of %s (pid %d, %d route(s) kept until the"
                         " leases are listed)", self.name(), self.dev_name, client.pid, info.get("routes", 0))
                return
            old = info.get("config") if isinstance(info.get("config"), dict) else {}
            diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in config.items() if old.get(k) != v)
            log.info("%s: the running engine of %s (pid %d) has another config (%s); replacing it",
                     self.name(), self.dev_name, client.pid, diff or info.get("config"))
            self._retire(client, own)
        self._remove_stale_device()
        proc = control.spawn(name)
        try:
            client = control.connect_new(name, proc)
            info = client.start(config, self._engine_routes())
        except (control.EngineError, ValueError) as exc:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            raise BackendError(f"{self.name()}: cannot start the engine of {self.dev_name}: {exc}") from None
        self._attach(client, info, proc)
        self._unconfirmed = False
        try:
            self._configure_device()
        except BaseException:
            self._stop()
            raise

    def _stop(self) -> None:
        """Stop the engine process (the TUN disappears with it)."""
        if self.engine is not None:
            client, proc = self.engine, self._engine_proc
            self._engine_gen += 1  # the supervisor must not take this exit for a crash
            self.engine, self._engine_proc = None, None
            self._retire(client, proc)
        self._detach()

    # -- supervision -------------------------------------------------------------------------------
    def _start_supervisor(self) -> None:
        if self._supervisor is None or not self._supervisor.is_alive():
            self._closing.clear()
            self._supervisor = threading.Thread(target=self._supervise, name=f"engine-supervisor-{self.dev_name}",
                                                daemon=True)
            self._supervisor.start()

    def _supervise(self) -> None:
        """Wait for the engine process to exit; start a new one at once (then every second until
        one starts). An engine stopped on purpose (teardown, a new config) is not restarted."""
        while not self._closing.is_set():
            with self._lock:
                pidfd, gen, pending = self._engine_pidfd, self._engine_gen, self._restart_pending
            if pending:
                self._closing.wait(RESTART_RETRY)
                with self._lock:
                    if self._restart_pending and not self._closing.is_set():
                        self._restart_engine(died=False)
                continue
            if pidfd is None:
                self._closing.wait(0.2)
                continue
            try:
                exited = control.wait_exit(pidfd, 0.2)
            except (OSError, ValueError):  # closed meanwhile: the engine was replaced on purpose
                exited = False
            if exited:
                with self._lock:
                    if gen == self._engine_gen and self.lease is not None and not self._closing.is_set():
                        self._restart_engine(died=True)

    def _restart_engine(self, died: bool) -> None:
        """Start a new engine: the one we had just ``died``, or an earlier try failed."""
        if died:
            pid, proc = self._engine_pid, self._engine_proc
            status = proc.poll() if proc is not None else None
            log.warning("%s: the engine process of %s (pid %s) exited%s; starting a new one", self.name(),
                        self.dev_name, pid, f" with status {status}" if status is not None else "")
            self._counters["engine_restarts"] += 1
            self._detach()
        try:
            self._start()
        except Exception as exc:
            if not self._restart_pending:
                log.warning("%s: starting a new engine failed: %s; retrying every %.0f s", self.name(),
                            exc, RESTART_RETRY)
            self._restart_pending = True
            return
        self._restart_pending = False
        log.info("%s: new engine of %s running (pid %d, %d route(s))", self.name(), self.dev_name,
                 self._engine_pid, len(self._engine_routes()))

    def peers_synced(self) -> None:
        """The daemon has applied its first full listing of the leases: the routes an adopted
        engine had that no lease holds (a node that went while no daemon ran) are removed."""
        with self._lock:
            if not self._unconfirmed or self.engine is None:
                return
            try:
                self._replace_routes()
            except (control.EngineError, ValueError) as exc:
                log.warning("%s: pruning the adopted engine's routes failed: %s", self.name(), exc)
                return
            self._unconfirmed = False

    def _replace_routes(self) -> None:
        removed = self.engine.request("replace_routes",
                                      routes=control.routes_message(self._engine_routes())).get("removed") or []
        if removed:
            log.info("%s: removed engine route(s) no lease holds: %s", self.name(), ", ".join(removed))

    def _engine_routes(self) -> dict[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[str, str | None]]:
        """What the engine should hold: every peer (either family) through the tunnel that did not
        fail."""
        return {s: (str(p.public_ip), p.mac) for s, p in self._peers.items()
                if not p.direct and s not in self._failed}

    def setup(self, lease: Lease) -> None:
        with self._lock:
            self.lease = lease
            try:
                if self.supports_direct_routing and self.config.backend.direct_routing:
                    if self.carries_ipv4:
                        self._l2_net = direct_routes.underlay_network(self.ipr, self.iface)
                    if self.has_ipv6:
                        self._l2_net6 = direct_routes.underlay_network(self.ipr, self.iface, v6=True)
                self._start()
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(f"{self.name()}: cannot set up {self.dev_name}: {exc}") from None
            self._start_supervisor()
            log.info("%s: %s up (engine %s in pid %d, %d worker(s), vnet_hdr=%s, port %d)", self.name(),
                     self.dev_name, self._engine_name, self._engine_pid, self.workers, self.vnet_hdr, self.port)
            if self.supports_direct_routing and self.config.backend.direct_routing:
                log.info("%s: DirectRouting for peers on %s", self.name(),
                         " and ".join(str(n) for n in (self._l2_net, self._l2_net6) if n) or "(unknown)")
            for peer in list(self._peers.values()):  # setup again after a lease change
                if peer.direct:
                    self._program(peer)

    # -- peers: an engine route, or (DirectRouting) a kernel route -----------------------------

    def is_direct(self, public_ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        l2_net = self._l2_net6 if public_ip.version == 6 else self._l2_net
        return self.supports_direct_routing and direct_routes.is_direct(self.config, l2_net, public_ip)

    def add_peer(self, lease: Lease) -> None:
        # the engine's route table holds no other (IPv6-only: the lease's IPv4 side is not used)
        if self.carries_ipv4 and not self.config.contains_subnet(lease.subnet):
            with self._lock:
                self._counters["peers_bad_backend_data"] += 1
            log.warning("peer %s: not a subnet of %s; skipped", lease.subnet, self.config.network)
            return
        super().add_peer(lease)

    def program(self, peer: Peer) -> None:
        if peer.direct:
            direct_routes.add_route(self.ipr, peer.subnet, peer.public_ip, self.iface.index)
            return
        if self.engine is None:
            return  # the engine gets every route when it starts
        try:
            self.engine.set_route(str(peer.subnet), str(peer.public_ip), peer.mac)
        except control.EngineError as exc:  # kept: resync or the engine's restart programs it
            self._counters["peer_errors"] += 1
            log.warning("peer %s: %s (resync or the engine's restart programs it)", peer.subnet, exc)

    def unprogram(self, peer: Peer) -> None:
        if peer.direct:
            direct_routes.del_route(self.ipr, peer.subnet, peer.public_ip, self.iface.index)
        elif self.engine is not None:
            try:
                self.engine.remove_route(str(peer.subnet))
            except ValueError:
                pass  # it had none; an EngineError counts (resync's full table removes it)

    def replaced(self, old: Peer, new: Peer) -> None:
        """Across the DirectRouting boundary the new path is in: the old one goes (an engine
        route, or the direct route; the Network route through the TUN takes over)."""
        if old.direct != new.direct:
            self.unprogram(old)

    def resync_device(self) -> bool:
        """Reopen everything if the TUN was deleted; else put back its address and the Network
        route, and give the engine the full route table (a route lost on the way comes back)."""
        try:
            idx = self.link_index(self.dev_name)
            if idx is None:
                log.warning("%s vanished; reopening it", self.dev_name)
                self._stop()
                self._start()
                self._counters["device_recreated"] += 1
            else:
                restored = self._ensure_addr_route(idx)
                if restored:
                    self._counters["entries_restored"] += len(restored)
                    log.info("%s: restored %s", self.dev_name, ", ".join(restored))
                if self.engine is not None and not self._unconfirmed:
                    self._replace_routes()
        except Exception as exc:
            log.warning("%s resync failed: %s", self.name(), exc)
        return True

    def snapshot(self) -> set[tuple]:
        present: set[tuple] = set()
        for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
            if any(p.direct and p.subnet.version == version for p in self._peers.values()):
                present |= direct_routes.main_routes(self.ipr, family)
        return present

    def missing(self, peer: Peer, present: set[tuple]) -> tuple[str, ...]:
        if peer.direct and direct_routes.route_key(peer.subnet, peer.public_ip, self.iface.index) not in present:
            return ("direct route",)
        return ()

    def teardown(self) -> None:
        """Stop the engine (the TUN goes with it), then the direct routes."""
        self._closing.set()
        with self._lock:
            self._stop()
        super().teardown()

    def extra_stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.supports_direct_routing:
            out["peers_direct"] = float(sum(1 for p in self._peers.values() if p.direct))
        if self.engine is not None:
            try:
                for k, v in self.engine.stats().items():
                    out[k] = float(v)
            except (control.EngineError, ValueError) as exc:  # no numbers rather than zeros
                log.debug("engine stats: %s", exc)
        if self._engine_pid is not None:
            out["engine_pid"] = float(self._engine_pid)
        for i, tid in self._worker_threads:
            usage = _thread_usage(self._engine_pid, tid)
            if usage is None:
                continue
            for key, value in zip(("tun_read_bytes", "tun_write_bytes", "cpu_seconds"), usage):
                name = f"worker{i}_{key}"
                out[name] = out.get(name, 0.0) + float(value)
        return out
