"""Real etcd 3.4 servers for the etcd store tests (session-scoped: one start each per run).

- ``etcd_plain``: plaintext on 127.0.0.1.
- ``etcd_tls``: TLS with client-cert-auth (mTLS), certificates from ``bench.pki``.
- ``etcd_auth``: plaintext with auth on (user root, ``AUTH_PASSWORD``), simple tokens expiring
  after 2 s idle, so the store's re-authentication runs during the contract suite too.

Import the fixtures into a test module (``from .etcd_fixtures import *``).
"""
from __future__ import annotations

import shutil

import pytest

from bench.etcdserver import EtcdServer
from bench.pki import make_pki
from controlplane.store import EtcdOptions

HAVE_ETCD = shutil.which("etcd") is not None and shutil.which("etcdctl") is not None
needs_etcd = pytest.mark.skipif(not HAVE_ETCD,
                                reason="needs etcd and etcdctl (Debian etcd-server, etcd-client)")
AUTH_PASSWORD = "weft-test-password"
AUTH_TOKEN_TTL = 2


@pytest.fixture(scope="session")
def etcd_pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("etcd-pki")), ["127.0.0.1", "localhost"])


@pytest.fixture(scope="session")
def etcd_plain():
    with EtcdServer(name="weft-test-plain", die_with_parent=True) as server:
        yield server


@pytest.fixture(scope="session")
def etcd_tls(etcd_pki):
    with EtcdServer(tls=True, pki=etcd_pki, name="weft-test-tls", die_with_parent=True) as server:
        yield server


@pytest.fixture(scope="session")
def etcd_auth():
    with EtcdServer(name="weft-test-auth", auth_password=AUTH_PASSWORD, die_with_parent=True,
                    extra_args=["--auth-token-ttl", str(AUTH_TOKEN_TTL)]) as server:
        yield server


def plain_options(server: EtcdServer) -> EtcdOptions:
    return EtcdOptions([server.endpoint])


def tls_options(server: EtcdServer) -> EtcdOptions:
    return EtcdOptions([server.endpoint], cafile=server.pki["ca"], certfile=server.pki["client"],
                       keyfile=server.pki["client_key"])


def auth_options(server: EtcdServer) -> EtcdOptions:
    return EtcdOptions([server.endpoint], username="root", password=AUTH_PASSWORD)


def compact_now(server: EtcdServer, store) -> int:
    """Compact the server's history at its current revision (as an operator would)."""
    _, rev = store.list_leases()
    server.etcdctl("compact", str(rev), "--physical")
    return rev


__all__ = ["etcd_pki", "etcd_plain", "etcd_tls", "etcd_auth", "needs_etcd", "plain_options",
           "tls_options", "auth_options", "compact_now", "AUTH_PASSWORD", "HAVE_ETCD"]
