"""Lease logic, written once for every store (flannel's LocalManager).

Acquisition, in flannel's order (``tryAcquireLease``):
1. the lease (or reservation) this public IP already holds, if the config still covers it;
2. else the subnet from the previous subnet.env, if free and inside the config;
3. else a random free subnet among the first 100 free ones between SubnetMin and SubnetMax.
Creation is atomic create-if-absent; a lost race retries (10 times, as flannel). Keys without TTL
are reservations: only the public IP written in them ever takes them.

Renewal re-puts the value with a fresh TTL, and only if the key still exists: a lease an operator
deleted raises ``LeaseRevoked`` instead of being quietly recreated.

``LeaseWatcher`` turns a store's raw history into lease events (added, renewed, removed, expired),
listing first and then watching from the listed revision, so no lease is missed however many
daemons start at once; after a compaction or a reconnect it re-lists and emits the difference.
It judges every lease against the network config (``controlplane.leasecheck``): an invalid one is
logged and counted once per write and never becomes an event; a known lease rewritten into an
invalid one is "removed" (with the reason). It also reports each new config text it sees.
"""
from __future__ import annotations

import ipaddress
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from .config import NetworkConfig, parse_config
from .lease import Lease, LeaseAttrs, LeaseFormatError, subnet_key
from .leasecheck import InvalidLeases, judge, key_problem
from .store import (LeaseExists, LeaseNotFound, LeaseRecord, Store, StoreError, StoreUnavailable,
                    WatchCompacted)

log = logging.getLogger("weft.lease")

RACE_RETRIES = 10
FREE_CANDIDATES = 100
DEFAULT_TTL = 24 * 3600


class ConfigMissing(StoreError):
    pass


class NetworkFull(StoreError):
    pass


class LeaseRevoked(StoreError):
    pass


def decode(record: LeaseRecord, config: NetworkConfig | None = None) -> Lease:
    """A store record as a Lease; LeaseFormatError (with its reason) when it is not one weftd
    follows: not flannel's format, or, given the config, not a subnet of it."""
    return judge(record, config)


class LeaseManager:
    def __init__(self, store: Store, ttl: float = DEFAULT_TTL, rng: random.Random | None = None):
        self.store = store
        self.ttl = ttl
        self.rng = rng or random.Random()

    def get_config(self) -> NetworkConfig:
        text = self.store.get_config()
        if text is None:
            raise ConfigMissing(f"network config not found at {self.store.config_key()} "
                                "(write it with: weftctl config put FILE; with etcd, the v3 API)")
        return parse_config(text)

    def leases(self) -> tuple[list[Lease], int]:
        """Every live lease in flannel's format (not judged further: this is for finding a node's
        own lease, which the acquisition checks against the config); malformed ones are skipped
        (the watcher logs and counts them)."""
        records, rev = self.store.list_leases()
        out = []
        for r in records:
            try:
                out.append(Lease(r.subnet, LeaseAttrs.from_json(r.value), r.expiration, r.revision))
            except LeaseFormatError:
                continue
        return out, rev

    def find_by_ip(self, public_ip: ipaddress.IPv4Address) -> Lease | None:
        leases, _ = self.leases()
        return next((l for l in leases if l.attrs.public_ip == public_ip), None)

    def acquire(self, config: NetworkConfig, attrs: LeaseAttrs,
                previous_subnet: ipaddress.IPv4Network | None = None) -> Lease:
        value = attrs.to_json()
        for _ in range(RACE_RETRIES):
            records, _ = self.store.list_leases()
            taken = {r.subnet for r in records}
            mine = None
            for r in records:
                try:
                    if LeaseAttrs.from_json(r.value).public_ip == attrs.public_ip:
                        mine = r
                        break
                except LeaseFormatError:
                    continue
            if mine is not None:
                if config.contains_subnet(mine.subnet):
                    ttl = None if mine.expiration is None else self.ttl  # a reservation stays one
                    try:
                        rec = self.store.update_lease(mine.subnet, value, ttl)
                    except LeaseNotFound:
                        continue  # deleted under us: start over
                    log.info("reusing lease %s held by %s", mine.subnet, attrs.public_ip)
                    return Lease(rec.subnet, attrs, rec.expiration, rec.revision)
                log.warning("lease %s of %s is outside the current config; deleting it",
                            mine.subnet, attrs.public_ip)
                self.store.delete_lease(mine.subnet)
                taken.discard(mine.subnet)

            if previous_subnet is not None and config.contains_subnet(previous_subnet) \
                    and previous_subnet not in taken:
                candidate = previous_subnet
            else:
                candidate = self._random_free(config, taken)
            try:
                rec = self.store.create_lease(candidate, value, self.ttl)
            except LeaseExists:
                continue
            log.info("acquired lease %s for %s", candidate, attrs.public_ip)
            return Lease(rec.subnet, attrs, rec.expiration, rec.revision)
        raise StoreError(f"could not acquire a lease after {RACE_RETRIES} races with other nodes")

    def _random_free(self, config: NetworkConfig, taken: set) -> ipaddress.IPv4Network:
        # Integers, not IPv4Network objects, in the scan: it walks every subnet of a crowded network.
        used = {int(s.network_address) for s in taken if s.prefixlen == config.subnet_len}
        start, size = int(config.subnet_min), config.subnet_size
        free = []
        for addr in range(start, int(config.subnet_max) + 1, size):
            if addr not in used:
                free.append(addr)
                if len(free) >= FREE_CANDIDATES:
                    break
        if not free:
            raise NetworkFull(f"network {config.network} is full: all {config.subnet_count} "
                              f"/{config.subnet_len} subnets between {config.subnet_min} and "
                              f"{config.subnet_max} are leased or reserved")
        return ipaddress.IPv4Network((self.rng.choice(free), config.subnet_len))

    def renew(self, lease: Lease) -> Lease:
        ttl = None if lease.expiration is None else self.ttl
        try:
            rec = self.store.update_lease(lease.subnet, lease.attrs.to_json(), ttl)
        except LeaseNotFound:
            raise LeaseRevoked(f"lease {lease.subnet} has been revoked (deleted from the store)") from None
        return Lease(rec.subnet, lease.attrs, rec.expiration, rec.revision)


@dataclass(frozen=True)
class LeaseEvent:
    kind: str  # "added", "renewed", "removed", "expired"
    lease: Lease
    reason: str = ""  # "removed" because the key now holds an invalid lease: why (leasecheck.REASONS)


class LeaseWatcher:
    """Follows every lease in the store and calls ``on_event`` for each change, in order.

    ``config``: leases are judged against it (None: format only). ``on_config(text)`` is called
    with the stored config's text (None: deleted) whenever it differs from the last one seen,
    starting from ``config_text`` (the text the caller runs with)."""

    def __init__(self, store: Store, on_event: Callable[[LeaseEvent], None],
                 poll_timeout: float = 1.0, retry_interval: float = 0.25,
                 max_retry_interval: float = 1.0,
                 config: NetworkConfig | None = None,
                 on_config: Callable[[str | None], None] | None = None, config_text: str | None = None):
        self.store = store
        self.on_event = on_event
        self.poll_timeout = poll_timeout
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self.config = config
        self.on_config = on_config
        self.config_text = config_text if config_text is not None else (config.raw if config else None)
        self.known: dict[ipaddress.IPv4Network, Lease] = {}
        self.revision = 0
        self.synced = threading.Event()
        self.stats: Counter[str] = Counter()
        self.invalid = InvalidLeases(log)

    def _decode(self, record: LeaseRecord) -> tuple[Lease | None, str]:
        """The lease, or None and the reason it is refused (logged and counted once per write)."""
        try:
            return decode(record, self.config), ""
        except LeaseFormatError as exc:
            self.invalid.report(subnet_key(record.subnet), record.revision, exc.reason, str(exc))
            return None, exc.reason

    def _foreign(self, name: str, revision: int) -> None:
        self.invalid.report(name, revision, "bad_key", key_problem(name))

    def _config(self, text: str | None) -> None:
        if text == self.config_text:
            return
        self.config_text = text
        if self.on_config is not None:
            try:
                self.on_config(text)
            except Exception:  # a handler bug must not stop the watch
                self.stats["handler_errors"] += 1
                log.exception("config change handler failed")

    def _emit(self, kind: str, lease: Lease, reason: str = "") -> None:
        self.stats[kind] += 1
        try:
            self.on_event(LeaseEvent(kind, lease, reason))
        except Exception:  # a handler bug must not stop the watch
            self.stats["handler_errors"] += 1
            log.exception("lease event handler failed on %s %s", kind, lease.subnet)

    def resync(self) -> None:
        """List everything and emit what changed since what we knew."""
        scan = self.store.scan_subnets()
        current, refused = {}, {}
        for r in scan.records:
            lease, reason = self._decode(r)
            if lease is not None:
                current[lease.subnet] = lease
            else:
                refused[r.subnet] = reason
        for f in scan.foreign:
            self._foreign(f.name, f.revision)
        self.invalid.keep_only({subnet_key(s) for s in refused} | {f.name for f in scan.foreign})
        for subnet in [s for s in self.known if s not in current]:
            old, reason = self.known.pop(subnet), refused.get(subnet, "")
            # Gone while history was lost: past its expiration it expired (a node that could not
            # renew, e.g. through a long store outage), else someone deleted it.
            expired = not reason and old.expiration is not None and old.expiration <= time.time() + 1
            self._emit("expired" if expired else "removed", old, reason)
        for subnet, lease in current.items():
            old = self.known.get(subnet)
            if old is None:
                self.known[subnet] = lease
                self._emit("added", lease)
            elif old.revision != lease.revision:
                self.known[subnet] = lease
                self._emit("renewed", lease)
        if self.on_config is not None:
            self._config(self.store.get_config())  # a change while history was lost
        self.revision = scan.revision
        self.synced.set()

    def _apply(self, event) -> None:
        if event.kind == "config":
            self._config(event.value)
        elif event.kind == "foreign":
            if event.value is None:
                self.invalid.forget(event.name)
            else:
                self._foreign(event.name, event.revision)
        elif event.kind == "put":
            lease, reason = self._decode(event.record)
            old = self.known.get(event.subnet)
            if lease is None:
                if old is not None:  # replaced by garbage: it no longer describes a peer
                    self._emit("removed", self.known.pop(event.subnet), reason)
                return
            self.known[event.subnet] = lease
            self._emit("added" if old is None else "renewed", lease)
        elif event.kind == "delete":
            self.invalid.forget(subnet_key(event.subnet))
            old = self.known.pop(event.subnet, None)
            if old is not None:
                expired = event.expired or (old.expiration is not None
                                            and old.expiration <= time.time() + 1)
                self._emit("expired" if expired else "removed", old)

    def run(self, stop: threading.Event) -> None:
        """Follow the store until ``stop``. Never returns early: every failure (the store away,
        a corrupt file, a bug) is counted and retried, waiting ``retry_interval`` at first and
        twice as long after each failure in a row, up to ``max_retry_interval``. A store that is
        away is logged by the store monitor (once per outage); anything else once per streak."""
        need_list = True
        delay = self.retry_interval
        failing = False
        while not stop.is_set():
            watch = None
            try:
                if need_list:
                    self.resync()
                    need_list = False
                    delay, failing = self.retry_interval, False
                watch = self.store.watch(self.revision)
                while not stop.is_set():
                    for event in watch.get(self.poll_timeout):
                        self.revision = max(self.revision, event.revision)
                        self._apply(event)
                        delay, failing = self.retry_interval, False
            except WatchCompacted as exc:
                self.stats["resyncs"] += 1
                log.info("watch fell behind (%s); re-listing", exc)
                need_list = True
            except Exception as exc:
                self.stats["errors"] += 1
                if isinstance(exc, StoreUnavailable):
                    log.debug("watch: store unavailable: %s; retrying in %.2f s", exc, delay)
                elif isinstance(exc, StoreError):
                    if not failing:
                        log.warning("watch failed: %s; re-listing (retrying with backoff)", exc)
                    need_list = True
                else:  # a bug or input nobody foresaw: the daemon keeps following leases
                    if not failing:
                        log.exception("watch failed unexpectedly; re-listing (retrying with backoff)")
                    need_list = True
                failing = True
                stop.wait(delay)
                delay = min(delay * 2, self.max_retry_interval)
            finally:
                if watch is not None:
                    try:
                        watch.close()
                    except Exception:  # closing a broken watch must not end the thread
                        pass
