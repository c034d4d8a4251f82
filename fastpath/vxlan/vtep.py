"""The VTEP identity every vxlan data plane advertises: ``{"VNI": n, "VtepMAC": "..."}``.

The MAC must survive restarts, or peers keep neighbour and FDB entries for a MAC nobody answers
to (flannel issues #533, #1036, #1330). So a node reuses, in order: the VtepMAC of its previous
lease, the MAC of a device of its name that is still there, and only then a new random
locally administered one. The kernel, eBPF and userspace vxlan backends all take it from here.
"""
from __future__ import annotations

import random
import re

from controlplane.lease import Lease, LeaseAttrs

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


class VtepIdentity:
    """Mixin for a NetlinkBackend with ``vni``, ``dev_name`` and ``vtep_mac`` (None until chosen)."""

    def _init_vxlan_device(self, config, iface) -> None:
        """For the backends that own the kernel device ``flannel.<VNI>`` (vxlan/kernel, vxlan/ebpf):
        its VNI, UDP port, name and local underlay address, as flannel names them."""
        self.vni = config.backend.vni
        self.port = config.backend.effective_port
        self.dev_name = f"flannel.{self.vni}"
        self.local = iface.address or iface.public_ip
        self.vtep_mac: str | None = None
        self.lease: Lease | None = None

    def lease_attrs(self, previous: Lease | None) -> LeaseAttrs:
        with self._lock:
            if self.vtep_mac is None:
                self.vtep_mac = self._pick_mac(previous)
            return LeaseAttrs(self.iface.public_ip, self.wire_type,
                              {"VNI": self.vni, "VtepMAC": self.vtep_mac})

    def _pick_mac(self, previous: Lease | None) -> str:
        return lease_mac(previous) or self._device_mac() or random_mac()

    def _device_mac(self) -> str | None:
        found = self.ipr.link_lookup(ifname=self.dev_name)
        if not found:
            return None
        return parse_unicast_mac(self.ipr.link("get", index=found[0])[0].get("IFLA_ADDRESS"))

    def _adopt_mac(self, lease: Lease) -> None:
        """At setup without lease_attrs first (a test, a restart path): take the lease's MAC."""
        if self.vtep_mac is None:
            self.vtep_mac = lease_mac(lease) or self._pick_mac(None)
