"""Input from others: leases and configs someone else wrote into the store, and a mistyped --store.

Every case runs a real weftd against a real store written the way an operator or another program
would: ``etcdctl put`` (v3 API) on etcd, a raw sqlite3 connection into the store's tables on
SQLite. A bad lease is logged once, counted by reason in /metrics, never programmed (not a peer,
no route), and the daemon keeps following the valid ones.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
import uuid

import pytest

from .conftest import needs_root
from .daemons import Weftd, run_tool
from .etcd_fixtures import HAVE_ETCD, etcd_plain  # noqa: F401  (fixture)

# The daemon's own lease comes from 10.244.100.0..10.244.109.0; the leases the tests write lie
# elsewhere in the Network (valid: SubnetMin/Max bound allocation only), so none is the daemon's.
OWN_RANGE = '"SubnetMin":"10.244.100.0","SubnetMax":"10.244.109.0"'
CONFIG = '{"Network":"10.244.0.0/16","SubnetLen":24,%s,"Backend":{"Type":"alloc"}}' % OWN_RANGE
MAC = "5e:bb:b4:14:2b:45"


def alloc_value(n: int) -> str:
    return json.dumps({"PublicIP": f"198.18.0.{n}", "PublicIPv6": None, "BackendType": "alloc"},
                      separators=(",", ":"))


# name under <prefix>/subnets/ -> (value, the reason it is refused)
BAD_LEASES = {
    "10.244.10.0-24": ("this is not json", "not_json"),
    "10.244.11.0-24": ("[1,2,3]", "not_json"),
    "10.244.12.0-24": ('{"PublicIP":"198.18.0.12","BackendType":5}', "bad_field"),
    "10.244.13.0-24": ('{"PublicIP":"999.1.1.1","BackendType":"alloc"}', "bad_public_ip"),
    "10.244.14.0-24": ('{"BackendType":"alloc"}', "bad_public_ip"),
    "10.244.15.0-24": ('{"PublicIP":"0.0.0.0","BackendType":"alloc"}', "bad_public_ip"),
    "10.244.16.0-24": ('{"PublicIP":"198.18.0.16","BackendType":"vxlan",'
                       '"BackendData":{"VNI":1,"VtepMAC":"ff:ff:ff:ff:ff:ff"}}', "bad_backend_data"),
    "10.244.17.0-24": ('{"PublicIP":"198.18.0.17","BackendType":"vxlan",'
                       f'"BackendData":{{"VNI":16777216,"VtepMAC":"{MAC}"}}}}', "bad_backend_data"),
    "garbage": (alloc_value(20), "bad_key"),
    "10.244.18.5-24": (alloc_value(21), "bad_key"),
    "10.244.19.0-24/extra": (alloc_value(22), "bad_key"),
    "10.99.0.0-24": (alloc_value(23), "outside_network"),
    "10.244.204.0-23": (alloc_value(24), "wrong_length"),
    # flanneld's IPv6-only lease on a network with IPv4: it has no IPv4 subnet to follow
    "0.0.0.0-0&fd10:244:0:1::-64": ('{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:198:18::1",'
                                    '"BackendType":"alloc"}', "outside_network"),
}
VALID = {"10.244.205.0-24": alloc_value(25),  # inside the refused /23 above: the /23 is the bad one
         "10.244.30.0-24": alloc_value(30)}


def expected_counts(leases: dict) -> dict[str, float]:
    counts: dict[str, float] = {}
    for _, reason in leases.values():
        counts[reason] = counts.get(reason, 0) + 1
    return counts


# -- writing the store as someone else ------------------------------------------------------------
class SQLiteWriter:
    """Writes the store's tables with its own sqlite3 connection, as another program would."""

    def __init__(self, path: str, prefix: str):
        self.path, self.prefix = path, prefix
        self.args = ["--store", f"sqlite://{path}", "-etcd-prefix", prefix]

    def _change(self, key: str, kind: str, value: str | None) -> None:
        conn = sqlite3.connect(self.path, timeout=15, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
            rev = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
            conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, NULL, 0)",
                         (rev, self.prefix, key, kind, value))
            if kind == "put":
                conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, NULL, ?)",
                             (self.prefix, key, value, rev))
            else:
                conn.execute("DELETE FROM kv WHERE prefix = ? AND key = ?", (self.prefix, key))
            conn.execute("COMMIT")
        finally:
            conn.close()

    def put_lease(self, name: str, value: str) -> None:
        self._change(f"subnets/{name}", "put", value)

    def put_config(self, text: str) -> None:
        self._change("config", "put", text)

    def delete_config(self) -> None:
        self._change("config", "delete", None)

    def get_lease(self, name: str) -> str | None:
        conn = sqlite3.connect(self.path, timeout=15)
        try:
            row = conn.execute("SELECT value FROM kv WHERE prefix = ? AND key = ?",
                               (self.prefix, f"subnets/{name}")).fetchone()
        finally:
            conn.close()
        return row[0] if row else None


class EtcdctlWriter:
    """Writes with ``etcdctl put`` (the v3 API), as an operator would."""

    def __init__(self, server, prefix: str):
        self.server, self.prefix = server, prefix
        self.args = ["-etcd-endpoints", server.endpoint, "-etcd-prefix", prefix]

    def put_lease(self, name: str, value: str) -> None:
        self.server.etcdctl("put", f"{self.prefix}/subnets/{name}", "--", value)

    def put_config(self, text: str) -> None:
        self.server.etcdctl("put", f"{self.prefix}/config", "--", text)

    def delete_config(self) -> None:
        self.server.etcdctl("del", f"{self.prefix}/config")

    def get_lease(self, name: str) -> str | None:
        out = self.server.etcdctl("get", f"{self.prefix}/subnets/{name}", "--print-value-only")
        return out.rstrip("\n") or None


@pytest.fixture(params=["sqlite", "etcd"])
def writer(request, tmp_path):
    prefix = f"/weft-hostile/{uuid.uuid4().hex[:8]}"
    if request.param == "sqlite":
        w = SQLiteWriter(str(tmp_path / "weft.db"), prefix)
    else:
        if not HAVE_ETCD:
            pytest.skip("needs etcd and etcdctl (Debian etcd-server, etcd-client)")
        w = EtcdctlWriter(request.getfixturevalue("etcd_plain"), prefix)
    r = run_tool("controlplane.ctl", *w.args, "config", "put", "-", input=CONFIG)
    assert r.returncode == 0, r.stderr
    return w


# -- reading a daemon -----------------------------------------------------------------------------
def invalid_counts(d: Weftd) -> dict[str, float]:
    return {k: v for k, v in d.labelled("weft_leases_invalid_total", "reason").items() if v}


def wait_for(what, check, timeout: float = 10.0, d: Weftd | None = None):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if d is not None and d.proc.poll() is not None:
            raise AssertionError(f"weftd exited {d.proc.returncode} waiting for {what}: {d.log()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def log_lines(d: Weftd, needle: str) -> list[str]:
    return [l for l in d.log().splitlines() if needle in l]


# -- leases ---------------------------------------------------------------------------------------
def test_invalid_leases_are_logged_counted_never_programmed(writer, tmp_path):
    d = Weftd(str(tmp_path), 1, writer.args).start()
    try:
        d.wait_ready()
        for name, (value, _) in BAD_LEASES.items():
            writer.put_lease(name, value)
        for name, value in VALID.items():
            writer.put_lease(name, value)
        want = expected_counts(BAD_LEASES)
        wait_for("every bad lease counted", lambda: invalid_counts(d) == want and
                 d.metric("weft_peers") == len(VALID), d=d)
        time.sleep(1.0)  # nothing is counted twice, nothing turns into a peer later
        assert invalid_counts(d) == want
        assert d.metric("weft_peers") == 2
        for name, (_, reason) in BAD_LEASES.items():
            lines = log_lines(d, f"subnets/{name} ")
            assert len(lines) == 1 and f"({reason})" in lines[0] and "WARNING" in lines[0], \
                (name, lines)

        # A valid peer rewritten to garbage is no longer a peer, and comes back when fixed.
        writer.put_lease("10.244.30.0-24", "{")
        wait_for("the rewritten peer dropped", lambda: d.metric("weft_peers") == 1, d=d)
        assert invalid_counts(d)["not_json"] == want["not_json"] + 1
        writer.put_lease("10.244.30.0-24", VALID["10.244.30.0-24"])
        writer.put_lease("10.244.31.0-24", alloc_value(31))  # a new valid lease is still followed
        wait_for("valid peers followed", lambda: d.metric("weft_peers") == 3, d=d)
        assert d.proc.poll() is None and d.ready()

        # A restart lists the same store: each bad lease logged and counted once again, no more.
        d.stop()
        before = len(d.log().splitlines())
        d.start()
        d.wait_ready()
        wait_for("re-listed", lambda: invalid_counts(d) == want and d.metric("weft_peers") == 3, d=d)
        new_log = "\n".join(d.log().splitlines()[before:])
        assert new_log.count("subnets/10.99.0.0-24 ") == 1
    finally:
        d.stop()


def test_own_lease_overwritten_by_someone_else(writer, tmp_path):
    """Garbage or another node's value in this node's key: logged and counted, not a revocation;
    the daemon writes its own value back within seconds (its lease is not due for 23 h)."""
    d = Weftd(str(tmp_path), 1, writer.args).start()
    try:
        d.wait_ready()
        own = d.subnet().replace(".1/", ".0-")
        writer.put_lease(own, "garbage")
        wait_for("counted", lambda: invalid_counts(d).get("not_json") == 1, d=d)
        wait_for("written back", lambda: (writer.get_lease(own) or "").startswith(
            '{"PublicIP":"198.18.0.1"'), d=d)
        writer.put_lease(own, alloc_value(66))
        wait_for("counted", lambda: invalid_counts(d).get("own_subnet") == 1, d=d)
        wait_for("written back", lambda: (writer.get_lease(own) or "").startswith(
            '{"PublicIP":"198.18.0.1"'), d=d)
        assert d.proc.poll() is None and d.ready()
        assert not log_lines(d, "revoked")
        assert len(log_lines(d, f"subnets/{own} ")) == 2
        assert d.metric("weft_peers") == 0
        assert d.metric("weft_lease_renewals_total") == 2  # the two write-backs, nothing more
    finally:
        d.stop()


# -- the config -----------------------------------------------------------------------------------
def test_config_changed_while_running(writer, tmp_path):
    d = Weftd(str(tmp_path), 1, writer.args).start()
    try:
        d.wait_ready()
        assert d.metric("weft_config_stale") == 0

        writer.put_config("this is not json")
        wait_for("invalid config counted", lambda: d.metric("weft_config_invalid_total") == 1, d=d)
        writer.put_config("this is not json")  # the same text again: nothing new to say
        writer.put_config('{"Network":"10.244.0.0/16","SubnetLen":40}')
        wait_for("second invalid config counted", lambda: d.metric("weft_config_invalid_total") == 2, d=d)
        writer.put_config('{"Network":"10.245.0.0/16","Backend":{"Type":"alloc"}}')
        wait_for("valid change counted", lambda: d.metric("weft_config_changes_total") == 3, d=d)
        assert d.metric("weft_config_stale") == 1
        assert len(log_lines(d, "not valid JSON")) == 1
        assert len(log_lines(d, "SubnetLen: 40 is too long")) == 1
        assert len(log_lines(d, "restart weftd to apply it")) == 1

        # Still working on the config it started with: a new lease of that network is followed.
        writer.put_lease("10.244.40.0-24", alloc_value(40))
        wait_for("peer followed", lambda: d.metric("weft_peers") == 1, d=d)
        writer.delete_config()
        wait_for("deletion counted", lambda: d.metric("weft_config_changes_total") == 4, d=d)
        writer.put_config(CONFIG)
        wait_for("back in step", lambda: d.metric("weft_config_stale") == 0, d=d)
        assert d.metric("weft_config_changes_total") == 4
        assert d.proc.poll() is None and d.ready()

        # A restart with a broken config stops at once, with one line.
        writer.put_config('{"Network":"10.244.0.0/16","SubnetLen":40}')
        d.stop()
        d.start()
        assert d.wait(20) == 1
        errors = [l for l in d.log().splitlines()[-20:] if " ERROR " in l]
        assert len(errors) == 1 and "SubnetLen: 40 is too long" in errors[0], errors
    finally:
        d.stop()


# -- a routing backend ----------------------------------------------------------------------------
class NetnsWeftd(Weftd):
    """weftd inside a network namespace of its own (host-gw needs a real underlay interface)."""

    def __init__(self, workdir: str, ns: str, store_args: list[str]):
        super().__init__(workdir, 1, store_args)
        self.ns = ns
        argv = self.argv[:self.argv.index("-iface")] + [
            "-iface", "eth0", "-subnet-file", self.subnet_file, "-healthz-ip", "127.0.0.1",
            "-healthz-port", str(self.port), "--teardown"]
        self.argv = ["ip", "netns", "exec", ns, *argv]

    def get(self, path: str) -> tuple[int, str]:
        from bench.netns import http_get
        got = http_get(self.ns, "127.0.0.1", self.port, path, timeout=2)
        if got is None:
            raise OSError(f"{path} not reachable in {self.ns}")
        return got[0], got[1].decode()


def routes(ns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", ns, "-4", "-j", "route", "show"], capture_output=True,
                         text=True, check=True).stdout
    return {r["dst"] for r in json.loads(out or "[]")}


@needs_root
def test_routing_backend_programs_no_route_for_an_invalid_lease(tmp_path):
    ns = f"wsi{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    w = SQLiteWriter(str(tmp_path / "weft.db"), "/weft-hostile/hostgw")
    d = None
    try:
        for cmd in (["link", "set", "lo", "up"], ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                    ["addr", "add", "198.18.77.1/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                    ["link", "set", "eth1", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        r = run_tool("controlplane.ctl", *w.args, "config", "put", "-",
                     input='{"Network":"10.244.0.0/16",%s,"Backend":{"Type":"host-gw"}}' % OWN_RANGE)
        assert r.returncode == 0, r.stderr
        d = NetnsWeftd(str(tmp_path), ns, w.args).start()
        d.wait_ready()

        def hostgw(n: int) -> str:
            return json.dumps({"PublicIP": f"198.18.77.{n}", "PublicIPv6": None, "BackendType": "host-gw"})
        w.put_lease("10.99.0.0-24", hostgw(2))  # outside the Network
        w.put_lease("10.244.204.0-23", hostgw(3))  # not a SubnetLen subnet
        w.put_lease("10.244.206.0-24", '{"PublicIP":"224.0.0.1","BackendType":"host-gw"}')
        w.put_lease("10.244.30.0-24", hostgw(30))
        wait_for("the valid route", lambda: "10.244.30.0/24" in routes(ns), d=d)
        wait_for("counted", lambda: invalid_counts(d) == {"outside_network": 1, "wrong_length": 1,
                                                          "bad_public_ip": 1}, d=d)
        assert d.metric("weft_peers") == 1
        have = routes(ns)
        assert not {"10.99.0.0/24", "10.244.204.0/23", "10.244.206.0/24"} & have, have
        # The valid peer rewritten to point outside: its route goes.
        w.put_lease("10.244.30.0-24", '{"PublicIP":"0.0.0.0","BackendType":"host-gw"}')
        wait_for("route removed", lambda: "10.244.30.0/24" not in routes(ns), d=d)
        assert d.metric("weft_peers") == 0
    finally:
        if d is not None:
            d.stop()
        subprocess.run(["ip", "netns", "del", ns], check=False)


# -- a mistyped store -----------------------------------------------------------------------------
def test_weftd_refuses_a_store_in_a_missing_directory(tmp_path):
    url = f"sqlite://{tmp_path}/no/such/dir/x.db"
    r = run_tool("controlplane.daemon", "--store", url, "-iface", "lo", "-subnet-file",
                 f"{tmp_path}/e", timeout=20)
    assert r.returncode == 1
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and f"{tmp_path}/no/such/dir" in lines[0] and "does not exist" in lines[0], \
        r.stderr
    assert not os.path.exists(tmp_path / "no")


# -- IPv6-only leases judged (controlplane.leasecheck), and on an IPv6-only network ---------------
SIX_NET = ('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/56",'
           '"Backend":{"Type":"vxlan"}}')
DUAL_NET = '{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56"}'


def six_value(n: int, **fields) -> str:
    """flanneld's IPv6-only vxlan value: PublicIP 0.0.0.0 (its empty ip.IP4), no BackendData."""
    doc = {"PublicIP": "0.0.0.0", "PublicIPv6": f"2001:db8:198:18::{n}", "BackendType": "vxlan",
           "BackendV6Data": {"VNI": 1, "VtepMAC": MAC}}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}, separators=(",", ":"))


def _judged(name: str, value: str, config_text: str | None):
    """(Lease, "") or (None, "reason: one line") for a key under subnets/ judged as weftd does."""
    from controlplane.config import parse_config
    from controlplane.lease import LeaseFormatError, parse_lease_key
    from controlplane.leasecheck import judge
    from controlplane.store import LeaseRecord
    subnet, subnet6 = parse_lease_key(name)
    try:
        return judge(LeaseRecord(subnet, value, None, 1, subnet6),
                     None if config_text is None else parse_config(config_text)), ""
    except LeaseFormatError as exc:
        return None, f"{exc.reason}: {exc}"


SIX_VALID = [  # on an IPv6-only network: followed (PublicIP is never read: any IPv4 address)
    ("0.0.0.0-0&fd10:244:0:5::-64", six_value(5)),
    ("0.0.0.0-0&fd10:244:0:6::-64", six_value(6, PublicIP="198.18.0.6")),
    ("0.0.0.0-0&fd10:244:0:7::-64", six_value(7, PublicIP="127.0.0.1", BackendData="ignored")),
    ("0.0.0.0-0&fd10:244:0:8::-64", '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:198:18::8",'
                                    '"BackendType":"host-gw"}'),
]
SIX_BAD = [  # on an IPv6-only network: (key, value, reason, words the one line holds)
    ("10.244.5.0-24&fd10:244:0:5::-64", six_value(5, PublicIP="198.18.0.5"), "outside_network",
     "10.244.5.0/24 on an IPv6-only network (EnableIPv4 false): a lease's IPv4 part must be "
     "flannel's empty 0.0.0.0-0"),
    ("10.244.5.0-24", alloc_value(5), "outside_network", "on an IPv6-only network"),
    ("0.0.0.0-0&fd99::-64", six_value(9), "outside_network", "fd99::/64 is outside IPv6Network fd10:244::/56"),
    ("0.0.0.0-0&fd10:244:0:9::-80", six_value(9), "wrong_length", "is not a /64 (IPv6SubnetLen)"),
    ("0.0.0.0-0&fd10:244:0:9::-64", six_value(9, PublicIPv6=None), "bad_public_ip",
     "an IPv6-only lease (0.0.0.0-0&...) needs a PublicIPv6"),
    ("0.0.0.0-0&fd10:244:0:9::-64", six_value(9, PublicIPv6=...), "bad_public_ip", "needs a PublicIPv6"),
    ("0.0.0.0-0&fd10:244:0:9::-64", six_value(9, PublicIPv6="fe80::9"), "bad_public_ip", "link-local"),
    ("0.0.0.0-0&fd10:244:0:9::-64", six_value(9, BackendV6Data=...), "bad_backend_data", "BackendV6Data"),
    ("0.0.0.0-0&fd10:244:0:9::-64", six_value(9, BackendV6Data={"VNI": 1}), "bad_backend_data", "BackendV6Data"),
    ("0.0.0.0-0&fd10:244:0:9::-64", six_value(9, PublicIP="banana"), "bad_public_ip", "not an IPv4 address"),
]


@pytest.mark.parametrize("name,value", SIX_VALID, ids=[v[0] + str(i) for i, v in enumerate(SIX_VALID)])
def test_ipv6_only_network_follows_flanneld_leases(name, value):
    lease, why = _judged(name, value, SIX_NET)
    assert why == "" and not lease.has_ipv4 and lease.ident == lease.subnet6
    assert str(lease.subnet6) == name.split("&")[1].replace("-", "/")
    _, why = _judged(name, value, None)  # weftctl, with no config: the same
    assert why == ""


@pytest.mark.parametrize("name,value,reason,words", SIX_BAD, ids=[f"{v[2]}-{i}" for i, v in enumerate(SIX_BAD)])
def test_ipv6_only_network_refuses_with_one_line(name, value, reason, words):
    lease, why = _judged(name, value, SIX_NET)
    assert lease is None and why.startswith(reason + ": ") and words in why and "\n" not in why


@pytest.mark.parametrize("config_text", [CONFIG, DUAL_NET])
def test_ipv6_only_lease_refused_on_a_network_with_ipv4(config_text):
    lease, why = _judged("0.0.0.0-0&fd10:244:0:5::-64", six_value(5), config_text)
    assert lease is None and why == (
        "outside_network: an IPv6-only lease (IPv4 part 0.0.0.0-0) on a network with IPv4 (Network "
        "10.244.0.0/16): it has no IPv4 subnet")


def test_overlap_between_an_ipv6_only_and_a_dual_stack_key():
    """One IPv6 subnet in two keys of two identities (0.0.0.0-0&X names X; 10.244.1.0-24&X names
    10.244.1.0/24): the lease known first keeps it, as between two dual-stack keys. Only a watcher
    without a config follows both kinds (a config admits one kind or the other)."""
    import ipaddress
    import tempfile

    from controlplane.lease import NO_IPV4
    from controlplane.manager import LeaseWatcher
    from controlplane.store.sqlite import SQLiteStore
    x = ipaddress.IPv6Network("fd10:244:0:1::/64")
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(f"{tmp}/w.db")
        try:
            store.create_lease(NO_IPV4, six_value(1), 3600, x)
            dual = json.dumps({"PublicIP": "198.18.0.2", "PublicIPv6": "2001:db8:198:18::2",
                               "BackendType": "alloc"}, separators=(",", ":"))
            store.create_lease(ipaddress.IPv4Network("10.244.1.0/24"), dual, 3600, x)
            store.create_lease(NO_IPV4, six_value(3), 3600, ipaddress.IPv6Network("fd10:244:0:3::/64"))
            events = []
            w = LeaseWatcher(store, events.append)
            w.resync()
            assert sorted(e.lease.key for e in events) == ["0.0.0.0-0&fd10:244:0:1::-64",
                                                           "0.0.0.0-0&fd10:244:0:3::-64"]
            assert w.invalid.snapshot()["overlap"] == 1
            assert set(w.shadowed) == {ipaddress.IPv4Network("10.244.1.0/24")}
            store.delete_lease(NO_IPV4, x)  # lets go of it: the dual-stack lease is followed now
            watch = store.watch(w.revision)
            try:
                for event in watch.get(5):
                    w._apply(event)
            finally:
                watch.close()
            assert [(e.kind, e.lease.key) for e in events[2:]] == [
                ("removed", "0.0.0.0-0&fd10:244:0:1::-64"), ("added", "10.244.1.0-24&fd10:244:0:1::-64")]
        finally:
            store.close()
