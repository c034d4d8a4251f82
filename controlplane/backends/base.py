"""The backend contract: what a data plane does for the daemon.

A backend is one implementation ("data plane") of one wire format, named ``<wire>/<dataplane>``
(``vxlan/kernel``, ``udp/fastpath`` ...). The daemon drives it in this order:

1. ``lease_attrs(previous)``: what this node advertises in its lease (BackendType, BackendData).
   ``previous`` is this node's lease from before a restart, if any, so that identities such as a
   VTEP MAC survive restarts and peers' entries never go stale.
2. ``setup(lease)``: build the node's data plane for the subnet it holds.
3. ``add_peer(lease)`` / ``remove_peer(lease)``: for every other node's lease, as they come and go.
   ``add_peer`` is also called when a peer's lease is renewed or changes, so it must be idempotent.
   ``peers_synced()``: once, after the first full listing of leases went through ``add_peer``:
   a data plane that outlived a previous daemon may drop what no lease holds now.
4. ``resync()``: called every few seconds; puts back anything someone removed behind our back.
5. ``teardown()``: remove the data plane (``weftd --teardown``); a plain SIGTERM leaves it in place.

``stats()`` returns counters for ``/metrics``. The daemon filters peers whose wire format differs
from ours before calling ``add_peer`` (see ``accepts``).
"""
from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..lease import NO_PUBLIC_IP, Lease, LeaseAttrs

if TYPE_CHECKING:  # controlplane.config reads the registry, which imports this module
    from ..config import NetworkConfig


class BackendError(Exception):
    """A backend cannot run; str() is one line that names the cause (and the fix, if known)."""


class BadBackendData(ValueError):
    """A peer's lease carries BackendData this data plane cannot use; str() says why."""


@dataclass(frozen=True)
class ExternalInterface:
    """The node's underlay interface, and the address peers reach it at."""
    name: str
    index: int
    address: ipaddress.IPv4Address | None  # the interface's own IPv4 address (IPv6-only: unused)
    public_ip: ipaddress.IPv4Address  # what goes into the lease (differs behind NAT); IPv6-only:
    # flannel's empty 0.0.0.0 (NO_PUBLIC_IP), the same for every node: never a node's name then
    mtu: int
    address6: ipaddress.IPv6Address | None = None  # the interface's own global IPv6 address
    public_ipv6: ipaddress.IPv6Address | None = None  # PublicIPv6 (None: the network is IPv4 only)


class BackendOptions:
    """Node-local switches from weftd's flags: the ones every backend reads, and each data plane's
    own flags (``spec.Flag``, declared with it) in ``flags``, by their dest name
    (``BackendOptions(vxlan_tx_csum_off=True).flags["vxlan_tx_csum_off"]``)."""
    __slots__ = ("ip_masq", "source_guard", "flags")

    def __init__(self, ip_masq: bool = False, source_guard: bool = False, **flags: Any):
        if flags:  # (the registry is read only then: the default instance is built at import)
            from . import flag_owners
            unknown = sorted(set(flags) - {flag.dest for flag in flag_owners()})
            if unknown:
                raise TypeError(f"BackendOptions: no backend declares the flag(s) {', '.join(unknown)}")
        self.ip_masq = ip_masq
        # vxlan/kernel, host-gw/kernel: attach a guard (fastpath/bpf/guard.py). See Backend.source_guard.
        self.source_guard = source_guard
        self.flags: dict[str, Any] = dict(flags)

    def __repr__(self) -> str:
        return f"BackendOptions(ip_masq={self.ip_masq}, source_guard={self.source_guard}, flags={self.flags})"


class Backend(ABC):
    wire_type: ClassVar[str]
    dataplane: ClassVar[str]

    def __init__(self, config: NetworkConfig, iface: ExternalInterface,
                 options: BackendOptions = BackendOptions()):
        self.config = config
        self.iface = iface
        self.options = options

    @classmethod
    def name(cls) -> str:
        return f"{cls.wire_type}/{cls.dataplane}"

    @property
    def mtu(self) -> int:
        """The MTU pods get (FLANNEL_MTU): underlay MTU minus the wire format's overhead."""
        return (self.config.backend.mtu or self.iface.mtu) - self.config.backend.mtu_overhead

    def accepts(self, lease: Lease) -> bool:
        """Whether a peer's lease speaks our wire format."""
        return lease.attrs.wire_type == self.wire_type

    def lease_attrs(self, previous: Lease | None) -> LeaseAttrs:
        """BackendType and the public addresses; IPv6-only: PublicIP is flannel's empty 0.0.0.0."""
        public_ip = self.iface.public_ip if self.config.enable_ipv4 else NO_PUBLIC_IP
        return LeaseAttrs(public_ip, self.wire_type, public_ipv6=self.iface.public_ipv6)

    @abstractmethod
    def setup(self, lease: Lease) -> None: ...

    @abstractmethod
    def add_peer(self, lease: Lease) -> None: ...

    @abstractmethod
    def remove_peer(self, lease: Lease) -> None: ...

    def peers_synced(self) -> None:
        pass

    def resync(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    # The stats that are levels (they may go down); every other stat only grows, and /metrics
    # shows it as a Prometheus counter (weft_backend_<name>_total; a restart may reset it).
    GAUGES: ClassVar[frozenset[str]] = frozenset()

    def stats(self) -> dict[str, float]:
        """The data plane's numbers by name, read now; ``GAUGES`` says which are levels."""
        return {}
