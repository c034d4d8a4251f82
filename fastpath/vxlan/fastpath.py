"""``vxlan/fastpath``: flannel's vxlan wire format carried by the compiled userspace engine.

The node looks exactly like a ``vxlan/kernel`` node to its peers: its lease says BackendType
``vxlan`` with BackendData ``{"VNI": n, "VtepMAC": "..."}``, so kernel peers program their static
neighbour/FDB/route entries for it and send VXLAN (UDP 8472, our VNI) with inner destination MAC =
our VtepMAC; the engine answers no ARP and needs none. The VtepMAC survives restarts (it comes
from the previous lease). Locally: a TUN named ``flannel.<VNI>`` (as the kernel backend's device,
which it replaces if one is left over) with ``<subnet>.0/32``, MTU = underlay MTU - 50, and the
whole Network routed through it; the engine adds/strips VXLAN + inner Ethernet
(dst = the peer's VtepMAC, src = ours, type IPv4).

``DirectRouting`` (``Backend.DirectRouting: true``) means what it means for ``vxlan/kernel``: a peer
whose PublicIP is on the underlay interface's own L2 subnet gets a kernel route
``<peer subnet> via <PublicIP> dev <underlay>`` and no engine route, so its traffic never reaches
the TUN; any other peer goes through the engine. Lease updates that move a peer between the two
switch it over, resync restores a removed direct route and teardown removes them (the netlink
side is ``fastpath/direct.py``, shared with ``vxlan/kernel``; the bookkeeping is
``fastpath/routing.py``'s, the engine's side ``fastpath/userspace.py``).
"""
from __future__ import annotations

from controlplane.lease import Lease

from fastpath.engine import load_engine
from fastpath.userspace import TunEngineBackend
from fastpath.vxlan.vtep import VtepIdentity

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
        return {"vni": self.vni, "vtep_mac": self.vtep_mac}
