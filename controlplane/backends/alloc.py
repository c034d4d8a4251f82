"""``alloc``: subnet allocation only, no forwarding (flannel's experimental ``alloc`` backend).

Useful on its own when something else moves the packets, and to run the control plane alone.
"""
from __future__ import annotations

from ..lease import Lease
from .base import Backend
from .spec import Dataplane, Wire

WIRE = Wire("alloc", mtu_overhead=0, default_dataplane="kernel",
            summary="subnet allocation only, no forwarding")
# bench run measures the bare underlay with this backend ("bare"), not as a data plane of its own
DATAPLANES = (Dataplane("alloc", "kernel", "controlplane.backends.alloc:AllocBackend",
                        "leases only; something else moves the packets", bench=False,
                        ipv6=True),)  # leases of both families; no traffic of its own


class AllocBackend(Backend):
    wire_type = "alloc"
    dataplane = "kernel"
    GAUGES = frozenset({"peers_programmed"})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.peers: dict = {}

    def accepts(self, lease: Lease) -> bool:
        return True  # allocation only: every lease is a peer, whatever it speaks

    def setup(self, lease: Lease) -> None:
        self.lease = lease

    def add_peer(self, lease: Lease) -> None:
        self.peers[lease.ident] = lease  # not .subnet: every IPv6-only lease's is 0.0.0.0/0

    def remove_peer(self, lease: Lease) -> None:
        self.peers.pop(lease.ident, None)

    def stats(self) -> dict[str, float]:
        return {"peers_programmed": len(self.peers)}
