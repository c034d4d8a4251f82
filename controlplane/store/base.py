"""The storage interface every store implements (flannel's ``Registry``, narrowed).

A store keeps raw strings: the config document and one value per subnet key, each with an optional
TTL. It knows nothing about allocation (``controlplane.manager`` does that once for every store) and
never parses lease values. Every change gets a store-wide revision, and ``watch(since)`` replays the
changes after a revision, so a watcher that lists at revision R and then watches from R loses
nothing, however many writers there are.

Contract (tests/store_contract.py runs it against every store):
- Lease keys are flannel's: ``<ip>-<len>``, or ``<ip>-<len>&<ip6>-<len6>`` for a dual-stack
  lease; the lease methods take the IPv4 subnet and the IPv6 one (``subnet6``, None for none).
- ``create_lease`` is atomic create-if-absent: two racing creators, one wins, the other gets
  ``LeaseExists``. A lease is its identity (``LeaseRecord.ident``): its IPv4 subnet, so a key of
  the same IPv4 subnet with another (or no) IPv6 part makes the create fail too; an IPv6-only
  lease (``0.0.0.0-0&<ip6>-<len6>``) is its IPv6 subnet, so IPv6-only leases of distinct IPv6
  subnets coexist.
- ``update_lease`` only updates a key that exists (so a lease an operator deleted is not brought
  back by a renewal): otherwise ``LeaseNotFound``.
- a TTL of ``None`` means no expiry (a reservation). An expired key is absent for every read and
  its removal is an event (``expired=True`` where the store can tell).
- ``watch(since)`` returns events with revision > ``since`` in revision order; if the store no
  longer holds history back to ``since`` it raises ``WatchCompacted`` and the caller re-lists.
- Keys under ``<prefix>/subnets/`` that are not lease keys (``<ip>-<len>[&<ip6>-<len6>]`` exactly
  as flannel writes it, nothing nested) are someone else's writing, never leases: ``scan_subnets`` returns
  them apart as ``ForeignKey``, and ``watch`` reports their changes as ``foreign`` events, so the
  caller can log and count them (``list_leases`` leaves them out).
- ``watch`` also reports every change of the config key (``config`` events), so a daemon notices
  a config rewritten under it without polling.
"""
from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..lease import Ident, lease_ident


class StoreError(Exception):
    """A store failure; str() is one line."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now; the caller may retry."""


class StoreCorrupt(StoreUnavailable):
    """The store's data cannot be read (a SQLite file that is no database any more). A running
    daemon retries (the file may be restored); a daemon starting stops with this one line."""


class LeaseExists(StoreError):
    pass


class LeaseNotFound(StoreError):
    pass


class WatchCompacted(StoreError):
    """History back to the requested revision is gone; re-list and watch from the new revision."""


class ClaimChanged(StoreError):
    """A node claim is not what the caller expected (taken, replaced or gone meanwhile)."""


@dataclass(frozen=True)
class LeaseRecord:
    subnet: ipaddress.IPv4Network
    value: str
    expiration: float | None  # epoch seconds, None = no TTL (reservation)
    revision: int  # revision of the last change to this key
    subnet6: ipaddress.IPv6Network | None = None  # a dual-stack or IPv6-only key's IPv6 part

    @property
    def ident(self) -> Ident:
        """What names the lease among the others (``controlplane.lease.lease_ident``)."""
        return lease_ident(self.subnet, self.subnet6)


@dataclass(frozen=True)
class ForeignKey:
    """A key under ``<prefix>/subnets/`` that is not a lease key: someone else wrote it."""
    name: str  # the key's name under subnets/
    revision: int  # revision of its last change


@dataclass(frozen=True)
class SubnetScan:
    """Everything under ``<prefix>/subnets/`` at one revision."""
    records: list[LeaseRecord]
    foreign: list[ForeignKey]
    revision: int


@dataclass(frozen=True)
class StoreEvent:
    # "put" / "delete": a lease key; "foreign": a key under subnets/ that is not a lease key was
    # written (value set) or deleted (value None); "config": the config was written (value set)
    # or deleted (value None).
    kind: str
    subnet: ipaddress.IPv4Network | None  # None for "foreign" and "config"
    revision: int
    record: LeaseRecord | None = None  # set for "put"
    expired: bool = False  # "delete" caused by TTL expiry, where the store can tell
    name: str = ""  # "foreign": the key's name under subnets/
    value: str | None = None  # "foreign" and "config": the text written; None when deleted
    subnet6: ipaddress.IPv6Network | None = None  # "put", "delete": the key's IPv6 part

    @property
    def ident(self) -> Ident | None:
        """"put", "delete": what names the lease (``controlplane.lease.lease_ident``); else None."""
        return None if self.subnet is None else lease_ident(self.subnet, self.subnet6)


@dataclass(frozen=True)
class ClaimRecord:
    """A node claim: which running weftd uses a public IP (``controlplane.claim``). Kept apart
    from the leases (etcd ``<prefix>/weft/claims/<ip>``), so flanneld and lease watchers never
    see it."""
    public_ip: str
    value: str  # weft's JSON, opaque to the store
    expiration: float | None  # epoch seconds; None only for a key written by hand without TTL
    revision: int  # changes on every take and every refresh
    lease_id: int = 0  # etcd: the lease the key is attached to (kept alive by refreshes)


class Watch(ABC):
    @abstractmethod
    def get(self, timeout: float) -> list[StoreEvent]:
        """Events after the last one returned; [] when none arrive within ``timeout`` seconds.
        Raises WatchCompacted or StoreUnavailable."""

    @abstractmethod
    def close(self) -> None: ...


class Store(ABC):
    url: str = ""  # for messages: where the store is
    prefix: str = ""  # -etcd-prefix without its trailing "/": etcd's keys, the SQLite file's namespace

    def config_key(self) -> str:
        """Where the network config is, for messages (``<prefix>/config``, flanneld's key)."""
        return f"{self.prefix}/config"

    @abstractmethod
    def get_config(self) -> str | None: ...

    @abstractmethod
    def put_config(self, text: str) -> None: ...

    @abstractmethod
    def scan_subnets(self) -> SubnetScan:
        """All live leases, the foreign keys beside them, and the revision they were read at."""

    def list_leases(self) -> tuple[list[LeaseRecord], int]:
        """All live leases and the store revision they were read at."""
        scan = self.scan_subnets()
        return scan.records, scan.revision

    @abstractmethod
    def get_lease(self, subnet: ipaddress.IPv4Network,
                  subnet6: ipaddress.IPv6Network | None = None) -> LeaseRecord | None: ...

    @abstractmethod
    def create_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: float | None,
                     subnet6: ipaddress.IPv6Network | None = None) -> LeaseRecord: ...

    @abstractmethod
    def update_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: float | None,
                     subnet6: ipaddress.IPv6Network | None = None) -> LeaseRecord: ...

    @abstractmethod
    def delete_lease(self, subnet: ipaddress.IPv4Network,
                     subnet6: ipaddress.IPv6Network | None = None) -> bool:
        """True when a live key was deleted."""

    @abstractmethod
    def watch(self, since_revision: int) -> Watch: ...

    # -- node claims (one running weftd per public IP; never a lease, never a watch event) -------
    @abstractmethod
    def get_claim(self, public_ip: str) -> ClaimRecord | None:
        """The live claim of ``public_ip``, or None."""

    @abstractmethod
    def take_claim(self, public_ip: str, value: str, ttl: float,
                   expected: ClaimRecord | None) -> ClaimRecord:
        """Atomically: create the claim when ``expected`` is None and there is no live claim, or
        replace ``expected`` when the claim is still exactly that; else ``ClaimChanged``."""

    @abstractmethod
    def refresh_claim(self, public_ip: str, record: ClaimRecord, ttl: float) -> ClaimRecord:
        """Extend our claim by ``ttl`` and change its revision (so a waiting newcomer sees that its
        holder is alive); ``ClaimChanged`` when it is no longer ``record`` (expired or taken)."""

    @abstractmethod
    def release_claim(self, public_ip: str, record: ClaimRecord) -> bool:
        """Delete the claim if it is still ``record``; True when deleted."""

    def stats(self) -> dict[str, float]:
        """Operation counters for metrics (``weft_store_ops_total`` by op)."""
        return {}

    def on_failover(self, listener) -> None:
        """A store with several endpoints calls ``listener(endpoint)`` when ``endpoint`` answered
        in place of one that failed (``controlplane.store.monitor`` counts that as an answer of
        the store at once). A store with one endpoint never fails over."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
