"""What the userspace backends (``udp/fastpath``, ``udp/python``, ``vxlan/fastpath``) share.

A userspace backend is a TUN device plus a UDP socket with an engine between them:

- setup: open the TUN (``flannel0`` or ``flannel.<VNI>``; IFF_VNET_HDR and offloads for the
  compiled engine), give it ``<subnet network address>/32``, MTU = underlay MTU - overhead, a
  txqueuelen of 10,000 (the default 500 overflows under TCP load), IPv6 off, and one route for the
  whole Network through it; bind the UDP socket to the underlay address and the wire format's
  port; start the engine.
- add_peer / remove_peer: one ``engine.set_route`` / ``remove_route`` (constant time; the engine's
  threads keep running).
- resync: put back the address and the Network route if someone removed them; reopen everything
  if the device itself was deleted.
- teardown: stop the engine and close the fds; the TUN is not persistent, so it disappears with
  its address and routes. A daemon stopped without --teardown exits, which has the same effect:
  a userspace data plane cannot outlive its process. The lease (and so the subnet) survives.

Engine workers: ``WEFT_ENGINE_WORKERS`` (default 1) > 1 opens a multiqueue TUN and one
SO_REUSEPORT socket per queue, one worker (one thread) per queue. ``WEFT_ENGINE_BUSY_POLL_US``:
how long the compiled engine keeps polling after the last packet before it sleeps.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket

from controlplane.backends.base import BackendError, BackendOptions, ExternalInterface
from controlplane.config import NetworkConfig
from controlplane.lease import Lease

from ..netlink import GONE, NetlinkBackend, nl_errno, only_address
from .tun import open_tun

log = logging.getLogger("weft.backend.engine")

TXQUEUELEN = 10000
BUSY_POLL_US = 1000  # default of WEFT_ENGINE_BUSY_POLL_US: ping p50 ~110 -> ~65 us here (0: off)




class TunEngineBackend(NetlinkBackend):
    """Base of the userspace backends; subclasses set ``mode``, ``vnet_hdr`` and the engine."""
    mode = "udp"
    vnet_hdr = True

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
        self._peers: dict[ipaddress.IPv4Network, tuple[str, str | None]] = {}
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
            self.engine.start()
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
                self._start()
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(f"{self.name()}: cannot set up {self.dev_name}: {exc}") from None
            log.info("%s: %s up (engine %s, %d worker(s), vnet_hdr=%s, port %d)", self.name(),
                     self.dev_name, type(self.engine).__name__, self.workers, self.vnet_hdr, self.port)

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
            entry = (str(lease.attrs.public_ip), mac)
            self._peers[lease.subnet] = entry
            if self.engine is not None:
                try:
                    self.engine.set_route(str(lease.subnet), entry[0], mac or None)
                except ValueError as exc:
                    self._counters["peer_errors"] += 1
                    self._peers.pop(lease.subnet, None)
                    log.warning("peer %s: %s", lease.subnet, exc)

    def remove_peer(self, lease: Lease) -> None:
        with self._lock:
            if self._peers.pop(lease.subnet, None) is None:
                return
            if self.engine is not None:
                try:
                    self.engine.remove_route(str(lease.subnet))
                except ValueError:
                    pass

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
                    return
                restored = self._ensure_addr_route(idx)
                if restored:
                    self._counters["entries_restored"] += len(restored)
                    log.info("%s: restored %s", self.dev_name, ", ".join(restored))
            except Exception as exc:
                log.warning("%s resync failed: %s", self.name(), exc)

    def teardown(self) -> None:
        with self._lock:
            self._stop()
            self._peers.clear()
            self.lease = None
            self.close()

    def stats(self) -> dict[str, float]:
        with self._lock:
            out = {k: float(v) for k, v in self._counters.items()}
            out["peers_programmed"] = float(len(self._peers))
            if self.engine is not None:
                for k, v in self.engine.stats().items():
                    out[k] = float(v)
            return out
