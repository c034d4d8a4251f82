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
- Dual-stack (EnableIPv6, and the node has a PublicIPv6): a second device ``flannel-v6.<VNI>``, as
  flannel's: same VNI and port, source address the interface's IPv6 address, learning off, its own
  VtepMAC (``BackendV6Data``, kept across restarts like the IPv4 one), ``<our subnet6's network
  address>/128`` (no DAD), MTU 20 bytes below flannel.N's (the IPv6 outer header). Each peer's IPv6
  side gets the same three entries there: neighbour ``<peer subnet6 network address> lladdr <its
  v6 VtepMAC>``, FDB ``<v6 VtepMAC> dst <PublicIPv6>``, route ``<peer subnet6> via <its network
  address> dev flannel-v6.N onlink``; with DirectRouting, a peer whose PublicIPv6 is on the
  underlay's IPv6 subnet gets ``<peer subnet6> via <PublicIPv6> dev <underlay>`` instead. resync
  and teardown cover it as flannel.N. A node without IPv6 removes a flannel-v6.N left by a run with it.
- IPv6-only (EnableIPv4 false): flannel-v6.<VNI> is the only device, as flanneld's; no flannel.<VNI>
  (one a run with IPv4 left goes, its routes with it), and no IPv4 route, neighbour or FDB entry. The
  source guard (IPv4 only) is refused there (``fastpath.routing.GuardedRouting``).

All netlink work goes through one pyroute2 ``IPRoute`` in the calling process's network namespace.
pyroute2's synchronous API runs its own asyncio loop, so these methods must not be called from a
thread that is running an event loop (use ``asyncio.to_thread``). A lock serialises them.
"""
from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
import subprocess

from controlplane.backends.base import BackendError
from controlplane.lease import Lease

from .. import direct as direct_routes
from ..netlink import ignore_gone
from ..routing import GuardedRouting, Peer
from .vtep import VxlanDevice

log = logging.getLogger("weft.backend.vxlan")

NUD_PERMANENT = 0x80
PARTS = ("neigh", "fdb", "route")  # a tunnelled peer's entries, in the order they go in


class VXLANKernelBackend(VxlanDevice, GuardedRouting):
    """A tunnelled peer is a neighbour, an FDB entry and an onlink route on flannel.N; a direct
    one (DirectRouting) a route via its PublicIP on the underlay interface."""
    wire_type = "vxlan"
    dataplane = "kernel"
    COUNTERS = ("device_recreated", "tx_csum_off_failed")
    GAUGES = GuardedRouting.GAUGES | {"peers_direct", "peers6_direct"}
    _l2_net: ipaddress.IPv4Network | None = None  # the underlay's own subnet, read at setup
    # Device name -> index as of setup or the last resync: a lookup per peer entry costs as much
    # as the entry. A device recreated meanwhile fails its peers until resync, which refreshes it.
    _dev_index: dict[str, int | None]
    _l2_net6: ipaddress.IPv6Network | None = None  # and its IPv6 subnet (dual-stack)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dev_index = {}

    # -- lease and device -------------------------------------------------------------------------

    def setup(self, lease: Lease) -> None:
        if self.has_ipv6 and lease.subnet6 is None:
            raise BackendError(f"vxlan: EnableIPv6 but lease {lease.subnet} has no IPv6 subnet")
        if not self.has_ipv4 and not self.has_ipv6:
            raise BackendError("vxlan: the network is IPv6-only (EnableIPv4 false) but this node has "
                               "no public IPv6 address")
        with self._lock:
            self._adopt_mac(lease)
            self.lease = lease
            dev = self.dev_name
            try:
                if self.has_ipv4:
                    self._l2_net = direct_routes.underlay_network(self.ipr, self.iface)
                    self._ensure_device()
                else:
                    self._remove_stale_device(self.dev_name, "IPv4")
                dev = self.dev6_name
                if self.has_ipv6:
                    self._l2_net6 = direct_routes.underlay_network(self.ipr, self.iface, v6=True)
                    self._ensure_device6()
                else:
                    self._remove_stale_device(self.dev6_name, "IPv6")
            except BackendError:
                raise
            except Exception as exc:  # pyroute2's NetlinkError, an OSError
                raise BackendError(f"vxlan: cannot set up {dev} on {self.iface.name}: {exc}") from None
            for peer in list(self._peers.values()):  # setup again after a lease change
                self._program(peer)
            self.setup_guard(lease)

    def new_guard(self):
        from fastpath.bpf.guard import SourceGuard
        return SourceGuard(self.ipr, self.iface.name, self.iface.index, self.config.network,
                           self.vni, self.port, self.local, self.iface.public_ip)

    def guard_start_args(self, lease: Lease) -> tuple:
        return (lease.subnet, self.vtep_mac)

    def _device_compatible(self, msg, v6: bool = False) -> bool:
        info = msg.get("IFLA_LINKINFO")
        if info is None or info.get("IFLA_INFO_KIND") != "vxlan":
            return False
        data = info.get("IFLA_INFO_DATA")
        if data is None:
            return False
        local = (data.get("IFLA_VXLAN_LOCAL6") == str(self.local6) if v6
                 else data.get("IFLA_VXLAN_LOCAL") == str(self.local))
        return (data.get("IFLA_VXLAN_ID") == self.vni
                and data.get("IFLA_VXLAN_PORT") == self.port
                and local
                and data.get("IFLA_VXLAN_LINK") == self.iface.index
                and not data.get("IFLA_VXLAN_LEARNING"))

    def _ensure_device(self) -> int:
        """Create (or fix, or recreate) flannel.N; return its index."""
        idx = self._dev_index[self.dev_name] = self.ensure_vxlan_device(
            self._device_compatible, "has other settings (VNI, port, local address or link)",
            vxlan_id=self.vni, vxlan_link=self.iface.index, vxlan_local=str(self.local),
            vxlan_port=self.port)
        if self.options.flags.get("vxlan_tx_csum_off"):
            self._tx_csum_off(self.dev_name)
        return idx

    def _ensure_device6(self) -> int:
        """Create (or fix, or recreate) flannel-v6.N; return its index."""
        if self.local6 is None:
            raise BackendError(f"vxlan: {self.dev6_name} needs an IPv6 address on {self.iface.name}")
        idx = self._dev_index[self.dev6_name] = self.ensure_vxlan_device(
            lambda msg: self._device_compatible(msg, v6=True),
            "has other settings (VNI, port, local IPv6 address or link)", v6=True,
            vxlan_id=self.vni, vxlan_link=self.iface.index, vxlan_local6=str(self.local6),
            vxlan_port=self.port)
        if self.options.flags.get("vxlan_tx_csum_off"):
            self._tx_csum_off(self.dev6_name)
        return idx

    def _remove_stale_device(self, name: str, family: str) -> None:
        """Without ``family`` (IPv4, IPv6) now: the device ``name`` a run with it left goes (and
        its routes with it)."""
        idx = self.link_index(name)
        if idx is not None:
            log.info("%s left by a run with %s; removing it", name, family)
            ignore_gone(self.ipr.link, "del", index=idx)

    def _tx_csum_off(self, dev: str) -> None:
        """flannel's workaround for broken checksums: ``ethtool -K <dev> tx-checksum-ip-generic off``."""
        feature = "tx-checksum-ip-generic"
        try:
            from pyroute2.ethtool import Ethtool
            with Ethtool() as et:
                feats = et.get_features(dev)
                if feats.features[feature].enable:
                    feats.features[feature].enable = False
                    et.set_features(dev, feats)
                if not et.get_features(dev).features[feature].enable:
                    return
        except Exception as exc:
            log.debug("pyroute2 ethtool failed on %s (%s); trying the ethtool tool", dev, exc)
        tool = shutil.which("ethtool") or "/usr/sbin/ethtool"
        try:
            res = subprocess.run([tool, "-K", dev, feature, "off"], capture_output=True,
                                 text=True, timeout=10)
            if res.returncode == 0:
                return
            reason = (res.stderr or res.stdout).strip().splitlines()[-1:] or [f"exit {res.returncode}"]
            reason = reason[0]
        except (OSError, subprocess.TimeoutExpired) as exc:
            reason = str(exc)
        self._counters["tx_csum_off_failed"] += 1
        log.warning("could not turn off tx checksum offload on %s: %s", dev, reason)

    # -- peers -------------------------------------------------------------------------------------

    def is_direct(self, public_ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return direct_routes.is_direct(self.config, self._l2_net6 if public_ip.version == 6 else self._l2_net,
                                       public_ip)

    def _dev(self, peer: Peer) -> str:
        """The device a tunnelled peer's entries are on: flannel.N, or flannel-v6.N for an IPv6 side."""
        return self.dev6_name if peer.subnet.version == 6 else self.dev_name

    def _change(self, peer: Peer, parts: tuple[str, ...], put: bool) -> None:
        """Put in (neigh, fdb, route, in that order) or delete (route first; already gone is
        fine) ``parts`` of a peer's entries, in one netlink batch; a direct peer has only its
        route."""
        if peer.direct:
            if "route" in parts:
                change = direct_routes.add_route if put else direct_routes.del_route
                change(self.ipr, peer.subnet, peer.public_ip, self.iface.index)
            return
        dev = self._dev(peer)
        idx = self._dev_index.get(dev)
        if idx is None:
            idx = self._dev_index[dev] = self.link_index(dev)
        if idx is None:
            if put:
                raise BackendError(f"{dev} does not exist")
            return
        gateway, nl = peer.subnet.network_address, self.nl
        entries = {"neigh": lambda: nl.neigh(put, idx, gateway, peer.mac),
                   "fdb": lambda: nl.fdb(put, idx, peer.mac, peer.public_ip),
                   "route": lambda: nl.route(put, peer.subnet, gateway, idx, onlink=True)}
        for part in PARTS if put else reversed(PARTS):
            if part in parts:
                entries[part]()
        nl.commit()

    def program(self, peer: Peer, parts: tuple[str, ...] = PARTS) -> None:
        self._change(peer, parts, put=True)

    restore = program

    def unprogram(self, peer: Peer, parts: tuple[str, ...] = PARTS) -> None:
        self._change(peer, parts, put=False)

    def rollback(self, peer: Peer) -> None:
        if not peer.direct:  # no neighbour or FDB entry without its route
            self.unprogram(peer, ("neigh", "fdb"))

    def replace(self, old: Peer, new: Peer) -> None:
        if old.direct:
            return  # the onlink route (or the new direct one) replaces the direct route
        if new.direct:
            self.unprogram(old, ("neigh", "fdb"))  # the direct route replaces the onlink one
        elif old.mac != new.mac or old.public_ip != new.public_ip:
            # The neighbour (same IP) is replaced in place; the old MAC's FDB entry is not.
            self.unprogram(old, ("fdb",))

    # -- resync, teardown, stats ------------------------------------------------------------------

    def resync_device(self) -> bool:
        self._dev_index.clear()  # a device recreated behind our back has a new index
        try:
            if self.has_ipv4 and self.link_index(self.dev_name) is None:
                log.warning("%s vanished; recreating it", self.dev_name)
                self._ensure_device()
                self._counters["device_recreated"] += 1
            if self.has_ipv6 and self.link_index(self.dev6_name) is None:
                log.warning("%s vanished; recreating it", self.dev6_name)
                self._ensure_device6()
                self._counters["device_recreated"] += 1
        except Exception as exc:
            log.warning("vxlan resync failed: %s", exc)
            return False
        return super().resync_device()

    def snapshot(self) -> dict[int, tuple[set, set, set, int | None]]:
        """Per IP version with peers: (routes, neighbours, fdb entries) as sets of comparable
        tuples, and the index of that version's device (flannel.N, flannel-v6.N)."""
        ipr = self.ipr
        out = {}
        for version, dev, family in ((4, self.dev_name, socket.AF_INET),
                                     (6, self.dev6_name, socket.AF_INET6)):
            if not any(subnet.version == version for subnet in self._peers):
                continue  # no peer of that version asks (an IPv6-only node: never version 4)
            idx = self.link_index(dev)
            neigh, fdb = set(), set()
            if idx is not None:
                for n in ipr.neigh("dump", ifindex=idx, family=family):
                    if n["ifindex"] == idx and n["state"] & NUD_PERMANENT:
                        neigh.add((n.get("NDA_DST"), (n.get("NDA_LLADDR") or "").lower()))
                for f in ipr.fdb("dump", ifindex=idx):
                    if f["ifindex"] == idx:
                        fdb.add(((f.get("NDA_LLADDR") or "").lower(), f.get("NDA_DST")))
            out[version] = (direct_routes.main_routes(ipr, family), neigh, fdb, idx)
        return out

    def missing(self, peer: Peer, present) -> tuple[str, ...]:
        routes, neigh, fdb, idx = present[peer.subnet.version]
        if peer.direct:
            key = direct_routes.route_key(peer.subnet, peer.public_ip, self.iface.index)
            return () if key in routes else ("route",)
        gateway = peer.subnet.network_address
        have = {"neigh": (str(gateway), peer.mac) in neigh,
                "fdb": (peer.mac, str(peer.public_ip)) in fdb,
                "route": direct_routes.route_key(peer.subnet, gateway, idx) in routes}
        return tuple(part for part in PARTS if not have[part])

    def teardown_peer(self, peer: Peer) -> None:
        if peer.direct:  # the tunnel's entries go with the device
            self.unprogram(peer)

    def teardown_device(self) -> None:
        for dev in (self.dev_name, self.dev6_name):
            idx = self.link_index(dev)
            if idx is not None:
                ignore_gone(self.ipr.link, "del", index=idx)

    def extra_stats(self) -> dict[str, float]:
        s = super().extra_stats()
        direct = [p.subnet.version for p in self._peers.values() if p.direct]
        if self.has_ipv4:
            s["peers_direct"] = float(direct.count(4))
        if self.has_ipv6:
            s["peers6_direct"] = float(direct.count(6))
        return s
