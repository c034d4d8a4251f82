"""``host-gw/kernel``: flannel's host-gw backend, one plain kernel route per peer.

Each peer subnet is routed via the peer's PublicIP on the underlay interface
(``ip route replace 10.244.2.0/24 via 198.18.0.2 dev eth0``). No encapsulation, so the MTU is the
underlay's. It needs every node on one L2 segment, and PublicIP must be the interface's own
address: behind NAT the route's gateway would be unreachable, so ``setup`` refuses, as flannel does.

As flannel's ``route_network.go``: a route to the same destination through another gateway or
device is removed before ours goes in, and ``resync`` puts back routes that vanished. Removal
deletes exactly our route (destination, gateway and device must all match).

The source guard (opt-in, weftd ``--source-guard``, ``BackendOptions.source_guard``):
``weft_hostgw_guard`` (fastpath/bpf/hostgw_guard.c, fastpath/bpf/guard.py) on the underlay
interface's ingress drops, counted by reason, every IPv4 packet whose source is in the Network but
whose frame does not come from the MAC of the PublicIP holding that source's lease: one LPM and one
FIB lookup per packet, no per-peer rule. Its maps follow the leases. It needs the peer's MAC in the
neighbour table, so a peer's PublicIP is resolved (ARP) when its lease arrives and on resync when
the table has no valid entry for it. Without it, as flannel, host-gw forwards whatever arrives.

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
NTF_USE = 0x01  # neighbour "use": create the entry if needed and start resolving it
# NUD_PERMANENT | NUD_NOARP | NUD_REACHABLE | NUD_PROBE | NUD_STALE | NUD_DELAY: a usable MAC
NUD_VALID = 0x80 | 0x40 | 0x02 | 0x10 | 0x04 | 0x08


class HostGWKernelBackend(NetlinkBackend):
    wire_type = "host-gw"
    dataplane = "kernel"
    source_guard = "optional"

    def __init__(self, config: NetworkConfig, iface: ExternalInterface,
                 options: BackendOptions = BackendOptions()):
        super().__init__(config, iface, options)
        self.lease: Lease | None = None
        self._peers: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}
        self._failed: set[ipaddress.IPv4Network] = set()
        self._counters = {"entries_restored": 0, "peer_errors": 0, "conflicts_removed": 0}
        self._guard_wanted = options.source_guard
        self.guard = None  # fastpath.bpf.guard.HostGWGuard when the source guard is on

    def close(self) -> None:
        """Release the netlink socket and the guard's fds (an attached guard keeps working)."""
        if self.guard is not None:
            self.guard.close()
        super().close()

    def setup(self, lease: Lease) -> None:
        if self.iface.address != self.iface.public_ip:
            have = self.iface.address if self.iface.address is not None else "no IPv4 address"
            raise BackendError(f"host-gw backend requires the public IP ({self.iface.public_ip}) "
                               f"to be the address of interface {self.iface.name} ({have})")
        with self._lock:
            self.lease = lease
            for subnet in list(self._peers):
                self._program(subnet)
            self._setup_guard(lease)

    def _new_guard(self):
        from fastpath.bpf.guard import HostGWGuard
        return HostGWGuard(self.ipr, self.iface.name, self.iface.index, self.config.network,
                           self.iface.address)

    def _setup_guard(self, lease: Lease) -> None:
        """Start the source guard when asked; otherwise remove one a previous run left on the
        underlay interface (its maps would no longer follow the leases)."""
        from fastpath.bpf.guard import CLSACT_INGRESS, detach_filter
        if not self._guard_wanted:
            try:
                if detach_filter(self.ipr, self.iface.index, CLSACT_INGRESS):
                    log.info("removed a stale source guard filter from %s", self.iface.name)
            except Exception as exc:
                log.warning("removing a stale filter from %s failed: %s", self.iface.name, exc)
            return
        from fastpath.bpf import BpfUnavailable
        if self.guard is None:
            self.guard = self._new_guard()
        try:
            self.guard.start(lease.subnet)
        except BpfUnavailable as exc:
            raise BackendError(f"host-gw/kernel source guard: {exc}") from None
        except Exception as exc:
            raise BackendError(f"host-gw/kernel source guard on {self.iface.name}: {exc}") from None
        for gw in set(self._peers.values()):
            self._resolve(gw)

    def _resolve(self, ip: ipaddress.IPv4Address) -> None:
        """Ask the kernel to resolve a peer's PublicIP on the underlay interface (an ARP request
        when it has no entry), so that the guard knows the MAC its packets must come from."""
        try:
            self.ipr.neigh("replace", dst=str(ip), ifindex=self.iface.index, flags=NTF_USE)
        except Exception as exc:
            log.debug("resolving %s on %s failed: %s", ip, self.iface.name, exc)

    def _resolve_missing(self) -> None:
        """Resolve the PublicIPs of the peers that have no valid neighbour entry (resync)."""
        valid = set()
        for n in self.ipr.neigh("dump", ifindex=self.iface.index, family=socket.AF_INET):
            if n["ifindex"] == self.iface.index and n["state"] & NUD_VALID:
                valid.add(n.get("NDA_DST"))
        for gw in set(self._peers.values()):
            if str(gw) not in valid:
                self._resolve(gw)

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
            if self.guard is not None or self._guard_wanted:
                self._guard_put(lease)

    def _guard_put(self, lease: Lease) -> None:
        if self.guard is None:
            self.guard = self._new_guard()
        try:
            self.guard.put(lease.subnet, lease.attrs.public_ip)
        except Exception as exc:
            self._counters["peer_errors"] += 1
            log.warning("peer %s: source guard map update failed, resync retries: %s", lease.subnet, exc)
        if self.guard.progs is not None:
            self._resolve(lease.attrs.public_ip)

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
            if self.guard is not None:
                try:
                    self.guard.delete(lease.subnet)
                except Exception as exc:
                    log.warning("peer %s: source guard map update failed: %s", lease.subnet, exc)
            self._delete(lease.subnet, gw if gw is not None else lease.attrs.public_ip)

    def resync(self) -> None:
        with self._lock:
            if self.lease is None:
                return
            if self.guard is not None:
                try:
                    self.guard.resync()
                    self._resolve_missing()
                except Exception as exc:
                    log.warning("source guard resync failed: %s", exc)
            if not self._peers:
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
            if self.guard is not None:
                self.guard.stop()
                self.guard = None
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
            if self.guard is not None:
                s.update(self.guard.stats())
            return {k: float(v) for k, v in s.items()}
