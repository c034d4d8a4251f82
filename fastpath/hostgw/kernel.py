"""``host-gw/kernel``: flannel's host-gw backend, one plain kernel route per peer.

Each peer subnet is routed via the peer's PublicIP on the underlay interface
(``ip route replace 10.244.2.0/24 via 198.18.0.2 dev eth0``). No encapsulation, so the MTU is the
underlay's. It needs every node on one L2 segment, and PublicIP must be the interface's own
address: behind NAT the route's gateway would be unreachable, so ``setup`` refuses, as flannel does.

As flannel's ``route_network.go``: a route to the same destination through another gateway or
device is removed before ours goes in, and ``resync`` puts back routes that vanished. Removal
deletes exactly our route (destination, gateway and device must all match).

Dual-stack (EnableIPv6, and the node has a PublicIPv6): each peer's IPv6 side is one more route,
``<peer subnet6> via <PublicIPv6> dev <underlay>`` (flannel's ``ip -6 route replace``), with the
same conflict removal, resync and removal rules, and PublicIPv6 must likewise be the interface's
own IPv6 address.

IPv6-only (EnableIPv4 false): only those IPv6 routes, and no check of the IPv4 PublicIP (flanneld's
0.0.0.0); the source guard (IPv4 only) is refused there (``fastpath.routing.GuardedRouting``).

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

import errno
import ipaddress
import logging
import socket

from controlplane.backends.base import BackendError
from controlplane.lease import Lease

from ..direct import MAIN_TABLE, route_key
from ..netlink import GONE, nl_errno
from ..routing import GuardedRouting, Peer

log = logging.getLogger("weft.backend.hostgw")

RTM_F_FIB_MATCH = 0x2000  # route get: return the FIB entry that matched, not a cloned route
MAX_CONFLICTS = 16  # routes to one destination removed per program(): a bound, not a limit met
NTF_USE = 0x01  # neighbour "use": create the entry if needed and start resolving it
# NUD_PERMANENT | NUD_NOARP | NUD_REACHABLE | NUD_PROBE | NUD_STALE | NUD_DELAY: a usable MAC
NUD_VALID = 0x80 | 0x40 | 0x02 | 0x10 | 0x04 | 0x08


class HostGWKernelBackend(GuardedRouting):
    """Each peer is one route ``<subnet> via <PublicIP> dev <underlay>`` (``Peer`` without a MAC)."""
    wire_type = "host-gw"
    dataplane = "kernel"
    COUNTERS = ("conflicts_removed",)

    def setup(self, lease: Lease) -> None:
        if not self.has_ipv4 and not self.has_ipv6:
            raise BackendError("host-gw backend: the network is IPv6-only (EnableIPv4 false) but this "
                               "node has no public IPv6 address")
        if self.has_ipv4 and self.iface.address != self.iface.public_ip:
            have = self.iface.address if self.iface.address is not None else "no IPv4 address"
            raise BackendError(f"host-gw backend requires the public IP ({self.iface.public_ip}) "
                               f"to be the address of interface {self.iface.name} ({have})")
        if self.has_ipv6 and self.iface.address6 != self.iface.public_ipv6:
            have = self.iface.address6 if self.iface.address6 is not None else "no IPv6 address"
            raise BackendError(f"host-gw backend requires the public IPv6 ({self.iface.public_ipv6}) "
                               f"to be the address of interface {self.iface.name} ({have})")
        with self._lock:
            self.lease = lease
            for peer in list(self._peers.values()):
                self._program(peer)
            self.setup_guard(lease)
            if self.guard is not None:
                for gw in {p.public_ip for p in self._peers.values() if p.public_ip.version == 4}:
                    self._resolve(gw)

    # -- the source guard needs each peer's MAC in the neighbour table -----------------------------

    def new_guard(self):
        from fastpath.bpf.guard import HostGWGuard
        return HostGWGuard(self.ipr, self.iface.name, self.iface.index, self.config.network,
                           self.iface.address)

    def _resolve(self, ip: ipaddress.IPv4Address) -> None:
        """Ask the kernel to resolve a peer's PublicIP on the underlay interface (an ARP request
        when it has no entry), so that the guard knows the MAC its packets must come from."""
        try:
            self.ipr.neigh("replace", dst=str(ip), ifindex=self.iface.index, flags=NTF_USE)
        except Exception as exc:
            log.debug("resolving %s on %s failed: %s", ip, self.iface.name, exc)

    def peer_added(self, peer: Peer) -> None:
        super().peer_added(peer)
        if self.guard is not None and self.guard.progs is not None and peer.subnet.version == 4:
            self._resolve(peer.public_ip)

    def resync_guard(self) -> None:
        """The guard's maps, and the PublicIPs of the peers without a valid neighbour entry."""
        if self.guard is None:
            return
        try:
            self.guard.resync()
            valid = set()
            for n in self.ipr.neigh("dump", ifindex=self.iface.index, family=socket.AF_INET):
                if n["ifindex"] == self.iface.index and n["state"] & NUD_VALID:
                    valid.add(n.get("NDA_DST"))
            for gw in {p.public_ip for p in self._peers.values() if p.public_ip.version == 4}:
                if str(gw) not in valid:
                    self._resolve(gw)
        except Exception as exc:
            log.warning("source guard resync failed: %s", exc)

    # -- peers -----------------------------------------------------------------------------------

    def _route_in_use(self, subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
                      ) -> tuple[str | None, int | None, int] | None:
        """(gateway, oif, priority) of the main-table route to exactly ``subnet`` that the kernel
        uses now (``ip route get <subnet> fibmatch``), or None: one lookup, where a dump of every
        route per peer would make programming N peers cost N dumps of N routes."""
        try:
            found = self.ipr.route("get", dst=str(subnet.network_address), flags=RTM_F_FIB_MATCH)
        except Exception as exc:
            if nl_errno(exc) in (errno.ENETUNREACH, errno.EHOSTUNREACH, *GONE):
                return None
            raise
        for r in found:
            if (r.get("RTA_TABLE", r["table"]) == MAIN_TABLE and r["dst_len"] == subnet.prefixlen
                    and r.get("RTA_DST") == str(subnet.network_address)):
                return r.get("RTA_GATEWAY"), r.get("RTA_OIF"), r.get("RTA_PRIORITY") or 0
        return None

    def _remove_conflict(self, subnet, r_gw: str | None, r_oif: int | None, prio: int) -> None:
        log.info("removing conflicting route %s via %s dev #%s", subnet, r_gw, r_oif)
        kw = {"gateway": r_gw} if r_gw else {}
        try:
            self.ipr.route("del", dst=str(subnet), oif=r_oif, priority=prio, **kw)
        except Exception as exc:
            if nl_errno(exc) not in GONE:
                raise
        self._counters["conflicts_removed"] += 1

    def program(self, peer: Peer) -> None:
        """Our route, after removing any other route to the same destination (flannel's rule):
        each one the kernel would use instead of ours goes, until ours (or none) is in use. One
        hidden behind ours (a higher metric, added later) goes at the next resync."""
        subnet, gw = peer.subnet, peer.public_ip
        for _ in range(MAX_CONFLICTS):
            in_use = self._route_in_use(subnet)
            if in_use is None or in_use[:2] == (str(gw), self.iface.index):
                break
            self._remove_conflict(subnet, *in_use)
        self.nl.route(True, subnet, gw, self.iface.index)
        self.nl.commit()

    def unprogram(self, peer: Peer) -> None:
        """Exactly our route: destination, gateway and device must all match."""
        self.nl.route(False, peer.subnet, peer.public_ip, self.iface.index)  # already gone is fine
        self.nl.commit()

    def replace(self, old: Peer, new: Peer) -> None:
        self._unprogram(old)  # another gateway: the old route is not ours to keep

    def snapshot(self) -> set[tuple]:
        """Our peers' routes present now, as ``(dst, dst_len, gateway, oif)``: one dump per family.
        The same dump sweeps conflicts: a route to a peer's subnet through another gateway or
        device, which ``program`` cannot see while ours is the one in use (a higher metric)."""
        peers = {(str(p.subnet.network_address), p.subnet.prefixlen): p for p in self._peers.values()}
        present = set()
        families = [family for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6))
                    if any(s.version == version for s in self._peers)]
        for family in families:
            for r in self.ipr.route("dump", family=family):
                peer = peers.get((r.get("RTA_DST"), r["dst_len"]))
                if peer is None or r.get("RTA_TABLE", r["table"]) != MAIN_TABLE:
                    continue
                gw, oif = r.get("RTA_GATEWAY"), r.get("RTA_OIF")
                if (gw, oif) == (str(peer.public_ip), self.iface.index):
                    present.add(route_key(peer.subnet, gw, oif))
                    continue
                try:
                    self._remove_conflict(peer.subnet, gw, oif, r.get("RTA_PRIORITY") or 0)
                except Exception as exc:
                    log.warning("removing a conflicting route to %s failed: %s", peer.subnet, exc)
        return present

    def missing(self, peer: Peer, present: set[tuple]) -> tuple[str, ...]:
        return () if route_key(peer.subnet, peer.public_ip, self.iface.index) in present else ("route",)
