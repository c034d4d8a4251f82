"""``vxlan/kernel``: flannel's vxlan backend, programmed through the kernel's VXLAN device.

Design notes (after flannel's ``pkg/backend/vxlan/vxlan.go``):

- One device, ``flannel.<VNI>``: VXLAN id VNI, UDP port 8472 (``Backend.Port``), source address the
  underlay interface's address, bound to that interface, learning off. It holds
  ``<our subnet's network address>/32`` and has MTU = underlay MTU - 50.
- Nothing is learnt and nothing is asked for. flannel's first version answered the kernel's L2MISS
  and L3MISS netlink callouts from userspace, the second only L2MISS; both put a round trip to the
  daemon on the first packet to every peer and lost packets while it was away. Like flannel today
  we program everything statically, three entries per peer, as soon as its lease is seen:

    1. neighbour ``<peer subnet>.0 lladdr <peer VtepMAC> nud permanent`` on flannel.N;
    2. FDB entry ``<peer VtepMAC> dst <peer PublicIP> self permanent`` on flannel.N;
    3. route ``<peer subnet> via <peer subnet>.0 dev flannel.N onlink``.

  The order matters: the route goes last, so by the time the kernel can pick it both the inner
  neighbour (VtepMAC for the gateway) and the outer destination (VtepMAC -> PublicIP) are known and
  it never has to ARP or flood. Removal is the reverse (route first). ``onlink`` is needed because
  ``<peer subnet>.0`` is in no prefix on flannel.N, whose only address is a /32.
- The VTEP MAC is part of the lease (``BackendData.VtepMAC``) and peers pin it in their static
  entries, so it must survive restarts: it comes from the previous lease, else the existing
  device, else it is a new random locally administered unicast MAC.
- ``DirectRouting``: a peer whose PublicIP is on our underlay interface's own L2 subnet gets a plain
  route via its PublicIP (host-gw style) and no neighbour or FDB entry (``fastpath/direct.py``,
  shared with ``vxlan/fastpath``).
- The source guard (opt-in, weftd ``--source-guard``, ``BackendOptions.source_guard``): ``weft_from_underlay``
  (fastpath/bpf/guard.py) on the underlay interface's ingress drops, counted by reason, every
  datagram to our VXLAN port whose outer source is not the PublicIP of the lease that holds its
  inner source (and malformed ones), before the kernel's VXLAN device sees it: one hash and one LPM
  lookup per datagram, no per-peer rule. Without it, as flannel, the device takes any datagram.
- A peer whose VtepMAC or PublicIP changes gets its stale FDB/neighbour entries removed before the
  new ones go in. ``resync`` re-adds any entry of a known peer that someone removed, and recreates
  the device if it vanished (flannel's link watcher does the same on RTM_DELLINK).

All netlink work goes through one pyroute2 ``IPRoute`` in the calling process's network namespace.
pyroute2's synchronous API runs its own asyncio loop, so these methods must not be called from a
thread that is running an event loop (use ``asyncio.to_thread``). A lock serialises them.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import shutil
import socket
import subprocess
from dataclasses import dataclass

from controlplane.backends.base import BackendError, BackendOptions, ExternalInterface
from controlplane.config import NetworkConfig
from controlplane.lease import Lease

from .. import direct as direct_routes
from ..netlink import NetlinkBackend, ignore_gone, nl_errno, only_address, set_mac_and_mtu
from .vtep import VtepIdentity, parse_unicast_mac

log = logging.getLogger("weft.backend.vxlan")

NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
# Errors that mean "already gone" when deleting.
@dataclass(frozen=True)
class _Peer:
    """What one peer lease is programmed as."""
    subnet: ipaddress.IPv4Network
    public_ip: ipaddress.IPv4Address
    mac: str | None  # None: direct route
    direct: bool

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address




class VXLANKernelBackend(VtepIdentity, NetlinkBackend):
    wire_type = "vxlan"
    dataplane = "kernel"
    source_guard = "optional"

    def __init__(self, config: NetworkConfig, iface: ExternalInterface,
                 options: BackendOptions = BackendOptions()):
        super().__init__(config, iface, options)
        self._init_vxlan_device(config, iface)
        self._l2_net: ipaddress.IPv4Network | None = None
        self._peers: dict[ipaddress.IPv4Network, _Peer] = {}
        self._failed: set[ipaddress.IPv4Network] = set()
        self._counters = {"entries_restored": 0, "peers_bad_backend_data": 0, "peer_errors": 0,
                          "device_recreated": 0, "tx_csum_off_failed": 0}
        self._guard_wanted = options.source_guard
        self.guard = None  # fastpath.bpf.guard.SourceGuard when the source guard is on

    # -- netlink plumbing -------------------------------------------------------------------------



    def close(self) -> None:
        """Release the netlink socket and the guard's fds (an attached guard keeps working)."""
        if self.guard is not None:
            self.guard.close()
        super().close()

    def _dev_index(self) -> int | None:
        found = self.ipr.link_lookup(ifname=self.dev_name)
        return found[0] if found else None


    # -- lease and device -------------------------------------------------------------------------

    def setup(self, lease: Lease) -> None:
        with self._lock:
            self._adopt_mac(lease)
            self.lease = lease
            try:
                self._l2_net = direct_routes.underlay_network(self.ipr, self.iface)
                self._ensure_device()
            except BackendError:
                raise
            except Exception as exc:  # pyroute2's NetlinkError, an OSError
                raise BackendError(f"vxlan: cannot set up {self.dev_name} on {self.iface.name}: "
                                   f"{exc}") from None
            for peer in list(self._peers.values()):  # setup again after a lease change
                self._program(peer)
            self._setup_guard(lease)

    def _setup_guard(self, lease: Lease) -> None:
        """Start the source guard when asked; otherwise remove one a previous run left on the
        underlay interface (its maps would no longer follow the leases)."""
        from fastpath.bpf.guard import CLSACT_INGRESS, SourceGuard, detach_filter
        if not self._guard_wanted:
            try:
                if detach_filter(self.ipr, self.iface.index, CLSACT_INGRESS):
                    log.info("removed a stale weft_from_underlay filter from %s", self.iface.name)
            except Exception as exc:
                log.warning("removing a stale filter from %s failed: %s", self.iface.name, exc)
            return
        from fastpath.bpf import BpfUnavailable
        if self.guard is None:
            self.guard = SourceGuard(self.ipr, self.iface.name, self.iface.index, self.config.network,
                                     self.vni, self.port, self.local, self.iface.public_ip)
        try:
            self.guard.start(lease.subnet, self.vtep_mac)
        except BpfUnavailable as exc:
            raise BackendError(f"vxlan/kernel source guard: {exc}") from None
        except Exception as exc:
            raise BackendError(f"vxlan/kernel source guard on {self.iface.name}: {exc}") from None

    def _device_compatible(self, msg) -> bool:
        info = msg.get("IFLA_LINKINFO")
        if info is None or info.get("IFLA_INFO_KIND") != "vxlan":
            return False
        data = info.get("IFLA_INFO_DATA")
        if data is None:
            return False
        return (data.get("IFLA_VXLAN_ID") == self.vni
                and data.get("IFLA_VXLAN_PORT") == self.port
                and data.get("IFLA_VXLAN_LOCAL") == str(self.local)
                and data.get("IFLA_VXLAN_LINK") == self.iface.index
                and not data.get("IFLA_VXLAN_LEARNING"))

    def _ensure_device(self) -> int:
        """Create (or fix, or recreate) flannel.N; return its index."""
        ipr = self.ipr
        idx = self._dev_index()
        if idx is not None and not self._device_compatible(ipr.link("get", index=idx)[0]):
            log.info("%s exists with other settings (VNI, port, local address or link); recreating",
                     self.dev_name)
            ignore_gone(ipr.link, "del", index=idx)
            idx = None
        if idx is None:
            try:
                ipr.link("add", ifname=self.dev_name, kind="vxlan", vxlan_id=self.vni,
                         vxlan_link=self.iface.index, vxlan_local=str(self.local),
                         vxlan_port=self.port, vxlan_learning=0)
            except Exception as exc:
                if nl_errno(exc) != errno.EEXIST:
                    raise
            idx = self._dev_index()
            if idx is None:
                raise BackendError(f"vxlan: {self.dev_name} vanished right after it was created")
        link = ipr.link("get", index=idx)[0]
        set_mac_and_mtu(ipr, idx, link, self.vtep_mac, self.mtu)
        # Exactly one IPv4 address: <subnet network address>/32 (flannel removes any other).
        only_address(ipr, idx, str(self.lease.subnet.network_address))
        ipr.link("set", index=idx, state="up")
        if self.options.vxlan_tx_csum_off:
            self._tx_csum_off()
        return idx

    def _tx_csum_off(self) -> None:
        """flannel's workaround for broken checksums: ``ethtool -K flannel.N tx-checksum-ip-generic off``."""
        feature = "tx-checksum-ip-generic"
        try:
            from pyroute2.ethtool import Ethtool
            with Ethtool() as et:
                feats = et.get_features(self.dev_name)
                if feats.features[feature].enable:
                    feats.features[feature].enable = False
                    et.set_features(self.dev_name, feats)
                if not et.get_features(self.dev_name).features[feature].enable:
                    return
        except Exception as exc:
            log.debug("pyroute2 ethtool failed on %s (%s); trying the ethtool tool", self.dev_name, exc)
        tool = shutil.which("ethtool") or "/usr/sbin/ethtool"
        try:
            res = subprocess.run([tool, "-K", self.dev_name, feature, "off"], capture_output=True,
                                 text=True, timeout=10)
            if res.returncode == 0:
                return
            reason = (res.stderr or res.stdout).strip().splitlines()[-1:] or [f"exit {res.returncode}"]
            reason = reason[0]
        except (OSError, subprocess.TimeoutExpired) as exc:
            reason = str(exc)
        self._counters["tx_csum_off_failed"] += 1
        log.warning("could not turn off tx checksum offload on %s: %s", self.dev_name, reason)

    # -- peers -------------------------------------------------------------------------------------

    def _decode(self, lease: Lease) -> _Peer | None:
        data = lease.attrs.backend_data
        raw = data.get("VtepMAC") if isinstance(data, dict) else None
        mac = parse_unicast_mac(raw)
        if mac is None:
            why = ("no BackendData object" if not isinstance(data, dict)
                   else "no VtepMAC" if raw is None else f"VtepMAC {raw!r} is not a unicast MAC")
            self._counters["peers_bad_backend_data"] += 1
            log.warning("peer %s (%s): bad vxlan BackendData (%s); skipped",
                        lease.subnet, lease.attrs.public_ip, why)
            return None
        direct = direct_routes.is_direct(self.config, self._l2_net, lease.attrs.public_ip)
        return _Peer(lease.subnet, lease.attrs.public_ip, None if direct else mac, direct)

    def add_peer(self, lease: Lease) -> None:
        with self._lock:
            if self.lease is not None and lease.subnet == self.lease.subnet:
                return
            peer = self._decode(lease)
            if peer is None:
                return
            old = self._peers.get(peer.subnet)
            if old is not None and old != peer:
                try:
                    self._remove_stale(old, peer)
                except Exception as exc:
                    log.warning("peer %s: removing stale entries failed: %s", peer.subnet, exc)
            self._peers[peer.subnet] = peer
            self._program(peer)
            if self.guard is not None or self._guard_wanted:
                self._guard_put(lease)

    def _guard_put(self, lease: Lease) -> None:
        from fastpath.bpf.guard import SourceGuard
        if self.guard is None:
            self.guard = SourceGuard(self.ipr, self.iface.name, self.iface.index, self.config.network,
                                     self.vni, self.port, self.local, self.iface.public_ip)
        mac = parse_unicast_mac(lease.attrs.backend_data.get("VtepMAC"))
        try:
            self.guard.put(lease.subnet, lease.attrs.public_ip, mac)
        except Exception as exc:
            self._counters["peer_errors"] += 1
            log.warning("peer %s: source guard map update failed, resync retries: %s", lease.subnet, exc)

    def _program(self, peer: _Peer) -> bool:
        """neigh, fdb, route, in that order; on failure roll back neigh/fdb, count, retry in resync."""
        try:
            self._apply(peer)
        except Exception as exc:
            self._counters["peer_errors"] += 1
            self._failed.add(peer.subnet)
            log.warning("peer %s (%s): programming failed, will retry: %s",
                        peer.subnet, peer.public_ip, exc)
            if not peer.direct:
                try:
                    self._unapply(peer, route=False)
                except Exception:
                    pass
            return False
        self._failed.discard(peer.subnet)
        return True

    def _apply(self, peer: _Peer, parts: tuple[str, ...] = ("neigh", "fdb", "route")) -> None:
        ipr = self.ipr
        if peer.direct:
            if "route" in parts:
                direct_routes.add_route(ipr, peer.subnet, peer.public_ip, self.iface.index)
            return
        idx = self._dev_index()
        if idx is None:
            raise BackendError(f"{self.dev_name} does not exist")
        if "neigh" in parts:
            ipr.neigh("replace", ifindex=idx, dst=str(peer.gateway), lladdr=peer.mac,
                      state=NUD_PERMANENT)
        if "fdb" in parts:
            ipr.fdb("replace", ifindex=idx, lladdr=peer.mac, dst=str(peer.public_ip),
                    state=NUD_PERMANENT | NUD_NOARP, flags=NTF_SELF)
        if "route" in parts:
            ipr.route("replace", dst=str(peer.subnet), gateway=str(peer.gateway), oif=idx,
                      flags=RTNH_F_ONLINK)

    def _unapply(self, peer: _Peer, route: bool = True, fdb: bool = True, neigh: bool = True) -> None:
        """Delete a peer's entries (route first); entries already gone are fine."""
        ipr = self.ipr
        if peer.direct:
            if route:
                direct_routes.del_route(ipr, peer.subnet, peer.public_ip, self.iface.index)
            return
        idx = self._dev_index()
        if idx is None:
            return
        if route:
            ignore_gone(ipr.route, "del", dst=str(peer.subnet), gateway=str(peer.gateway),
                              oif=idx)
        if fdb:
            ignore_gone(ipr.fdb, "del", ifindex=idx, lladdr=peer.mac, dst=str(peer.public_ip))
        if neigh:
            ignore_gone(ipr.neigh, "del", ifindex=idx, dst=str(peer.gateway))

    def _remove_stale(self, old: _Peer, new: _Peer) -> None:
        if old.direct and not new.direct:
            return  # the onlink route replaces the direct one
        if not old.direct and new.direct:
            self._unapply(old, route=False)  # the direct route replaces the onlink one
            return
        if not old.direct and (old.mac != new.mac or old.public_ip != new.public_ip):
            # The neighbour (same IP) is replaced in place; the old MAC's FDB entry is not.
            self._unapply(old, route=False, neigh=False)

    def remove_peer(self, lease: Lease) -> None:
        with self._lock:
            peer = self._peers.pop(lease.subnet, None)
            self._failed.discard(lease.subnet)
            if self.guard is not None:
                try:
                    self.guard.delete(lease.subnet)
                except Exception as exc:
                    log.warning("peer %s: source guard map update failed: %s", lease.subnet, exc)
            if peer is None:
                # Not programmed by us (bad data, or before a restart): remove what its lease implies.
                data = lease.attrs.backend_data
                mac = parse_unicast_mac(data.get("VtepMAC")) if isinstance(data, dict) else None
                if mac is None:
                    return
                direct = direct_routes.is_direct(self.config, self._l2_net, lease.attrs.public_ip)
                peer = _Peer(lease.subnet, lease.attrs.public_ip, None if direct else mac, direct)
            try:
                self._unapply(peer)
            except Exception as exc:
                self._counters["peer_errors"] += 1
                log.warning("peer %s: removal failed: %s", lease.subnet, exc)

    # -- resync, teardown, stats ------------------------------------------------------------------

    def _present(self) -> tuple[set, set, set]:
        """(routes, neighbours, fdb entries) as sets of comparable tuples."""
        ipr = self.ipr
        idx = self._dev_index()
        routes = direct_routes.main_routes(ipr)
        neigh, fdb = set(), set()
        if idx is not None:
            for n in ipr.neigh("dump", ifindex=idx, family=socket.AF_INET):
                if n["ifindex"] == idx and n["state"] & NUD_PERMANENT:
                    neigh.add((n.get("NDA_DST"), (n.get("NDA_LLADDR") or "").lower()))
            for f in ipr.fdb("dump", ifindex=idx):
                if f["ifindex"] == idx:
                    fdb.add(((f.get("NDA_LLADDR") or "").lower(), f.get("NDA_DST")))
        return routes, neigh, fdb

    def resync(self) -> None:
        with self._lock:
            if self.lease is None:
                return
            try:
                if self._dev_index() is None:
                    log.warning("%s vanished; recreating it", self.dev_name)
                    self._ensure_device()
                    self._counters["device_recreated"] += 1
                routes, neigh, fdb = self._present()
                idx = self._dev_index()
            except Exception as exc:
                log.warning("vxlan resync failed: %s", exc)
                return
            if self.guard is not None:
                try:
                    self.guard.resync()
                except Exception as exc:
                    log.warning("source guard resync failed: %s", exc)
            for subnet, peer in list(self._peers.items()):
                if subnet in self._failed:
                    self._program(peer)
                    continue
                missing = []
                if peer.direct:
                    key = direct_routes.route_key(subnet, peer.public_ip, self.iface.index)
                    if key not in routes:
                        missing.append("route")
                else:
                    if (str(peer.gateway), peer.mac) not in neigh:
                        missing.append("neigh")
                    if (peer.mac, str(peer.public_ip)) not in fdb:
                        missing.append("fdb")
                    key = direct_routes.route_key(subnet, peer.gateway, idx)
                    if key not in routes:
                        missing.append("route")
                if not missing:
                    continue
                try:
                    self._apply(peer, tuple(missing))
                except Exception as exc:
                    self._counters["peer_errors"] += 1
                    self._failed.add(subnet)
                    log.warning("peer %s: restoring %s failed: %s", subnet, ", ".join(missing), exc)
                    continue
                self._counters["entries_restored"] += len(missing)
                log.info("peer %s: restored %s", subnet, ", ".join(missing))

    def teardown(self) -> None:
        with self._lock:
            if self.guard is not None:
                self.guard.stop()
                self.guard = None
            for peer in self._peers.values():
                if peer.direct:
                    try:
                        self._unapply(peer)
                    except Exception as exc:
                        log.warning("peer %s: removing direct route failed: %s", peer.subnet, exc)
            self._peers.clear()
            self._failed.clear()
            idx = self._dev_index()
            if idx is not None:
                ignore_gone(self.ipr.link, "del", index=idx)
            self.lease = None
        self.close()

    def stats(self) -> dict[str, float]:
        with self._lock:
            s = dict(self._counters)
            s["peers_programmed"] = len(self._peers) - len(self._failed)
            s["peers_failed"] = len(self._failed)
            s["peers_direct"] = sum(1 for p in self._peers.values() if p.direct)
            if self.guard is not None:
                s.update(self.guard.stats())
            return {k: float(v) for k, v in s.items()}
