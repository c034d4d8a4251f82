"""The storage interface every store implements (flannel's ``Registry``, narrowed).

A store keeps raw strings: the config document and one value per subnet key, each with an optional
TTL. It knows nothing about allocation (``controlplane.manager`` does that once for every store) and
never parses lease values. Every change gets a store-wide revision, and ``watch(since)`` replays the
changes after a revision, so a watcher that lists at revision R and then watches from R loses
nothing, however many writers there are.

Contract (tests/store_contract.py runs it against every store):
- ``create_lease`` is atomic create-if-absent: two racing creators, one wins, the other gets
  ``LeaseExists``.
- ``update_lease`` only updates a key that exists (so a lease an operator deleted is not brought
  back by a renewal): otherwise ``LeaseNotFound``.
- a TTL of ``None`` means no expiry (a reservation). An expired key is absent for every read and
  its removal is an event (``expired=True`` where the store can tell).
- ``watch(since)`` returns events with revision > ``since`` in revision order; if the store no
  longer holds history back to ``since`` it raises ``WatchCompacted`` and the caller re-lists.
"""
from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from dataclasses import dataclass


class StoreError(Exception):
    """A store failure; str() is one line."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now; the caller may retry."""


class LeaseExists(StoreError):
    pass


class LeaseNotFound(StoreError):
    pass


class WatchCompacted(StoreError):
    """History back to the requested revision is gone; re-list and watch from the new revision."""


@dataclass(frozen=True)
class LeaseRecord:
    subnet: ipaddress.IPv4Network
    value: str
    expiration: float | None  # epoch seconds, None = no TTL (reservation)
    revision: int  # revision of the last change to this key


@dataclass(frozen=True)
class StoreEvent:
    kind: str  # "put" or "delete"
    subnet: ipaddress.IPv4Network
    revision: int
    record: LeaseRecord | None = None  # set for "put"
    expired: bool = False  # "delete" caused by TTL expiry, where the store can tell


class Watch(ABC):
    @abstractmethod
    def get(self, timeout: float) -> list[StoreEvent]:
        """Events after the last one returned; [] when none arrive within ``timeout`` seconds.
        Raises WatchCompacted or StoreUnavailable."""

    @abstractmethod
    def close(self) -> None: ...


class Store(ABC):
    url: str = ""

    @abstractmethod
    def get_config(self) -> str | None: ...

    @abstractmethod
    def put_config(self, text: str) -> None: ...

    @abstractmethod
    def list_leases(self) -> tuple[list[LeaseRecord], int]:
        """All live leases and the store revision they were read at."""

    @abstractmethod
    def get_lease(self, subnet: ipaddress.IPv4Network) -> LeaseRecord | None: ...

    @abstractmethod
    def create_lease(self, subnet: ipaddress.IPv4Network, value: str,
                     ttl: float | None) -> LeaseRecord: ...

    @abstractmethod
    def update_lease(self, subnet: ipaddress.IPv4Network, value: str,
                     ttl: float | None) -> LeaseRecord: ...

    @abstractmethod
    def delete_lease(self, subnet: ipaddress.IPv4Network) -> bool:
        """True when a live key was deleted."""

    @abstractmethod
    def watch(self, since_revision: int) -> Watch: ...

    def stats(self) -> dict[str, float]:
        """Operation counters for metrics (``weft_store_ops_total`` by op)."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
