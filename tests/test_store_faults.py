"""The store under faults, with real weftd processes: etcd paused and killed, a node paused past its
lease TTL, a SQLite file that turns read-only, fills its disk or gets corrupted, and the network
config changed under running daemons.

What every case shows: no daemon exits (the data plane stays), ``weft_store_up`` and one WARNING
line say the store is away, one INFO line says when it is back, ``/readyz`` follows the rule in
``controlplane.health`` (200 while the lease is held and has not expired), and once the store is
usable again the daemons follow every change at once.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
import uuid

import pytest

from bench.etcdserver import EtcdServer, _die_with_parent

from .conftest import needs_etcd, needs_root
from .daemons import Weftd, run_tool
from .etcd_fixtures import etcd_plain  # noqa: F401  (fixture)

ALLOC = '{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}'
FAST = ["--claim-ttl", "3"]  # a claim refreshed every second: the store's state is seen within ~1 s


def wait_for(what, check, timeout: float = 10.0, nodes=()):
    """Poll ``check`` until it returns something true; a node that exits meanwhile fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        for d in nodes:
            if d.proc.poll() is not None:
                raise AssertionError(f"weftd {d.n} exited {d.proc.returncode} waiting for {what}:"
                                     f" {d.log()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def lines(d: Weftd, pattern: str) -> list[str]:
    return [l for l in d.log().splitlines() if re.search(pattern, l)]


def alive(*nodes: Weftd) -> None:
    for d in nodes:
        assert d.proc.poll() is None, f"weftd {d.n} exited {d.proc.returncode}: {d.log()[-2000:]}"


def put_config(args, text=ALLOC):
    r = run_tool("controlplane.ctl", *args, "config", "put", "-", input=text)
    assert r.returncode == 0, r.stderr


# -- etcd ---------------------------------------------------------------------------------------
class RestartableEtcd(EtcdServer):
    """An etcd of the test's own that can be SIGKILLed and started again on the same data dir."""

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def restart(self) -> None:
        argv = self.proc.args
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self._wait_healthy()


@pytest.fixture
def own_etcd():
    server = RestartableEtcd(name="weft-test-faults", die_with_parent=True)
    try:
        yield server
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


@needs_etcd
def test_etcd_paused_then_killed_and_restarted(own_etcd, tmp_path):
    """Fault 1: etcd SIGSTOPped, then SIGKILLed and restarted on its data dir; a joiner starts
    during the outage; a lease is released once etcd is back."""
    args = ["-etcd-endpoints", own_etcd.endpoint, "-etcd-prefix", "/weft-faults/etcd"]
    put_config(args)
    gone = Weftd(str(tmp_path), 4, args, extra=FAST).start()  # its lease stays after SIGTERM
    gone.wait_ready()
    gone.stop()
    nodes = [Weftd(str(tmp_path), n, args, extra=FAST).start() for n in (1, 2, 3)]
    joiner = Weftd(str(tmp_path), 5, args, extra=FAST)
    try:
        for d in nodes:
            d.wait_ready()
        wait_for("3 peers each", lambda: all(d.metric("weft_peers") == 3 for d in nodes), nodes=nodes)
        assert all(d.metric("weft_store_up") == 1 for d in nodes)

        os.kill(own_etcd.proc.pid, signal.SIGSTOP)
        wait_for("store down on every node", lambda: all(d.metric("weft_store_up") == 0 for d in nodes),
                 timeout=20, nodes=nodes)
        for d in nodes:
            assert d.metric("weft_store_down_since_timestamp_seconds") > 0
            assert len(lines(d, r"WARNING .*store .* is unavailable")) == 1, d.log()
            assert d.get("/readyz")[0] == 200  # the lease has not expired: pod traffic is fine
            assert d.get("/healthz")[0] == 200
        os.kill(own_etcd.proc.pid, signal.SIGCONT)
        wait_for("store back", lambda: all(d.metric("weft_store_up") == 1 for d in nodes),
                 timeout=15, nodes=nodes)
        for d in nodes:
            assert len(lines(d, r"INFO .*store .* is back after \d+ s")) == 1, d.log()

        own_etcd.kill()
        joiner.start()
        wait_for("the joiner waits for the store", lambda: lines(joiner, "waiting for the store at"),
                 nodes=[joiner])
        time.sleep(1.5)  # several retries: still one line, still running
        alive(joiner, *nodes)
        assert len(lines(joiner, "waiting for the store at")) == 1, joiner.log()
        assert joiner.metric("weft_store_up") == 0
        assert joiner.get("/readyz")[0] == 503

        own_etcd.restart()
        back = time.monotonic()
        everyone = nodes + [joiner]
        wait_for("the joiner ready", joiner.ready, nodes=[joiner])
        wait_for("4 peers each", lambda: all(d.metric("weft_peers") == 4 for d in everyone),
                 nodes=everyone)
        assert time.monotonic() - back < 2.0 + 0.5, "converged more than 2 s after etcd returned"

        r = run_tool("controlplane.ctl", *args, "release", gone.subnet().replace(".1/", ".0/"))
        assert r.returncode == 0, r.stderr
        released = time.monotonic()
        wait_for("the released lease dropped", lambda: all(d.metric("weft_peers") == 3 for d in everyone),
                 nodes=everyone)
        assert time.monotonic() - released < 2.0
        alive(*everyone)
        assert all(d.ready() for d in everyone)
    finally:
        for d in nodes + [joiner]:
            d.stop()


@needs_etcd
def test_weftd_waits_for_an_etcd_that_is_not_there_yet(tmp_path):
    """Started before etcd: it waits (one line, then one every ~30 s), and comes up once etcd answers."""
    etcd = RestartableEtcd(name="weft-test-late", die_with_parent=True, start=False)
    from bench.etcdserver import free_port
    etcd.client_port, etcd.peer_port = free_port(), free_port()
    args = ["-etcd-endpoints", etcd.endpoint, "-etcd-prefix", "/weft-faults/late"]
    d = Weftd(str(tmp_path), 1, args, extra=FAST).start()
    try:
        wait_for("waiting line", lambda: lines(d, "waiting for the store at " + re.escape(etcd.endpoint)),
                 nodes=[d])
        assert d.metric("weft_store_up") == 0
        etcd.start()
        put_config(args)
        wait_for("ready", d.ready, nodes=[d])
        assert d.metric("weft_store_up") == 1
        assert len(lines(d, "waiting for the store at")) == 1
    finally:
        d.stop()
        etcd.stop()


# -- a node paused past its lease TTL ------------------------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=needs_etcd)])
def store_args(request, tmp_path):
    prefix = f"/weft-faults/{uuid.uuid4().hex[:8]}"
    if request.param == "sqlite":
        args = ["--store", f"sqlite://{tmp_path}/weft.db", "-etcd-prefix", prefix]
    else:
        args = ["-etcd-endpoints", request.getfixturevalue("etcd_plain").endpoint, "-etcd-prefix", prefix]
    put_config(args)
    return args


def test_paused_past_the_lease_ttl_takes_its_lease_again(store_args, tmp_path):
    """Fault 4: the others remove it; on resume it takes the same subnet again without exiting."""
    a = Weftd(str(tmp_path), 1, store_args, extra=["--lease-ttl", "3"]).start()
    b = Weftd(str(tmp_path), 2, store_args, extra=["--lease-ttl", "3"]).start()
    try:
        a.wait_ready()
        b.wait_ready()
        subnet = a.subnet()
        wait_for("peers", lambda: a.metric("weft_peers") == 1 and b.metric("weft_peers") == 1, nodes=[a, b])
        a.signal(signal.SIGSTOP)
        wait_for("b removed a", lambda: b.metric("weft_peers") == 0, nodes=[b])
        time.sleep(0.5)
        a.signal(signal.SIGCONT)
        resumed = time.monotonic()
        wait_for("b follows a again", lambda: b.metric("weft_peers") == 1, nodes=[a, b])
        assert time.monotonic() - resumed < 2.0
        wait_for("a counted it", lambda: a.metric("weft_lease_reacquired_total") == 1, nodes=[a])
        alive(a, b)
        assert a.subnet() == subnet
        assert a.metric("weft_peers") == 1 and a.ready()
        assert len(lines(a, r"WARNING .*lease .* expired .*took it again")) == 1, a.log()
        assert not lines(a, "revoked")
        time.sleep(4)  # renewals go on as before
        alive(a)
        assert a.metric("weft_lease_reacquired_total") == 1
        assert a.metric("weft_lease_expiration_timestamp_seconds") > time.time()
    finally:
        a.signal(signal.SIGCONT)
        a.stop()
        b.stop()


def test_paused_past_ttl_with_its_subnet_taken_exits_with_one_line(tmp_path):
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    put_config(args)
    a = Weftd(str(tmp_path), 1, args, extra=["--lease-ttl", "3"]).start()
    try:
        a.wait_ready()
        subnet = a.subnet().replace(".1/", ".0/")
        a.signal(signal.SIGSTOP)
        time.sleep(3.5)
        r = run_tool("controlplane.ctl", *args, "reserve", subnet, "--public-ip", "198.18.0.9")
        assert r.returncode == 0, r.stderr
        a.signal(signal.SIGCONT)
        assert a.wait(15) == 1
        errors = [l for l in a.log().splitlines() if " ERROR " in l]
        assert len(errors) == 1 and f"lease {subnet} expired" in errors[0] \
            and "198.18.0.9" in errors[0] and "restart" in errors[0], a.log()
    finally:
        a.signal(signal.SIGCONT)
        a.stop()


# -- SQLite faults ---------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs of the test's own, unmounted afterwards."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "weft-test-faults", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])


def sqlite_nodes(tmp_path, db: str, n: int = 2):
    args = ["--store", f"sqlite://{db}"]
    put_config(args)
    nodes = [Weftd(str(tmp_path), k, args, extra=FAST).start() for k in range(1, n + 1)]
    for d in nodes:
        d.wait_ready()
    wait_for("peers", lambda: all(d.metric("weft_peers") == n - 1 for d in nodes), nodes=nodes)
    return args, nodes


def outage_then_recovery(tmp_path, args, nodes, heal, reason: str):
    """Common checks: down, one line with ``reason``, ready, alive; healed: back, and a newcomer
    is followed by every node (the watch survived)."""
    wait_for("store down", lambda: all(d.metric("weft_store_up") == 0 for d in nodes), nodes=nodes)
    time.sleep(2)  # several failed refreshes: still one line each
    alive(*nodes)
    for d in nodes:
        assert len(lines(d, r"WARNING .*store .* is unavailable")) == 1, d.log()
        assert lines(d, reason), d.log()
        assert d.get("/readyz")[0] == 200 and d.get("/healthz")[0] == 200
        assert sum(v for v in d.labelled("weft_store_errors_total", "op").values()) > 0
    heal()
    wait_for("store back", lambda: all(d.metric("weft_store_up") == 1 for d in nodes),
             timeout=15, nodes=nodes)
    newcomer = Weftd(str(tmp_path), 9, args, extra=FAST).start()
    try:
        newcomer.wait_ready()
        n = len(nodes)
        wait_for("newcomer followed", lambda: all(d.metric("weft_peers") == n for d in nodes), nodes=nodes)
        for d in nodes:
            assert len(lines(d, r"INFO .*store .* is back after")) == 1, d.log()
    finally:
        newcomer.stop()


@needs_root
def test_sqlite_file_turned_read_only(small_fs, tmp_path):
    """The file made immutable (root ignores a mode of 0444; so does SQLite, for root): every
    connection opened since could only read it, and weftd stops writing it too."""
    db = f"{small_fs}/weft.db"
    args, nodes = sqlite_nodes(tmp_path, db)
    try:
        subprocess.run(["chattr", "+i", db], check=True)
        outage_then_recovery(tmp_path, args, nodes,
                             lambda: subprocess.run(["chattr", "-i", db], check=True),
                             r"attempt to write a readonly database")
    finally:
        subprocess.run(["chattr", "-i", db])
        for d in nodes:
            d.stop()


@needs_root
def test_store_away_past_the_lease_ttl(small_fs, tmp_path):
    """/readyz turns 503 once the lease expired unrenewed (the store read-only longer than the
    TTL); once the store is writable again the lease is taken again and /readyz is 200."""
    db = f"{small_fs}/weft.db"
    args = ["--store", f"sqlite://{db}"]
    put_config(args)
    d = Weftd(str(tmp_path), 1, args, extra=FAST + ["--lease-ttl", "3"]).start()
    try:
        d.wait_ready()
        subnet = d.subnet()
        subprocess.run(["chattr", "+i", db], check=True)
        wait_for("lease expired", lambda: d.get("/readyz")[0] == 503, nodes=[d])
        status, body = d.get("/readyz")
        assert "expired" in body, body
        assert d.metric("weft_store_up") == 0 and d.get("/healthz")[0] == 200
        subprocess.run(["chattr", "-i", db], check=True)
        wait_for("ready again", d.ready, nodes=[d])
        assert d.metric("weft_lease_reacquired_total") == 1
        assert d.subnet() == subnet
        alive(d)
    finally:
        subprocess.run(["chattr", "-i", db])
        d.stop()


@needs_root
def test_sqlite_disk_full(small_fs, tmp_path):
    args, nodes = sqlite_nodes(tmp_path, f"{small_fs}/weft.db")
    filler = small_fs / "filler"
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        outage_then_recovery(tmp_path, args, nodes, filler.unlink, r"full")
    finally:
        for d in nodes:
            d.stop()


def test_sqlite_file_corrupted(tmp_path):
    """The header overwritten under running daemons: one line naming the file and what to do, no
    exit; the file restored from a backup (as an operator would: the file replaced, its -wal and
    -shm removed), every daemon reopens it and carries on."""
    db = f"{tmp_path}/weft.db"
    args, nodes = sqlite_nodes(tmp_path, db)
    backup = f"{tmp_path}/backup.db"
    try:
        conn = sqlite3.connect(db, timeout=15)
        with sqlite3.connect(backup) as dst:
            conn.backup(dst)
        for _ in range(5):  # changes the backup lacks: the restored file's revision is lower
            put_config(args)
        # Page 1 copied back from the WAL into the file first: while the WAL holds it, SQLite reads
        # it from there, and its next checkpoint would write it over the garbage.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        _write_at(db, 0, b"this is no database, " * 5)

        def restore():
            for suffix in ("-wal", "-shm"):
                if os.path.exists(db + suffix):
                    os.unlink(db + suffix)
            os.replace(backup, db)
        outage_then_recovery(tmp_path, args, nodes, restore,
                             re.escape(f"store file {db} is not a weft SQLite database (corrupt?):"
                                       " move it aside and restart weftd"))
    finally:
        for d in nodes:
            d.stop()


def _write_at(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_sqlite_store_that_is_no_database_at_start_is_one_line(tmp_path):
    db = tmp_path / "weft.db"
    db.write_bytes(b"this is no database, " * 500)
    r = run_tool("controlplane.daemon", "--store", f"sqlite://{db}", "-iface", "lo",
                 "-subnet-file", f"{tmp_path}/e", timeout=20)
    assert r.returncode == 1
    out = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(out) == 1 and f"store file {db} is not a weft SQLite database (corrupt?)" in out[0], r.stderr


# -- the network config changed under running daemons -----------------------------------------------
@pytest.mark.parametrize("new", [
    '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}',
    '{"Network":"10.5.0.0/16","SubnetLen":26,"Backend":{"Type":"alloc"}}',
])
def test_backend_type_or_subnet_len_changed_takes_a_restart(tmp_path, new):
    """Fault 7: kept running on the config it started with (flanneld needs a restart too); the
    restart applies the new one."""
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    put_config(args)
    d = Weftd(str(tmp_path), 1, args, extra=FAST).start()
    peer = Weftd(str(tmp_path), 2, args, extra=FAST).start()
    try:
        d.wait_ready()
        peer.wait_ready()
        subnet = d.subnet()
        put_config(args, new)
        wait_for("change counted", lambda: d.metric("weft_config_changes_total") == 1, nodes=[d])
        assert d.metric("weft_config_stale") == 1
        assert len(lines(d, "restart weftd to apply it")) == 1
        time.sleep(1)
        alive(d, peer)
        assert d.subnet() == subnet and d.ready() and d.metric("weft_peers") == 1
        from controlplane.store.sqlite import SQLiteStore
        with SQLiteStore(f"{tmp_path}/weft.db") as store:
            records, _ = store.list_leases()
        assert sorted(str(r.subnet.prefixlen) + json.loads(r.value)["BackendType"] for r in records) \
            == ["24alloc", "24alloc"]  # nothing rewritten under the running daemons
        if "SubnetLen" in new:
            d.stop()
            d.start()
            d.wait_ready()
            assert d.subnet().endswith("/26"), d.subnet()
            assert d.metric("weft_config_stale") == 0
    finally:
        d.stop()
        peer.stop()


# -- the pieces, without daemons ---------------------------------------------------------------------
def test_sqlite_store_reopens_a_replaced_file_and_names_a_corrupt_one(tmp_path):
    from controlplane.store import StoreCorrupt
    from controlplane.store.sqlite import SQLiteStore
    db = str(tmp_path / "weft.db")
    with SQLiteStore(db) as store, SQLiteStore(str(tmp_path / "copy.db")) as other:
        store.put_config("first")
        other.put_config("restored")
        other.close()
        for suffix in ("-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.unlink(db + suffix)
        os.replace(str(tmp_path / "copy.db"), db)
        assert store.get_config() == "restored"  # the open connection was to the old file
    _write_at(db, 0, b"this is no database, " * 5)
    with pytest.raises(StoreCorrupt, match=re.escape(f"store file {db} is not a weft SQLite"
                                                     " database (corrupt?): move it aside")):
        SQLiteStore(db)


def test_store_health_logs_each_outage_once(caplog, monkeypatch):
    import controlplane.store.monitor as monitor
    from controlplane.store import LeaseNotFound, StoreUnavailable
    monkeypatch.setattr(monitor, "BACK_AFTER", 0.0)
    caplog.set_level("INFO", logger="weft.store")
    h = monitor.StoreHealth("etcd://x")
    h.answered("get_config")
    assert h.up is True
    h.failed("update_lease", LeaseNotFound("gone"))  # an answer, not an outage
    assert h.up is True and not h.errors
    for _ in range(3):
        h.failed("refresh_claim", StoreUnavailable("disk full"))
    assert h.up is False and h.errors == {"refresh_claim": 3} and h.down_since > 0
    h.answered("get_config")  # reads work on a full disk: not back until a write is
    assert h.up is False
    h.answered("refresh_claim")
    assert h.up is True and h.down_since is None and h.outages == 1
    text = [r.getMessage() for r in caplog.records if r.name == "weft.store"]
    assert len(text) == 2 and "is unavailable: disk full" in text[0] and "is back after" in text[1], text


def test_an_endpoint_answering_for_a_failed_one_ends_the_outage_at_once(caplog):
    """A failover that answered (another etcd member) is the store answering: no 2-s hold."""
    import controlplane.store.monitor as monitor
    from controlplane.store import StoreUnavailable
    caplog.set_level("INFO", logger="weft.store")
    h = monitor.StoreHealth("etcd://a,b")
    h.failed_over("http://b:2379")  # a start that never got an answer: still waiting
    assert h.up is None
    h.answered("open")
    h.failed_over("http://b:2379")  # up already: nothing to say
    h.failed("update_lease", StoreUnavailable("etcd http://a:2379: no answer within 10s"))
    h.answered("get_config")  # the same store answering once: not back yet (BACK_AFTER)
    assert h.up is False
    h.failed_over("http://b:2379")
    assert h.up is True and h.down_since is None and h.outages == 1
    h.answered("get_config")
    text = [r.getMessage() for r in caplog.records if r.name == "weft.store"]
    assert len(text) == 2 and "is unavailable" in text[0], text
    assert "is back after 0 s (http://b:2379 answers)" in text[1], text
