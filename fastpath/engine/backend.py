"""What the userspace backends (``udp/fastpath``, ``udp/python``, ``vxlan/fastpath``) share.

A userspace backend is a TUN device plus a UDP socket with an engine between them:

- setup: open the TUN (``flannel0`` or ``flannel.<VNI>``; IFF_VNET_HDR and offloads for the
  compiled engine), give it ``<subnet network address>/32``, MTU = underlay MTU - overhead, a
  txqueuelen of 10,000 (the default 500 overflows under TCP load), IPv6 off, and one route for the
  whole Network through it; bind the UDP socket to the underlay address and the wire format's
  port; start the engine.
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
- teardown: stop the engine and close the fds; the TUN is not persistent, so it disappears with
  its address and routes; the direct routes on the underlay interface are removed. A daemon
  stopped without --teardown exits, which has the same effect on the TUN (a userspace data plane
  cannot outlive its process) but leaves the direct routes, as vxlan/kernel leaves its entries.
  The lease (and so the subnet) survives.

Engine workers: ``WEFT_ENGINE_WORKERS`` (default 1) > 1 opens a multiqueue TUN and one
SO_REUSEPORT socket per queue, one worker (one thread) per queue. ``WEFT_ENGINE_BUSY_POLL_US``:
how long the compiled engine keeps polling after the last packet before it sleeps.

``stats``: the engine's counters (summed over its workers), and per worker ``worker<i>_*``: the
bytes its thread read from the TUN (what it encapsulated and sent), the bytes it wrote to the TUN
(what it received and decapsulated) and its CPU seconds, from the kernel's per-thread accounting
(``/proc/self/task/<tid>/io`` and ``stat``), so the spread over workers is visible in /metrics.
Which worker carries what: the TUN hands a flow to the queue that last wrote a packet of it (its
"automq"), else to a hash of it; the kernel hands a datagram to one SO_REUSEPORT socket by a hash
of its outer addresses and ports, which are fixed between two userspace nodes (both ends use the
wire format's port), so all traffic from one such peer arrives at one worker.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import threading

from controlplane.backends.base import BackendError, BackendOptions, ExternalInterface
from controlplane.config import NetworkConfig
from controlplane.lease import Lease

from .. import direct as direct_routes
from ..netlink import GONE, NetlinkBackend, nl_errno, only_address
from .tun import open_tun

log = logging.getLogger("weft.backend.engine")

TXQUEUELEN = 10000
# Default of WEFT_ENGINE_BUSY_POLL_US (0: off). Long enough to catch the answer to a packet just
# forwarded (the pinned request/response round trip through two engines is ~43 us; with 0 it is
# ~150 us, every hop a wake-up), short enough not to spin through idle time under load: measured
# in the bench lab, 1000 us cost ~0.03 core-s/Gbit more (the receiving engine spent ~40 % of its
# time in sched_yield) for no gain in throughput or ping RTT; 50-200 us all kept the 43 us.
BUSY_POLL_US = 100
CLK_TCK = os.sysconf("SC_CLK_TCK")
_ENGINE_THREAD = re.compile(r"^weft-engine-[a-z]+(\d+)$")  # the compiled engine's thread names


def _thread_usage(tid: int) -> tuple[int, int, float] | None:
    """(bytes read, bytes written, CPU seconds) of one of this process's threads; None when gone."""
    try:
        with open(f"/proc/self/task/{tid}/io") as f:
            io = dict(line.split(": ", 1) for line in f.read().splitlines() if ": " in line)
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (OSError, ValueError):
        return None
    try:
        # after "pid (comm)": state is fields[0], utime and stime are fields 14 and 15 of stat(5)
        return int(io["rchar"]), int(io["wchar"]), (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (KeyError, IndexError, ValueError):
        return None




class TunEngineBackend(NetlinkBackend):
    source_guard = "builtin"  # both engines drop a sender that holds no lease, or spoofs its source
    """Base of the userspace backends; subclasses set ``mode``, ``vnet_hdr`` and the engine."""
    mode = "udp"
    vnet_hdr = True
    supports_direct_routing = False  # Backend.DirectRouting (flannel: vxlan only)

    def __init__(self, config: NetworkConfig, iface: ExternalInterface,
                 options: BackendOptions = BackendOptions()):
        super().__init__(config, iface, options)
        self.port = config.backend.effective_port
        self.vni = config.backend.vni
        self.local = iface.address or iface.public_ip
        self.lease: Lease | None = None
        self.engine = None
        self.tun_fds: list[int] = []
        self.socks: list[socket.socket] = []
        self.workers = max(1, int(os.environ.get("WEFT_ENGINE_WORKERS", "1") or 1))
        self.busy_poll_us = max(0, int(os.environ.get("WEFT_ENGINE_BUSY_POLL_US", str(BUSY_POLL_US)) or 0))
        self._peers: dict[ipaddress.IPv4Network, tuple[str, str | None]] = {}  # engine routes
        self._direct: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}  # direct routes
        self._direct_failed: set[ipaddress.IPv4Network] = set()
        self._l2_net: ipaddress.IPv4Network | None = None
        self._worker_threads: list[tuple[int, int]] = []  # (worker index, thread id)
        self._counters = {"peers_bad_backend_data": 0, "peer_errors": 0, "entries_restored": 0,
                          "device_recreated": 0}

    # -- to override ---------------------------------------------------------------------------
    @property
    def dev_name(self) -> str:
        raise NotImplementedError

    def engine_class(self):
        raise NotImplementedError

    def engine_kwargs(self) -> dict:
        return {}

    def peer_mac(self, lease: Lease) -> str | None:
        """The MAC a peer's packets are addressed to; None when its lease lacks a required one."""
        return ""

    # -- netlink -------------------------------------------------------------------------------

    def _dev_index(self) -> int | None:
        found = self.ipr.link_lookup(ifname=self.dev_name)
        return found[0] if found else None

    def _configure_device(self) -> int:
        ipr = self.ipr
        idx = self._dev_index()
        if idx is None:
            raise BackendError(f"{self.name()}: TUN {self.dev_name} vanished right after it was opened")
        ipr.link("set", index=idx, mtu=self.mtu, txqlen=TXQUEUELEN)
        try:
            with open(f"/proc/sys/net/ipv6/conf/{self.dev_name}/disable_ipv6", "w") as f:
                f.write("1")
        except OSError:
            pass
        ipr.link("set", index=idx, state="up")
        self._ensure_addr_route(idx)
        return idx

    def _ensure_addr_route(self, idx: int) -> list[str]:
        """Exactly <subnet>.0/32 on the TUN and the Network routed through it; what was missing."""
        ipr = self.ipr
        missing = []
        if only_address(ipr, idx, str(self.lease.subnet.network_address)):
            missing.append("address")
        net = self.config.network
        found = False
        for r in ipr.route("dump", family=socket.AF_INET):
            if (r.get("RTA_DST") == str(net.network_address) and r["dst_len"] == net.prefixlen
                    and r.get("RTA_OIF") == idx and r.get("RTA_TABLE", r["table"]) == 254):
                found = True
                break
        if not found:
            ipr.route("replace", dst=str(net), oif=idx)
            missing.append("route")
        return missing

    # -- lifecycle -----------------------------------------------------------------------------
    def _remove_stale_device(self) -> None:
        """A device of our name that is not ours (a kernel vxlan device left by vxlan/kernel, a
        persistent TUN): it would hold our name or our UDP port."""
        idx = self._dev_index()
        if idx is not None:
            log.info("removing the existing %s before opening the TUN", self.dev_name)
            try:
                self.ipr.link("del", index=idx)
            except Exception as exc:
                if nl_errno(exc) not in GONE:
                    raise

    def _open_sockets(self) -> list[socket.socket]:
        socks = []
        try:
            for _ in range(self.workers):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                if self.workers > 1:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind((str(self.local), self.port))
        except OSError as exc:
            for s in socks:
                s.close()
            raise BackendError(f"{self.name()}: cannot bind UDP {self.local}:{self.port}: {exc.strerror}") from None
        return socks

    def _start(self) -> None:
        self._remove_stale_device()
        try:
            self.tun_fds = open_tun(self.dev_name, vnet_hdr=self.vnet_hdr, queues=self.workers)
        except OSError as exc:
            raise BackendError(f"{self.name()}: cannot open TUN {self.dev_name}: {exc.strerror} "
                               "(needs CAP_NET_ADMIN and /dev/net/tun)") from None
        try:
            self.socks = self._open_sockets()
            self._configure_device()
            cls = self.engine_class()
            tun = self.tun_fds if self.workers > 1 else self.tun_fds[0]
            sock = [s.fileno() for s in self.socks] if self.workers > 1 else self.socks[0].fileno()
            self.engine = cls(tun, sock, mode=self.mode, network=str(self.config.network),
                              subnet_len=self.config.subnet_len, local_subnet=str(self.lease.subnet),
                              port=self.port, workers=self.workers, mtu=self.mtu,
                              vnet_hdr=self.vnet_hdr, busy_poll_us=self.busy_poll_us,
                              **self.engine_kwargs())
            for subnet, (ip, mac) in self._peers.items():
                self.engine.set_route(str(subnet), ip, mac or None)
            before = set(threading.enumerate())
            self.engine.start()
            self._worker_threads = sorted(
                (int(m.group(1)), t.native_id) for t in threading.enumerate()
                if t not in before and t.native_id and (m := _ENGINE_THREAD.match(t.name)))
        except BaseException:
            self._stop()
            raise

    def _stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            close = getattr(self.engine, "close", None)
            if close is not None:
                close()
            self.engine = None
        self._worker_threads = []
        for fd in self.tun_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.tun_fds = []
        for s in self.socks:
            s.close()
        self.socks = []

    def setup(self, lease: Lease) -> None:
        with self._lock:
            self._stop()
            self.lease = lease
            try:
                if self.supports_direct_routing and self.config.backend.direct_routing:
                    self._l2_net = direct_routes.underlay_network(self.ipr, self.iface)
                self._start()
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(f"{self.name()}: cannot set up {self.dev_name}: {exc}") from None
            log.info("%s: %s up (engine %s, %d worker(s), vnet_hdr=%s, port %d)", self.name(),
                     self.dev_name, type(self.engine).__name__, self.workers, self.vnet_hdr, self.port)
            if self.supports_direct_routing and self.config.backend.direct_routing:
                log.info("%s: DirectRouting for peers on %s", self.name(), self._l2_net or "(unknown)")
            for subnet in list(self._direct):  # setup again after a lease change
                self._program_direct(subnet)

    # -- DirectRouting -------------------------------------------------------------------------

    def _is_direct(self, public_ip: ipaddress.IPv4Address) -> bool:
        return self.supports_direct_routing and direct_routes.is_direct(self.config, self._l2_net,
                                                                        public_ip)

    def _program_direct(self, subnet: ipaddress.IPv4Network) -> bool:
        """Put in the direct route of a peer in ``_direct``, then take out its engine route, if any.
        On failure: count, keep the engine route (if any), retry in resync."""
        try:
            direct_routes.add_route(self.ipr, subnet, self._direct[subnet], self.iface.index)
        except Exception as exc:  # pyroute2's NetlinkError
            self._counters["peer_errors"] += 1
            self._direct_failed.add(subnet)
            log.warning("peer %s (%s): direct route failed, will retry: %s", subnet,
                        self._direct[subnet], exc)
            return False
        self._direct_failed.discard(subnet)
        if self._peers.pop(subnet, None) is not None and self.engine is not None:
            try:
                self.engine.remove_route(str(subnet))
            except ValueError:
                pass
        return True

    def _remove_direct(self, subnet: ipaddress.IPv4Network, public_ip: ipaddress.IPv4Address) -> None:
        try:
            direct_routes.del_route(self.ipr, subnet, public_ip, self.iface.index)
        except Exception as exc:
            self._counters["peer_errors"] += 1
            log.warning("peer %s: removing direct route via %s failed: %s", subnet, public_ip, exc)

    def add_peer(self, lease: Lease) -> None:
        with self._lock:
            if self.lease is not None and lease.subnet == self.lease.subnet:
                return
            if not self.config.contains_subnet(lease.subnet):
                self._counters["peers_bad_backend_data"] += 1
                log.warning("peer %s: not a subnet of %s; skipped", lease.subnet, self.config.network)
                return
            mac = self.peer_mac(lease)
            if mac is None:
                self._counters["peers_bad_backend_data"] += 1
                return
            if self._is_direct(lease.attrs.public_ip):
                self._direct[lease.subnet] = lease.attrs.public_ip  # replaces any older gateway
                self._program_direct(lease.subnet)
                return
            entry = (str(lease.attrs.public_ip), mac)
            self._peers[lease.subnet] = entry
            if self.engine is not None:
                try:
                    self.engine.set_route(str(lease.subnet), entry[0], mac or None)
                except ValueError as exc:
                    self._counters["peer_errors"] += 1
                    self._peers.pop(lease.subnet, None)
                    log.warning("peer %s: %s", lease.subnet, exc)
                    return
            # through the tunnel now: a direct route from before goes (the Network route takes over)
            old = self._direct.pop(lease.subnet, None)
            self._direct_failed.discard(lease.subnet)
            if old is not None:
                self._remove_direct(lease.subnet, old)

    def remove_peer(self, lease: Lease) -> None:
        with self._lock:
            routed = self._peers.pop(lease.subnet, None)
            direct = self._direct.pop(lease.subnet, None)
            self._direct_failed.discard(lease.subnet)
            if routed is not None and self.engine is not None:
                try:
                    self.engine.remove_route(str(lease.subnet))
                except ValueError:
                    pass
            if direct is None and routed is None and self._is_direct(lease.attrs.public_ip):
                # Not programmed by us (e.g. before a restart): remove what its lease implies.
                direct = lease.attrs.public_ip
            if direct is not None:
                self._remove_direct(lease.subnet, direct)

    def resync(self) -> None:
        with self._lock:
            if self.lease is None:
                return
            try:
                idx = self._dev_index()
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
            except Exception as exc:
                log.warning("%s resync failed: %s", self.name(), exc)
            if self._direct:
                self._resync_direct()

    def _resync_direct(self) -> None:
        try:
            routes = direct_routes.main_routes(self.ipr)
        except Exception as exc:
            log.warning("%s resync of direct routes failed: %s", self.name(), exc)
            return
        for subnet, public_ip in list(self._direct.items()):
            if subnet in self._direct_failed:
                self._program_direct(subnet)
            elif direct_routes.route_key(subnet, public_ip, self.iface.index) not in routes:
                if self._program_direct(subnet):
                    self._counters["entries_restored"] += 1
                    log.info("peer %s: restored the direct route via %s", subnet, public_ip)

    def teardown(self) -> None:
        with self._lock:
            self._stop()
            for subnet, public_ip in self._direct.items():
                self._remove_direct(subnet, public_ip)
            self._direct.clear()
            self._direct_failed.clear()
            self._peers.clear()
            self.lease = None
            self.close()

    def stats(self) -> dict[str, float]:
        with self._lock:
            out = {k: float(v) for k, v in self._counters.items()}
            out["peers_programmed"] = float(len(set(self._peers)
                                                | (set(self._direct) - self._direct_failed)))
            if self.supports_direct_routing:
                out["peers_direct"] = float(len(self._direct))
                out["peers_failed"] = float(len(self._direct_failed))
            if self.engine is not None:
                for k, v in self.engine.stats().items():
                    out[k] = float(v)
            for i, tid in self._worker_threads:
                usage = _thread_usage(tid)
                if usage is None:
                    continue
                for key, value in zip(("tun_read_bytes", "tun_write_bytes", "cpu_seconds"), usage):
                    name = f"worker{i}_{key}"
                    out[name] = out.get(name, 0.0) + float(value)
            return out
