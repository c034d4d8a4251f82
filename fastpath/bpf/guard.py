"""weft's tc filters, and the source guards on the underlay interface.

vxlan/ebpf always attaches ``weft_from_underlay`` (with its own programs and maps). vxlan/kernel
attaches it when asked (``SourceGuard``, the ``source_guard`` backend option): the kernel's VXLAN
device then only ever sees datagrams whose outer source is the PublicIP of the lease that holds the
inner source, at the price of one hash and one LPM lookup per datagram, with no per-peer rule.
host-gw/kernel attaches ``weft_hostgw_guard`` when asked (``HostGWGuard``): a packet from a pod
address must come from the MAC of the PublicIP whose lease holds that address (one LPM lookup and
one FIB lookup per packet, no per-peer rule).
"""
from __future__ import annotations

import errno
import ipaddress
import logging

log = logging.getLogger("weft.bpf.guard")

CLSACT_INGRESS = "ffff:fff2"
CLSACT_EGRESS = "ffff:fff3"
FILTER_PRIO = 0xC0F  # ours, on every hook; lets teardown find exactly our filter
FILTER_HANDLE = 1
GONE = {errno.ENOENT, errno.ENODEV, errno.ESRCH, errno.EINVAL}


def _errno(exc) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else getattr(exc, "errno", None)


def attach_filter(ipr, idx: int, parent: str, fn) -> None:
    """Put program ``fn`` (fastpath.bpf._Fn) on a clsact hook of link ``idx`` as our filter."""
    try:
        ipr.tc("add", "clsact", idx)
    except Exception as exc:
        if _errno(exc) != errno.EEXIST:
            raise
    ipr.tc("replace-filter", "bpf", idx, handle=FILTER_HANDLE, fd=fn.fd, name=fn.name,
           parent=parent, prio=FILTER_PRIO, classid=1, direct_action=True)


def detach_filter(ipr, idx: int, parent: str) -> bool:
    """Remove our filter (our priority and handle) from a hook; False when there was none. The
    clsact qdisc stays: other filters may hang on it."""
    try:
        ipr.tc("del-filter", "bpf", idx, handle=FILTER_HANDLE, parent=parent, prio=FILTER_PRIO)
    except Exception as exc:
        if _errno(exc) in GONE:
            return False
        raise
    return True


def filter_ids(dev: str, hook: str) -> list[int]:
    """Ids of the BPF programs attached as our filter (our priority) on one clsact hook."""
    from .live import NoProgram, filters
    try:
        return [f["id"] for f in filters(dev, hook) if f["prio"] == FILTER_PRIO]
    except NoProgram:
        return []


def inherited_peers(dev: str, ours: set[int]) -> dict:
    """The peers in the maps of a weft program that a previous weftd left on ``dev`` (a restart):
    {subnet: (PublicIP, VtepMAC)}. Empty when the attached program is one of ``ours``, or none."""
    from .live import NoProgram, read
    try:
        doc = read(dev)
    except (NoProgram, OSError, ValueError) as exc:
        log.debug("nothing to inherit from %s: %s", dev, exc)
        return {}
    if doc["program_id"] in ours:
        return {}
    out = {}
    for e in doc["peers"]:
        if not e["local"]:
            out[ipaddress.ip_network(e["subnet"])] = (ipaddress.ip_address(e["public_ip"]), e["vtep_mac"])
    return out


class SourceGuard:
    """weft_from_underlay for a data plane that is not vxlan/ebpf (vxlan/kernel): its own programs
    and maps, filled from the leases, the program on the underlay interface's ingress.

    The maps hold what the program needs: weft_config (our VtepMAC, VNI, port, Network),
    weft_peers (every peer subnet -> PublicIP, VtepMAC; ours flagged local) and weft_peer_ips.
    """

    ENTRY = "weft_from_underlay"

    def __init__(self, ipr, iface_name: str, iface_index: int, network: ipaddress.IPv4Network,
                 vni: int, port: int, local_ip: ipaddress.IPv4Address, public_ip: ipaddress.IPv4Address):
        self.ipr, self.iface_name, self.iface_index = ipr, iface_name, iface_index
        self.network, self.vni, self.port, self.local_ip = network, vni, port, local_ip
        self.public_ip = public_ip
        self.progs = None
        self.lease_subnet: ipaddress.IPv4Network | None = None
        self.vtep_mac: str | None = None
        self._peers: dict[ipaddress.IPv4Network, tuple[ipaddress.IPv4Address, str]] = {}
        self._inherited: set[ipaddress.IPv4Network] = set()
        self.restored = 0

    def _programs(self):
        if self.progs is None:
            from . import Programs
            self.progs = Programs()
        return self.progs

    def _config(self):
        import ctypes
        import socket
        import struct
        from . import Config, mac_bytes
        net = self.network
        return Config(vtep_mac=(ctypes.c_uint8 * 6)(*mac_bytes(self.vtep_mac)),
                      local_ipv4=int(self.local_ip),
                      network=struct.unpack("=I", net.network_address.packed)[0],
                      netmask=struct.unpack("=I", net.netmask.packed)[0],
                      flags=0, vxlan_port=socket.htons(self.port), vni=self.vni,
                      public_ipv4=int(self.public_ip))

    def _put(self, subnet, public_ip, mac, flags: int = 0) -> None:
        from . import peer_key, peer_value
        self.progs.put_peer(peer_key(subnet), peer_value(public_ip, self.vni, mac, flags))

    def start(self, subnet: ipaddress.IPv4Network, vtep_mac: str) -> None:
        """Fill the maps (with what a previous weftd's guard knew, until the leases say otherwise),
        then attach. Raises fastpath.bpf.BpfUnavailable when bcc or the headers are missing."""
        from . import PEER_LOCAL
        progs = self._programs()
        if self.lease_subnet is not None and self.lease_subnet != subnet and self.lease_subnet not in self._peers:
            from . import peer_key
            progs.delete_peer(peer_key(self.lease_subnet))  # a new lease: the old one is not ours now
        self.lease_subnet, self.vtep_mac = subnet, vtep_mac
        progs.set_config(self._config())
        self._put(subnet, self.local_ip, vtep_mac, PEER_LOCAL)
        for s, (ip, mac) in inherited_peers(self.iface_name, self.prog_ids()).items():
            if s not in self._peers and s != subnet:
                self._put(s, ip, mac)
                self._inherited.add(s)
        for s, (ip, mac) in self._peers.items():
            self._put(s, ip, mac)
        attach_filter(self.ipr, self.iface_index, CLSACT_INGRESS, progs.fns[self.ENTRY])

    def put(self, subnet, public_ip, mac) -> None:
        self._peers[subnet] = (public_ip, mac)
        if self.progs is not None:
            self._put(subnet, public_ip, mac)

    def delete(self, subnet) -> None:
        self._peers.pop(subnet, None)
        self._inherited.discard(subnet)
        if self.progs is not None:
            from . import peer_key
            self.progs.delete_peer(peer_key(subnet))

    def prog_ids(self) -> set[int]:
        from .sysbpf import prog_info
        return {prog_info(fn.fd)[0].id for fn in self.progs.fns.values()} if self.progs else set()

    def resync(self) -> None:
        """Re-attach when our filter went missing; drop inherited peers no lease re-added; put back
        entries removed behind our back."""
        if self.progs is None or self.lease_subnet is None:
            return
        from . import PEER_LOCAL, peer_key
        fn = self.progs.fns[self.ENTRY]
        if self.prog_ids() and not set(filter_ids(self.iface_name, "ingress")) & self.prog_ids():
            attach_filter(self.ipr, self.iface_index, CLSACT_INGRESS, fn)
            self.restored += 1
            log.info("re-attached %s on %s", self.ENTRY, self.iface_name)
        for s in self._inherited - set(self._peers):
            self.progs.delete_peer(peer_key(s))
        self._inherited.clear()
        have = {e["subnet"] for e in self.progs.peer_entries()}
        if str(self.lease_subnet) not in have:
            self._put(self.lease_subnet, self.local_ip, self.vtep_mac, PEER_LOCAL)
        for s, (ip, mac) in self._peers.items():
            if str(s) not in have:
                self._put(s, ip, mac)
                self.restored += 1

    def stop(self) -> None:
        """Detach and release the programs (teardown)."""
        try:
            detach_filter(self.ipr, self.iface_index, CLSACT_INGRESS)
        except Exception as exc:
            log.warning("removing %s from %s failed: %s", self.ENTRY, self.iface_name, exc)
        self.close()

    def close(self) -> None:
        """Release our fds; an attached filter keeps working (a restart replaces it)."""
        if self.progs is not None:
            self.progs.close()
            self.progs = None

    def stats(self) -> dict[str, float]:
        if self.progs is None:
            return {}
        from . import UNDERLAY_REASONS
        drops = self.progs.drop_sums()
        out = {f"drops_{r.name.lower()}": float(drops[r.name.lower()]) for r in UNDERLAY_REASONS}
        out["underlay_passed"] = float(self.progs.counter_sums()["underlay_passed"])
        out["guard_peer_ips"] = float(len(self.progs.peer_ip_entries()))
        return out


NO_MAC = "00:00:00:00:00:00"


class HostGWGuard(SourceGuard):
    """weft_hostgw_guard for host-gw/kernel: the program on the underlay interface's ingress, and
    maps filled from the leases: weft_config (the Network; no VXLAN port, so weft_from_underlay of
    the same compile is inert), weft_peers (every lease's subnet -> PublicIP, ours flagged local).
    The MAC a packet must come from is the kernel's neighbour entry for that PublicIP, looked up
    by the program (bpf_fib_lookup): nothing per peer is kept here but the lease map."""

    ENTRY = "weft_hostgw_guard"

    def __init__(self, ipr, iface_name: str, iface_index: int, network: ipaddress.IPv4Network,
                 local_ip: ipaddress.IPv4Address):
        super().__init__(ipr, iface_name, iface_index, network, vni=0, port=0, local_ip=local_ip,
                         public_ip=local_ip)

    def start(self, subnet: ipaddress.IPv4Network, vtep_mac: str = NO_MAC) -> None:
        super().start(subnet, NO_MAC)

    def put(self, subnet, public_ip, mac: str = NO_MAC) -> None:
        super().put(subnet, public_ip, NO_MAC)

    def stats(self) -> dict[str, float]:
        if self.progs is None:
            return {}
        from . import HOSTGW_REASONS
        drops = self.progs.drop_sums()
        out = {f"drops_{r.name.lower()}": float(drops[r.name.lower()]) for r in HOSTGW_REASONS}
        out["hostgw_passed"] = float(self.progs.counter_sums()["hostgw_passed"])
        # leases in the map: the known ones, and a previous run's until the first resync
        out["guard_peers"] = float(len(set(self._peers) | self._inherited))
        return out
