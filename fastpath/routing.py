"""What the backends that program each peer lease (routes, neighbour/FDB entries, a BPF map) share.

``RoutingBackend`` keeps the lease-to-peer bookkeeping once: which ``Peer`` each subnet is
programmed as, which ones failed (``resync`` retries them), the counters, and the order of things
on add / remove / resync / teardown. A backend supplies only what a peer is (``decode``) and how
one is programmed (``program``), taken out (``unprogram``), switched over from an older version
of itself (``replace``) and checked (``snapshot`` + ``missing``), plus hooks for its device.

Dual-stack: a lease maps to up to two peers, its IPv4 side (``decode``) and, when this node and the
lease both have IPv6, its IPv6 side (``decode6``: ``Lease.subnet6`` via ``PublicIPv6``). Both are
kept in the same bookkeeping, keyed by ``Peer.subnet``; ``program`` etc. see ``peer.subnet.version``.
Each side is judged on its own: bad BackendV6Data skips (and counts) only the IPv6 side. A lease is
named by ``Lease.ident`` (its IPv4 subnet, or its IPv6 subnet when it is IPv6-only): ``remove_peer``
takes out both of its sides.

IPv6-only (EnableIPv4 false, ``has_ipv4`` False): no lease has an IPv4 side here, whatever it
carries (``decode`` is never asked): a lease with an IPv4 part on such a network (which the lease
judge refuses first) programs nothing IPv4. Likewise a lease without an IPv4 part (``Lease.has_ipv4``
False) has no IPv4 side on any network.

``GuardedRouting`` adds the opt-in source guard (weftd ``--source-guard``) of vxlan/kernel and
host-gw/kernel: a tc program on the underlay interface whose maps follow the same peers.

The daemon calls ``add_peer`` from its watch thread while its main loop calls ``resync``: one
re-entrant lock (``NetlinkBackend._lock``) serialises every method.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from controlplane.backends.base import BackendError, BackendOptions, BadBackendData, ExternalInterface
from controlplane.config import NetworkConfig
from controlplane.lease import Ident, Lease

from .netlink import NetlinkBackend

log = logging.getLogger("weft.backend")


@dataclass(frozen=True)
class Peer:
    """What one side (IPv4 or IPv6) of a peer lease is programmed as."""
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
    public_ip: ipaddress.IPv4Address | ipaddress.IPv6Address  # of the same family as subnet
    mac: str | None = None  # the VtepMAC its frames are addressed to (vxlan); None: host-gw
    direct: bool = False  # DirectRouting: a plain route via public_ip, nothing in the tunnel


class RoutingBackend(NetlinkBackend):
    RESTORED = "entries_restored"  # the counter of what resync put back
    COUNTERS: tuple[str, ...] = ()  # the backend's own counters, besides the ones kept here
    # stats()'s levels; the rest only grow (/metrics: counters)
    GAUGES = frozenset({"peers_programmed", "peers_failed", "peers6_programmed", "peers6_failed"})

    def __init__(self, config: NetworkConfig, iface: ExternalInterface,
                 options: BackendOptions = BackendOptions()):
        super().__init__(config, iface, options)
        self.lease: Lease | None = None
        self._peers: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, Peer] = {}
        self._failed: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
        self._v6_of: dict[Ident, ipaddress.IPv6Network] = {}  # lease (its ident) -> its v6 peer
        self._counters = dict.fromkeys(("peers_bad_backend_data", "peer_errors", self.RESTORED,
                                        *self.COUNTERS), 0)

    # -- what a backend supplies ----------------------------------------------------------------

    def decode(self, lease: Lease) -> Peer:
        """What ``lease`` is programmed as; BadBackendData when this data plane cannot use it."""
        return Peer(lease.subnet, lease.attrs.public_ip, direct=self.is_direct(lease.attrs.public_ip))

    def has_v4_side(self, lease: Lease) -> bool:
        """Whether ``lease`` has an IPv4 side here: this network carries IPv4 and the lease has an
        IPv4 part. Only then is ``decode`` asked, and only then is ``lease.subnet`` a subnet."""
        return self.has_ipv4 and lease.has_ipv4

    def decode6(self, lease: Lease) -> Peer | None:
        """The IPv6 side of ``lease``: None when this node has no IPv6 or the lease has no IPv6
        subnet or PublicIPv6; BadBackendData when this data plane cannot use its BackendV6Data."""
        if not self.has_ipv6 or lease.subnet6 is None or lease.attrs.public_ipv6 is None:
            return None
        return Peer(lease.subnet6, lease.attrs.public_ipv6, direct=self.is_direct(lease.attrs.public_ipv6))

    @property
    def has_ipv4(self) -> bool:
        """Whether this network carries IPv4 (False on an IPv6-only network: EnableIPv4 false)."""
        return self.config.enable_ipv4

    @property
    def has_ipv6(self) -> bool:
        """Whether this node carries IPv6 (EnableIPv6, and the daemon found a PublicIPv6)."""
        return self.config.enable_ipv6 and self.iface.public_ipv6 is not None

    def is_direct(self, public_ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return False

    def program(self, peer: Peer) -> None:
        """Put in every entry of ``peer`` (replacing what is there); raises on failure."""
        raise NotImplementedError

    def unprogram(self, peer: Peer) -> None:
        """Take out every entry of ``peer``; entries already gone are fine."""
        raise NotImplementedError

    def rollback(self, peer: Peer) -> None:
        """After ``program`` failed half way: take out what would misroute until resync retries."""

    def replace(self, old: Peer, new: Peer) -> None:
        """Before ``new`` is programmed for the same subnet: take out what of ``old`` it would not
        overwrite and must not outlive it (the new path goes in right after)."""

    def replaced(self, old: Peer, new: Peer) -> None:
        """After ``new`` was programmed for the same subnet: take out what is left of ``old`` (a
        backend whose old path must carry traffic until the new one is in uses this one)."""

    def snapshot(self) -> Any:
        """What is programmed now (one dump), for ``missing``."""
        return None

    def missing(self, peer: Peer, present: Any) -> tuple[str, ...]:
        """The parts of ``peer`` that ``present`` lacks, named for the log and ``restore``."""
        return ()

    def restore(self, peer: Peer, parts: tuple[str, ...]) -> None:
        self.program(peer)

    def resync_device(self) -> bool:
        """The backend's own part of resync, before its peers are checked; False: skip them."""
        return True

    def teardown_peer(self, peer: Peer) -> None:
        """At teardown, for each peer: by default its entries go (unless the device takes them)."""
        self.unprogram(peer)

    def teardown_device(self) -> None:
        """At teardown, after the peers: remove the backend's device, programs ..."""

    def peer_added(self, peer: Peer) -> None:
        """After ``peer`` was stored and programmed (or failed to be)."""

    def peer_removed(self, lease: Lease) -> None:
        """When ``lease``'s peer goes, before its entries are taken out."""

    def extra_stats(self) -> dict[str, float]:
        return {}

    # -- the bookkeeping ------------------------------------------------------------------------

    def _own(self, lease: Lease) -> bool:
        return self.lease is not None and lease.ident == self.lease.ident

    def _program(self, peer: Peer) -> bool:
        """Program ``peer``; on failure count it, roll back, and leave it to resync."""
        try:
            self.program(peer)
        except Exception as exc:  # pyroute2's NetlinkError, an OSError, a BackendError
            self._counters["peer_errors"] += 1
            self._failed.add(peer.subnet)
            log.warning("%s: peer %s (%s): programming failed, will retry: %s", self.name(),
                        peer.subnet, peer.public_ip, exc)
            try:
                self.rollback(peer)
            except Exception:
                pass
            return False
        self._failed.discard(peer.subnet)
        return True

    def _unprogram(self, peer: Peer) -> None:
        try:
            self.unprogram(peer)
        except Exception as exc:
            self._counters["peer_errors"] += 1
            log.warning("%s: peer %s: removal failed: %s", self.name(), peer.subnet, exc)

    def add_peer(self, lease: Lease) -> None:
        with self._lock:
            if self._own(lease):
                return
            if self.has_v4_side(lease):
                self._add_v4(lease)
            if self.has_ipv6 or lease.ident in self._v6_of:
                self._add_v6(lease)

    def _add_v4(self, lease: Lease) -> None:
        """The IPv4 side of ``add_peer``."""
        try:
            peer = self.decode(lease)
        except BadBackendData as exc:
            self._counters["peers_bad_backend_data"] += 1
            log.warning("%s: peer %s (%s): bad %s BackendData (%s); skipped", self.name(),
                        lease.subnet, lease.attrs.public_ip, self.wire_type, exc)
            old = self._peers.pop(lease.subnet, None)  # its lease no longer describes it
            self._failed.discard(lease.subnet)
            if old is not None:
                self._unprogram(old)
        else:
            self._put(peer)

    def _put(self, peer: Peer) -> None:
        """Store and program ``peer``, switching over from what its subnet was programmed as."""
        old = self._peers.get(peer.subnet)
        changed = old is not None and old != peer
        if changed:
            self._step_from(self.replace, old, peer)
        self._peers[peer.subnet] = peer
        if self._program(peer) and changed:
            self._step_from(self.replaced, old, peer)
        self.peer_added(peer)

    def _add_v6(self, lease: Lease) -> None:
        """The IPv6 side of ``add_peer``: judged apart from the IPv4 side, which stays as it is."""
        ident = lease.ident
        try:
            peer = self.decode6(lease)
        except BadBackendData as exc:
            self._counters["peers_bad_backend_data"] += 1
            log.warning("%s: peer %s (%s): bad %s BackendV6Data (%s); its IPv6 side skipped",
                        self.name(), lease.subnet6, lease.attrs.public_ipv6, self.wire_type, exc)
            self._drop_v6(ident)
            return
        if peer is not None and self._own6(peer):
            log.warning("%s: peer %s claims our IPv6 subnet %s; its IPv6 side skipped", self.name(),
                        lease.shown, peer.subnet)
            peer = None
        if peer is None or self._v6_of.get(ident, peer.subnet) != peer.subnet:
            self._drop_v6(ident)  # no IPv6 side any more, or another IPv6 subnet
        if peer is None:
            return
        if peer.subnet in self._peers and ident not in self._v6_of:
            # Another lease held that subnet before (a store that let two leases claim it): this
            # one has it now, and that one's removal must not take it out.
            for other, subnet6 in list(self._v6_of.items()):
                if subnet6 == peer.subnet:
                    del self._v6_of[other]
        self._v6_of[ident] = peer.subnet
        self._put(peer)

    def _drop_v6(self, ident: Ident) -> None:
        """Take out the IPv6 peer of the lease named ``ident``, if it has one."""
        subnet6 = self._v6_of.pop(ident, None)
        if subnet6 is None:
            return
        self._failed.discard(subnet6)
        old = self._peers.pop(subnet6, None)
        if old is not None:
            self._unprogram(old)

    def _own6(self, peer: Peer) -> bool:
        return self.lease is not None and peer.subnet == self.lease.subnet6

    def _step_from(self, step, old: Peer, new: Peer) -> None:
        try:
            step(old, new)
        except Exception as exc:
            log.warning("%s: peer %s: removing stale entries failed: %s", self.name(), new.subnet, exc)

    def remove_peer(self, lease: Lease) -> None:
        with self._lock:
            if self._own(lease):
                return
            v4 = self.has_v4_side(lease)
            peer = self._peers.pop(lease.subnet, None) if v4 else None
            if v4:
                self._failed.discard(lease.subnet)
            subnet6 = self._v6_of.pop(lease.ident, None)
            peer6 = self._peers.pop(subnet6, None) if subnet6 is not None else None
            self._failed.discard(subnet6)
            self.peer_removed(lease)
            # Not programmed by us (bad data, or before a restart): remove what its lease implies.
            if peer is None and v4:
                try:
                    peer = self.decode(lease)
                except BadBackendData:
                    pass
            if peer6 is None and subnet6 is None:
                try:
                    peer6 = self.decode6(lease)
                except BadBackendData:
                    pass
                if peer6 is not None and (self._own6(peer6) or peer6.subnet in self._peers):
                    peer6 = None  # ours, or held by another lease now
            for side in (peer, peer6):
                if side is not None:
                    self._unprogram(side)

    def resync(self) -> None:
        """Put back what someone removed behind our back, and retry what failed."""
        with self._lock:
            if self.lease is None or not self.resync_device() or not self._peers:
                return
            try:
                present = self.snapshot()
            except Exception as exc:
                log.warning("%s resync failed: %s", self.name(), exc)
                return
            for subnet, peer in list(self._peers.items()):
                if subnet in self._failed:
                    self._program(peer)
                    continue
                parts = self.missing(peer, present)
                if not parts:
                    continue
                try:
                    self.restore(peer, parts)
                except Exception as exc:
                    self._counters["peer_errors"] += 1
                    self._failed.add(subnet)
                    log.warning("%s: peer %s: restoring %s failed: %s", self.name(), subnet,
                                ", ".join(parts), exc)
                    continue
                self._counters[self.RESTORED] += len(parts)
                log.info("%s: peer %s: restored %s", self.name(), subnet, ", ".join(parts))

    def teardown(self) -> None:
        with self._lock:
            for peer in self._peers.values():
                try:
                    self.teardown_peer(peer)
                except Exception as exc:
                    log.warning("%s: peer %s: removal failed: %s", self.name(), peer.subnet, exc)
            self._peers.clear()
            self._failed.clear()
            self._v6_of.clear()
            self.teardown_device()
            self.lease = None
        self.close()

    def stats(self) -> dict[str, float]:
        with self._lock:
            s = {k: float(v) for k, v in self._counters.items()}
            for version, key, carried in ((4, "peers", self.has_ipv4), (6, "peers6", self.has_ipv6)):
                if not carried:
                    continue  # an IPv4-only node has no IPv6 numbers (rather than zeros), and vice versa
                held = sum(1 for subnet in self._peers if subnet.version == version)
                failed = sum(1 for subnet in self._failed if subnet.version == version)
                s[f"{key}_programmed"] = float(held - failed)
                s[f"{key}_failed"] = float(failed)
            s.update(self.extra_stats())
            return s


class GuardedRouting(RoutingBackend):
    """A RoutingBackend with the opt-in source guard (declared ``source_guard="optional"``): weftd
    ``--source-guard`` attaches ``new_guard()`` (fastpath/bpf/guard.py) to the underlay interface's
    ingress at setup, its maps follow the peers, and without the flag a guard a previous run left
    there is removed (its maps would no longer follow the leases).

    The guard checks IPv4 packets only (its maps hold IPv4 subnets and PublicIPs): on an IPv6-only
    network it would guard nothing, so asking for it there is refused when the backend is made,
    before any lease or device."""
    GAUGES = RoutingBackend.GAUGES | {"guard_peer_ips", "guard_peers"}  # the guard's map sizes

    def __init__(self, config: NetworkConfig, iface: ExternalInterface,
                 options: BackendOptions = BackendOptions()):
        super().__init__(config, iface, options)
        if options.source_guard and not self.has_ipv4:
            raise BackendError(f"{self.name()}: --source-guard checks IPv4 packets only; this network "
                               "is IPv6-only (EnableIPv4 false), so there is nothing for it to guard")
        self._guard_wanted = options.source_guard
        self.guard = None  # a fastpath.bpf.guard.SourceGuard while the source guard is on

    def new_guard(self):
        raise NotImplementedError

    def guard_start_args(self, lease: Lease) -> tuple:
        return (lease.subnet,)

    def setup_guard(self, lease: Lease) -> None:
        """Call at the end of setup."""
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
            self.guard = self.new_guard()
        try:
            self.guard.start(*self.guard_start_args(lease))
        except BpfUnavailable as exc:
            raise BackendError(f"{self.name()} source guard: {exc}") from None
        except Exception as exc:
            raise BackendError(f"{self.name()} source guard on {self.iface.name}: {exc}") from None

    def peer_added(self, peer: Peer) -> None:
        if self.guard is None and not self._guard_wanted:
            return
        if peer.subnet.version != 4:
            # The guard is an IPv4 guard: it checks IPv4 packets only (IPv6 ones pass it unchecked)
            # and its maps hold IPv4 subnets and PublicIPs, so a peer's IPv6 side stays out of it.
            return
        if self.guard is None:
            self.guard = self.new_guard()
        try:
            self.guard.put(peer.subnet, peer.public_ip, *([peer.mac] if peer.mac else []))
        except Exception as exc:
            self._counters["peer_errors"] += 1
            log.warning("peer %s: source guard map update failed, resync retries: %s", peer.subnet, exc)

    def peer_removed(self, lease: Lease) -> None:
        if self.guard is not None and self.has_v4_side(lease):
            try:
                self.guard.delete(lease.subnet)
            except Exception as exc:
                log.warning("peer %s: source guard map update failed: %s", lease.subnet, exc)

    def resync_guard(self) -> None:
        if self.guard is not None:
            try:
                self.guard.resync()
            except Exception as exc:
                log.warning("source guard resync failed: %s", exc)

    def resync_device(self) -> bool:
        self.resync_guard()
        return True

    def teardown(self) -> None:
        with self._lock:
            if self.guard is not None:
                self.guard.stop()
                self.guard = None
        super().teardown()

    def close(self) -> None:
        """Release the netlink socket and the guard's fds (an attached guard keeps working)."""
        if self.guard is not None:
            self.guard.close()
        super().close()

    def extra_stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.guard.stats().items()} if self.guard is not None else {}
