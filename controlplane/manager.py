"""Lease logic, written once for every store (flannel's LocalManager).

Acquisition, in flannel's order (``tryAcquireLease``):
1. the lease (or reservation) this public IP already holds, if the config still covers it (with
   EnableIPv6 both parts; without it, only a lease with no IPv6 part fits);
2. else the subnet from the previous subnet.env, if free and inside the config;
3. else a random free subnet among the first 100 free ones between SubnetMin and SubnetMax.
With EnableIPv6, steps 2 and 3 pick the IPv6 subnet the same way and independently (the previous
FLANNEL_IPV6_SUBNET, else a random one of the first 100 free between IPv6SubnetMin and
IPv6SubnetMax), and both go into one key (``10.5.3.0-24&fd10:244:0:9::-64``).

IPv6-only (EnableIPv4 false): the key's IPv4 part is flannel's empty one (``0.0.0.0-0&...``), an
IPv6 subnet is free when no live lease's IPv6 part is it, and the node's lease is found by its
PublicIPv6: every IPv6-only lease carries PublicIP 0.0.0.0, which names no node. (flanneld's etcd
allocator places only one IPv6-only node: it looks for a free IPv4 subnet still, and its only
candidate, 0.0.0.0/0, overlaps every lease; weft places as many as the IPv6 range holds.)

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
from .lease import (NO_IPV4, NO_PUBLIC_IP, Ident, Lease, LeaseAttrs, LeaseFormatError, shown,
                    subnet_key)
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
                out.append(Lease(r.subnet, LeaseAttrs.from_json(r.value), r.expiration, r.revision,
                                 r.subnet6))
            except LeaseFormatError:
                continue
        return out, rev

    def find_by_ip(self, public_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                   public_ipv6: ipaddress.IPv6Address | None = None) -> Lease | None:
        """The lease of the node with this public address: by PublicIP, or by PublicIPv6 when
        ``public_ip`` is 0.0.0.0 or None (an IPv6-only node: every IPv6-only lease carries
        PublicIP 0.0.0.0, so it names no node) or is itself an IPv6 address."""
        if public_ip is not None and public_ip.version == 6:
            public_ip, public_ipv6 = None, public_ip
        leases, _ = self.leases()
        if public_ip is not None and public_ip != NO_PUBLIC_IP:
            return next((l for l in leases if l.attrs.public_ip == public_ip), None)
        if public_ipv6 is None:
            return None
        return next((l for l in leases if l.attrs.public_ipv6 == public_ipv6), None)

    @staticmethod
    def _holds(held: LeaseAttrs, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs,
               config: NetworkConfig) -> bool:
        """Is a lease of ``subnet`` with the value ``held`` this node's (``attrs``)? By PublicIP,
        as flannel; by PublicIPv6 for an IPv6-only lease, and on an IPv6-only network (this node's
        lease from a dual-stack run goes then): PublicIP 0.0.0.0 is every IPv6-only node's."""
        if attrs.public_ipv6 is not None and held.public_ipv6 == attrs.public_ipv6 \
                and (subnet == NO_IPV4 or config.ipv6_only):
            return True
        return subnet != NO_IPV4 and attrs.public_ip != NO_PUBLIC_IP and held.public_ip == attrs.public_ip

    def acquire(self, config: NetworkConfig, attrs: LeaseAttrs,
                previous_subnet: ipaddress.IPv4Network | None = None,
                previous_subnet6: ipaddress.IPv6Network | None = None) -> Lease:
        """This node's lease (``attrs``: its value). ``previous_subnet``/``previous_subnet6``:
        subnet.env's, reused when free (the IPv4 one is ignored on an IPv6-only network)."""
        if config.ipv6_only and attrs.public_ipv6 is None:
            raise ValueError("IPv6-only network: this node has no public IPv6 address for its lease "
                             "(PublicIPv6 names an IPv6-only node; its PublicIP is 0.0.0.0)")
        node = attrs.public_ipv6 if config.ipv6_only else attrs.public_ip  # for log lines
        value = attrs.to_json()
        for _ in range(RACE_RETRIES):
            records, _ = self.store.list_leases()
            taken = {r.subnet for r in records}
            taken6 = {r.subnet6 for r in records if r.subnet6 is not None}
            held = []  # this node's leases: a fitting one first
            for r in records:
                try:
                    if self._holds(LeaseAttrs.from_json(r.value), r.subnet, attrs, config):
                        held.append(r)
                except LeaseFormatError:
                    continue
            held.sort(key=lambda r: not config.fits(r.subnet, r.subnet6))
            if held and config.fits(held[0].subnet, held[0].subnet6):
                mine = held.pop(0)
                ttl = None if mine.expiration is None else self.ttl  # a reservation stays one
                try:
                    rec = self.store.update_lease(mine.subnet, value, ttl, mine.subnet6)
                except LeaseNotFound:
                    continue  # deleted under us: start over
                log.info("reusing lease %s held by %s", shown(mine.subnet, mine.subnet6), node)
                for other in held:  # e.g. a dual-stack lease of a node that is IPv6-only now
                    if not config.fits(other.subnet, other.subnet6):
                        self._drop_unfit(other, node)
                return Lease(rec.subnet, attrs, rec.expiration, rec.revision, rec.subnet6)
            for mine in held:
                self._drop_unfit(mine, node)
                taken.discard(mine.subnet)
                taken6.discard(mine.subnet6)

            if config.ipv6_only:  # flannel's empty IPv4 part: the lease is its IPv6 subnet
                candidate = NO_IPV4
            elif previous_subnet is not None and config.contains_subnet(previous_subnet) \
                    and previous_subnet not in taken:
                candidate = previous_subnet
            else:
                candidate = self._random_free(taken, config.network, config.subnet_len, config.subnet_min,
                                              config.subnet_max, config.subnet_count)
            candidate6 = None
            if config.enable_ipv6:  # picked independently of the IPv4 part, as flannel does
                if config.contains_subnet6(previous_subnet6) and previous_subnet6 not in taken6:
                    candidate6 = previous_subnet6
                else:
                    candidate6 = self._random_free(taken6, config.ipv6_network, config.ipv6_subnet_len,
                                                   config.ipv6_subnet_min, config.ipv6_subnet_max,
                                                   config.subnet6_count, "IPv6 network")
            try:
                rec = self.store.create_lease(candidate, value, self.ttl, candidate6)
            except LeaseExists:
                continue
            log.info("acquired lease %s for %s", shown(candidate, candidate6), node)
            return Lease(rec.subnet, attrs, rec.expiration, rec.revision, rec.subnet6)
        raise StoreError(f"could not acquire a lease after {RACE_RETRIES} races with other nodes")

    def _drop_unfit(self, record: LeaseRecord, node) -> None:
        log.warning("lease %s of %s does not fit the current config; deleting it",
                    shown(record.subnet, record.subnet6), node)
        self.store.delete_lease(record.subnet, record.subnet6)

    def _random_free(self, taken: set, network, length: int, first, last, count: int,
                     what: str = "network"):
        """A random one of the first FREE_CANDIDATES free /``length`` subnets of ``network`` between
        ``first`` and ``last`` (either family). Integers, not network objects, in the scan: it
        walks every subnet of a crowded network, and stops at the 100th free one, so it walks at
        most (leases + 100) of an IPv6 range's 2**n subnets."""
        used = {int(s.network_address) for s in taken if s.prefixlen == length}
        size = 1 << (network.max_prefixlen - length)
        free = []
        for addr in range(int(first), int(last) + 1, size):
            if addr not in used:
                free.append(addr)
                if len(free) >= FREE_CANDIDATES:
                    break
        if not free:
            raise NetworkFull(f"{what} {network} is full: all {count} /{length} subnets between "
                              f"{first} and {last} are leased or reserved")
        return type(network)((self.rng.choice(free), length))

    def renew(self, lease: Lease) -> Lease:
        ttl = None if lease.expiration is None else self.ttl
        try:
            rec = self.store.update_lease(lease.subnet, lease.attrs.to_json(), ttl, lease.subnet6)
        except LeaseNotFound:
            raise LeaseRevoked(f"lease {lease.shown} has been revoked (deleted from the store)") from None
        return Lease(rec.subnet, lease.attrs, rec.expiration, rec.revision, rec.subnet6)


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
        self.known: dict[Ident, Lease] = {}  # by Lease.ident (IPv6-only leases share subnet 0.0.0.0/0)
        self.revision = 0
        self.synced = threading.Event()
        # How long the first listing took to go through the data plane (every listed lease judged
        # and handed to on_event): what a node starting into a big cluster waits. None before.
        self.initial_sync_seconds: float | None = None
        self.stats: Counter[str] = Counter()
        self.invalid = InvalidLeases(log)
        # Valid leases refused because their IPv6 subnet is another known lease's (by ident):
        # followed once that lease lets go of it.
        self.shadowed: dict[Ident, Lease] = {}

    @property
    def _judges_ipv6(self) -> bool:
        return self.config is None or self.config.enable_ipv6

    def _holder6(self, lease: Lease) -> Lease | None:
        """The known lease of another identity that holds ``lease``'s IPv6 subnet, if any.
        IPv6 parts are not canonical-disjoint as IPv4 keys are (one IPv6 subnet can be in two
        keys), so the first lease known with it keeps it: a later key cannot take a node's IPv6
        subnet away (a route to it through another node)."""
        if lease.subnet6 is None or not self._judges_ipv6:
            return None
        return next((k for k in self.known.values()
                     if k.subnet6 == lease.subnet6 and k.ident != lease.ident), None)

    def _shadow(self, lease: Lease, holder: Lease) -> None:
        self.shadowed[lease.ident] = lease
        node = (f"PublicIP {holder.attrs.public_ip}" if holder.has_ipv4
                else f"PublicIPv6 {holder.attrs.public_ipv6}")
        self.invalid.report(lease.key, lease.revision, "overlap",
                            f"{lease.subnet6} is the IPv6 subnet of the lease {holder.key} ({node})")

    def _release6(self, gone: Lease) -> None:
        """``gone`` no longer holds its IPv6 subnet: a lease refused for it is followed now."""
        if gone.subnet6 is None:
            return
        waiting = sorted((l for l in self.shadowed.values() if l.subnet6 == gone.subnet6),
                         key=lambda l: l.revision)
        if waiting and waiting[0].ident not in self.known:
            lease = self.shadowed.pop(waiting[0].ident)
            self.known[lease.ident] = lease
            self._emit("added", lease)

    def _decode(self, record: LeaseRecord) -> tuple[Lease | None, str]:
        """The lease, or None and the reason it is refused (logged and counted once per write)."""
        try:
            return decode(record, self.config), ""
        except LeaseFormatError as exc:
            self.invalid.report(subnet_key(record.subnet, record.subnet6), record.revision, exc.reason,
                                str(exc))
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
            log.exception("lease event handler failed on %s %s", kind, lease.shown)

    def resync(self) -> None:
        """List everything and emit what changed since what we knew."""
        started = time.monotonic()
        scan = self.store.scan_subnets()
        current, refused, refused_keys = {}, {}, set()
        for r in scan.records:
            lease, reason = self._decode(r)
            if lease is not None:
                # Two keys of one identity (an IPv4 subnet with and without an IPv6 part, or with
                # two IPv6 parts: only someone else's writing does that) are one lease: the last
                # written wins.
                other = current.get(lease.ident)
                if other is None or other.revision < lease.revision:
                    current[lease.ident] = lease
            else:
                refused[r.ident] = reason
                refused_keys.add(subnet_key(r.subnet, r.subnet6))
        # IPv6 subnets held twice: leases known with theirs keep them, then the oldest write.
        holders: dict[ipaddress.IPv6Network, Lease] = {}
        self.shadowed = {}
        for lease in sorted(current.values(), key=lambda l: (
                getattr(self.known.get(l.ident), "subnet6", None) != l.subnet6, l.revision)):
            if lease.subnet6 is None or not self._judges_ipv6:
                continue
            holder = holders.setdefault(lease.subnet6, lease)
            if holder is not lease:
                del current[lease.ident]
                self._shadow(lease, holder)
                refused[lease.ident] = "overlap"
                refused_keys.add(lease.key)
        for f in scan.foreign:
            self._foreign(f.name, f.revision)
        self.invalid.keep_only(refused_keys | {f.name for f in scan.foreign})
        for ident in [i for i in self.known if i not in current]:
            old, reason = self.known.pop(ident), refused.get(ident, "")
            # Gone while history was lost: past its expiration it expired (a node that could not
            # renew, e.g. through a long store outage), else someone deleted it.
            expired = not reason and old.expiration is not None and old.expiration <= time.time() + 1
            self._emit("expired" if expired else "removed", old, reason)
        for ident, lease in current.items():
            old = self.known.get(ident)
            if old is None:
                self.known[ident] = lease
                self._emit("added", lease)
            elif old.revision != lease.revision or old.subnet6 != lease.subnet6:
                self.known[ident] = lease
                self._emit("renewed", lease)
        if self.on_config is not None:
            self._config(self.store.get_config())  # a change while history was lost
        self.revision = scan.revision
        if self.initial_sync_seconds is None:
            self.initial_sync_seconds = time.monotonic() - started
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
            ident = event.ident
            old = self.known.get(ident)
            if lease is None:
                # replaced by garbage: it no longer describes a peer (garbage in another key of
                # the same IPv4 subnet leaves the lease known from its own key alone)
                shadowed = self.shadowed.get(ident)
                if shadowed is not None and shadowed.subnet6 == event.record.subnet6:
                    del self.shadowed[ident]
                if old is not None and old.subnet6 == event.record.subnet6:
                    self._emit("removed", self.known.pop(ident), reason)
                    self._release6(old)
                return
            holder = self._holder6(lease)
            if holder is not None:  # another node's IPv6 subnet: not this lease's to take
                self._shadow(lease, holder)
                if old is not None:
                    self._emit("removed", self.known.pop(ident), "overlap")
                    self._release6(old)
                return
            self.shadowed.pop(ident, None)
            # A lease is its identity: a key of its IPv4 subnet with another IPv6 part replaces
            # what was known of it ("renewed": the data plane moves its IPv6 side).
            self.known[ident] = lease
            self._emit("added" if old is None else "renewed", lease)
            if old is not None and old.subnet6 != lease.subnet6:
                self._release6(old)
        elif event.kind == "delete":
            self.invalid.forget(subnet_key(event.subnet, event.subnet6))
            ident = event.ident
            shadowed = self.shadowed.get(ident)
            if shadowed is not None and shadowed.subnet6 == event.subnet6:
                del self.shadowed[ident]
            old = self.known.get(ident)
            if old is not None and old.subnet6 != event.subnet6:
                return  # another key of that IPv4 subnet: the known lease's key stays
            self.known.pop(ident, None)
            if old is not None:
                expired = event.expired or (old.expiration is not None
                                            and old.expiration <= time.time() + 1)
                self._emit("expired" if expired else "removed", old)
                self._release6(old)

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
