"""The store's health as state: is it answering, since when not, and how many operations failed.

``MonitoredStore`` wraps a store so that every operation a daemon makes (the watch, renewals, the
claim refresh, the config check) feeds one ``StoreHealth``. An answer that is a refusal
(``LeaseExists``, ``LeaseNotFound``, ``ClaimChanged``, ``WatchCompacted``) is an answer: the store
is up. Any other ``StoreError`` (unreachable, a timeout, a SQLite file that is read-only, full or
corrupt) marks it down.

Logging is by state change only: one WARNING when the store goes away (with the reason) and one
INFO when it answers again (with how long it was away), whatever the number of failed retries.
A store that never answered yet (a daemon waiting at start) is down without the WARNING: the
daemon's own "waiting for the store" line says it.

A store whose writes fail while reads still work (a SQLite file on a read-only or full disk) is
down until a *write* succeeds again, so it does not flap with every successful read. And a store
that went away is back only once it has answered for ``BACK_AFTER`` seconds without a failure (a
full disk lets a write through now and then: that is not the end of the outage), or at once when
another endpoint answered in place of the one that failed (an etcd cluster with a member down).
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter

from .base import ClaimChanged, LeaseExists, LeaseNotFound, StoreError, WatchCompacted

log = logging.getLogger("weft.store")

ANSWERS = (LeaseExists, LeaseNotFound, ClaimChanged, WatchCompacted)  # the store did answer
WRITES = frozenset({"put_config", "create_lease", "update_lease", "delete_lease", "take_claim",
                    "refresh_claim", "release_claim"})
BACK_AFTER = 2.0  # seconds of answers without a failure before an outage is over
READS = frozenset({"get_config", "scan_subnets", "list_leases", "get_lease", "get_claim"})


class StoreHealth:
    def __init__(self, url: str):
        self.url = url
        self.up: bool | None = None  # None: never answered yet
        self.down_since: float | None = None  # epoch seconds
        self.reason = ""
        self.errors: Counter[str] = Counter()  # failed operations by op
        self.outages = 0
        self._writes_failed = False  # down because writes fail: only a write brings it back
        self._good_since: float | None = None  # first answer since the last failure (while down)
        self._lock = threading.Lock()

    def answered(self, op: str) -> None:
        with self._lock:
            if self.up:
                return
            if self._writes_failed and op not in WRITES:
                return
            was_down, since = self.down_since is not None, self.down_since
            now = time.time()
            if was_down and self.outages:  # an outage, not the first answer of a waiting start
                if self._good_since is None:
                    self._good_since = now
                if now - self._good_since < BACK_AFTER:
                    return
            self.up, self.down_since, self.reason, self._writes_failed = True, None, "", False
            self._good_since = None
        if was_down:
            log.info("store %s is back after %.0f s", self.url, time.time() - since)

    def failed_over(self, endpoint: str) -> None:
        """Another endpoint of the store answered in place of one that failed (an etcd member
        died): the store answers again, so an outage ends at once. ``BACK_AFTER`` is for a store
        that answers now and then from the same place (a full disk), not for a failover."""
        with self._lock:
            if self.up is not False or not self.outages:  # up, or a start still waiting
                return
            since = self.down_since
            self.up, self.down_since, self.reason, self._writes_failed = True, None, "", False
            self._good_since = None
        log.info("store %s is back after %.0f s (%s answers)", self.url, time.time() - since, endpoint)

    def failed(self, op: str, exc: BaseException) -> None:
        if isinstance(exc, ANSWERS):
            self.answered(op)
            return
        with self._lock:
            self.errors[op] += 1
            self._good_since = None
            if op in WRITES:
                self._writes_failed = True
            if self.up is False:
                return
            was_up = self.up
            self.up, self.down_since, self.reason = False, time.time(), str(exc)
            if was_up:
                self.outages += 1
        if was_up:
            log.warning("store %s is unavailable: %s (on %s; weftd keeps its lease and data plane,"
                        " and retries)", self.url, exc, op)


class _MonitoredWatch:
    def __init__(self, watch, health: StoreHealth):
        self._watch = watch
        self._health = health

    def get(self, timeout: float):
        try:
            events = self._watch.get(timeout)
        except StoreError as exc:
            self._health.failed("watch", exc)
            raise
        if events:  # silence proves nothing (a paused etcd is silent too)
            self._health.answered("watch")
        return events

    def close(self) -> None:
        self._watch.close()


class MonitoredStore:
    """A store whose every operation reports to ``health``; anything else passes through."""

    def __init__(self, store, health: StoreHealth):
        self._store = store
        self.health = health
        store.on_failover(health.failed_over)

    def _call(self, op: str, fn, *args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except StoreError as exc:
            self.health.failed(op, exc)
            raise
        self.health.answered(op)
        return result

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if name in WRITES or name in READS:
            return functools.partial(self._call, name, attr)
        return attr

    def watch(self, since_revision: int):
        try:  # opening a watch may reuse a connection: only its events prove an answer
            watch = self._store.watch(since_revision)
        except StoreError as exc:
            self.health.failed("watch", exc)
            raise
        return _MonitoredWatch(watch, self.health)

    def close(self) -> None:
        self._store.close()
