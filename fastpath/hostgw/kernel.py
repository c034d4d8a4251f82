"""``host-gw/kernel``: flannel's host-gw backend, one plain kernel route per peer.

Each peer subnet is routed via the peer's PublicIP on the underlay interface
(``ip route replace 10.244.2.0/24 via 198.18.0.2 dev eth0``). No encapsulation, so the MTU is the
underlay's. It needs every node on one L2 segment, and PublicIP must be the interface's own
address: behind NAT the route's gateway would be unreachable, so ``setup`` refuses, as flannel does.

As flannel's ``route_network.go``: a route to the same destination through another gateway or
device is removed before ours goes in, and ``resync`` puts back routes that vanished. Removal
deletes exactly our route (destination, gateway and device must all match).

The same threading rules as ``vxlan/kernel`` apply: pyroute2's synchronous API, not from a thread
running an event loop; a lock serialises the methods.
"""
from __future__ import annotations

import ipaddress
import logging
import socket

from controlplane.backends.base import BackendError, BackendOptions, ExternalInterface
from controlplane.config import NetworkConfig
from controlplane.lease import Lease

from ..netlink import GONE, NetlinkBackend, nl_errno

log = logging.getLogger("weft.backend.hostgw")

MAIN_TABLE = 254




class HostGWKernelBackend(NetlinkBackend):
    wire_type = "host-gw"
    dataplane = "kernel"

    def __init__(self, config: NetworkConfig, iface: ExternalInterface,
                 options: BackendOptions = BackendOptions()):
        super().__init__(config, iface, options)
        self.lease: Lease | None = None
        self._peers: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}
        self._failed: set[ipaddress.IPv4Network] = set()
        self._counters = {"entries_restored": 0, "peer_errors": 0, "conflicts_removed": 0}



    def setup(self, lease: Lease) -> None:
        if self.iface.address != self.iface.public_ip:
            have = self.iface.address if self.iface.address is not None else "no IPv4 address"
            raise BackendError(f"host-gw backend requires the public IP ({self.iface.public_ip}) "
                               f"to be the address of interface {self.iface.name} ({have})")
        with self._lock:
            self.lease = lease
            for subnet in list(self._peers):
                self._program(subnet)

    def _routes_to(self, subnet: ipaddress.IPv4Network) -> list[tuple[str | None, int | None, int]]:
        """(gateway, oif, priority) of every main-table route to exactly ``subnet``."""
        out = []
        for r in self.ipr.route("dump", family=socket.AF_INET):
            if (r.get("RTA_TABLE", r["table"]) == MAIN_TABLE and r["dst_len"] == subnet.prefixlen
                    and r.get("RTA_DST") == str(subnet.network_address)):
                out.append((r.get("RTA_GATEWAY"), r.get("RTA_OIF"), r.get("RTA_PRIORITY") or 0))
        return out

    def _program(self, subnet: ipaddress.IPv4Network) -> bool:
        gw = self._peers[subnet]
        ipr = self.ipr
        try:
            for r_gw, r_oif, prio in self._routes_to(subnet):
                if (r_gw, r_oif) == (str(gw), self.iface.index):
                    continue
                log.info("removing conflicting route %s via %s dev #%s", subnet, r_gw, r_oif)
                kw = {"gateway": r_gw} if r_gw else {}
                try:
                    ipr.route("del", dst=str(subnet), oif=r_oif, priority=prio, **kw)
                except Exception as exc:
                    if nl_errno(exc) not in GONE:
                        raise
                self._counters["conflicts_removed"] += 1
            ipr.route("replace", dst=str(subnet), gateway=str(gw), oif=self.iface.index)
        except Exception as exc:
            self._counters["peer_errors"] += 1
            self._failed.add(subnet)
            log.warning("peer %s (%s): route failed, will retry: %s", subnet, gw, exc)
            return False
        self._failed.discard(subnet)
        return True

    def add_peer(self, lease: Lease) -> None:
        with self._lock:
            if self.lease is not None and lease.subnet == self.lease.subnet:
                return
            old = self._peers.get(lease.subnet)
            self._peers[lease.subnet] = lease.attrs.public_ip
            if old is not None and old != lease.attrs.public_ip:
                self._delete(lease.subnet, old)
            self._program(lease.subnet)

    def _delete(self, subnet: ipaddress.IPv4Network, gw: ipaddress.IPv4Address) -> None:
        try:
            self.ipr.route("del", dst=str(subnet), gateway=str(gw), oif=self.iface.index)
        except Exception as exc:
            if nl_errno(exc) not in GONE:
                self._counters["peer_errors"] += 1
                log.warning("route %s via %s: removal failed: %s", subnet, gw, exc)

    def remove_peer(self, lease: Lease) -> None:
        with self._lock:
            gw = self._peers.pop(lease.subnet, None)
            self._failed.discard(lease.subnet)
            self._delete(lease.subnet, gw if gw is not None else lease.attrs.public_ip)

    def resync(self) -> None:
        with self._lock:
            if self.lease is None or not self._peers:
                return
            try:
                present = set()
                for r in self.ipr.route("dump", family=socket.AF_INET):
                    if r.get("RTA_TABLE", r["table"]) == MAIN_TABLE and r.get("RTA_DST"):
                        present.add((r.get("RTA_DST"), r["dst_len"], r.get("RTA_GATEWAY"),
                                     r.get("RTA_OIF")))
            except Exception as exc:
                log.warning("host-gw resync failed: %s", exc)
                return
            for subnet, gw in list(self._peers.items()):
                key = (str(subnet.network_address), subnet.prefixlen, str(gw), self.iface.index)
                if subnet in self._failed:
                    self._program(subnet)
                elif key not in present and self._program(subnet):
                    self._counters["entries_restored"] += 1
                    log.info("route %s via %s recovered", subnet, gw)

    def teardown(self) -> None:
        with self._lock:
            for subnet, gw in list(self._peers.items()):
                self._delete(subnet, gw)
            self._peers.clear()
            self._failed.clear()
            self.lease = None
        self.close()

    def stats(self) -> dict[str, float]:
        with self._lock:
            s = dict(self._counters)
            s["peers_programmed"] = len(self._peers) - len(self._failed)
            s["peers_failed"] = len(self._failed)
            return {k: float(v) for k, v in s.items()}
