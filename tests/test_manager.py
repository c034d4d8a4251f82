"""Lease acquisition, renewal and watching (flannel's LocalManager rules) on the embedded store."""
from __future__ import annotations

import ipaddress
import random
import threading
import time

import pytest

from controlplane.config import parse_config
from controlplane.lease import NO_IPV4, NO_PUBLIC_IP, LeaseAttrs
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


# -- dual-stack (EnableIPv6): both parts allocated, one key, flannel's reuse rules ------------------
NET6 = ipaddress.IPv6Network
IP6 = ipaddress.IPv6Address
DUAL = parse_config('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56",'
                    '"Backend":{"Type":"alloc"}}')
MAC = "5e:bb:b4:14:2b:45"


def attrs6(n: int) -> LeaseAttrs:
    return LeaseAttrs(IP(f"198.18.0.{n}"), "alloc", public_ipv6=IP6(f"2001:db8:198:18::{n}"))


def test_dual_stack_acquire_writes_both_parts_in_one_key(store):
    m = LeaseManager(store, ttl=3600, rng=random.Random(3))
    leases = [m.acquire(DUAL, attrs6(n)) for n in range(1, 6)]
    for lease in leases:
        assert DUAL.contains_subnet(lease.subnet) and DUAL.contains_subnet6(lease.subnet6)
        rec = store.get_lease(lease.subnet, lease.subnet6)  # the one dual key
        assert rec is not None and rec.value == lease.attrs.to_json()
        assert lease.key == f"{lease.subnet.network_address}-24&{lease.subnet6.network_address}-64"
    assert len({l.subnet for l in leases}) == 5 and len({l.subnet6 for l in leases}) == 5
    # the two parts are picked independently (random among the first 100 free of each range)
    index4 = [(int(l.subnet.network_address) - int(DUAL.subnet_min)) >> 8 for l in leases]
    index6 = [(int(l.subnet6.network_address) - int(DUAL.ipv6_subnet_min)) >> 64 for l in leases]
    assert index4 != index6
    assert all(i < 100 for i in index6)
    # an IPv4-only config never writes an IPv6 part
    plain = m.acquire(CONFIG, attrs(9))
    assert plain.subnet6 is None and store.get_lease(plain.subnet) is not None


def test_dual_stack_reuse_needs_both_parts_to_fit(store):
    """flannel's tryAcquireLease: the lease of this public IP is reused when both parts fit the
    config; otherwise it is deleted and a new one made. Without EnableIPv6 only a lease with no
    IPv6 part fits."""
    m = LeaseManager(store, ttl=3600, rng=random.Random(4))
    first = m.acquire(DUAL, attrs6(1))
    again = m.acquire(DUAL, attrs6(1))
    assert (again.subnet, again.subnet6) == (first.subnet, first.subnet6)
    assert again.revision > first.revision
    # the same node under an IPv4-only config: the dual-stack lease does not fit, and goes
    v4 = m.acquire(CONFIG, attrs(1), previous_subnet=first.subnet)
    assert v4.subnet == first.subnet and v4.subnet6 is None  # its IPv4 subnet is free again
    assert store.get_lease(first.subnet, first.subnet6) is None
    # and back to dual-stack: an IPv4-only lease does not fit either
    back = m.acquire(DUAL, attrs6(1), previous_subnet=v4.subnet, previous_subnet6=first.subnet6)
    assert (back.subnet, back.subnet6) == (first.subnet, first.subnet6)
    assert [(r.subnet, r.subnet6) for r in store.list_leases()[0]] == [(first.subnet, first.subnet6)]
    # an IPv6 part outside the (new) IPv6 range: deleted, a fitting one made
    other = parse_config('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd99::/56",'
                         '"Backend":{"Type":"alloc"}}')
    moved = m.acquire(other, attrs6(1), previous_subnet=first.subnet, previous_subnet6=first.subnet6)
    assert other.contains_subnet6(moved.subnet6) and moved.subnet == first.subnet
    assert len(store.list_leases()[0]) == 1


def test_dual_stack_previous_subnet_env_parts_reused_independently(store):
    m = LeaseManager(store, ttl=3600, rng=random.Random(5))
    lease = m.acquire(DUAL, attrs6(1), previous_subnet=NET("10.5.77.0/24"),
                      previous_subnet6=NET6("fd10:244:0:99::/64"))
    assert (lease.subnet, lease.subnet6) == (NET("10.5.77.0/24"), NET6("fd10:244:0:99::/64"))
    # the IPv4 part is taken, the IPv6 part free: the IPv6 one is still reused
    lease2 = m.acquire(DUAL, attrs6(2), previous_subnet=NET("10.5.77.0/24"),
                       previous_subnet6=NET6("fd10:244:0:98::/64"))
    assert lease2.subnet != NET("10.5.77.0/24") and lease2.subnet6 == NET6("fd10:244:0:98::/64")
    # the IPv6 part taken (by node 1) or outside IPv6Network: a random free one
    lease3 = m.acquire(DUAL, attrs6(3), previous_subnet=NET("10.5.78.0/24"),
                       previous_subnet6=NET6("fd10:244:0:99::/64"))
    assert lease3.subnet == NET("10.5.78.0/24") and lease3.subnet6 not in (lease.subnet6, lease2.subnet6)
    lease4 = m.acquire(DUAL, attrs6(4), previous_subnet6=NET6("fd77::/64"))
    assert DUAL.contains_subnet6(lease4.subnet6)


def test_dual_stack_ipv6_range_full(store):
    tiny = parse_config('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/62",'
                        '"Backend":{"Type":"alloc"}}')  # /64 subnets: 3 after the first
    m = LeaseManager(store, ttl=3600)
    got = {m.acquire(tiny, attrs6(n)).subnet6 for n in range(1, 4)}
    assert got == {NET6("fd10:244:0:1::/64"), NET6("fd10:244:0:2::/64"), NET6("fd10:244:0:3::/64")}
    with pytest.raises(NetworkFull, match=r"IPv6 network fd10:244::/62 is full: all 3 /64 subnets"):
        m.acquire(tiny, attrs6(4))


def test_dual_stack_renew_and_revoke(store):
    m = LeaseManager(store, ttl=3600)
    lease = m.acquire(DUAL, attrs6(1))
    renewed = m.renew(lease)
    assert renewed.subnet6 == lease.subnet6 and renewed.revision > lease.revision
    store.delete_lease(lease.subnet, lease.subnet6)
    with pytest.raises(LeaseRevoked, match=f"lease {lease.subnet}\\+{lease.subnet6} has been revoked"):
        m.renew(renewed)
    assert store.list_leases()[0] == []  # not recreated


def _v6_value(n: int, **fields) -> str:
    import json
    doc = {"PublicIP": f"198.18.0.{n}", "PublicIPv6": f"2001:db8:198:18::{n}", "BackendType": "vxlan",
           "BackendData": {"VNI": 1, "VtepMAC": MAC}, "BackendV6Data": {"VNI": 1, "VtepMAC": MAC}}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}, separators=(",", ":"))


VXDUAL = parse_config('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56"}')
VXV4 = parse_config('{"Network":"10.5.0.0/16"}')


def test_watcher_emits_dual_stack_leases_and_judges_the_ipv6_part(store):
    """Hostile IPv6 parts are refused with a reason, counted once, never a crash; a node without
    EnableIPv6 follows the IPv4 part only (and does not judge the rest)."""
    good = {1: "fd10:244:0:1::-64"}
    bad = {  # key's IPv6 part or value -> the reason a dual-stack node refuses it
        2: ("fd99::-64", _v6_value(2), "outside_network"),
        3: ("fd10:244:0:3::-80", _v6_value(3), "wrong_length"),
        4: ("fd10:244:0:4::-64", _v6_value(4, PublicIPv6="fe80::4"), "bad_public_ip"),
        5: ("fd10:244:0:5::-64", _v6_value(5, PublicIPv6="ff02::1"), "bad_public_ip"),
        6: ("fd10:244:0:6::-64", _v6_value(6, PublicIPv6="::"), "bad_public_ip"),
        7: ("fd10:244:0:7::-64", _v6_value(7, BackendV6Data={"VNI": 1}), "bad_backend_data"),
        8: ("fd10:244:0:8::-64", _v6_value(8, BackendV6Data="garbage"), "bad_backend_data"),
        9: ("fd10:244:0:9::-64", _v6_value(9, BackendV6Data={"VNI": 1 << 24, "VtepMAC": MAC}),
            "bad_backend_data"),
        10: ("fd10:244:0:a::-64", _v6_value(10, BackendV6Data={"VtepMAC": "01:00:5e:00:00:01"}),
             "bad_backend_data"),
        11: ("fd10:244:0:b::-64", _v6_value(11, BackendV6Data=...), "bad_backend_data"),
    }
    _raw_put(store, f"subnets/10.5.1.0-24&{good[1]}", _v6_value(1))
    for n, (part, text, _) in bad.items():
        _raw_put(store, f"subnets/10.5.{n}.0-24&{part}", text)
    # garbage a dual-stack and an IPv4-only node both refuse: PublicIPv6 not an address; key parts
    _raw_put(store, "subnets/10.5.20.0-24&fd10:244:0:14::-64", _v6_value(20, PublicIPv6="banana"))
    _raw_put(store, "subnets/10.5.21.0-24&fd10:244:0:15::1-64", _v6_value(21))
    _raw_put(store, "subnets/10.5.22.0-24&FD10:244:0:16::-64", _v6_value(22))
    _raw_put(store, "subnets/10.5.30.0-24", _v6_value(30, PublicIPv6=None, BackendV6Data=...))

    dual, v4 = [], []
    wd = LeaseWatcher(store, dual.append, config=VXDUAL)
    w4 = LeaseWatcher(store, v4.append, config=VXV4)
    wd.resync()
    w4.resync()
    got = {(str(e.lease.subnet), str(e.lease.subnet6), str(e.lease.attrs.public_ipv6)) for e in dual}
    assert got == {("10.5.1.0/24", "fd10:244:0:1::/64", "2001:db8:198:18::1"),
                   ("10.5.30.0/24", "None", "None")}  # an IPv4-only lease: followed on IPv4
    one = next(e.lease for e in dual if e.lease.subnet == NET("10.5.1.0/24"))
    assert one.attrs.backend_v6_data == {"VNI": 1, "VtepMAC": MAC}
    counts = {k: v for k, v in wd.invalid.snapshot().items() if v}
    want = {}
    for _, _, reason in bad.values():
        want[reason] = want.get(reason, 0) + 1
    want["bad_public_ip"] += 1  # "banana"
    want["bad_key"] = 2
    assert counts == want
    # the IPv4-only node follows the IPv4 part of every dual-stack lease whose IPv4 side is fine
    assert {str(e.lease.subnet) for e in v4} == {"10.5.1.0/24", "10.5.30.0/24"} | {
        f"10.5.{n}.0/24" for n in bad}
    assert {k: v for k, v in w4.invalid.snapshot().items() if v} == {"bad_public_ip": 1, "bad_key": 2}


def test_watcher_follows_dual_stack_keys_through_the_watch(store):
    """put/delete of dual keys through the watch: added, renewed with a new IPv6 part, removed;
    another key of the same IPv4 subnet deleted leaves the known lease alone."""
    events, stop = [], threading.Event()
    w = LeaseWatcher(store, lambda e: events.append((e.kind, str(e.lease.subnet), str(e.lease.subnet6))),
                     poll_timeout=0.1, config=VXDUAL)
    t = threading.Thread(target=w.run, args=(stop,))
    t.start()
    try:
        assert w.synced.wait(5)
        n6a, n6b = NET6("fd10:244:0:1::/64"), NET6("fd10:244:0:2::/64")
        store.create_lease(NET("10.5.1.0/24"), _v6_value(1), ttl=3600, subnet6=n6a)
        store.update_lease(NET("10.5.1.0/24"), _v6_value(1), ttl=3600, subnet6=n6a)
        _raw_put(store, "subnets/10.5.1.0-24&fd10:244:0:2::-64", _v6_value(1))  # someone else's key
        store.delete_lease(NET("10.5.1.0/24"), n6a)  # the old key: the lease stays (new key)
        store.delete_lease(NET("10.5.1.0/24"), n6b)
        deadline = time.monotonic() + 5
        while len(events) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert events == [("added", "10.5.1.0/24", "fd10:244:0:1::/64"),
                      ("renewed", "10.5.1.0/24", "fd10:244:0:1::/64"),
                      ("renewed", "10.5.1.0/24", "fd10:244:0:2::/64"),
                      ("removed", "10.5.1.0/24", "fd10:244:0:2::/64")]


def test_an_ipv6_subnet_stays_with_the_lease_known_first(store):
    """IPv6 key parts are not disjoint by construction as IPv4 ones are: a second key naming a
    known lease's IPv6 subnet is refused (overlap), counted once per write, and followed once the
    first lets go of it; a known lease rewritten onto another's IPv6 subnet is removed."""
    events, stop = [], threading.Event()
    n6a, n6b = NET6("fd10:244:0:1::/64"), NET6("fd10:244:0:2::/64")
    store.create_lease(NET("10.5.1.0/24"), _v6_value(1), ttl=3600, subnet6=n6a)
    store.create_lease(NET("10.5.2.0/24"), _v6_value(2), ttl=3600, subnet6=n6a)  # someone's copy
    w = LeaseWatcher(store, lambda e: events.append((e.kind, str(e.lease.subnet), str(e.lease.subnet6), e.reason)),
                     poll_timeout=0.1, config=VXDUAL)
    w.resync()
    assert events == [("added", "10.5.1.0/24", "fd10:244:0:1::/64", "")]  # the older write
    assert w.invalid.snapshot()["overlap"] == 1
    w.resync()  # a re-list counts nothing again, and the lease known first keeps it
    assert w.invalid.snapshot()["overlap"] == 1 and len(events) == 1
    t = threading.Thread(target=w.run, args=(stop,))
    t.start()
    try:
        assert w.synced.wait(5)
        store.update_lease(NET("10.5.1.0/24"), _v6_value(1), ttl=3600, subnet6=n6a)  # renewed: still its
        store.create_lease(NET("10.5.3.0/24"), _v6_value(3), ttl=3600, subnet6=n6b)
        store.update_lease(NET("10.5.2.0/24"), _v6_value(2), ttl=3600, subnet6=n6a)  # still refused
        store.delete_lease(NET("10.5.1.0/24"), n6a)  # lets go: 10.5.2.0/24 is followed now
        _raw_put(store, "subnets/10.5.3.0-24&fd10:244:0:1::-64", _v6_value(3))  # onto 10.5.2's: removed
        deadline = time.monotonic() + 5
        while len(events) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert events[1:] == [("renewed", "10.5.1.0/24", "fd10:244:0:1::/64", ""),
                          ("added", "10.5.3.0/24", "fd10:244:0:2::/64", ""),
                          ("removed", "10.5.1.0/24", "fd10:244:0:1::/64", ""),
                          ("added", "10.5.2.0/24", "fd10:244:0:1::/64", ""),
                          ("removed", "10.5.3.0/24", "fd10:244:0:2::/64", "overlap")]
    assert w.invalid.snapshot()["overlap"] == 3
    assert {str(s): str(l.subnet6) for s, l in w.known.items()} == {"10.5.2.0/24": "fd10:244:0:1::/64"}


# -- IPv6-only networks (EnableIPv4 false): leases 0.0.0.0-0&<ip6>-<len6>, named by their IPv6 part --
SIX = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/56",'
                   '"Backend":{"Type":"alloc"}}')


def attrs_six(n: int) -> LeaseAttrs:
    """An IPv6-only node's attrs: PublicIP 0.0.0.0 (flanneld's empty ip.IP4), the same for all."""
    return LeaseAttrs(NO_PUBLIC_IP, "alloc", public_ipv6=IP6(f"2001:db8:198:18::{n}"))


def test_ipv6_only_many_nodes_get_distinct_subnets(store):
    """flanneld places one IPv6-only node at most (its etcd allocator's only IPv4 candidate,
    0.0.0.0/0, overlaps every lease); weft places as many as the IPv6 range holds."""
    m = LeaseManager(store, ttl=3600, rng=random.Random(6))
    leases = [m.acquire(SIX, attrs_six(n)) for n in range(1, 21)]
    assert all(l.subnet == NO_IPV4 and not l.has_ipv4 and SIX.contains_subnet6(l.subnet6) for l in leases)
    assert len({l.subnet6 for l in leases}) == 20 and len({l.ident for l in leases}) == 20
    for l in leases:
        assert l.key == f"0.0.0.0-0&{l.subnet6.network_address}-64"
        assert store.get_lease(NO_IPV4, l.subnet6).value == l.attrs.to_json()
    assert len(store.list_leases()[0]) == 20


def test_ipv6_only_concurrent_acquirers_get_distinct_subnets(tmp_path):
    tiny = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/62",'
                        '"Backend":{"Type":"alloc"}}')  # /64 subnets: 3 after the first
    path = str(tmp_path / "w.db")
    stores = [SQLiteStore(path) for _ in range(3)]
    results, go = [], threading.Barrier(3)

    def run(s, n):
        go.wait()
        results.append(LeaseManager(s, ttl=3600, rng=random.Random(0)).acquire(tiny, attrs_six(n)).subnet6)
    threads = [threading.Thread(target=run, args=(s, n)) for n, s in enumerate(stores, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [NET6("fd10:244:0:1::/64"), NET6("fd10:244:0:2::/64"), NET6("fd10:244:0:3::/64")]
    with pytest.raises(NetworkFull, match=r"IPv6 network fd10:244::/62 is full: all 3 /64 subnets"):
        LeaseManager(stores[0]).acquire(tiny, attrs_six(4))
    for s in stores:
        s.close()


def test_ipv6_only_reuse_is_by_public_ipv6_never_by_public_ip(store):
    m = LeaseManager(store, ttl=3600, rng=random.Random(7))
    one = m.acquire(SIX, attrs_six(1))
    two = m.acquire(SIX, attrs_six(2))  # PublicIP 0.0.0.0 too: not node 1's lease
    assert two.subnet6 != one.subnet6
    again = m.acquire(SIX, attrs_six(1))
    assert again.subnet6 == one.subnet6 and again.revision > one.revision
    assert len(store.list_leases()[0]) == 2
    assert m.find_by_ip(IP6("2001:db8:198:18::2")).subnet6 == two.subnet6
    assert m.find_by_ip(NO_PUBLIC_IP) is None  # every IPv6-only lease has it: it names no node
    assert m.find_by_ip(IP6("2001:db8:198:18::9")) is None
    assert m.find_by_ip(NO_PUBLIC_IP, IP6("2001:db8:198:18::2")).subnet6 == two.subnet6  # weftd's call
    assert m.find_by_ip(NO_PUBLIC_IP, IP6("2001:db8:198:18::9")) is None
    # a reservation of this public IPv6 is taken by it, and stays one
    store.create_lease(NO_IPV4, attrs_six(5).to_json(), None, NET6("fd10:244:0:55::/64"))
    mine = m.acquire(SIX, attrs_six(5))
    assert mine.subnet6 == NET6("fd10:244:0:55::/64") and mine.expiration is None


def test_ipv6_only_acquire_needs_a_public_ipv6(store):
    with pytest.raises(ValueError, match="IPv6-only network: this node has no public IPv6 address"):
        LeaseManager(store).acquire(SIX, LeaseAttrs(NO_PUBLIC_IP, "alloc"))
    assert store.list_leases()[0] == []


def test_ipv6_only_previous_subnet_env(store):
    m = LeaseManager(store, ttl=3600, rng=random.Random(8))
    prev = NET6("fd10:244:0:99::/64")
    lease = m.acquire(SIX, attrs_six(1), previous_subnet=None, previous_subnet6=prev)
    assert lease.subnet6 == prev and lease.subnet == NO_IPV4
    taken = m.acquire(SIX, attrs_six(2), previous_subnet6=prev)  # node 1's: a random free one
    assert taken.subnet6 != prev and SIX.contains_subnet6(taken.subnet6)
    outside = m.acquire(SIX, attrs_six(3), previous_subnet6=NET6("fd77::/64"))
    assert SIX.contains_subnet6(outside.subnet6)
    # an IPv4 FLANNEL_SUBNET left from a dual-stack run is ignored on an IPv6-only network
    v4 = m.acquire(SIX, attrs_six(4), previous_subnet=NET("10.5.7.0/24"), previous_subnet6=NET6("fd10:244:0:7::/64"))
    assert (v4.subnet, v4.subnet6) == (NO_IPV4, NET6("fd10:244:0:7::/64"))


def test_ipv6_only_lease_from_a_dual_stack_run_is_replaced_and_back(store):
    """A node moved from dual-stack to IPv6-only (same public IPv6): its dual-stack lease does
    not fit and goes; its IPv6 subnet is kept through subnet.env. And back again."""
    m = LeaseManager(store, ttl=3600, rng=random.Random(9))
    dual = m.acquire(DUAL, attrs6(1))
    six = m.acquire(SIX, LeaseAttrs(NO_PUBLIC_IP, "alloc", public_ipv6=IP6("2001:db8:198:18::1")),
                    previous_subnet=dual.subnet, previous_subnet6=dual.subnet6)
    assert (six.subnet, six.subnet6) == (NO_IPV4, dual.subnet6)
    assert [(r.subnet, r.subnet6) for r in store.list_leases()[0]] == [(NO_IPV4, dual.subnet6)]
    back = m.acquire(DUAL, attrs6(1), previous_subnet=dual.subnet, previous_subnet6=six.subnet6)
    assert (back.subnet, back.subnet6) == (dual.subnet, dual.subnet6)
    assert [(r.subnet, r.subnet6) for r in store.list_leases()[0]] == [(dual.subnet, dual.subnet6)]


def test_ipv6_only_renew_and_revoke(store):
    m = LeaseManager(store, ttl=3600)
    lease = m.acquire(SIX, attrs_six(1))
    other = m.acquire(SIX, attrs_six(2))
    renewed = m.renew(lease)
    assert (renewed.subnet, renewed.subnet6) == (NO_IPV4, lease.subnet6) and renewed.revision > lease.revision
    store.delete_lease(NO_IPV4, lease.subnet6)
    with pytest.raises(LeaseRevoked, match=f"^lease {lease.subnet6} has been revoked"):
        m.renew(renewed)
    assert [r.subnet6 for r in store.list_leases()[0]] == [other.subnet6]  # not recreated; the other stays


VXSIX = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/56"}')


def _six_value(n: int, **fields) -> str:
    return _v6_value(n, PublicIP="0.0.0.0", BackendData=..., **fields)


def test_watcher_follows_many_ipv6_only_leases(store):
    """Every IPv6-only lease has the IPv4 part 0.0.0.0-0: the watcher names them by their IPv6
    subnet (Lease.ident), so each is its own peer, through the listing and through the watch."""
    for n in (1, 2):
        _raw_put(store, f"subnets/0.0.0.0-0&fd10:244:0:{n}::-64", _six_value(n))
    events, stop = [], threading.Event()
    w = LeaseWatcher(store, lambda e: events.append((e.kind, str(e.lease.subnet6))), poll_timeout=0.1,
                     config=VXSIX)
    t = threading.Thread(target=w.run, args=(stop,))
    t.start()
    try:
        assert w.synced.wait(5)
        store.create_lease(NO_IPV4, _six_value(3), 3600, NET6("fd10:244:0:3::/64"))
        store.update_lease(NO_IPV4, _six_value(1), 3600, NET6("fd10:244:0:1::/64"))
        store.delete_lease(NO_IPV4, NET6("fd10:244:0:2::/64"))
        deadline = time.monotonic() + 5
        while len(events) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert sorted(events[:2]) == [("added", "fd10:244:0:1::/64"), ("added", "fd10:244:0:2::/64")]
    assert events[2:] == [("added", "fd10:244:0:3::/64"), ("renewed", "fd10:244:0:1::/64"),
                          ("removed", "fd10:244:0:2::/64")]
    assert set(w.known) == {NET6("fd10:244:0:1::/64"), NET6("fd10:244:0:3::/64")}
    assert not any(w.invalid.snapshot().values())


def test_only_leases_of_this_node_that_do_not_fit_are_deleted(store):
    """A node holding two leases (its reservation and a lease left from a dual-stack run): the
    fitting one is reused, the one that does not fit goes, a second fitting one stays."""
    me = LeaseAttrs(NO_PUBLIC_IP, "alloc", public_ipv6=IP6("2001:db8:198:18::1"))
    store.create_lease(NET("10.5.1.0/24"), attrs6(1).to_json(), 3600, NET6("fd10:244:0:1::/64"))
    store.create_lease(NO_IPV4, me.to_json(), None, NET6("fd10:244:0:2::/64"))
    store.create_lease(NO_IPV4, me.to_json(), None, NET6("fd10:244:0:3::/64"))
    lease = LeaseManager(store, ttl=3600).acquire(SIX, me)
    assert lease.subnet6 == NET6("fd10:244:0:2::/64") and lease.expiration is None
    assert sorted(str(r.subnet6) for r in store.list_leases()[0]) == ["fd10:244:0:2::/64", "fd10:244:0:3::/64"]
