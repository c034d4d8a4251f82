"""A 3-member etcd cluster with one member killed or paused: weft fails over to the others.

The store is given every member (``-etcd-endpoints``); the member it is connected to (the first
endpoint) dies. What must hold: the operation that meets the dead member is answered by the next
one (reads always; writes only when the request never left: a write whose answer was lost may have
been applied, and the claim refresh and lease writes are compare-and-swap transactions), the watch
carries on from the last revision it received without a missed event, and the store's health
(``weft_store_up``) stays up: the cluster answered all along.
"""
from __future__ import annotations

import ipaddress
import json
import os
import select
import signal
import time

import pytest

from bench.etcdserver import EtcdServer, free_port
from controlplane.store import EtcdOptions, StoreUnavailable, etcd_http
from controlplane.store.etcd import EtcdStore
from controlplane.store.monitor import MonitoredStore, StoreHealth

from .conftest import needs_etcd
from .daemons import Weftd, run_tool
from .store_contract import drain

pytestmark = needs_etcd

NET = ipaddress.IPv4Network
PREFIX = "/weft-failover"
VALUE = ('{"PublicIP":"198.18.0.9","PublicIPv6":null,"BackendType":"vxlan",'
         '"BackendData":{"VNI":1,"VtepMAC":"5e:bb:b4:14:2b:45"}}')
ALLOC = '{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}'


class Cluster:
    """Three etcd members on 127.0.0.1, started together (none is healthy before a quorum runs)."""

    def __init__(self, tag: str):
        self.members = [EtcdServer(name=f"weft-{tag}{i}", start=False, wait_healthy=False,
                                   die_with_parent=True) for i in range(3)]
        for m in self.members:
            m.client_port, m.peer_port = free_port(), free_port()
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster, m.cluster_token = initial, f"weft-{tag}-{os.getpid()}"

    def start(self) -> "Cluster":
        for m in self.members:
            m.start()
        for m in self.members:
            m._wait_healthy()
        return self

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def leader(self) -> int:
        for i, m in enumerate(self.members):
            st = json.loads(m.etcdctl("endpoint", "status", "-w", "json"))[0]["Status"]
            if st["header"]["member_id"] == st["leader"]:
                return i
        raise AssertionError("no member says it is the leader")

    def make_leader(self, index: int) -> None:
        """Move the leadership to member ``index`` (etcdctl move-leader, asked of the leader)."""
        now = self.leader()
        if now == index:
            return
        st = json.loads(self.members[index].etcdctl("endpoint", "status", "-w", "json"))[0]["Status"]
        self.members[now].etcdctl("move-leader", format(st["header"]["member_id"], "x"))
        deadline = time.monotonic() + 10
        while self.leader() != index:
            assert time.monotonic() < deadline, f"member {index} did not become the leader"
            time.sleep(0.1)

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                os.kill(m.proc.pid, signal.SIGCONT)
            m.stop()


@pytest.fixture
def cluster(request):
    c = Cluster(f"fo{abs(hash(request.node.name)) % 1000}")
    try:
        yield c.start()
    finally:
        c.stop()


def _monitored(cluster, **kw):
    raw = EtcdStore(EtcdOptions(cluster.endpoints), prefix=PREFIX, **kw)
    health = StoreHealth(raw.url)
    health.answered("open")
    return raw, MonitoredStore(raw, health), health


@pytest.mark.parametrize("first_is", ["leader", "follower"])
def test_first_endpoint_killed_the_next_answers_and_health_stays_up(cluster, first_is):
    cluster.make_leader(0 if first_is == "leader" else 1)
    raw, store, health = _monitored(cluster, connect_timeout=2, op_timeout=3)
    try:
        store.put_config(ALLOC)
        _, rev = store.list_leases()
        watch = store.watch(rev)
        store.create_lease(NET("10.5.1.0/24"), VALUE, ttl=60)
        assert [e.kind for e in drain(watch, 1)] == ["put"]

        cluster.members[0].kill()  # the member every connection uses
        assert store.get_config() == ALLOC  # the read that meets the dead member is answered
        store.create_lease(NET("10.5.2.0/24"), VALUE, ttl=60)
        assert store.get_lease(NET("10.5.2.0/24")) is not None
        events = drain(watch, 1)  # the watch resumed on another member, nothing missed
        assert [(e.kind, str(e.subnet)) for e in events] == [("put", "10.5.2.0/24")]
        assert health.up is True, health.reason
        assert health.outages == 0 and not health.errors, (health.outages, dict(health.errors))
        assert raw.stats().get("failover", 0) >= 1
        watch.close()
    finally:
        store.close()


def test_a_read_during_the_election_waits_for_the_new_leader(cluster):
    """The leader killed: until the others elect a new one (an election timeout, 1 s, or more)
    no member answers a linearizable read. A read asked at once is asked again, round after
    round over the endpoints, until the new leader answers, within its op_timeout; no outage."""
    cluster.make_leader(0)
    raw, store, health = _monitored(cluster, connect_timeout=0.3, op_timeout=6)
    try:
        store.put_config(ALLOC)
        cluster.members[0].kill()
        start = time.monotonic()
        assert store.get_config() == ALLOC
        waited = time.monotonic() - start
        assert health.up is True and health.outages == 0, (health.outages, dict(health.errors))
        # more than one round over the two survivors: the election was really waited for
        assert raw.stats()["failover"] >= 2, (waited, raw.stats())
    finally:
        store.close()


@pytest.mark.parametrize("opened", ["on the leader, before it dies", "during the election"])
def test_a_watch_goes_on_through_the_election(cluster, opened):
    """A watch is a read: it waits for the new leader, as reads do, and misses nothing.
    - Opened on the leader before it dies: while the others elect a new one, every member refuses
      the watch (no leader) or the check read; the watch goes on asking, round after round within
      its op_timeout, instead of failing over once and giving up.
    - Opened just after the leader died (weftd starting its watch at that moment: what CI met
      once): the opening waits the same way."""
    cluster.make_leader(0)
    raw, store, health = _monitored(cluster, connect_timeout=0.3, op_timeout=6)
    try:
        store.put_config(ALLOC)
        _, rev = store.list_leases()
        if opened == "during the election":
            cluster.members[0].kill()
            watch = store.watch(rev)
        else:
            watch = store.watch(rev)
            assert raw.endpoints.index(watch._watch.endpoint) == 0
            cluster.members[0].kill()
            assert watch.get(timeout=2) == []  # the stream broke during the election: no error
        store.create_lease(NET("10.5.5.0/24"), VALUE, ttl=60)
        assert [(e.kind, str(e.subnet)) for e in drain(watch, 1)] == [("put", "10.5.5.0/24")]
        assert health.up is True and health.outages == 0, (health.outages, dict(health.errors))
        watch.close()
    finally:
        store.close()


def test_a_write_that_could_not_be_written_goes_to_the_next_member(cluster, monkeypatch):
    """The member dies between the pool's idle check and the send (what CI met once: "Broken
    pipe" on a lease write right after the kill). The request never left whole, so no member can
    have applied it: it is a write that was never sent, and the next member takes it."""
    cluster.make_leader(1)
    raw, store, health = _monitored(cluster, connect_timeout=1, op_timeout=3)
    try:
        store.put_config(ALLOC)  # a connection to member 0 now idles in the pool
        idle = raw._connection().client._idle
        assert len(idle) == 1
        sock = idle[0].sock
        cluster.members[0].kill()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        assert poller.poll(5000), "the dead member's FIN did not arrive"
        sock.send(b"\r\n")  # the dead member answers with a reset: the next write fails at once
        time.sleep(0.2)
        monkeypatch.setattr(etcd_http, "_readable", lambda s: False)  # the check ran just before
        record = store.create_lease(NET("10.5.7.0/24"), VALUE, ttl=60)
        assert health.up is True and health.outages == 0
        assert raw.stats()["create"] == 1 and raw.stats()["failover"] >= 1
        assert store.get_lease(NET("10.5.7.0/24")).revision == record.revision
    finally:
        store.close()


def test_a_write_whose_answer_was_lost_is_not_sent_again(cluster):
    """The first member paused: a read times out there and is answered by the next member; a
    write that timed out may have been applied, so it is reported (StoreUnavailable), never sent
    again; the next write goes to the member that answers."""
    cluster.make_leader(1)
    raw, store, health = _monitored(cluster, connect_timeout=1, op_timeout=1)
    first = cluster.members[0]
    try:
        store.put_config(ALLOC)
        os.kill(first.proc.pid, signal.SIGSTOP)
        assert store.get_config() == ALLOC  # timed out on member 0, answered by member 1
        assert health.up is True
        grants = raw.stats().get("grant", 0)
        os.kill(first.proc.pid, signal.SIGCONT)
        raw2, store2, health2 = _monitored(cluster, connect_timeout=1, op_timeout=1)
        try:
            os.kill(first.proc.pid, signal.SIGSTOP)
            with pytest.raises(StoreUnavailable, match="no answer within 1s"):
                store2.create_lease(NET("10.5.3.0/24"), VALUE, ttl=60)
            assert raw2.stats()["create"] == 1 and raw2.stats()["grant"] == 1  # not sent again
            assert health2.up is False
            store2.create_lease(NET("10.5.4.0/24"), VALUE, ttl=60)  # the next member answers
            assert health2.up is True  # a failover that answered: up at once
            assert health2.outages == 1
        finally:
            store2.close()
        assert raw.stats().get("grant", 0) == grants
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
        store.close()


@pytest.mark.parametrize("first_is", ["leader", "follower"])
def test_weftd_stays_up_when_its_first_endpoint_dies(cluster, tmp_path, first_is):
    cluster.make_leader(0 if first_is == "leader" else 1)
    args = ["-etcd-endpoints", ",".join(cluster.endpoints), "-etcd-prefix", PREFIX]
    r = run_tool("controlplane.ctl", *args, "config", "put", "-", input=ALLOC)
    assert r.returncode == 0, r.stderr
    d = Weftd(str(tmp_path), 1, args, extra=["--claim-ttl", "3"]).start()
    try:
        d.wait_ready()
        assert d.metric("weft_store_up") == 1
        other = "10.5.9.0/24" if not d.subnet().startswith("10.5.9.") else "10.5.10.0/24"  # not its own
        cluster.members[0].kill()
        r = run_tool("controlplane.ctl", "-etcd-endpoints", ",".join(cluster.endpoints[1:]),
                     "-etcd-prefix", PREFIX, "reserve", other, "--public-ip", "198.18.0.9")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 6  # two claim refreshes and the watch, on the others
        while time.monotonic() < deadline:
            assert d.metric("weft_store_up") == 1, d.log()[-2000:]
            time.sleep(0.2)
        assert d.metric("weft_peers") == 1, d.log()[-2000:]  # the reservation made after the kill
        assert d.metric("weft_store_outages_total") == 0, d.log()[-3000:]
        assert "is unavailable" not in d.log(), d.log()[-2000:]
    finally:
        d.stop()
