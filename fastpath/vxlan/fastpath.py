"""``vxlan/fastpath``: flannel's vxlan wire format carried by the compiled userspace engine.

The node looks exactly like a ``vxlan/kernel`` node to its peers: its lease says BackendType
``vxlan`` with BackendData ``{"VNI": n, "VtepMAC": "..."}``, so kernel peers program their static
neighbour/FDB/route entries for it and send VXLAN (UDP 8472, our VNI) with inner destination MAC =
our VtepMAC; the engine answers no ARP and needs none. The VtepMAC survives restarts (it comes
from the previous lease). Locally: a TUN named ``flannel.<VNI>`` (as the kernel backend's device,
which it replaces if one is left over) with ``<subnet>.0/32``, MTU = underlay MTU - 50, and the
whole Network routed through it; the engine adds/strips VXLAN + inner Ethernet
(dst = the peer's VtepMAC, src = ours, type IPv4).

Dual-stack (EnableIPv6): the node also looks like a kernel node's ``flannel-v6.<VNI>``: its lease
adds PublicIPv6 and BackendV6Data ``{"VNI": n, "VtepMAC": "<v6 MAC>"}`` (its own MAC, kept across
restarts as the v4 one), the same TUN also gets ``<subnet6 network address>/128`` and the
IPv6Network routed through it (route MTU = TUN MTU - 20: the IPv6 outer header is 20 bytes
longer), and the engine sends inner IPv6 packets as VXLAN (inner type 0x86DD, dst = the peer's v6
VtepMAC, src = ours) from a second UDP socket on PublicIPv6, same VNI and port; what arrives
there must be IPv6 to our v6 VtepMAC from inside the sending peer's IPv6 subnet.

``DirectRouting`` (``Backend.DirectRouting: true``) means what it means for ``vxlan/kernel``: a peer
whose PublicIP is on the underlay interface's own L2 subnet gets a kernel route
``<peer subnet> via <PublicIP> dev <underlay>`` and no engine route, so its traffic never reaches
the TUN; any other peer goes through the engine. Lease updates that move a peer between the two
switch it over, resync restores a removed direct route and teardown removes them (the netlink
side is ``fastpath/direct.py``, shared with ``vxlan/kernel``; the bookkeeping is
``fastpath/routing.py``'s, the engine's side ``fastpath/userspace.py``).

IPv6-only (EnableIPv4 false): the node looks like a kernel node that has only ``flannel-v6.<VNI>``:
its lease is ``0.0.0.0-0&<subnet6>`` with PublicIP 0.0.0.0, PublicIPv6 and BackendV6Data only. The
TUN keeps its name ``flannel.<VNI>`` but holds only the IPv6 address and route, and the engine only
its IPv6 socket.
"""
from __future__ import annotations

import logging

from controlplane.lease import Lease

from fastpath.engine import load_engine
from fastpath.netlink import ignore_gone
from fastpath.userspace import TunEngineBackend
from fastpath.vxlan.vtep import VtepIdentity

log = logging.getLogger("weft.backend.engine")


class VXLANFastpathBackend(VtepIdentity, TunEngineBackend):
    wire_type = "vxlan"
    dataplane = "fastpath"
    mode = "vxlan"
    vnet_hdr = True
    supports_direct_routing = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vtep_mac: str | None = None

    @property
    def dev_name(self) -> str:
        return f"flannel.{self.vni}"

    def setup(self, lease: Lease) -> None:
        self._adopt_mac(lease)
        super().setup(lease)

    def engine_class(self):
        return load_engine()

    def engine_kwargs(self) -> dict:
        # IPv6-only: no IPv4 VTEP (the lease has no BackendData), so no MAC for it either
        return {"vni": self.vni, "vtep_mac": self.vtep_mac if self.carries_ipv4 else None}

    def engine_kwargs6(self) -> dict:
        return {"vtep_mac6": self.vtep_mac6}

    def _remove_stale_device(self) -> None:
        """Also a kernel ``flannel-v6.<VNI>`` (left by vxlan/kernel): it holds our IPv6 UDP port."""
        super()._remove_stale_device()
        idx = self.link_index(f"flannel-v6.{self.vni}")
        if idx is not None:
            log.info("removing the existing flannel-v6.%s before opening the TUN", self.vni)
            ignore_gone(self.ipr.link, "del", index=idx)
