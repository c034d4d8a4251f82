"""``udp/fastpath`` and ``udp/python``: flannel's udp backend, wire compatible with flanneld.

As flanneld's udp backend (``pkg/backend/udp``): TUN ``flannel0`` with ``<subnet>.0/32``, a route
for the whole Network through it, MTU = underlay MTU - 28, a UDP socket bound to the underlay
address and port 8285 (``Backend.Port``). The wire format is the bare inner IPv4 packet as the UDP
payload. The lease carries only PublicIP (no BackendType, no BackendData), exactly as flanneld
writes it, so flanneld udp nodes and weft udp nodes program each other.

- ``udp/fastpath``: the compiled engine (batches, TSO/USO reads, UDP GSO/GRO, TUN GSO writes).
- ``udp/python``: the pure-Python reference engine, one packet per system call: the baseline.

IPv4 only, as flannel's udp backend: the configuration refuses EnableIPv6 with these data planes,
and the backend itself refuses an interface with an IPv6 address or a lease with an IPv6 subnet
(BackendError, one line) should it ever be handed one.
"""
from __future__ import annotations

from controlplane.backends.base import BackendError
from controlplane.lease import Lease, LeaseAttrs

from fastpath.engine import load_engine
from fastpath.userspace import TunEngineBackend


class UDPFastpathBackend(TunEngineBackend):
    wire_type = "udp"
    dataplane = "fastpath"
    mode = "udp"
    vnet_hdr = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.enable_ipv6 or self.iface.public_ipv6 is not None:
            raise BackendError(f"{self.name()}: IPv6 refused: flannel's udp wire format carries IPv4"
                               " only; use vxlan or host-gw for dual-stack")

    @property
    def dev_name(self) -> str:
        return "flannel0"

    def lease_attrs(self, previous: Lease | None) -> LeaseAttrs:
        return LeaseAttrs(self.iface.public_ip)  # flanneld udp: no BackendType, no BackendData

    def setup(self, lease: Lease) -> None:
        if lease.subnet6 is not None:
            raise BackendError(f"{self.name()}: lease {lease.subnet} has IPv6 subnet {lease.subnet6}:"
                               " flannel's udp wire format carries IPv4 only")
        super().setup(lease)

    def engine_class(self):
        return load_engine()


class UDPPythonBackend(UDPFastpathBackend):
    dataplane = "python"
    vnet_hdr = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.workers = 1

    def engine_class(self):
        from fastpath.engine.reference import ReferenceEngine
        return ReferenceEngine
