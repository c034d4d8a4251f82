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
from controlplane.store.etcd import EtcdStore

from .etcd_fixtures import (auth_options, compact_now, etcd_auth,  # noqa: F401
                            etcd_pki, etcd_plain, etcd_tls, needs_etcd, plain_options, tls_options)
from .daemons import REPO
from .store_contract import StoreContract, drain

pytestmark = needs_etcd

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


def test_certificate_checks_name_the_flag(tmp_path):
    """Checked before any connection (the ssl module's, since cryptography is not loaded)."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weft")])
    old = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
           .serial_number(1).not_valid_before(datetime.datetime(2020, 1, 1))
           .not_valid_after(datetime.datetime(2020, 1, 2)).sign(key, hashes.SHA256()))
    (tmp_path / "old.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    now = datetime.datetime.now(datetime.timezone.utc)
    new = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
           .serial_number(2).not_valid_before(now - datetime.timedelta(days=1))
           .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "new.pem").write_bytes(new.public_bytes(serialization.Encoding.PEM))
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    (tmp_path / "key.pem").write_bytes(key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    (tmp_path / "enc.pem").write_bytes(key.private_bytes(
        pem, pkcs8, serialization.BestAvailableEncryption(b"secret")))
    endpoint = ["https://127.0.0.1:1"]
    cases = [("old.pem", "key.pem", f"-etcd-certfile {tmp_path}/old.pem: certificate expired at"),
             ("key.pem", "key.pem", f"-etcd-certfile {tmp_path}/key.pem: not a certificate"),
             ("new.pem", "enc.pem", f"-etcd-keyfile {tmp_path}/enc.pem: not an unencrypted private key")]
    for cert, keyfile, want in cases:
        with pytest.raises(StoreError) as exc:
            EtcdStore(EtcdOptions(endpoint, certfile=str(tmp_path / cert), keyfile=str(tmp_path / keyfile)))
        assert _one_line(exc.value).startswith(want), exc.value


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


def test_http_to_a_tls_server_says_so(etcd_tls):
    with pytest.raises(StoreUnavailable) as exc:
        EtcdStore(EtcdOptions([f"http://127.0.0.1:{etcd_tls.client_port}"]), connect_timeout=3)
    assert "does the server want https?" in _one_line(exc.value)


QUIET = """
import sys
from controlplane.store import EtcdOptions, StoreError
from controlplane.store.etcd import EtcdStore
try:
    EtcdStore(EtcdOptions([sys.argv[1]], cafile=sys.argv[2]), connect_timeout=2)
except StoreError as exc:
    print(exc)
print(sorted(m for m in ("grpc", "google.protobuf", "etcd3", "cryptography") if m in sys.modules))
"""


def test_tls_errors_are_one_line_and_the_client_is_light(etcd_tls, tmp_path):
    """A CA file that is no certificate is the store's one line naming the flag; nothing else
    reaches weftd's log (stderr); and the store needs none of gRPC, protobuf, etcd3 or
    cryptography (what made weftd on etcd 17 MB heavier than on SQLite)."""
    broken_ca = tmp_path / "ca.pem"  # PEM armour around garbage
    broken_ca.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    for ca, want in ((str(broken_ca), f"-etcd-cafile {broken_ca}: no usable CA certificate"),
                     (etcd_tls.pki["ca"], "TLS: check -etcd-cafile")):  # no client certificate
        r = subprocess.run([sys.executable, "-c", QUIET, etcd_tls.endpoint, ca], capture_output=True,
                           text=True, cwd=REPO, timeout=30, env=dict(os.environ, PYTHONPATH=REPO))
        lines = r.stdout.splitlines()
        assert r.stderr == "" and len(lines) == 2, r
        assert want in lines[0], lines[0]
        assert lines[1] == "[]"


def test_watch_compaction_signal_and_revisions(etcd_plain, plain_store):
    """The watch's contract on the wire: events carry their revisions, a start revision that is
    compacted away is WatchCompacted naming the oldest revision kept."""
    first = plain_store.create_lease(NET("10.5.11.0/24"), VXLAN_VALUE, ttl=60)
    second = plain_store.update_lease(NET("10.5.11.0/24"), VXLAN_VALUE, ttl=60)
    watch = plain_store.watch(first.revision - 1)
    try:
        events = drain(watch, 2)
    finally:
        watch.close()
    assert [(e.kind, e.revision) for e in events] == [("put", first.revision), ("put", second.revision)]
    rev = compact_now(etcd_plain, plain_store)
    watch = plain_store.watch(first.revision - 1)
    try:
        with pytest.raises(WatchCompacted, match=f"oldest kept {rev}"):
            watch.get(timeout=5)
    finally:
        watch.close()
