"""The VTEP identity every vxlan data plane advertises: ``{"VNI": n, "VtepMAC": "..."}``.

The MAC must survive restarts, or peers keep neighbour and FDB entries for a MAC nobody answers
to (flannel issues #533, #1036, #1330). So a node reuses, in order: the VtepMAC of its previous
lease, the MAC of a device of its name that is still there, and only then a new random
locally administered one. The kernel, eBPF and userspace vxlan backends all take it from here.

Dual-stack (flannel's EnableIPv6): the IPv6 side is a second VTEP with its own MAC, advertised as
``BackendV6Data`` ``{"VNI": n, "VtepMAC": "..."}`` beside ``PublicIPv6`` and kept across restarts
the same way (previous lease's BackendV6Data, then the ``flannel-v6.<VNI>`` device's MAC).

IPv6-only (flannel's EnableIPv4 false): the IPv6 VTEP is the only one. The lease carries flanneld's
``"PublicIP":"0.0.0.0"`` (``NO_PUBLIC_IP``), no BackendData, and ``BackendV6Data`` as above;
``vtep_mac`` stays None (there is no IPv4 VTEP to name).
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import random
import re
import socket

from controlplane.backends.base import BackendError, BackendOptions
from controlplane.lease import NO_PUBLIC_IP, Lease, LeaseAttrs

from ..netlink import ignore_gone, nl_errno, only_address, remove_addresses, set_mac_and_mtu

log = logging.getLogger("weft.backend.vxlan")

_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")


def parse_unicast_mac(value) -> str | None:
    """``value`` as a normalised ``aa:bb:cc:dd:ee:ff`` when it is a unicast, non-zero MAC; else None."""
    if not isinstance(value, str) or not _MAC_RE.match(value.lower()):
        return None
    mac = value.lower().replace("-", ":")
    first = int(mac[:2], 16)
    if first & 1 or mac == "00:00:00:00:00:00":
        return None
    return mac


def random_mac(rng: random.Random | None = None) -> str:
    """A random locally administered unicast MAC."""
    octets = [(rng or random.SystemRandom()).randrange(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def _data_mac(data) -> str | None:
    return parse_unicast_mac(data.get("VtepMAC")) if isinstance(data, dict) else None


def lease_mac(lease: Lease | None) -> str | None:
    """The VtepMAC a lease advertises (BackendData), when it holds a valid one."""
    return _data_mac(lease.attrs.backend_data if lease is not None else None)


def lease_mac6(lease: Lease | None) -> str | None:
    """The IPv6 VTEP's VtepMAC a lease advertises (BackendV6Data), when it holds a valid one."""
    return _data_mac(lease.attrs.backend_v6_data if lease is not None else None)


def no_mac_reason(lease: Lease, v6: bool = False) -> str:
    """Why ``lease_mac(lease)`` (``v6``: ``lease_mac6``) is None, for the log."""
    data = lease.attrs.backend_v6_data if v6 else lease.attrs.backend_data
    if not isinstance(data, dict):
        return f"no {'BackendV6Data' if v6 else 'BackendData'} object"
    raw = data.get("VtepMAC")
    return "no VtepMAC" if raw is None else f"VtepMAC {raw!r} is not a unicast MAC"


class VtepIdentity:
    """Mixin for a ``fastpath.routing.RoutingBackend`` with ``vni``, ``dev_name`` and ``vtep_mac``
    (None until chosen); with IPv6 (``has_ipv6``) also ``vtep_mac6``, and ``dev6_name`` when a
    device of that name holds it."""
    vtep_mac6: str | None = None  # the IPv6 VTEP's MAC (BackendV6Data), None until chosen
    dev6_name: str | None = None

    def decode(self, lease: Lease):
        """A peer's lease as a ``fastpath.routing.Peer``: its VtepMAC, and whether DirectRouting
        takes it past the tunnel; BadBackendData without a unicast VtepMAC."""
        from controlplane.backends.base import BadBackendData
        from fastpath.routing import Peer
        mac = lease_mac(lease)
        if mac is None:
            raise BadBackendData(no_mac_reason(lease))
        return Peer(lease.subnet, lease.attrs.public_ip, mac, self.is_direct(lease.attrs.public_ip))

    def decode6(self, lease: Lease):
        """The IPv6 side (None as ``RoutingBackend.decode6`` says) with the VtepMAC of its
        BackendV6Data; BadBackendData without a unicast one there."""
        from controlplane.backends.base import BadBackendData
        peer = super().decode6(lease)
        if peer is None:
            return None
        mac = lease_mac6(lease)
        if mac is None:
            raise BadBackendData(no_mac_reason(lease, v6=True))
        return dataclasses.replace(peer, mac=mac)

    def lease_attrs(self, previous: Lease | None) -> LeaseAttrs:
        with self._lock:
            if not self.has_ipv4:  # IPv6-only: flanneld's lease, no IPv4 VTEP at all
                if not self.has_ipv6:
                    raise BackendError(f"{self.name()}: the network is IPv6-only (EnableIPv4 false) "
                                       "but this node has no public IPv6 address")
                if self.vtep_mac6 is None:
                    self.vtep_mac6 = self._pick_mac6(previous)
                return LeaseAttrs(NO_PUBLIC_IP, self.wire_type, None, self.iface.public_ipv6,
                                  {"VNI": self.vni, "VtepMAC": self.vtep_mac6})
            if self.vtep_mac is None:
                self.vtep_mac = self._pick_mac(previous)
            if not self.has_ipv6:
                return LeaseAttrs(self.iface.public_ip, self.wire_type,
                                  {"VNI": self.vni, "VtepMAC": self.vtep_mac})
            if self.vtep_mac6 is None:
                self.vtep_mac6 = self._pick_mac6(previous)
            return LeaseAttrs(self.iface.public_ip, self.wire_type,
                              {"VNI": self.vni, "VtepMAC": self.vtep_mac}, self.iface.public_ipv6,
                              {"VNI": self.vni, "VtepMAC": self.vtep_mac6})

    def _pick_mac(self, previous: Lease | None) -> str:
        return lease_mac(previous) or self._device_mac(self.dev_name) or random_mac()

    def _pick_mac6(self, previous: Lease | None) -> str:
        return lease_mac6(previous) or self._device_mac(self.dev6_name) or random_mac()

    def _device_mac(self, name: str | None) -> str | None:
        idx = self.link_index(name) if name else None
        if idx is None:
            return None
        return parse_unicast_mac(self.ipr.link("get", index=idx)[0].get("IFLA_ADDRESS"))

    def _adopt_mac(self, lease: Lease) -> None:
        """At setup without lease_attrs first (a test, a restart path): take the lease's MACs."""
        if self.vtep_mac is None and self.has_ipv4:
            self.vtep_mac = lease_mac(lease) or self._pick_mac(None)
        if self.has_ipv6 and self.vtep_mac6 is None:
            self.vtep_mac6 = lease_mac6(lease) or self._pick_mac6(None)


class VxlanDevice(VtepIdentity):
    """Mixin for the backends that own the kernel device ``flannel.<VNI>`` (vxlan/kernel,
    vxlan/ebpf): its VNI, UDP port, name and local underlay address, as flannel names them."""

    def __init__(self, config, iface, options=BackendOptions()):
        super().__init__(config, iface, options)
        self.vni = config.backend.vni
        self.port = config.backend.effective_port
        self.dev_name = f"flannel.{self.vni}"
        self.local = iface.address or iface.public_ip
        self.vtep_mac: str | None = None
        # The IPv6 VTEP (flannel's flannel-v6.<VNI>): same VNI and port, the interface's IPv6 address.
        self.dev6_name = f"flannel-v6.{self.vni}"
        self.local6 = iface.address6 or iface.public_ipv6

    @property
    def mtu6(self) -> int:
        """flannel-v6.N's MTU: an outer IPv6 header is 20 bytes longer than an IPv4 one (the
        kernel's own default for such a device, and what pods' IPv6 path MTU discovery finds)."""
        return self.mtu - 20

    def ensure_vxlan_device(self, compatible, why_not: str, prepare=None, v6: bool = False, **vxlan) -> int:
        """For the backends that own the kernel device ``flannel.<VNI>`` (``v6``: ``flannel-v6.<VNI>``):
        create it (``vxlan``: its pyroute2 ``vxlan_*`` settings; learning is always off), or recreate
        it when an existing one is not ``compatible(link message)`` (``why_not`` says what it is
        then); give it our VtepMAC and MTU, ``prepare(index, link, created)`` what else it needs,
        exactly ``<subnet network address>/32`` (``v6``: ``<subnet6 network address>/128``;
        flannel removes any other address; IPv6-only, ``flannel.<VNI>`` of vxlan/ebpf: no IPv4
        address at all), and bring it up."""
        ipr = self.ipr
        name = self.dev6_name if v6 else self.dev_name
        idx = self.link_index(name)
        if idx is not None and not compatible(ipr.link("get", index=idx)[0]):
            log.info("%s exists but %s; recreating", name, why_not)
            ignore_gone(ipr.link, "del", index=idx)
            idx = None
        created = idx is None
        if created:
            try:
                ipr.link("add", ifname=name, kind="vxlan", vxlan_learning=0, **vxlan)
            except Exception as exc:
                if nl_errno(exc) != errno.EEXIST:
                    raise
            idx = self.link_index(name)
            if idx is None:
                raise BackendError(f"{self.name()}: {name} vanished right after it was created")
        link = ipr.link("get", index=idx)[0]
        if v6:
            set_mac_and_mtu(ipr, idx, link, self.vtep_mac6, self.mtu6)
        else:
            set_mac_and_mtu(ipr, idx, link, self.vtep_mac, self.mtu)
        if prepare is not None:
            prepare(idx, link, created)
        if v6:
            only_address(ipr, idx, str(self.lease.subnet6.network_address), 128, socket.AF_INET6)
        elif self.has_v4_side(self.lease):
            only_address(ipr, idx, str(self.lease.subnet.network_address))
        else:
            remove_addresses(ipr, idx)
        ipr.link("set", index=idx, state="up")
        return idx
