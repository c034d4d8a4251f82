"""The store contract on real etcd 3.4 (plain, mTLS, user/password), plus interop with etcdctl:
what flanneld and an operator's ``etcdctl`` write, weft reads, and the other way round."""
from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from bench.etcdserver import EtcdServer
from bench.pki import make_pki
from controlplane.store import (EtcdOptions, LeaseExists, StoreError, StoreUnavailable, WatchCompacted,
                               open_store)
from controlplane.store import etcd_rpc
from controlplane.store.etcd import EtcdStore

from .etcd_fixtures import (auth_options, compact_now, etcd_auth,  # noqa: F401
                            etcd_pki, etcd_plain, etcd_tls, needs_etcd, plain_options, tls_options)
from .daemons import REPO
from .store_contract import StoreContract, drain

pytestmark = [needs_etcd, pytest.mark.skipif(etcd_rpc.unavailable_reason() is not None,
                                              reason=str(etcd_rpc.unavailable_reason()))]

NET = ipaddress.IPv4Network
VXLAN_VALUE = ('{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan",'
               '"BackendData":{"VNI":1,"VtepMAC":"5e:bb:b4:14:2b:45"}}')


def _clean(server: EtcdServer) -> None:
    server.etcdctl("del", "--prefix", "/weft-test/")


def etcdctl_write(server: EtcdServer, store, key: str, value: str | None) -> None:
    """``etcdctl put`` (or ``del`` for None), as an operator would write the key."""
    if value is None:
        server.etcdctl("del", f"{store.prefix}/{key}")
    else:
        server.etcdctl("put", f"{store.prefix}/{key}", "--", value)


class TestEtcdPlain(StoreContract):
    @pytest.fixture
    def make_store(self, etcd_plain):
        _clean(etcd_plain)
        return lambda prefix: EtcdStore(plain_options(etcd_plain), prefix=prefix)

    @pytest.fixture
    def compact_store(self, etcd_plain):
        return lambda store: compact_now(etcd_plain, store)

    @pytest.fixture
    def write_raw(self, etcd_plain):
        return lambda store, key, value: etcdctl_write(etcd_plain, store, key, value)


class TestEtcdMutualTLS(StoreContract):
    @pytest.fixture
    def make_store(self, etcd_tls):
        _clean(etcd_tls)
        return lambda prefix: EtcdStore(tls_options(etcd_tls), prefix=prefix)

    @pytest.fixture
    def compact_store(self, etcd_tls):
        return lambda store: compact_now(etcd_tls, store)

    @pytest.fixture
    def write_raw(self, etcd_tls):
        return lambda store, key, value: etcdctl_write(etcd_tls, store, key, value)


class TestEtcdPasswordAuth(StoreContract):
    @pytest.fixture
    def make_store(self, etcd_auth):
        _clean(etcd_auth)
        return lambda prefix: EtcdStore(auth_options(etcd_auth), prefix=prefix)

    @pytest.fixture
    def compact_store(self, etcd_auth):
        return lambda store: compact_now(etcd_auth, store)

    @pytest.fixture
    def write_raw(self, etcd_auth):
        return lambda store, key, value: etcdctl_write(etcd_auth, store, key, value)


# -- interop with etcdctl (flanneld's layout) ---------------------------------------------------
PREFIX = "/weft-interop"


@pytest.fixture
def plain_store(etcd_plain):
    etcd_plain.etcdctl("del", "--prefix", PREFIX + "/")
    store = EtcdStore(plain_options(etcd_plain), prefix=PREFIX)
    yield store
    store.close()


def _lease_hex(server: EtcdServer, key: str) -> str:
    doc = json.loads(server.etcdctl("get", key, "-w", "json"))
    return format(int(doc["kvs"][0]["lease"]), "x")


def test_value_and_ttl_read_back_by_etcdctl(etcd_plain, plain_store):
    rec = plain_store.create_lease(NET("10.5.1.0/24"), VXLAN_VALUE, ttl=86400)
    key = f"{PREFIX}/subnets/10.5.1.0-24"
    out = etcd_plain.etcdctl("get", key, "--print-value-only")
    assert out == VXLAN_VALUE + "\n"  # byte-identical
    ttl = etcd_plain.etcdctl("lease", "timetolive", _lease_hex(etcd_plain, key))
    assert "TTL(86400s)" in ttl
    assert rec.expiration == pytest.approx(time.time() + 86400, abs=5)
    # A renewal re-puts with a fresh lease (as flanneld does) and revokes the old one.
    old = _lease_hex(etcd_plain, key)
    plain_store.update_lease(NET("10.5.1.0/24"), VXLAN_VALUE, ttl=3600)
    new = _lease_hex(etcd_plain, key)
    assert new != old
    assert "TTL(3600s)" in etcd_plain.etcdctl("lease", "timetolive", new)
    assert "not granted" in etcd_plain.etcdctl("lease", "timetolive", old) or \
        "expired" in etcd_plain.etcdctl("lease", "timetolive", old)
    # The config key is flanneld's too.
    plain_store.put_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
    assert etcd_plain.etcdctl("get", f"{PREFIX}/config", "--print-value-only") == \
        '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}\n'


def test_etcdctl_written_leases_and_reservations(etcd_plain, plain_store):
    out = etcd_plain.etcdctl("lease", "grant", "86400")
    lease_id = re.search(r"lease ([0-9a-f]+) granted", out).group(1)
    etcd_plain.etcdctl("put", f"--lease={lease_id}", f"{PREFIX}/subnets/10.5.2.0-24", VXLAN_VALUE)
    etcd_plain.etcdctl("put", f"{PREFIX}/subnets/10.5.3.0-24", '{"PublicIP":"198.18.0.3","PublicIPv6":null}')
    etcd_plain.etcdctl("put", f"{PREFIX}/subnets/not-a-subnet", "x")  # skipped
    etcd_plain.etcdctl("put", f"{PREFIX}/subnets/10.5.4.0-24/extra", "x")  # not a lease key
    etcd_plain.etcdctl("put", f"{PREFIX}/config", '{"Network":"10.5.0.0/16"}')
    records, rev = plain_store.list_leases()
    by_subnet = {r.subnet: r for r in records}
    assert set(by_subnet) == {NET("10.5.2.0/24"), NET("10.5.3.0/24")}
    leased = by_subnet[NET("10.5.2.0/24")]
    assert leased.value == VXLAN_VALUE
    assert leased.expiration == pytest.approx(time.time() + 86400, abs=5)
    assert by_subnet[NET("10.5.3.0/24")].expiration is None  # a reservation
    assert rev >= max(r.revision for r in records)
    assert plain_store.get_lease(NET("10.5.3.0/24")).expiration is None
    assert plain_store.get_config() == '{"Network":"10.5.0.0/16"}'
    # weft's create-if-absent respects the reservation; update keeps it a reservation.
    with pytest.raises(LeaseExists):
        plain_store.create_lease(NET("10.5.3.0/24"), VXLAN_VALUE, ttl=60)
    # A watch sees etcdctl's writes, with the lease's TTL.
    watch = plain_store.watch(rev)
    try:
        etcd_plain.etcdctl("put", f"--lease={lease_id}", f"{PREFIX}/subnets/10.5.5.0-24", VXLAN_VALUE)
        etcd_plain.etcdctl("del", f"{PREFIX}/subnets/10.5.3.0-24")
        events = drain(watch, 2)
    finally:
        watch.close()
    assert [(e.kind, e.subnet) for e in events] == [("put", NET("10.5.5.0/24")),
                                                    ("delete", NET("10.5.3.0/24"))]
    assert events[0].record.expiration == pytest.approx(time.time() + 86400, abs=5)
    assert events[1].expired is False


def test_revoking_the_lease_deletes_the_key(etcd_plain, plain_store):
    """flanneld's lease going away (expiry or `etcdctl lease revoke`) is a delete event."""
    rec = plain_store.create_lease(NET("10.5.6.0/24"), VXLAN_VALUE, ttl=600)
    watch = plain_store.watch(rec.revision)
    try:
        key = f"{PREFIX}/subnets/10.5.6.0-24"
        etcd_plain.etcdctl("lease", "revoke", _lease_hex(etcd_plain, key))
        events = drain(watch, 1)
    finally:
        watch.close()
    assert [(e.kind, e.subnet) for e in events] == [("delete", NET("10.5.6.0/24"))]
    assert plain_store.get_lease(NET("10.5.6.0/24")) is None


def test_open_store_etcd_url(etcd_plain):
    store = open_store(f"etcd://127.0.0.1:{etcd_plain.client_port}", prefix=PREFIX)
    try:
        assert isinstance(store, EtcdStore)
        store.list_leases()
    finally:
        store.close()


def test_stats_count_operations(plain_store):
    plain_store.get_config()
    plain_store.create_lease(NET("10.5.7.0/24"), VXLAN_VALUE, ttl=60)
    plain_store.list_leases()
    stats = plain_store.stats()
    assert stats["get_config"] == 1 and stats["create"] == 1 and stats["list"] == 1
    assert stats["ttl"] >= 1


# -- errors: one line, quick ---------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.mark.parametrize("flag,field", [("-etcd-cafile", "cafile"), ("-etcd-certfile", "certfile"),
                                         ("-etcd-keyfile", "keyfile")])
def test_missing_cert_file_names_the_flag(etcd_tls, tmp_path, flag, field):
    opts = tls_options(etcd_tls)
    setattr(opts, field, str(tmp_path / "nope.pem"))
    with pytest.raises(StoreError) as exc:
        EtcdStore(opts)
    assert flag in _one_line(exc.value) and "nope.pem" in str(exc.value)


def test_not_a_pem_file(etcd_tls, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    opts = tls_options(etcd_tls)
    opts.cafile = str(bad)
    with pytest.raises(StoreError, match="-etcd-cafile .*not a PEM file"):
        EtcdStore(opts)


def test_tls_trust_and_client_cert_errors(etcd_tls, tmp_path):
    other = make_pki(str(tmp_path / "other"), [])
    wrong_ca = tls_options(etcd_tls)
    wrong_ca.cafile = other["ca"]
    start = time.monotonic()
    with pytest.raises(StoreError) as exc:
        EtcdStore(wrong_ca, connect_timeout=3)
    assert etcd_tls.endpoint in _one_line(exc.value)
    no_client_cert = EtcdOptions([etcd_tls.endpoint], cafile=etcd_tls.pki["ca"])
    with pytest.raises(StoreError) as exc:
        EtcdStore(no_client_cert, connect_timeout=3)
    assert etcd_tls.endpoint in _one_line(exc.value)
    assert time.monotonic() - start < 8
    assert "TLS: check -etcd-cafile" in str(exc.value)


def test_key_not_matching_cert(etcd_tls, tmp_path):
    other = make_pki(str(tmp_path / "other"), [])
    opts = tls_options(etcd_tls)
    opts.keyfile = other["client_key"]
    with pytest.raises(StoreError, match="-etcd-keyfile .* is not the key of -etcd-certfile"):
        EtcdStore(opts)
    with pytest.raises(StoreError, match="-etcd-certfile and -etcd-keyfile"):
        EtcdStore(EtcdOptions([etcd_tls.endpoint], cafile=etcd_tls.pki["ca"],
                              certfile=etcd_tls.pki["client"]))


def test_wrong_password_is_a_store_error(etcd_auth):
    opts = auth_options(etcd_auth)
    opts.password = "wrong"
    with pytest.raises(StoreError) as exc:
        EtcdStore(opts)
    assert not isinstance(exc.value, StoreUnavailable)
    assert "authentication failed" in _one_line(exc.value)
    with pytest.raises(StoreError, match="-etcd-username and -etcd-password"):
        EtcdStore(EtcdOptions([etcd_auth.endpoint], username="root"))


def test_expired_auth_token_is_renewed(etcd_auth):
    store = EtcdStore(auth_options(etcd_auth), prefix=PREFIX)
    try:
        store.put_config("{}")
        time.sleep(3.5)  # the server forgets a token idle for --auth-token-ttl (2 s, checked each 1 s)
        assert store.get_config() == "{}"
        assert store.stats()["auth"] >= 2
        _, rev = store.list_leases()
        time.sleep(3.5)  # a watch created with a stale token would be cancelled by etcd
        watch = store.watch(rev)
        try:
            store.create_lease(NET("10.5.9.0/24"), VXLAN_VALUE, ttl=60)
            assert [e.kind for e in drain(watch, 1)] == ["put"]
        finally:
            watch.close()
        assert store.stats()["auth"] >= 3
    finally:
        store.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_unavailable_quickly():
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as exc:
        EtcdStore(EtcdOptions([f"http://127.0.0.1:{port}"]))
    assert f"127.0.0.1:{port}" in _one_line(exc.value)
    assert time.monotonic() - start < 5


def test_silent_endpoint_times_out():
    """A peer that accepts TCP but never speaks: bounded by the connect timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as exc:
            EtcdStore(EtcdOptions([f"http://127.0.0.1:{port}"]), connect_timeout=1)
        assert "no answer within 1s" in _one_line(exc.value)
        assert time.monotonic() - start < 4


def test_endpoints_fail_over_in_order(etcd_plain):
    dead = f"http://127.0.0.1:{_closed_port()}"
    store = EtcdStore(EtcdOptions([dead, etcd_plain.endpoint]), prefix=PREFIX)
    try:
        store.get_config()
        assert store.stats()["connect"] == 2
    finally:
        store.close()
    with pytest.raises(StoreError, match="not an http"):
        EtcdStore(EtcdOptions(["unix:///run/etcd.sock"]))


def test_lost_server_ends_the_watch_and_fails_over(etcd_plain):
    """The server under a watch dies. With another endpoint the watch goes on there (here another
    server, to see where it went; tests/test_etcd_failover.py runs a real cluster); with none,
    get() raises StoreUnavailable naming the endpoint."""
    with EtcdServer(name="weft-test-lost", die_with_parent=True) as server:
        store = EtcdStore(EtcdOptions([server.endpoint, etcd_plain.endpoint]), prefix=PREFIX,
                          connect_timeout=2, op_timeout=3)
        try:
            _, rev = store.list_leases()
            watch = store.watch(rev)
            store.create_lease(NET("10.5.8.0/24"), VXLAN_VALUE, ttl=60)
            assert [e.kind for e in drain(watch, 1)] == ["put"]
            server.stop()
            deadline = time.monotonic() + 5
            try:  # StoreUnavailable here: the watch failed instead of failing over
                while not store.stats().get("failover") and time.monotonic() < deadline:
                    watch.get(timeout=0.2)
            except WatchCompacted:
                pass  # etcd_plain is another server, whose history other tests compacted
            assert store.stats().get("failover") == 1
            assert watch.endpoint == etcd_plain.endpoint
            watch.close()
            assert store.get_lease(NET("10.5.8.0/24")) is None  # answered by etcd_plain
            assert store.stats()["connect"] == 2
        finally:
            store.close()
    with EtcdServer(name="weft-test-lost2", die_with_parent=True) as server:
        store = EtcdStore(EtcdOptions([server.endpoint]), connect_timeout=2, op_timeout=3)
        try:
            watch = store.watch(store.list_leases()[1])
            server.stop()
            start = time.monotonic()
            with pytest.raises(StoreUnavailable) as exc:
                while time.monotonic() - start < 10:
                    watch.get(timeout=0.5)
            assert server.endpoint in _one_line(exc.value)
            watch.close()
            with pytest.raises(StoreUnavailable) as exc:
                store.get_config()
            assert server.endpoint in _one_line(exc.value)
            assert "failover" not in store.stats()
        finally:
            store.close()


def test_close_stops_watch_threads(plain_store):
    _, rev = plain_store.list_leases()
    before = threading.active_count()
    watches = [plain_store.watch(rev) for _ in range(3)]
    plain_store.close()
    for w in watches:
        assert w.get(timeout=0.1) == []
    deadline = time.monotonic() + 3
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


def test_client_that_does_not_import_is_one_line(monkeypatch):
    monkeypatch.setattr(etcd_rpc, "Client", None)  # not loaded yet
    monkeypatch.setitem(sys.modules, "etcd3", None)  # and not installed
    with pytest.raises(StoreError) as exc:
        EtcdStore(EtcdOptions(["http://127.0.0.1:2379"]))
    assert str(exc.value) == ("etcd store needs the etcd3 client (etcd3 is not installed:"
                              " pip install etcd3 'protobuf==3.20.3')")
    # protobuf 4+ makes etcd3's generated modules raise this TypeError on import
    assert str(etcd_rpc.import_error(TypeError("Descriptors cannot be created directly."))) == (
        "etcd store needs the etcd3 client with protobuf<4 (pip install 'protobuf==3.20.3')")


GRPC_QUIET = """
import os, sys
import controlplane.store.etcd  # importing the store changes nothing in the environment
assert os.environ.get("GRPC_VERBOSITY") == (None if sys.argv[1] == "-" else sys.argv[1])
from controlplane.store import EtcdOptions, StoreError
from controlplane.store.etcd import EtcdStore
try:
    EtcdStore(EtcdOptions([sys.argv[2]], cafile=sys.argv[3]), connect_timeout=2)
except StoreError as exc:
    print(exc)
"""


def test_grpc_prints_nothing_of_its_own(etcd_tls, tmp_path):
    """A TLS failure is the store's one line; gRPC's C core writes nothing to stderr (weftd's log)
    unless the user asks for it with GRPC_VERBOSITY."""
    broken_ca = tmp_path / "ca.pem"  # PEM armour around garbage: gRPC cannot load it
    broken_ca.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")

    def run(verbosity):
        env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
        if verbosity != "-":
            env["GRPC_VERBOSITY"] = verbosity
        argv = [sys.executable, "-c", GRPC_QUIET, verbosity, etcd_tls.endpoint, str(broken_ca)]
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=30)
    quiet = run("-")
    assert etcd_tls.endpoint in quiet.stdout, quiet
    assert quiet.stderr == ""
    loud = run("ERROR")  # the user's setting wins
    assert etcd_tls.endpoint in loud.stdout
    assert "root certificate" in loud.stderr, loud.stderr
