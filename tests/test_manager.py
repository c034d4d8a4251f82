"""Lease acquisition, renewal and watching (flannel's LocalManager rules) on the embedded store."""
from __future__ import annotations

import ipaddress
import random
import threading
import time

import pytest

from controlplane.config import parse_config
from controlplane.lease import LeaseAttrs
from controlplane.manager import (ConfigMissing, LeaseManager, LeaseRevoked, LeaseWatcher,
                                  NetworkFull)
from controlplane.store.sqlite import SQLiteStore

NET = ipaddress.IPv4Network
IP = ipaddress.IPv4Address
CONFIG = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}')
SMALL = parse_config('{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.3.0"}')


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(str(tmp_path / "w.db"))
    yield s
    s.close()


def attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(IP(f"198.18.0.{n}"), "alloc")


def test_config_missing_names_the_key(store):
    with pytest.raises(ConfigMissing, match="/coreos.com/network/config"):
        LeaseManager(store).get_config()


def test_reuse_lease_of_same_public_ip(store):
    m = LeaseManager(store, ttl=3600, rng=random.Random(1))
    first = m.acquire(CONFIG, attrs(1))
    assert CONFIG.contains_subnet(first.subnet)
    again = m.acquire(CONFIG, attrs(1))
    assert again.subnet == first.subnet and again.revision > first.revision
    other = m.acquire(CONFIG, attrs(2))
    assert other.subnet != first.subnet


def test_previous_subnet_env_is_reused_when_free(store):
    m = LeaseManager(store, ttl=3600)
    lease = m.acquire(CONFIG, attrs(1), previous_subnet=NET("10.5.77.0/24"))
    assert lease.subnet == NET("10.5.77.0/24")
    # Taken by someone else: a random free one instead.
    lease2 = m.acquire(CONFIG, attrs(2), previous_subnet=NET("10.5.77.0/24"))
    assert lease2.subnet != NET("10.5.77.0/24")
    # Outside the config (e.g. the config changed): ignored.
    lease3 = m.acquire(SMALL, attrs(3), previous_subnet=NET("10.5.200.0/24"))
    assert SMALL.contains_subnet(lease3.subnet)


def test_reservations_are_never_taken_and_stay_reservations(store):
    m = LeaseManager(store, ttl=3600)
    store.create_lease(NET("10.5.1.0/24"), attrs(9).to_json(), ttl=None)
    store.create_lease(NET("10.5.2.0/24"), attrs(8).to_json(), ttl=None)
    got = m.acquire(SMALL, attrs(1))
    assert got.subnet == NET("10.5.3.0/24")
    with pytest.raises(NetworkFull, match="network 10.5.0.0/16 is full: all 3 /24 subnets"):
        m.acquire(SMALL, attrs(2))
    # The reservation's owner gets it, and it keeps no TTL.
    mine = m.acquire(SMALL, attrs(9))
    assert mine.subnet == NET("10.5.1.0/24") and mine.expiration is None
    assert store.get_lease(NET("10.5.1.0/24")).expiration is None
    assert m.renew(mine).expiration is None


def test_lease_outside_new_config_is_replaced(store):
    m = LeaseManager(store, ttl=3600)
    old = m.acquire(CONFIG, attrs(1), previous_subnet=NET("10.5.200.0/24"))
    new = m.acquire(SMALL, attrs(1))
    assert SMALL.contains_subnet(new.subnet)
    assert store.get_lease(old.subnet) is None


def test_concurrent_acquirers_get_distinct_subnets(tmp_path):
    path = str(tmp_path / "w.db")
    stores = [SQLiteStore(path) for _ in range(3)]
    results, go = [], threading.Barrier(3)

    def run(s, n):
        go.wait()
        # One rng seed for all: every acquirer picks the same first candidate and must race.
        results.append(LeaseManager(s, ttl=3600, rng=random.Random(0)).acquire(SMALL, attrs(n)).subnet)
    threads = [threading.Thread(target=run, args=(s, n)) for n, s in enumerate(stores, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [NET("10.5.1.0/24"), NET("10.5.2.0/24"), NET("10.5.3.0/24")]
    for s in stores:
        s.close()


def test_renew_extends_and_detects_revocation(store):
    m = LeaseManager(store, ttl=5)
    lease = m.acquire(CONFIG, attrs(1))
    m.ttl = 3600
    renewed = m.renew(lease)
    assert renewed.remaining() > 3000
    store.delete_lease(lease.subnet)
    with pytest.raises(LeaseRevoked, match="revoked"):
        m.renew(renewed)
    assert store.get_lease(lease.subnet) is None  # not silently recreated


def test_watcher_events_and_bad_leases(store):
    events, stop = [], threading.Event()
    m = LeaseManager(store, ttl=3600)
    first = m.acquire(CONFIG, attrs(1))
    w = LeaseWatcher(store, lambda e: events.append((e.kind, e.lease.subnet)), poll_timeout=0.2)
    t = threading.Thread(target=w.run, args=(stop,))
    t.start()
    try:
        assert w.synced.wait(5)
        second = LeaseManager(store, ttl=2).acquire(CONFIG, attrs(2))
        m.renew(first)
        store.create_lease(NET("10.5.250.0/24"), '{"PublicIP": 5}', ttl=3600)  # garbage from someone
        store.delete_lease(first.subnet)
        deadline = time.monotonic() + 8
        while ("expired", second.subnet) not in events and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        t.join()
    assert events == [("added", first.subnet), ("added", second.subnet), ("renewed", first.subnet),
                      ("removed", first.subnet), ("expired", second.subnet)]
    assert w.invalid.snapshot()["bad_public_ip"] == 1


def test_watcher_resyncs_after_compaction(store):
    import sqlite3
    events, stop = [], threading.Event()
    w = LeaseWatcher(store, lambda e: events.append((e.kind, e.lease.subnet)), poll_timeout=0.2)
    m = LeaseManager(store, ttl=3600)
    a = m.acquire(CONFIG, attrs(1), previous_subnet=NET("10.5.76.0/24"))
    w.resync()
    # While the watcher is away: one lease goes, another comes (not on a's subnet, which a random
    # pick could reuse), history is compacted.
    store.delete_lease(a.subnet)
    b = m.acquire(CONFIG, attrs(2), previous_subnet=NET("10.5.77.0/24"))
    with sqlite3.connect(store.path) as conn:
        rev = conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
        conn.execute("DELETE FROM events WHERE revision <= ?", (rev,))
        conn.execute("UPDATE meta SET value=? WHERE name='compacted'", (rev,))
    t = threading.Thread(target=w.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while len(events) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert events == [("added", a.subnet), ("removed", a.subnet), ("added", b.subnet)]


def _raw_put(store, key: str, value: str) -> None:
    """A key written into the store's file by another program (not through the Store)."""
    import sqlite3
    conn = sqlite3.connect(store.path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        rev = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
        conn.execute("INSERT INTO events VALUES (?, ?, ?, 'put', ?, NULL, 0)", (rev, store.prefix, key, value))
        conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, NULL, ?)", (store.prefix, key, value, rev))
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_watcher_judges_leases_against_the_config(store):
    """Only leases valid for the network become events; each bad write is counted once, also when
    a re-list sees it again; a known lease rewritten into an invalid one is removed, with why."""
    events = []
    store.create_lease(NET("10.5.1.0/24"), attrs(1).to_json(), ttl=3600)
    store.create_lease(NET("10.6.0.0/24"), attrs(2).to_json(), ttl=3600)  # outside 10.5.0.0/16
    store.create_lease(NET("10.5.2.0/23"), attrs(3).to_json(), ttl=3600)  # not a /24
    store.create_lease(NET("10.5.4.0/24"), LeaseAttrs(IP("198.18.0.4"), "vxlan", {"VNI": 1}).to_json(),
                       ttl=3600)  # vxlan without a VtepMAC
    store.create_lease(NET("10.5.5.0/24"), LeaseAttrs(IP("127.0.0.1"), "alloc").to_json(), ttl=3600)
    _raw_put(store, "subnets/10.5.6.0-24/x", attrs(6).to_json())
    w = LeaseWatcher(store, lambda e: events.append((e.kind, str(e.lease.subnet), e.reason)), config=CONFIG)
    w.resync()
    assert events == [("added", "10.5.1.0/24", "")]
    counts = {k: v for k, v in w.invalid.snapshot().items() if v}
    assert counts == {"outside_network": 1, "wrong_length": 1, "bad_backend_data": 1,
                      "bad_public_ip": 1, "bad_key": 1}
    w.resync()  # a re-list (after a reconnect or a compaction) counts nothing again
    assert {k: v for k, v in w.invalid.snapshot().items() if v} == counts
    store.update_lease(NET("10.5.1.0/24"), '{"PublicIP":"198.18.0.1","BackendType":7}', ttl=3600)
    w.resync()
    assert events[-1] == ("removed", "10.5.1.0/24", "bad_field")
    assert w.invalid.snapshot()["bad_field"] == 1
    assert w.known == {}


def test_watcher_reports_each_new_config_text(store):
    seen, stop = [], threading.Event()
    store.put_config(CONFIG.raw)
    w = LeaseWatcher(store, lambda e: None, poll_timeout=0.2, config=CONFIG, on_config=seen.append)
    t = threading.Thread(target=w.run, args=(stop,))
    t.start()
    try:
        assert w.synced.wait(5)
        for text in ("garbage", "garbage", CONFIG.raw, "other"):
            store.put_config(text)
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert seen == ["garbage", CONFIG.raw, "other"]


def test_relist_tells_an_expired_lease_from_a_deleted_one(store):
    """Leases gone while the watcher's history was lost (a long outage, a compaction): one past
    its expiration expired (its node could not renew: weftd takes its own again), the other was
    deleted (weftd treats its own as revoked)."""
    events = []
    w = LeaseWatcher(store, lambda e: events.append((e.kind, e.lease.subnet)), config=CONFIG)
    short = LeaseManager(store, ttl=1).acquire(CONFIG, attrs(1))
    deleted = LeaseManager(store, ttl=3600).acquire(CONFIG, attrs(2))
    w.resync()
    store.delete_lease(deleted.subnet)
    time.sleep(1.2)  # past the 1 s TTL
    w.resync()
    assert events[2:] == [("expired", short.subnet), ("removed", deleted.subnet)] or \
        events[2:] == [("removed", deleted.subnet), ("expired", short.subnet)], events
