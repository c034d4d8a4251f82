"""What a running weftd reports about itself: one typed snapshot (``Daemon.status()``).

``/metrics``, ``/readyz`` and ``/healthz`` (``controlplane.health``) and the tests read this, never
the daemon's fields, so the daemon may keep its state however it likes. A snapshot is taken at
scrape time and never changes afterwards. Counts are the daemon's own (nothing is counted per
packet in Python); what is not known yet is ``None`` (no lease, no watch, no config, no store,
no backend), never 0.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

WATCH_EVENT_KINDS = ("added", "renewed", "removed", "expired")


@dataclass(frozen=True)
class LeaseStatus:
    subnet: ipaddress.IPv4Network | None  # None: an IPv6-only lease (no IPv4 side)
    public_ip: str | None  # None: an IPv6-only lease (its PublicIP is flannel's empty 0.0.0.0)
    expiration: float | None  # epoch seconds; None for a reservation (never expires)
    subnet6: ipaddress.IPv6Network | None = None  # dual-stack or IPv6-only
    public_ipv6: str | None = None

    @classmethod
    def of(cls, lease) -> "LeaseStatus":
        """The status of a ``controlplane.lease.Lease``: its IPv4 side only when it has one."""
        v4 = lease.has_ipv4
        six = lease.attrs.public_ipv6
        return cls(lease.subnet if v4 else None, str(lease.attrs.public_ip) if v4 else None,
                   lease.expiration, lease.subnet6, None if six is None else str(six))


@dataclass(frozen=True)
class WatchStatus:
    """The lease watch (``controlplane.manager.LeaseWatcher``)."""
    events: dict[str, int]  # lease events seen, by kind (WATCH_EVENT_KINDS)
    resyncs: int  # re-lists after falling behind
    errors: int  # store errors while watching
    leases_invalid: dict[str, int]  # writes under <prefix>/subnets/ refused, by reason


@dataclass(frozen=True)
class StoreStatus:
    """The store's health (``controlplane.store.monitor.StoreHealth``) and operation counts."""
    url: str
    up: bool  # answering now (False also before it ever answered)
    down_since: float | None  # epoch seconds while it does not answer
    errors: dict[str, int]  # failed operations by op
    outages: int
    ops: dict[str, float] | None  # operations by op (None before the store is open, or not asked)


@dataclass(frozen=True)
class ConfigStatus:
    """The network config in the store, against the one this daemon started with."""
    stale: bool  # the stored config is not the one weftd runs with
    changes: int  # new config texts seen while running (never applied)
    invalid: int  # of those, configs weftd could not start with


@dataclass(frozen=True)
class DaemonStatus:
    set_up: bool  # lease, data plane and subnet.env in place (weft_ready)
    ready: bool  # /readyz: 200 when true (set up, the lease not expired, the watch running)
    ready_reason: str  # /readyz's body ("ready", or why not)
    dead_threads: tuple[str, ...]  # /healthz: threads that should run and do not
    lease: LeaseStatus | None
    peers: int  # peers programmed
    peers_incompatible: int  # peers whose lease speaks another wire format
    peers_changed_at: float  # epoch seconds; 0 before the first change
    peers_initial_sync_s: float | None  # the first listing through the data plane; None before
    renewals: int
    renewal_errors: int
    leases_reacquired: int  # leases taken again after they expired unrenewed
    store: StoreStatus
    link_up_resyncs: int = 0  # resyncs because the underlay interface came back up
    watch: WatchStatus | None = None  # None before the lease watch starts
    config: ConfigStatus | None = None  # None before the config was read
    backend: str | None = None  # "wire/dataplane", None before the backend is made
    backend_stats: dict[str, float] = field(default_factory=dict)  # the data plane's numbers (if asked)
    backend_gauges: frozenset[str] = frozenset()  # which of them are levels (Backend.GAUGES); the rest only grow
