"""The store contract: every Store implementation runs this same suite.

A test module subclasses ``StoreContract`` and provides three fixtures:
- ``make_store(prefix)``: open a new client of the store under test (a fresh client each call, so
  concurrency tests use separate connections, as separate daemons do);
- ``compact_store(store)``: drop the store's history up to its current revision;
- ``write_raw(store, key, value)``: write ``<prefix>/<key>`` the way another program would (not
  through the Store), ``value`` None to delete it.
"""
from __future__ import annotations

import ipaddress
import threading
import time

import pytest

from controlplane.lease import NO_IPV4
from controlplane.store import LeaseExists, LeaseNotFound, WatchCompacted

NET = ipaddress.IPv4Network
NET6 = ipaddress.IPv6Network


def subnet(i: int) -> ipaddress.IPv4Network:
    return NET(f"10.5.{i}.0/24")


def value(i: int) -> str:
    return f'{{"PublicIP":"198.18.0.{i}","PublicIPv6":null}}'


def six_value(i: int) -> str:
    """An IPv6-only node's value, as flanneld writes it (PublicIP is its empty ip.IP4)."""
    return f'{{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:198:18::{i}","BackendType":"host-gw"}}'


def drain(watch, want: int, timeout: float = 10.0):
    """Collect events until ``want`` arrived or the timeout passes."""
    events, deadline = [], time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        events.extend(watch.get(timeout=0.5))
    return events


class StoreContract:
    @pytest.fixture
    def store(self, make_store, request):
        s = make_store(f"/weft-test/{request.node.name}")
        yield s
        s.close()

    def test_config_roundtrip(self, store):
        assert store.get_config() is None
        store.put_config('{"Network":"10.5.0.0/16"}')
        assert store.get_config() == '{"Network":"10.5.0.0/16"}'
        store.put_config('{"Network":"10.6.0.0/16"}')
        assert store.get_config() == '{"Network":"10.6.0.0/16"}'

    def test_config_key_names_the_prefix(self, store, request):
        """Messages about a missing or changed config name flanneld's key under the prefix."""
        assert store.config_key() == f"/weft-test/{request.node.name}/config"

    def test_create_get_list(self, store):
        rec = store.create_lease(subnet(1), value(1), ttl=3600)
        assert rec.subnet == subnet(1) and rec.value == value(1)
        assert rec.expiration == pytest.approx(time.time() + 3600, abs=5)
        got = store.get_lease(subnet(1))
        assert got.value == value(1) and got.revision == rec.revision
        assert got.expiration == pytest.approx(rec.expiration, abs=5)
        store.create_lease(subnet(2), value(2), ttl=3600)
        records, rev = store.list_leases()
        assert [r.subnet for r in records] == [subnet(1), subnet(2)]
        assert rev >= max(r.revision for r in records)
        assert store.get_lease(subnet(3)) is None

    def test_create_is_create_if_absent(self, store):
        store.create_lease(subnet(1), value(1), ttl=3600)
        with pytest.raises(LeaseExists):
            store.create_lease(subnet(1), value(9), ttl=3600)
        assert store.get_lease(subnet(1)).value == value(1)

    def test_racing_creators_one_wins(self, make_store, request):
        prefix = f"/weft-test/{request.node.name}"
        clients = [make_store(prefix) for _ in range(8)]
        wins, losses, start = [], [], threading.Barrier(len(clients))

        def race(i, s):
            start.wait()
            try:
                s.create_lease(subnet(7), value(i), ttl=3600)
                wins.append(i)
            except LeaseExists:
                losses.append(i)
        threads = [threading.Thread(target=race, args=(i, s)) for i, s in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and len(losses) == len(clients) - 1
        assert clients[0].get_lease(subnet(7)).value == value(wins[0])
        for s in clients:
            s.close()

    def test_update_only_existing(self, store):
        with pytest.raises(LeaseNotFound):
            store.update_lease(subnet(1), value(1), ttl=3600)
        assert store.get_lease(subnet(1)) is None
        first = store.create_lease(subnet(1), value(1), ttl=60)
        second = store.update_lease(subnet(1), value(2), ttl=3600)
        assert second.revision > first.revision
        got = store.get_lease(subnet(1))
        assert got.value == value(2)
        assert got.expiration == pytest.approx(time.time() + 3600, abs=5)

    def test_delete(self, store):
        store.create_lease(subnet(1), value(1), ttl=3600)
        assert store.delete_lease(subnet(1)) is True
        assert store.get_lease(subnet(1)) is None
        assert store.delete_lease(subnet(1)) is False
        with pytest.raises(LeaseNotFound):
            store.update_lease(subnet(1), value(1), ttl=3600)

    def test_reservation_has_no_expiry(self, store):
        store.create_lease(subnet(3), value(3), ttl=None)
        got = store.get_lease(subnet(3))
        assert got.expiration is None
        records, _ = store.list_leases()
        assert records[0].expiration is None

    def test_ttl_expiry_is_enforced_and_watched(self, store):
        _, rev = store.list_leases()
        store.create_lease(subnet(4), value(4), ttl=2)
        assert store.get_lease(subnet(4)) is not None
        watch = store.watch(rev)
        try:
            events = drain(watch, 2, timeout=8)
        finally:
            watch.close()
        assert [e.kind for e in events] == ["put", "delete"]
        assert events[1].subnet == subnet(4)
        assert store.get_lease(subnet(4)) is None
        assert store.list_leases()[0] == []

    def test_watch_replays_from_revision(self, store):
        _, rev = store.list_leases()
        store.create_lease(subnet(1), value(1), ttl=3600)
        store.update_lease(subnet(1), value(11), ttl=3600)
        store.create_lease(subnet(2), value(2), ttl=None)
        store.delete_lease(subnet(1))
        store.put_config('{"Network":"10.5.0.0/16"}')  # not a lease: a config event
        watch = store.watch(rev)
        try:
            events = drain(watch, 5)
            assert not watch.get(timeout=0.3)
        finally:
            watch.close()
        assert [(e.kind, e.subnet) for e in events] == [
            ("put", subnet(1)), ("put", subnet(1)), ("put", subnet(2)), ("delete", subnet(1)),
            ("config", None)]
        assert events[4].value == '{"Network":"10.5.0.0/16"}'
        events = events[:4]
        assert [e.record.value for e in events if e.kind == "put"] == [value(1), value(11), value(2)]
        assert events[2].record.expiration is None
        revs = [e.revision for e in events]
        assert revs == sorted(revs) and revs[0] > rev

    def test_list_then_watch_loses_nothing(self, make_store, request):
        """Writers racing a lister: list at R + watch from R sees every lease exactly once."""
        prefix = f"/weft-test/{request.node.name}"
        writers = [make_store(prefix) for _ in range(5)]
        reader = make_store(prefix)
        go = threading.Barrier(len(writers) + 1)

        def write(w, base):
            go.wait()
            for i in range(base, base + 10):
                w.create_lease(subnet(i), value(i % 250), ttl=3600)
        threads = [threading.Thread(target=write, args=(w, 1 + 10 * n)) for n, w in enumerate(writers)]
        for t in threads:
            t.start()
        go.wait()
        time.sleep(0.01)
        records, rev = reader.list_leases()
        seen = {r.subnet for r in records}
        watch = reader.watch(rev)
        try:
            deadline = time.monotonic() + 15
            while len(seen) < 50 and time.monotonic() < deadline:
                for e in watch.get(timeout=0.5):
                    assert e.kind == "put" and e.subnet not in seen
                    seen.add(e.subnet)
        finally:
            watch.close()
        for t in threads:
            t.join()
        assert seen == {subnet(i) for i in range(1, 51)}
        for s in writers + [reader]:
            s.close()

    def test_watch_compacted(self, store, compact_store):
        _, rev = store.list_leases()
        for i in range(1, 4):
            store.create_lease(subnet(i), value(i), ttl=3600)
        compact_store(store)
        store.create_lease(subnet(9), value(9), ttl=3600)
        watch = store.watch(rev)
        try:
            with pytest.raises(WatchCompacted):
                drain(watch, 1, timeout=5)
        finally:
            watch.close()
        # Re-listing recovers the state, and a watch from the new revision works.
        records, rev2 = store.list_leases()
        assert {r.subnet for r in records} == {subnet(1), subnet(2), subnet(3), subnet(9)}
        watch = store.watch(rev2)
        try:
            store.delete_lease(subnet(2))
            assert [(e.kind, e.subnet) for e in drain(watch, 1)] == [("delete", subnet(2))]
        finally:
            watch.close()

    def test_foreign_keys_are_apart_from_leases(self, store, write_raw):
        """Keys under subnets/ that are not flannel's lease keys: never leases, always reported."""
        names = ["garbage", "10.5.1.5-24", "10.5.1.0-024", "x/10.5.1.0-24", "10.5.2.0-24/extra"]
        for name in names:
            write_raw(store, f"subnets/{name}", value(1))
        write_raw(store, "SUBNETS/10.5.3.0-24", value(3))  # not under subnets/ at all
        store.create_lease(subnet(4), value(4), ttl=3600)
        scan = store.scan_subnets()
        assert [r.subnet for r in scan.records] == [subnet(4)]
        assert sorted(f.name for f in scan.foreign) == sorted(names)
        assert all(0 < f.revision <= scan.revision for f in scan.foreign)
        records, rev = store.list_leases()
        assert [r.subnet for r in records] == [subnet(4)] and rev == scan.revision
        assert store.get_lease(subnet(1)) is None and store.get_lease(subnet(3)) is None

        watch = store.watch(scan.revision)
        try:
            write_raw(store, "subnets/10.5.1.0-24/x", "y")
            write_raw(store, "subnets/garbage", None)
            write_raw(store, "SUBNETS/10.5.3.0-24", value(3))
            store.create_lease(subnet(5), value(5), ttl=3600)
            events = drain(watch, 3)
        finally:
            watch.close()
        assert [(e.kind, e.subnet, e.name, e.value) for e in events] == [
            ("foreign", None, "10.5.1.0-24/x", "y"), ("foreign", None, "garbage", None),
            ("put", subnet(5), "", None)]

    # -- dual-stack keys: <ip>-<len>&<ip6>-<len6> (flannel's MakeSubnetKey) ----------------------
    def test_dual_stack_key_roundtrip(self, store, write_raw):
        """A lease with an IPv6 part lives under flannel's dual key; every method takes the pair,
        and a scan, a get and the watch give the IPv6 part back."""
        n6 = NET6("fd10:244:0:1::/64")
        _, rev = store.list_leases()
        rec = store.create_lease(subnet(1), value(1), ttl=3600, subnet6=n6)
        assert (rec.subnet, rec.subnet6) == (subnet(1), n6)
        assert store.get_lease(subnet(1)) is None  # another key: 10.5.1.0-24 alone
        got = store.get_lease(subnet(1), n6)
        assert (got.subnet, got.subnet6, got.value) == (subnet(1), n6, value(1))
        store.create_lease(subnet(2), value(2), ttl=3600)  # an IPv4-only lease beside it
        scan = store.scan_subnets()
        assert sorted((r.subnet, r.subnet6) for r in scan.records) == [(subnet(1), n6), (subnet(2), None)]
        assert scan.foreign == []
        renewed = store.update_lease(subnet(1), value(11), ttl=3600, subnet6=n6)
        assert renewed.subnet6 == n6 and store.get_lease(subnet(1), n6).value == value(11)
        with pytest.raises(LeaseNotFound):  # the IPv4-only key of that subnet does not exist
            store.update_lease(subnet(1), value(1), ttl=3600)
        assert store.delete_lease(subnet(1)) is False
        assert store.delete_lease(subnet(1), n6) is True
        assert store.get_lease(subnet(1), n6) is None
        watch = store.watch(rev)
        try:
            events = drain(watch, 4)
        finally:
            watch.close()
        assert [(e.kind, e.subnet, e.subnet6) for e in events] == [
            ("put", subnet(1), n6), ("put", subnet(2), None), ("put", subnet(1), n6),
            ("delete", subnet(1), n6)]
        assert events[0].record.subnet6 == n6 and events[1].record.subnet6 is None

    def test_a_lease_is_its_ipv4_subnet(self, store):
        """Create-if-absent covers every key of an IPv4 subnet: with an IPv6 part, without one, or
        with another one (two nodes must never share an IPv4 subnet through two keys)."""
        a6, b6 = NET6("fd10:244:0:1::/64"), NET6("fd10:244:0:2::/64")
        store.create_lease(subnet(1), value(1), ttl=3600, subnet6=a6)
        for other in (None, a6, b6):
            with pytest.raises(LeaseExists):
                store.create_lease(subnet(1), value(2), ttl=3600, subnet6=other)
        store.create_lease(subnet(2), value(2), ttl=3600)
        with pytest.raises(LeaseExists):
            store.create_lease(subnet(2), value(3), ttl=3600, subnet6=b6)
        # another IPv4 subnet that starts alike (10.5.1.0-25) is not one of its keys
        store.create_lease(NET("10.5.1.0/25"), value(4), ttl=3600, subnet6=b6)
        assert sorted((r.subnet, r.subnet6) for r in store.list_leases()[0]) == [
            (NET("10.5.1.0/24"), a6), (NET("10.5.1.0/25"), b6), (subnet(2), None)]

    # -- IPv6-only keys: 0.0.0.0-0&<ip6>-<len6> (flannel's empty IPv4 part); named by the IPv6 part --
    def test_ipv6_only_leases_are_named_by_their_ipv6_subnet(self, store):
        """Every IPv6-only lease has the IPv4 part 0.0.0.0-0: create-if-absent compares the
        lease's identity (``LeaseRecord.ident``, its IPv6 subnet here), so distinct IPv6 subnets
        coexist and one IPv6 subnet is created once."""
        a6, b6 = NET6("fd10:244:0:1::/64"), NET6("fd10:244:0:2::/64")
        rec = store.create_lease(NO_IPV4, six_value(1), ttl=3600, subnet6=a6)
        assert (rec.subnet, rec.subnet6, rec.ident) == (NO_IPV4, a6, a6)
        store.create_lease(NO_IPV4, six_value(2), ttl=3600, subnet6=b6)  # another node: fine
        for ttl in (3600, None):
            with pytest.raises(LeaseExists):
                store.create_lease(NO_IPV4, six_value(3), ttl=ttl, subnet6=a6)
        # a dual-stack lease of that IPv6 subnet has another identity (its IPv4 subnet): the
        # store lets it be (the watcher judges the overlap), and it does not block IPv6-only ones
        store.create_lease(subnet(1), value(4), ttl=3600, subnet6=a6)
        c6 = NET6("fd10:244:0:3::/64")
        store.create_lease(subnet(3), value(5), ttl=3600, subnet6=c6)
        store.create_lease(NO_IPV4, six_value(5), ttl=3600, subnet6=c6)
        scan = store.scan_subnets()
        assert sorted((str(r.subnet), str(r.subnet6)) for r in scan.records) == [
            ("0.0.0.0/0", "fd10:244:0:1::/64"), ("0.0.0.0/0", "fd10:244:0:2::/64"),
            ("0.0.0.0/0", "fd10:244:0:3::/64"), ("10.5.1.0/24", "fd10:244:0:1::/64"),
            ("10.5.3.0/24", "fd10:244:0:3::/64")]
        assert store.get_lease(NO_IPV4, a6).value == six_value(1)
        assert store.update_lease(NO_IPV4, six_value(11), 3600, a6).ident == a6
        assert store.get_lease(NO_IPV4, a6).value == six_value(11)
        assert store.get_lease(NO_IPV4, b6).value == six_value(2)  # untouched
        with pytest.raises(LeaseNotFound):
            store.update_lease(NO_IPV4, six_value(9), 3600, NET6("fd10:244:0:9::/64"))
        assert store.delete_lease(NO_IPV4, a6) is True
        store.create_lease(NO_IPV4, six_value(6), ttl=3600, subnet6=a6)  # free again
        assert store.get_lease(NO_IPV4, a6).value == six_value(6)

    def test_racing_ipv6_only_creators_one_wins(self, make_store, request):
        prefix = f"/weft-test/{request.node.name}"
        stores = [make_store(prefix) for _ in range(4)]
        n6 = NET6("fd10:244:0:7::/64")
        results, go = [], threading.Barrier(len(stores))

        def run(s, i):
            go.wait()
            try:
                s.create_lease(NO_IPV4, six_value(i), ttl=3600, subnet6=n6)
                results.append("won")
            except LeaseExists:
                results.append("lost")
        threads = [threading.Thread(target=run, args=(s, i)) for i, s in enumerate(stores, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["lost", "lost", "lost", "won"]
        assert [(r.subnet, r.subnet6) for r in stores[0].list_leases()[0]] == [(NO_IPV4, n6)]
        for s in stores:
            s.close()

    def test_dual_stack_keys_written_by_others(self, store, write_raw):
        """flanneld's dual keys are leases; malformed IPv6 parts are someone else's keys."""
        good = "10.5.1.0-24&fd10:244:0:1::-64"
        bad = ["10.5.2.0-24&fd10:244:0:2::1-64",  # host bits
               "10.5.3.0-24&FD10:244:0:3::-64",  # not as Go prints it
               "10.5.4.0-24&fd10:0244:0:4::-64",  # leading zero
               "10.5.5.0-24&fd10:244:0:5:0:0:0:0-64",  # not RFC 5952's short form
               "10.5.6.0-24&fd10:244:0:6::-129",  # no such length
               "10.5.7.0-24&fd10:244:0:7::-064",
               "10.5.8.0-24&10.6.0.0-16",  # IPv4 after '&'
               "10.5.9.0-24&", "10.5.10.0-24&fd10::-64&fd11::-64", "&fd10:244::-64"]
        write_raw(store, f"subnets/{good}", value(1))
        for name in bad:
            write_raw(store, f"subnets/{name}", value(2))
        scan = store.scan_subnets()
        assert [(r.subnet, r.subnet6) for r in scan.records] == [(subnet(1), NET6("fd10:244:0:1::/64"))]
        assert sorted(f.name for f in scan.foreign) == sorted(bad)

    def test_config_changes_are_watched(self, store, write_raw):
        _, rev = store.list_leases()
        store.put_config('{"Network":"10.5.0.0/16"}')
        write_raw(store, "config", "garbage")
        write_raw(store, "config", None)
        watch = store.watch(rev)
        try:
            events = drain(watch, 3)
        finally:
            watch.close()
        assert [(e.kind, e.subnet, e.value) for e in events] == [
            ("config", None, '{"Network":"10.5.0.0/16"}'), ("config", None, "garbage"),
            ("config", None, None)]
        assert store.get_config() is None

    def test_prefixes_are_separate(self, make_store, request):
        a = make_store(f"/weft-test/{request.node.name}/a")
        b = make_store(f"/weft-test/{request.node.name}/b")
        a.put_config('{"Network":"10.5.0.0/16"}')
        a.create_lease(subnet(1), value(1), ttl=3600)
        assert b.get_config() is None and b.list_leases()[0] == []
        b.create_lease(subnet(1), value(2), ttl=3600)  # same subnet, other network
        assert a.get_lease(subnet(1)).value == value(1)
        a.close()
        b.close()

    def test_many_writers_no_lost_update(self, make_store, request):
        """Concurrent renewals of one key: every write lands as its own revision."""
        prefix = f"/weft-test/{request.node.name}"
        seed = make_store(prefix)
        _, rev = seed.list_leases()
        seed.create_lease(subnet(1), value(0), ttl=3600)
        clients = [make_store(prefix) for _ in range(4)]

        def renew(s, n):
            for k in range(10):
                s.update_lease(subnet(1), value(n * 10 + k), ttl=3600)
        threads = [threading.Thread(target=renew, args=(s, n)) for n, s in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        watch = seed.watch(rev)
        try:
            events = drain(watch, 41)
        finally:
            watch.close()
        assert len(events) == 41
        assert len({e.revision for e in events}) == 41
        assert seed.get_lease(subnet(1)).value == events[-1].record.value
        for s in clients + [seed]:
            s.close()

    # -- node claims (controlplane.claim): one running weftd per public IP -------------------------
    def test_claim_take_refresh_release(self, store):
        from controlplane.store.base import ClaimChanged
        rec = store.take_claim("198.18.0.7", '{"instance":"a"}', 30, None)
        got = store.get_claim("198.18.0.7")
        assert (got.value, got.revision) == ('{"instance":"a"}', rec.revision)
        assert got.expiration == pytest.approx(time.time() + 30, abs=2)
        with pytest.raises(ClaimChanged):  # create-if-absent
            store.take_claim("198.18.0.7", '{"instance":"b"}', 30, None)
        fresh = store.refresh_claim("198.18.0.7", rec, 30)
        assert fresh.revision != rec.revision and fresh.value == rec.value
        assert store.get_claim("198.18.0.7").revision == fresh.revision
        with pytest.raises(ClaimChanged):  # a stale record refreshes nothing
            store.refresh_claim("198.18.0.7", rec, 30)
        assert store.release_claim("198.18.0.7", rec) is False  # nor releases anything
        assert store.get_claim("198.18.0.7").revision == fresh.revision
        assert store.release_claim("198.18.0.7", fresh) is True
        assert store.get_claim("198.18.0.7") is None
        with pytest.raises(ClaimChanged):
            store.refresh_claim("198.18.0.7", fresh, 30)
        assert store.get_claim("198.18.1.7") is None

    def test_claim_replaces_only_what_was_seen(self, store):
        from controlplane.store.base import ClaimChanged
        seen = store.take_claim("198.18.0.7", '{"instance":"a"}', 30, None)
        mine = store.take_claim("198.18.0.7", '{"instance":"b"}', 30, seen)
        with pytest.raises(ClaimChanged):  # a second newcomer that judged the same old claim
            store.take_claim("198.18.0.7", '{"instance":"c"}', 30, seen)
        assert store.get_claim("198.18.0.7").value == '{"instance":"b"}'
        store.refresh_claim("198.18.0.7", mine, 30)

    def test_racing_claimers_one_wins(self, make_store, request):
        from controlplane.store.base import ClaimChanged
        prefix = f"/weft-test/{request.node.name}"
        clients = [make_store(prefix) for _ in range(6)]
        wins, start = [], threading.Barrier(len(clients))

        def race(i, s):
            start.wait()
            try:
                s.take_claim("198.18.0.7", f'{{"instance":"{i}"}}', 30, None)
                wins.append(i)
            except ClaimChanged:
                pass
        threads = [threading.Thread(target=race, args=(i, s)) for i, s in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert clients[0].get_claim("198.18.0.7").value == f'{{"instance":"{wins[0]}"}}'
        for s in clients:
            s.close()

    def test_claim_expires(self, store):
        from controlplane.store.base import ClaimChanged
        rec = store.take_claim("198.18.0.7", '{"instance":"a"}', 2, None)
        deadline = time.monotonic() + 6
        while store.get_claim("198.18.0.7") is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.get_claim("198.18.0.7") is None
        with pytest.raises(ClaimChanged):
            store.refresh_claim("198.18.0.7", rec, 2)
        store.take_claim("198.18.0.7", '{"instance":"b"}', 30, None)

    def test_claims_are_not_leases(self, store):
        _, rev = store.list_leases()
        rec = store.take_claim("198.18.0.7", '{"PublicIP":"198.18.0.7","PublicIPv6":null}', 30, None)
        rec = store.refresh_claim("198.18.0.7", rec, 30)
        store.release_claim("198.18.0.7", rec)
        store.create_lease(subnet(1), value(1), ttl=3600)
        assert [r.subnet for r in store.list_leases()[0]] == [subnet(1)]
        watch = store.watch(rev)
        try:
            events = drain(watch, 1)
            assert not watch.get(timeout=0.3)
        finally:
            watch.close()
        assert [(e.kind, e.subnet) for e in events] == [("put", subnet(1))]
