"""``vxlan/ebpf``: flannel's vxlan wire format, with BPF maps instead of per-peer kernel entries.

Design notes (Cilium's tunnel shape, wire-identical to ``vxlan/kernel``):

- One device, ``flannel.<VNI>``, in external (collect-metadata) mode on UDP port 8472
  (``Backend.Port``): it encapsulates with whatever tunnel key a program sets and decapsulates any
  VNI. Like flannel.N it holds ``<our subnet>.0/32`` (kernel peers' neighbour entries for that
  address name our VtepMAC), MTU = underlay MTU - 50, and the lease's VtepMAC. It is NOARP: the node
  has ONE route, the whole Network via flannel.N, and nothing ever ARPs on it.
- Peers live in one BPF LPM trie, ``weft_peers`` (peer subnet -> PublicIP, VNI, VtepMAC; our own
  subnet is there too, flagged local). Adding or removing a peer is one map update; there is no
  per-peer neighbour, FDB or route entry. 1,000 peers take milliseconds, not the ~1 s of netlink.
- Five tc programs (fastpath/bpf/, clsact direct-action):

  * ``weft_from_pods`` on the pod bridge's (cni0) ingress: pod traffic for a peer is encapsulated
    (tunnel key + inner MACs: dst = peer VtepMAC, src = ours) and redirected straight to
    flannel.N, skipping IP forwarding (the TTL is decremented in the program). Anything else
    (local, outside the Network, TTL 1, bigger than the overlay MTU (GSO: a segment), no peer)
    follows the stack, counted.
  * ``weft_from_pod_port`` on each learnt pod's host veth (a port of cni0), ingress: the same
    steps before the bridge, for the pod's own frames to its gateway (source = its learnt address
    on this port, destination MAC = the bridge's), so pod traffic to a peer skips the bridge, its
    netfilter hook (br_netfilter's conntrack) and cni0's receive; the rest goes on to the bridge
    (and weft_from_pods). Attached by the bridge watcher with the endpoints it learns, re-attached by
    resync; runtime switch ``CFG_POD_PORT``.
  * ``weft_to_overlay`` on flannel.N egress: what the stack routes into the overlay (the node's own
    traffic; pod traffic before cni0 exists) gets the same treatment; a miss is dropped, counted.
  * ``weft_from_overlay`` on flannel.N ingress: a FIB lookup finds the local pod; a pod the
    bridge watcher learnt (``weft_endpoints``: pod IP -> host veth, MAC), whose MAC the kernel's
    neighbour entry confirms, gets the frame through ``bpf_redirect_peer`` (straight into its
    namespace: no bridge, no backlog queue); otherwise the frame is redirected to the bridge
    (``bpf_redirect_neigh`` while the neighbour is unresolved). Not for a local pod: the stack.
    First (``CFG_RX_CHECK``) the frame's tunnel key must name a peer that holds the inner source.
  * ``weft_from_underlay`` on the underlay interface's (``-iface``) ingress: every UDP datagram to
    our VXLAN port is checked before the kernel's UDP and VXLAN code sees it (outer source a peer's
    PublicIP: one hash lookup; that peer holds the inner source: one LPM lookup; VXLAN header, VNI,
    inner MACs, lengths) and counted in exactly one counter: ``underlay_passed`` or a drop reason.
    ``weft_peer_ips`` (PublicIP -> subnets held) follows ``weft_peers``.

  The outer UDP checksum is on, as on a VXLAN device created the way flannel creates it (udpcsum is
  the kernel's default and flannel does not change it); tests/test_ebpf_e2e.py compares the
  outer headers of both data planes on the wire. Runtime switches (each redirect, TTL, checksum)
  are bits of the ``weft_config`` map, never compile flags; so is every per-node value.
- Loading: bcc and LLVM run in a short-lived child (``python -m fastpath.bpf.loader``) that
  compiles once and passes the program and map fds back; weftd itself only does bpf(2) calls (its
  RSS stays that of vxlan/kernel, and the compile is bounded by a timeout).
- A watcher thread looks at the pod bridge every second: attaches ``weft_from_pods`` when cni0
  appears (the CNI plugin makes it, maybe after weftd) and relearns ``weft_endpoints`` from the
  bridge's neighbour and FDB tables. resync (every 10 s) re-creates the device, re-attaches
  missing programs and restores map entries removed behind our back.
- Restart: SIGTERM leaves the device and the attached programs (and so their maps) in place. The
  new weftd reads the old programs' peer map, puts those peers into its new maps *before*
  replacing the filters (no packet lost), and its first resync drops inherited peers that no lease
  re-added.
- Counters: per-CPU arrays ``weft_counters`` and ``weft_drops`` (one slot per drop reason), summed
  when ``stats()`` is called: /metrics shows ``weft_backend_tx_packets_total``, ``..._drops_no_peer_total`` ...
- ``weftctl peermap`` (run in the node's namespace) prints the live map: it finds the program on
  flannel.N's egress with ``tc`` and opens that program's maps by id (no bpffs pin, which the
  private mount namespace of ``ip netns exec`` would hide from other processes).
- Teardown removes our filters from the underlay interface and cni0 (by priority and handle) and
  the device (its filters and the Network route go with it); the maps go with the last reference.
- Dual-stack (EnableIPv6, the node has a PublicIPv6): the same device carries IPv6 too (an external
  device sends over whichever underlay family the tunnel key names), wire-compatible with a kernel
  peer's ``flannel-v6.<VNI>``: IPv6 pod packets travel in VXLAN over the IPv6 underlay between
  PublicIPv6 addresses, same VNI and port, inner MACs = the IPv6 VtepMACs of BackendV6Data. A
  lease's IPv6 side is one ``weft_peers6`` entry (IPv6 subnet -> PublicIPv6, VNI, IPv6 VtepMAC;
  ``weft_peer_ips6`` beside it); every program takes the IPv6 branch only for an IPv6 frame, so the
  IPv4 path does the same work as before. The device gets ``<subnet6 network address>/128`` (the
  source of the node's own traffic, as on flannel-v6.N) and one route, the IPv6Network with MTU
  ``mtu - 20`` (the outer IPv6 header is 20 bytes longer: bigger pod packets meet the stack, which
  answers Packet Too Big). Our IPv6 VtepMAC is the previous lease's (kept across restarts), else
  the device's MAC; a different one (a lease vxlan/kernel made) works too: frames for it that
  go up the stack get the device's MAC. Pods resolve their IPv6 gateway (cni0's address) by
  neighbour discovery with the bridge, as before; received IPv6 takes the same paths as IPv4:
  bpf_redirect_peer for a pod in ``weft_endpoints6`` (learnt from the bridge's IPv6 neighbours),
  else the FIB redirect (bpf_redirect_neigh resolves the pod), else the stack.
- IPv6-only (EnableIPv4 false): the same device carries IPv6 alone, wire-compatible with an
  IPv6-only kernel peer's ``flannel-v6.<VNI>`` (flanneld makes no flannel.<VNI> there). Nothing IPv4
  is programmed: weft_config's IPv4 network and netmask stay zero (every program then leaves IPv4
  alone), weft_peers, weft_peer_ips and weft_endpoints stay empty, and the device has no IPv4
  address and no IPv4 route. Its MAC is the IPv6 VtepMAC (the lease's only one, BackendV6Data).
  A node without a public IPv6 address cannot join (setup says so in one line).
- A Network (or IPv6Network) of length 0 is refused: a zero netmask tells the programs that the
  node has no such family.
- Not done: DirectRouting (every peer goes through the tunnel).

bcc or kernel headers missing: setup raises BackendError naming the fix, never a traceback.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading

from controlplane.backends.base import BackendError, BackendOptions, ExternalInterface
from controlplane.config import NetworkConfig
from controlplane.lease import Lease

from ..bpf.pods import POD_BRIDGE
from ..netlink import ignore_gone, only_address
from ..routing import Peer, RoutingBackend
from .vtep import VxlanDevice, parse_unicast_mac

log = logging.getLogger("weft.backend.vxlan.ebpf")

IFF_NOARP = 0x80
IFF_MULTICAST = 0x1000
SCOPE_LINK = 253
WATCH_INTERVAL = 1.0  # seconds between looks at the pod bridge (new pods, cni0 created late)


class VXLANEBPFBackend(VxlanDevice, RoutingBackend):
    """A peer is one weft_peers entry (and its weft_peer_ips count)."""
    wire_type = "vxlan"
    dataplane = "ebpf"
    RESTORED = "peers_restored"
    COUNTERS = ("device_recreated", "filters_restored")
    GAUGES = RoutingBackend.GAUGES | {"endpoints", "peer_ips"}  # map sizes; the programs' counts only grow

    def __init__(self, config: NetworkConfig, iface: ExternalInterface,
                 options: BackendOptions = BackendOptions()):
        super().__init__(config, iface, options)
        for net in (config.network, config.ipv6_network):
            if net is not None and net.prefixlen == 0:
                raise BackendError(f"vxlan/ebpf: network {net} has length 0; its programs read a zero "
                                   "netmask as 'this node has no such family' (use a longer prefix)")
        self.bridge = POD_BRIDGE
        self.progs = None  # fastpath.bpf.Programs, compiled on first setup
        self.cfg_flags: int | None = None
        self._bridge_index: int | None = None
        self._pod_ports: set[int] = set()  # pods' host veths that carry weft_from_pod_port
        self._inherited: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
        self.dev6_name = None  # no flannel-v6.<VNI>: flannel.<VNI> (external) carries both families
        self._watch_stop = threading.Event()
        self._watch: threading.Thread | None = None

    # -- netlink plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the bridge watcher and release the netlink socket (the data plane stays)."""
        self._watch_stop.set()
        if self._watch is not None and self._watch is not threading.current_thread():
            self._watch.join(5)
        self._watch = None
        super().close()

    # -- setup ------------------------------------------------------------------------------------

    def _programs(self):
        if self.progs is None:
            from fastpath.bpf import BpfUnavailable, Programs
            try:
                self.progs = Programs()
            except BpfUnavailable as exc:
                raise BackendError(str(exc)) from None
        return self.progs

    def setup(self, lease: Lease) -> None:
        if not self.has_ipv4 and not self.has_ipv6:
            raise BackendError("vxlan/ebpf: the network is IPv6-only (EnableIPv4 false) but this node "
                               "has no public IPv6 address")
        if not self.has_ipv4 and lease.subnet6 is None:
            raise BackendError(f"vxlan/ebpf: the network is IPv6-only but lease {lease.shown} has no "
                               "IPv6 subnet")
        with self._lock:
            self._adopt_mac(lease)
            self.lease = lease
            progs = self._programs()
            inherited = self._inherit()
            try:
                idx = self._ensure_device()
                self._write_config(idx)
                # Fill the maps before the programs go live, so a restart does not drop a packet.
                self._put_local(progs)
                for peer in inherited:
                    if not self._carries(peer.subnet):
                        continue  # a family this network no longer carries (e.g. now IPv6-only)
                    if peer.subnet not in self._peers and peer.subnet not in (lease.subnet, lease.subnet6):
                        self._put_entry(progs, peer)
                        self._inherited.add(peer.subnet)
                for peer in list(self._peers.values()):
                    self._put_entry(progs, peer)
                self._attach_device(idx)
                self._attach_bridge()
                self._attach_underlay()
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(f"vxlan/ebpf: cannot set up {self.dev_name} on {self.iface.name}: "
                                   f"{exc}") from None
            self.sync_endpoints()
            if self._watch is None:
                self._watch_stop.clear()
                self._watch = threading.Thread(target=self._watch_bridge, name="ebpf-bridge-watch",
                                               daemon=True)
                self._watch.start()

    def _inherit(self) -> list[Peer]:
        """The peers in the map of the program a previous weftd left attached (a restart): they
        keep traffic flowing until the lease watch re-adds them; the first resync drops the rest."""
        if self.progs is None or self.link_index(self.dev_name) is None:
            return []
        from fastpath.bpf.guard import inherited_peers
        out = []
        for subnet, (public_ip, raw) in inherited_peers(self.dev_name, set(self.prog_ids().values())).items():
            mac = parse_unicast_mac(raw)
            if mac:
                out.append(Peer(subnet, public_ip, mac))
        if out:
            log.info("kept %d peers from the programs a previous weftd left on %s", len(out), self.dev_name)
        return out

    def _carries(self, subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
        """Whether this node programs subnets of ``subnet``'s family."""
        return self.has_ipv4 if subnet.version == 4 else self.has_ipv6

    def _pick_mac6(self, previous: Lease | None) -> str:
        """The previous lease's IPv6 VtepMAC, else the device's (one device: the simplest case)."""
        from .vtep import lease_mac6, random_mac
        return (lease_mac6(previous) or self.vtep_mac or self._device_mac(self.dev_name)
                or random_mac())

    def lease_attrs(self, previous: Lease | None):
        attrs = super().lease_attrs(previous)
        self._one_mac()
        return attrs

    def _adopt_mac(self, lease: Lease) -> None:
        super()._adopt_mac(lease)
        self._one_mac()

    def _one_mac(self) -> None:
        """IPv6-only: the lease advertises one VtepMAC (BackendV6Data), and the device has it."""
        if not self.has_ipv4 and self.vtep_mac6 is not None:
            self.vtep_mac = self.vtep_mac6

    def _watch_bridge(self) -> None:
        """Every second: attach weft_from_pods when the pod bridge appears (the CNI plugin makes it,
        maybe after weftd starts) and relearn the pods (weft_endpoints). Cheap: three netlink dumps."""
        while not self._watch_stop.wait(WATCH_INTERVAL):
            try:
                with self._lock:
                    if self.lease is None or self.progs is None:
                        continue
                    bidx = self.link_index(self.bridge)
                    if bidx is not None and bidx != self._bridge_index:
                        self._attach_bridge()
                        log.info("attached weft_from_pods to %s", self.bridge)
                    elif bidx is None:
                        self._bridge_index = None
                self.sync_endpoints()
            except Exception as exc:  # never let the watcher die; resync covers the rest
                log.debug("bridge watch: %s", exc)

    def _device_compatible(self, msg) -> bool:
        info = msg.get("IFLA_LINKINFO")
        if info is None or info.get("IFLA_INFO_KIND") != "vxlan":
            return False
        data = info.get("IFLA_INFO_DATA")
        return (data is not None and bool(data.get("IFLA_VXLAN_COLLECT_METADATA"))
                and data.get("IFLA_VXLAN_PORT") == self.port)

    def _ensure_device(self) -> int:
        v6 = self.has_ipv6 and self.lease.subnet6 is not None

        def prepare(idx: int, link, created: bool) -> None:
            if v6:
                # No link-local address (nothing is ever resolved on this NOARP device), and no
                # multicast listener reports (weft_to_overlay would drop them, counted): a
                # forwarding node joins the all-routers groups on every multicast interface, so
                # leave them (forwarding off; with MLDv1 a group never reported, joined while the
                # device was down, leaves silently, where MLDv2 sends a state-change report),
                # clear IFF_MULTICAST, and turn forwarding back on (bpf_fib_lookup wants it on
                # the ingress device) without joining again.
                self._sysctl(f"net/ipv6/conf/{self.dev_name}/addr_gen_mode", "1")
                if link["flags"] & IFF_MULTICAST:
                    forwarding = self._sysctl_read(f"net/ipv6/conf/{self.dev_name}/forwarding") or "1"
                    self._sysctl(f"net/ipv6/conf/{self.dev_name}/force_mld_version", "1")
                    self._sysctl(f"net/ipv6/conf/{self.dev_name}/forwarding", "0")
                    self.ipr.link("set", index=idx, flags=0, change=IFF_MULTICAST)
                    self._sysctl(f"net/ipv6/conf/{self.dev_name}/forwarding", forwarding)
                self._sysctl(f"net/ipv6/conf/{self.dev_name}/disable_ipv6", "0")
            elif created:
                self._sysctl(f"net/ipv6/conf/{self.dev_name}/disable_ipv6", "1")
            if not link["flags"] & IFF_NOARP:
                self.ipr.link("set", index=idx, flags=IFF_NOARP, change=IFF_NOARP)

        idx = self.ensure_vxlan_device(
            self._device_compatible, f"is not an external VXLAN device on port {self.port}", prepare,
            vxlan_collect_metadata=1, vxlan_port=self.port)
        # IPv4: one route for the whole Network; our own subnet's (more specific) is the bridge's.
        # IPv6-only: none (ensure_vxlan_device left the device no IPv4 address, and the kernel drops
        # a device's IPv4 routes with its last IPv4 address: a dual-stack run's Network route too).
        if self.has_ipv4:
            self.ipr.route("replace", dst=str(self.config.network), oif=idx, scope=SCOPE_LINK)
        if v6:  # the same for the IPv6Network, with the IPv6 overlay MTU; the device's own address
            only_address(self.ipr, idx, str(self.lease.subnet6.network_address), 128, socket.AF_INET6)
            self.ipr.route("replace", family=socket.AF_INET6, dst=str(self.config.ipv6_network), oif=idx,
                           metrics={"mtu": self.mtu - 20})
        return idx

    @staticmethod
    def _sysctl_read(path: str) -> str | None:
        try:
            with open(f"/proc/sys/{path}") as f:
                return f.read().strip()
        except OSError:
            return None

    @staticmethod
    def _sysctl(path: str, value: str) -> None:
        try:
            with open(f"/proc/sys/{path}", "w") as f:
                f.write(value)
        except OSError as exc:
            log.debug("sysctl %s=%s: %s", path, value, exc)

    def _write_config(self, idx: int) -> None:
        from fastpath.bpf import CFG_DEFAULT, Config, mac_bytes
        import ctypes
        import struct
        progs = self._programs()
        if self.cfg_flags is None:
            self.cfg_flags = CFG_DEFAULT
        cfg = Config(vtep_mac=(ctypes.c_uint8 * 6)(*mac_bytes(self.vtep_mac)), vxlan_ifindex=idx,
                     mtu=self.mtu, flags=self.cfg_flags, vxlan_port=socket.htons(self.port), vni=self.vni)
        if self.has_ipv4:  # else network, netmask, local and public IPv4 stay zero: no IPv4 here
            net = self.config.network
            cfg.local_ipv4 = int(self.local) if self.iface.address else 0
            cfg.network = struct.unpack("=I", net.network_address.packed)[0]
            cfg.netmask = struct.unpack("=I", net.netmask.packed)[0]
            cfg.public_ipv4 = int(self.iface.public_ip)
        if self.has_ipv6:  # else netmask6 stays zero: the programs leave IPv6 alone
            from fastpath.bpf import ip6_bytes
            net6 = self.config.ipv6_network
            cfg.vtep_mac6 = (ctypes.c_uint8 * 6)(*mac_bytes(self.vtep_mac6 or self.vtep_mac))
            cfg.mtu6 = self.mtu - 20
            cfg.network6 = ip6_bytes(net6.network_address)
            cfg.netmask6 = ip6_bytes(net6.netmask)
            cfg.local_ipv6 = ip6_bytes(self.iface.address6)
            cfg.public_ipv6 = ip6_bytes(self.iface.public_ipv6)
        progs.set_config(cfg)

    def set_flags(self, flags: int) -> None:
        """Switch the programs' runtime behaviour (fastpath.bpf.CFG_*), e.g. for measurements."""
        with self._lock:
            self.cfg_flags = flags
            cfg = self._programs().get_config()
            cfg.flags = flags
            self.progs.set_config(cfg)

    @staticmethod
    def _filter_ids(dev: str, hook: str) -> list[int]:
        from fastpath.bpf.guard import filter_ids
        return filter_ids(dev, hook)

    def _attach(self, idx: int, parent: str, fn_name: str) -> None:
        from fastpath.bpf.guard import attach_filter
        attach_filter(self.ipr, idx, parent, self.progs.fns[fn_name])

    def _attach_device(self, idx: int) -> None:
        from fastpath.bpf.guard import CLSACT_EGRESS, CLSACT_INGRESS
        self._attach(idx, CLSACT_EGRESS, "weft_to_overlay")
        self._attach(idx, CLSACT_INGRESS, "weft_from_overlay")

    def _attach_underlay(self) -> None:
        """weft_from_underlay on the underlay interface: every datagram to our port is checked and
        counted before the kernel's UDP and VXLAN code (after the maps are filled)."""
        from fastpath.bpf.guard import CLSACT_INGRESS
        self._attach(self.iface.index, CLSACT_INGRESS, "weft_from_underlay")

    def _attach_bridge(self) -> bool:
        """Put weft_from_pods on the pod bridge if it exists; True when attached now."""
        bidx = self.link_index(self.bridge)
        if bidx is None:
            self._bridge_index = None
            return False
        from fastpath.bpf.guard import CLSACT_INGRESS
        self._attach(bidx, CLSACT_INGRESS, "weft_from_pods")
        self._bridge_index = bidx
        return True

    def prog_ids(self) -> dict[str, int]:
        """Ids of our loaded programs (for checking what is attached)."""
        from fastpath.bpf.sysbpf import prog_info
        return {name: prog_info(fn.fd)[0].id for name, fn in self.progs.fns.items()}

    # -- peers -------------------------------------------------------------------------------------

    def _put_entry(self, progs, peer: Peer) -> None:
        from fastpath.bpf import peer_key, peer_value
        progs.put_peer(peer_key(peer.subnet), peer_value(peer.public_ip, self.vni, peer.mac))

    def _put_local(self, progs) -> None:
        """Our own subnet (and IPv6 subnet), flagged local: pod traffic to it is neither
        encapsulated nor a miss."""
        from fastpath.bpf import PEER_LOCAL, peer_key, peer_value
        if self.has_v4_side(self.lease):
            progs.put_peer(peer_key(self.lease.subnet),
                           peer_value(self.iface.public_ip, self.vni, self.vtep_mac, PEER_LOCAL))
        if self.has_ipv6 and self.lease.subnet6 is not None:
            progs.put_peer(peer_key(self.lease.subnet6),
                           peer_value(self.iface.public_ipv6, self.vni, self.vtep_mac6 or self.vtep_mac, PEER_LOCAL))

    def sync_endpoints(self, reattach: bool = False) -> int:
        """Refill weft_endpoints from the pod bridge: pod IP (neighbour table) -> MAC -> port
        (bridge FDB), and put weft_from_pod_port on the ports of learnt pods (on every one again
        when ``reattach``). Returns how many entries changed. Called by setup, the bridge watcher
        and resync."""
        with self._lock:
            if self.progs is None or self.lease is None:
                return 0
            want = {}
            try:
                want = self._learn_endpoints()
            except Exception as exc:
                log.debug("learning endpoints on %s failed: %s", self.bridge, exc)
            changed = self.progs.set_endpoints(want)
            self._attach_pod_ports({port for port, _, _ in want.values()}, reattach)
            return changed

    def _attach_pod_ports(self, ports: set[int], reattach: bool) -> None:
        """weft_from_pod_port on each learnt pod's host veth, where its traffic to peers is
        encapsulated before the bridge and its netfilter hook (weft_from_pods on cni0 stays: it
        takes what the port program leaves). A pod's veth takes its filter with it."""
        from fastpath.bpf.pods import attach_pod_ports
        self._pod_ports = attach_pod_ports(self.ipr, self.progs.fns["weft_from_pod_port"], ports,
                                           self._pod_ports, reattach)

    def _learn_endpoints(self) -> dict:
        bidx = self.link_index(self.bridge)
        if bidx is None:
            return {}
        subnets = {socket.AF_INET: self.lease.subnet} if self.has_v4_side(self.lease) else {}
        if self.has_ipv6 and self.lease.subnet6 is not None:  # IPv6 pods too (weft_endpoints6)
            subnets[socket.AF_INET6] = self.lease.subnet6
        from fastpath.bpf.pods import learn_endpoints
        return learn_endpoints(self.ipr, bidx, subnets)

    def program(self, peer: Peer) -> None:
        if self.progs is not None:  # else setup puts it
            self._put_entry(self.progs, peer)

    restore = program

    def unprogram(self, peer: Peer) -> None:
        if self.progs is not None:
            from fastpath.bpf import peer_key
            self.progs.delete_peer(peer_key(peer.subnet))

    def peer_removed(self, lease: Lease) -> None:
        if lease.has_ipv4:
            self._inherited.discard(lease.subnet)
        self._inherited.discard(lease.subnet6)

    def peer_map(self, local: bool = False) -> list[dict]:
        """The live weft_peers entries (our own subnet's local entry only when ``local``)."""
        with self._lock:
            if self.progs is None:
                return []
            return [e for e in self.progs.peer_entries() if local or not e["local"]]

    # -- resync, teardown, stats ------------------------------------------------------------------

    def resync_device(self) -> bool:
        """The device, the programs on it, on the underlay and on the pod bridge, the inherited
        peers no lease re-added, our own subnet's entry and the pods; the peers come after."""
        if self.progs is None:
            return False
        try:
            idx = self.link_index(self.dev_name)
            if idx is None:
                log.warning("%s vanished; recreating it", self.dev_name)
                idx = self._ensure_device()
                self._write_config(idx)
                self._counters["device_recreated"] += 1
            ours = self.prog_ids()
            if (ours["weft_to_overlay"] not in self._filter_ids(self.dev_name, "egress")
                    or ours["weft_from_overlay"] not in self._filter_ids(self.dev_name, "ingress")):
                self._ensure_device()
                self._write_config(idx)
                self._attach_device(idx)
                self._counters["filters_restored"] += 1
                log.info("re-attached the programs on %s", self.dev_name)
            if ours["weft_from_underlay"] not in self._filter_ids(self.iface.name, "ingress"):
                self._attach_underlay()
                self._counters["filters_restored"] += 1
                log.info("re-attached weft_from_underlay on %s", self.iface.name)
            bidx = self.link_index(self.bridge)
            if bidx is not None and ours["weft_from_pods"] not in self._filter_ids(self.bridge, "ingress"):
                self._attach_bridge()
                log.info("attached weft_from_pods to %s", self.bridge)
            if self._inherited:  # by now the lease watch has re-added every live peer
                from fastpath.bpf import peer_key
                for subnet in self._inherited - set(self._peers):
                    self.progs.delete_peer(peer_key(subnet))
                    log.info("dropped inherited peer %s: no lease", subnet)
                self._inherited.clear()
            self._put_local(self.progs)
            self.sync_endpoints(reattach=True)  # a port filter removed behind our back comes back
        except Exception as exc:
            log.warning("vxlan/ebpf resync failed: %s", exc)
            return False
        return True

    def snapshot(self) -> set[str]:
        return {e["subnet"] for e in self.progs.peer_entries()}

    def missing(self, peer: Peer, present: set[str]) -> tuple[str, ...]:
        return () if str(peer.subnet) in present else ("map entry",)

    def teardown(self) -> None:
        self._watch_stop.set()
        if self._watch is not None:
            self._watch.join(5)
            self._watch = None
        super().teardown()

    def teardown_peer(self, peer: Peer) -> None:
        pass  # the maps go with the programs

    def teardown_device(self) -> None:
        from fastpath.bpf.guard import CLSACT_INGRESS, detach_filter
        for dev in (self.iface.name, self.bridge):
            idx = self.link_index(dev)
            if idx is None:
                continue
            try:
                detach_filter(self.ipr, idx, CLSACT_INGRESS)
            except Exception as exc:
                log.warning("removing our filter from %s failed: %s", dev, exc)
        from fastpath.bpf.pods import detach_pod_ports
        detach_pod_ports(self.ipr, self._pod_ports)
        self._pod_ports = set()
        idx = self.link_index(self.dev_name)
        if idx is not None:
            ignore_gone(self.ipr.link, "del", index=idx)
        if self.progs is not None:
            self.progs.close()
            self.progs = None

    def extra_stats(self) -> dict[str, float]:
        s: dict[str, float] = {}
        if self.progs is not None:
            s["endpoints"] = float(self.progs.endpoint_count())
            s["peer_ips"] = float(len(self.progs.peer_ip_entries()))
            for k, v in self.progs.counter_sums().items():
                s[k] = float(v)
            for k, v in self.progs.drop_sums().items():
                s[f"drops_{k}"] = float(v)
        return s
