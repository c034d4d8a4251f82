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
NUD_NOARP = 0x40
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
PARTS = ("neigh", "fdb", "route")  # a tunnelled peer's entries, in the order they go in


class VXLANKernelBackend(VxlanDevice, GuardedRouting):
    """A tunnelled peer is a neighbour, an FDB entry and an onlink route on flannel.N; a direct
    one (DirectRouting) a route via its PublicIP on the underlay interface."""
    wire_type = "vxlan"
    dataplane = "kernel"
    COUNTERS = ("device_recreated", "tx_csum_off_failed")
    _l2_net: ipaddress.IPv4Network | None = None  # the underlay's own subnet, read at setup

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
            self.setup_guard(lease)

    def new_guard(self):
        from fastpath.bpf.guard import SourceGuard
        return SourceGuard(self.ipr, self.iface.name, self.iface.index, self.config.network,
                           self.vni, self.port, self.local, self.iface.public_ip)

    def guard_start_args(self, lease: Lease) -> tuple:
        return (lease.subnet, self.vtep_mac)

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
        idx = self.ensure_vxlan_device(
            self._device_compatible, "has other settings (VNI, port, local address or link)",
            vxlan_id=self.vni, vxlan_link=self.iface.index, vxlan_local=str(self.local),
            vxlan_port=self.port)
        if self.options.flags.get("vxlan_tx_csum_off"):
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

    def is_direct(self, public_ip: ipaddress.IPv4Address) -> bool:
        return direct_routes.is_direct(self.config, self._l2_net, public_ip)

    def _entries(self, peer: Peer, idx: int) -> dict[str, tuple]:
        """A tunnelled peer's entries on flannel.N: part -> (netlink call, how it is put in, the
        keys that delete it)."""
        gateway, ip = str(peer.subnet.network_address), str(peer.public_ip)
        return {"neigh": (self.ipr.neigh, {"lladdr": peer.mac, "state": NUD_PERMANENT},
                          {"ifindex": idx, "dst": gateway}),
                "fdb": (self.ipr.fdb, {"state": NUD_PERMANENT | NUD_NOARP, "flags": NTF_SELF},
                        {"ifindex": idx, "lladdr": peer.mac, "dst": ip}),
                "route": (self.ipr.route, {"flags": RTNH_F_ONLINK},
                          {"dst": str(peer.subnet), "gateway": gateway, "oif": idx})}

    def _change(self, peer: Peer, parts: tuple[str, ...], put: bool) -> None:
        """Put in (neigh, fdb, route, in that order) or delete (route first; already gone is
        fine) ``parts`` of a peer's entries; a direct peer has only its route."""
        if peer.direct:
            if "route" in parts:
                change = direct_routes.add_route if put else direct_routes.del_route
                change(self.ipr, peer.subnet, peer.public_ip, self.iface.index)
            return
        idx = self.link_index(self.dev_name)
        if idx is None:
            if put:
                raise BackendError(f"{self.dev_name} does not exist")
            return
        entries = self._entries(peer, idx)
        for part in PARTS if put else reversed(PARTS):
            if part in parts:
                call, extra, keys = entries[part]
                if put:
                    call("replace", **keys, **extra)
                else:
                    ignore_gone(call, "del", **keys)

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
        try:
            if self.link_index(self.dev_name) is None:
                log.warning("%s vanished; recreating it", self.dev_name)
                self._ensure_device()
                self._counters["device_recreated"] += 1
        except Exception as exc:
            log.warning("vxlan resync failed: %s", exc)
            return False
        return super().resync_device()

    def snapshot(self) -> tuple[set, set, set, int | None]:
        """(routes, neighbours, fdb entries) as sets of comparable tuples, and flannel.N's index."""
        ipr = self.ipr
        idx = self.link_index(self.dev_name)
        neigh, fdb = set(), set()
        if idx is not None:
            for n in ipr.neigh("dump", ifindex=idx, family=socket.AF_INET):
                if n["ifindex"] == idx and n["state"] & NUD_PERMANENT:
                    neigh.add((n.get("NDA_DST"), (n.get("NDA_LLADDR") or "").lower()))
            for f in ipr.fdb("dump", ifindex=idx):
                if f["ifindex"] == idx:
                    fdb.add(((f.get("NDA_LLADDR") or "").lower(), f.get("NDA_DST")))
        return direct_routes.main_routes(ipr), neigh, fdb, idx

    def missing(self, peer: Peer, present) -> tuple[str, ...]:
        routes, neigh, fdb, idx = present
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
        idx = self.link_index(self.dev_name)
        if idx is not None:
            ignore_gone(self.ipr.link, "del", index=idx)

    def extra_stats(self) -> dict[str, float]:
        s = super().extra_stats()
        s["peers_direct"] = float(sum(1 for p in self._peers.values() if p.direct))
        return s
