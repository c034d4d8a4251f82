"""``host-gw/ebpf``: flannel's host-gw wire format, with tc programs taking pod traffic past the
node's IP forwarding (and so past its netfilter: iptables rules on forwarded pod traffic do not see
it, as with vxlan/ebpf).

The kernel side is host-gw/kernel's, unchanged (this class is one): one route per peer,
``<subnet> via <PublicIP> dev <underlay>``, with its conflict removal, resync and teardown rules.
So the node's own traffic, and every packet the programs leave alone, take the kernel's path.
On top (fastpath/bpf/hostgw.c, one compile with the other programs, loaded by the loader child):

- ``weft_hostgw_from_pods`` on the pod bridge's (cni0) ingress: a pod's IPv4 packet for a peer's
  subnet leaves by the underlay interface through ``bpf_redirect_neigh``, next hop = the peer's
  PublicIP (the kernel's neighbour entry gives the MACs): no IP forwarding, no netfilter FORWARD or
  POSTROUTING; the TTL is decremented by the program. TTL 1, IP options, too big, no lease: the stack.
- ``weft_hostgw_from_pod_port`` on each learnt pod's host veth (a port of cni0): the same for that
  pod's own frames, before the bridge and its netfilter hook (br_netfilter would otherwise allocate
  and free a conntrack entry per packet: the node never confirms these flows). cni0's program takes
  what the ports leave (a pod not learnt yet).
- ``weft_hostgw_from_underlay`` on the underlay interface's ingress: an IPv4 packet for a learnt
  local pod (``weft_endpoints``, from the bridge's neighbour and FDB tables, every second) whose MAC
  the kernel's neighbour entry confirms goes straight into the pod's namespace
  (``bpf_redirect_peer``): no forwarding, no bridge, no backlog queue. Anything else: the stack.

``weft_peers`` (every lease's subnet -> PublicIP, ours flagged local) follows the leases exactly as
the source guard's map does (``fastpath.bpf.guard.HostGWGuard``, which ``HostGWPrograms`` extends),
and so do restart (a new weftd fills its maps from the attached program's before replacing it; the
filters and routes stay across SIGTERM), resync (missing filters re-attached, map entries put back)
and teardown (our filters removed by priority and handle, then the routes).

``source_guard`` (weftd ``--source-guard``) turns on the guard's check inside
``weft_hostgw_from_underlay`` (the same drops and counters as host-gw/kernel's guard): one program
on the underlay interface either way.

IPv4 only: EnableIPv6 is refused by the config (``ipv6=False`` in the declaration).
bcc or kernel headers missing: setup raises BackendError naming the fix.
"""
from __future__ import annotations

import logging
import socket
import threading

from controlplane.backends.base import BackendError, BackendOptions, ExternalInterface
from controlplane.config import NetworkConfig
from controlplane.lease import Lease

from ..bpf.guard import HostGWGuard
from ..bpf.pods import POD_BRIDGE
from .kernel import HostGWKernelBackend

log = logging.getLogger("weft.backend.hostgw.ebpf")

WATCH_INTERVAL = 1.0  # seconds between looks at the pod bridge (new pods, cni0 created late)
SHORTCUT_COUNTERS = ("tx_packets", "tx_bytes", "pods_redirect", "pods_stack", "map_miss", "rx_peer", "rx_stack")


def ebpf_flags(check: bool) -> int:
    """weft_config flags: both shortcuts, the TTL, and the guard's check when asked."""
    from fastpath.bpf import CFG_PODS_REDIRECT, CFG_RX_CHECK, CFG_RX_PEER, CFG_TTL_DEC
    return CFG_PODS_REDIRECT | CFG_RX_PEER | CFG_TTL_DEC | (CFG_RX_CHECK if check else 0)


class HostGWPrograms(HostGWGuard):
    """host-gw/ebpf's programs and maps: the guard's lease map, plus in weft_config the underlay
    interface, its MTU and the switches; ``weft_hostgw_from_underlay`` where the guard's program
    would go, ``weft_hostgw_from_pods`` on the pod bridge, ``weft_endpoints`` from the bridge."""

    ENTRY = "weft_hostgw_from_underlay"
    PODS_ENTRY = "weft_hostgw_from_pods"
    PORT_ENTRY = "weft_hostgw_from_pod_port"

    def __init__(self, ipr, iface: ExternalInterface, network, check: bool):
        super().__init__(ipr, iface.name, iface.index, network, iface.address)
        self.mtu, self.check = iface.mtu, check
        self.bridge = POD_BRIDGE
        self.bridge_index: int | None = None
        self.pod_ports: set[int] = set()  # learnt pods' host veths that carry PORT_ENTRY

    def _config(self):
        cfg = super()._config()
        cfg.underlay_ifindex, cfg.mtu, cfg.flags = self.iface_index, self.mtu, ebpf_flags(self.check)
        return cfg

    def start(self, subnet, vtep_mac: str = "") -> None:
        """The maps (endpoints first), the underlay program, then the bridge's."""
        self._programs()
        self.sync_endpoints(subnet)
        super().start(subnet)
        self.watch_bridge()

    def _bridge_idx(self) -> int | None:
        try:
            return self.ipr.link_lookup(ifname=self.bridge)[0]
        except Exception:  # no such link (IndexError), or the netlink socket is gone
            return None

    def watch_bridge(self) -> None:
        """Attach weft_hostgw_from_pods when the bridge appears (the CNI plugin makes it, maybe after
        weftd) or comes back, and when our filter went missing from it."""
        from ..bpf.guard import CLSACT_INGRESS, attach_filter, filter_ids
        bidx = self._bridge_idx()
        if bidx is None:
            self.bridge_index = None
            return
        fn = self.progs.fns[self.PODS_ENTRY]
        if bidx != self.bridge_index or not set(filter_ids(self.bridge, "ingress")) & self.prog_ids():
            attach_filter(self.ipr, bidx, CLSACT_INGRESS, fn)
            if self.bridge_index is not None and bidx == self.bridge_index:
                self.restored += 1
            self.bridge_index = bidx
            log.info("attached %s to %s", self.PODS_ENTRY, self.bridge)

    def sync_endpoints(self, subnet=None, reattach: bool = False) -> int:
        """weft_endpoints = the pods of our subnet (``subnet``, else the lease's) behind the bridge
        now, and PORT_ENTRY on their ports (on every one again when ``reattach``); how many
        entries changed."""
        from ..bpf.pods import attach_pod_ports, learn_endpoints
        bidx, subnet = self._bridge_idx(), subnet or self.lease_subnet
        want = {}
        if bidx is not None and subnet is not None:
            try:
                want = learn_endpoints(self.ipr, bidx, {socket.AF_INET: subnet})
            except Exception as exc:
                log.debug("learning endpoints on %s failed: %s", self.bridge, exc)
                return 0
        changed = self.progs.set_endpoints(want)
        self.pod_ports = attach_pod_ports(self.ipr, self.progs.fns[self.PORT_ENTRY],
                                          {port for port, _, _ in want.values()}, self.pod_ports, reattach)
        return changed

    def resync(self) -> None:
        super().resync()
        if self.progs is not None:
            self.watch_bridge()
            self.sync_endpoints(reattach=True)  # a port filter removed behind our back comes back

    def stop(self) -> None:
        from ..bpf.guard import CLSACT_INGRESS, detach_filter
        from ..bpf.pods import detach_pod_ports
        detach_pod_ports(self.ipr, self.pod_ports)
        self.pod_ports = set()
        bidx = self._bridge_idx()
        if bidx is not None:
            try:
                detach_filter(self.ipr, bidx, CLSACT_INGRESS)
            except Exception as exc:
                log.warning("removing %s from %s failed: %s", self.PODS_ENTRY, self.bridge, exc)
        super().stop()

    def stats(self) -> dict[str, float]:
        if self.progs is None:
            return {}
        counters = self.progs.counter_sums()
        out = {k: float(counters[k]) for k in SHORTCUT_COUNTERS}
        out["endpoints"] = float(self.progs.endpoint_count())
        if self.check:
            out.update(super().stats())
        else:
            out["guard_peers"] = float(len(set(self._peers) | self._inherited))
        return out


class HostGWEBPFBackend(HostGWKernelBackend):
    """host-gw/kernel's routes, and HostGWPrograms as its always-on "guard" (the object whose maps
    follow the peers); ``source_guard`` only switches the check on inside it."""
    dataplane = "ebpf"
    GAUGES = HostGWKernelBackend.GAUGES | {"endpoints"}

    def __init__(self, config: NetworkConfig, iface: ExternalInterface,
                 options: BackendOptions = BackendOptions()):
        super().__init__(config, iface, options)
        if not self.has_ipv4 or self.has_ipv6:
            raise BackendError("host-gw/ebpf carries IPv4 only: use host-gw/kernel with EnableIPv6")
        self._check = bool(options.source_guard)
        self._guard_wanted = True
        self._watch_stop = threading.Event()
        self._watch: threading.Thread | None = None

    def new_guard(self):
        return HostGWPrograms(self.ipr, self.iface, self.config.network, self._check)

    def setup(self, lease: Lease) -> None:
        from fastpath.bpf import BpfUnavailable
        with self._lock:
            if self.guard is None:
                self.guard = self.new_guard()
            try:
                self.guard._programs()
            except BpfUnavailable as exc:
                raise BackendError(f"host-gw/ebpf: {exc}") from None
        super().setup(lease)
        if self._watch is None:
            self._watch_stop.clear()
            self._watch = threading.Thread(target=self._watch_bridge, name="hostgw-ebpf-bridge-watch",
                                           daemon=True)
            self._watch.start()

    def _watch_bridge(self) -> None:
        """Every second: the bridge's program (cni0 made late, or re-made) and its pods."""
        while not self._watch_stop.wait(WATCH_INTERVAL):
            try:
                with self._lock:
                    if self.guard is not None and self.guard.progs is not None:
                        self.guard.watch_bridge()
                        self.guard.sync_endpoints()
            except Exception as exc:  # never let the watcher die; resync covers the rest
                log.debug("bridge watch: %s", exc)

    def _stop_watch(self) -> None:
        self._watch_stop.set()
        if self._watch is not None and self._watch is not threading.current_thread():
            self._watch.join(5)
        self._watch = None

    def teardown(self) -> None:
        self._stop_watch()
        super().teardown()

    def close(self) -> None:
        self._stop_watch()
        super().close()


def clear_programs_but_for(backend) -> list[str]:
    """The registry's ``leftovers`` hook: before another data plane is set up on this node, remove
    the filters a host-gw/ebpf run left on the pod bridge, its ports and the underlay interface
    (SIGTERM leaves them), whose maps would no longer follow the leases. The devices cleared."""
    if isinstance(backend, HostGWEBPFBackend):
        return []  # it adopts them (restart)
    import json
    import subprocess
    from ..bpf.guard import FILTER_HANDLE, FILTER_PRIO
    from ..bpf.live import NoProgram, filters
    res = subprocess.run(["ip", "-j", "link", "show", "master", POD_BRIDGE], capture_output=True, text=True,
                         timeout=5)
    ports = [link["ifname"] for link in json.loads(res.stdout or "[]")] if res.returncode == 0 else []
    removed = []
    for dev in dict.fromkeys((POD_BRIDGE, backend.iface.name, *ports)):
        try:
            ours = [f for f in filters(dev, "ingress") if f["prio"] == FILTER_PRIO
                    and str(f["name"]).startswith(HostGWPrograms.ENTRY[:15])]
        except NoProgram:
            continue  # no such device
        if ours:
            subprocess.run(["tc", "filter", "del", "dev", dev, "ingress", "pref", str(FILTER_PRIO),
                            "handle", str(FILTER_HANDLE), "bpf"], capture_output=True, timeout=5)
            log.info("removed the host-gw/ebpf filter a previous run left on %s", dev)
            removed.append(dev)
    return removed
