"""The VTEP identity every vxlan data plane advertises: ``{"VNI": n, "VtepMAC": "..."}``.

The MAC must survive restarts, or peers keep neighbour and FDB entries for a MAC nobody answers
to (flannel issues #533, #1036, #1330). So a node reuses, in order: the VtepMAC of its previous
lease, the MAC of a device of its name that is still there, and only then a new random
locally administered one. The kernel, eBPF and userspace vxlan backends all take it from here.
"""
from __future__ import annotations

import errno
import logging
import random
import re

from controlplane.backends.base import BackendError, BackendOptions
from controlplane.lease import Lease, LeaseAttrs

from ..netlink import ignore_gone, nl_errno, only_address, set_mac_and_mtu

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


def lease_mac(lease: Lease | None) -> str | None:
    """The VtepMAC a lease advertises, when it holds a valid one."""
    data = lease.attrs.backend_data if lease is not None else None
    return parse_unicast_mac(data.get("VtepMAC")) if isinstance(data, dict) else None


def no_mac_reason(lease: Lease) -> str:
    """Why ``lease_mac(lease)`` is None, for the log."""
    data = lease.attrs.backend_data
    if not isinstance(data, dict):
        return "no BackendData object"
    raw = data.get("VtepMAC")
    return "no VtepMAC" if raw is None else f"VtepMAC {raw!r} is not a unicast MAC"


class VtepIdentity:
    """Mixin for a NetlinkBackend with ``vni``, ``dev_name`` and ``vtep_mac`` (None until chosen)."""

    def decode(self, lease: Lease):
        """A peer's lease as a ``fastpath.routing.Peer``: its VtepMAC, and whether DirectRouting
        takes it past the tunnel; BadBackendData without a unicast VtepMAC."""
        from controlplane.backends.base import BadBackendData
        from fastpath.routing import Peer
        mac = lease_mac(lease)
        if mac is None:
            raise BadBackendData(no_mac_reason(lease))
        return Peer(lease.subnet, lease.attrs.public_ip, mac, self.is_direct(lease.attrs.public_ip))

    def lease_attrs(self, previous: Lease | None) -> LeaseAttrs:
        with self._lock:
            if self.vtep_mac is None:
                self.vtep_mac = self._pick_mac(previous)
            return LeaseAttrs(self.iface.public_ip, self.wire_type,
                              {"VNI": self.vni, "VtepMAC": self.vtep_mac})

    def _pick_mac(self, previous: Lease | None) -> str:
        return lease_mac(previous) or self._device_mac() or random_mac()

    def _device_mac(self) -> str | None:
        idx = self.link_index(self.dev_name)
        if idx is None:
            return None
        return parse_unicast_mac(self.ipr.link("get", index=idx)[0].get("IFLA_ADDRESS"))

    def _adopt_mac(self, lease: Lease) -> None:
        """At setup without lease_attrs first (a test, a restart path): take the lease's MAC."""
        if self.vtep_mac is None:
            self.vtep_mac = lease_mac(lease) or self._pick_mac(None)


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

    def ensure_vxlan_device(self, compatible, why_not: str, prepare=None, **vxlan) -> int:
        """For the backends that own the kernel device ``flannel.<VNI>``: create it (``vxlan``:
        its pyroute2 ``vxlan_*`` settings; learning is always off), or recreate it when an existing
        one is not ``compatible(link message)`` (``why_not`` says what it is then); give it our
        VtepMAC and MTU, ``prepare(index, link, created)`` what else it needs, exactly
        ``<subnet network address>/32`` (flannel removes any other address), and bring it up."""
        ipr = self.ipr
        idx = self.link_index(self.dev_name)
        if idx is not None and not compatible(ipr.link("get", index=idx)[0]):
            log.info("%s exists but %s; recreating", self.dev_name, why_not)
            ignore_gone(ipr.link, "del", index=idx)
            idx = None
        created = idx is None
        if created:
            try:
                ipr.link("add", ifname=self.dev_name, kind="vxlan", vxlan_learning=0, **vxlan)
            except Exception as exc:
                if nl_errno(exc) != errno.EEXIST:
                    raise
            idx = self.link_index(self.dev_name)
            if idx is None:
                raise BackendError(f"{self.name()}: {self.dev_name} vanished right after it was created")
        link = ipr.link("get", index=idx)[0]
        set_mac_and_mtu(ipr, idx, link, self.vtep_mac, self.mtu)
        if prepare is not None:
            prepare(idx, link, created)
        only_address(ipr, idx, str(self.lease.subnet.network_address))
        ipr.link("set", index=idx, state="up")
        return idx
