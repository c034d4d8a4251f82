"""The etcd v3 store, in flanneld's exact layout, on the python ``etcd3`` client (0.12).

Layout (flanneld's ``pkg/subnet/etcd/registry.go``), so weftd and flanneld can share one etcd:
- config ``<prefix>/config``; leases ``<prefix>/subnets/<ip>-<len>``; values are stored as given.
- a TTL is an etcd lease granted with that TTL (whole seconds, rounded up) and attached to the key;
  a key with no lease is a reservation (``etcdctl put`` without ``--lease``).
- create = txn ``version(key) == 0`` then put; renew = txn ``version(key) > 0`` then put with a
  *new* lease, as flanneld does (no keep-alive stream); the previous lease is revoked afterwards
  when no other key uses it.
- a record's expiration is now + the remaining TTL of its lease (one ``LeaseTimeToLive`` per leased
  key, as flanneld does); its revision is the key's ``mod_revision``; ``list_leases`` returns the
  range's header revision, so list at R + watch from R loses nothing.

Notes on python-etcd3 0.12 (kragniz/python-etcd3, last release 2020):
- It needs protobuf<4 (its generated ``_pb2`` files are too old for protobuf 4+).
- Its helpers hide the response header (``get_prefix``) and swallow the watch compaction signal
  into a callback, so this store calls the gRPC stubs the client builds (``client.kvstub``,
  ``leasestub``, and ``rpc.etcdrpc.WatchStub``) with request messages from ``etcd3.etcdrpc``, passing
  the auth token the way the client does (``metadata=(("token", ...),)``).
- With user/password it also attaches the token as gRPC *call credentials*, which current grpcio
  refuses on a plaintext channel ("Established channel does not have a sufficient security level
  to transfer call credential"); the token in metadata is all etcd reads, so only that is sent.
- It authenticates once; etcd's simple tokens expire after ``--auth-token-ttl`` (300 s) idle, so
  an "invalid auth token" answer re-authenticates and retries once.
- It takes one host:port. Endpoints are tried in order at connect time; after an UNAVAILABLE
  answer (or a timeout) the connection is dropped and the next call reconnects, starting at the
  next endpoint (also escaping gRPC's reconnect backoff). The call that met the dead member is
  sent once more to the next endpoint when that is safe (reads, and writes gRPC never sent: see
  ``_do``), and a watch goes on from the next endpoint at the last revision it received, so a
  cluster with a member down keeps answering without a failure.
- Watches use the watch stub directly (``controlplane.store.etcd_watch``, which names what it uses
  of this store), one stream at a time per watch, read by a thread into a queue: a watch whose
  start revision is compacted gets a response with ``compact_revision`` set (and ``canceled``),
  which becomes ``WatchCompacted``.
- gRPC and etcd3 are imported when the first store is made (``controlplane.store.etcd_rpc``
  says why: GRPC_VERBOSITY).
"""
from __future__ import annotations

import datetime
import ipaddress
import math
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..lease import subnet_key, subnet_of_name
from . import etcd_rpc as rpc
from .base import (ClaimChanged, ClaimRecord, ForeignKey, LeaseExists, LeaseNotFound, LeaseRecord,
                   Store, StoreError, StoreEvent, StoreUnavailable, SubnetScan, Watch)
from .etcd_watch import EtcdWatch

CONNECT_TIMEOUT = 5.0  # seconds for connecting / authenticating to one endpoint
OP_TIMEOUT = 10.0  # seconds for one request
BEST_EFFORT_TIMEOUT = 2.0  # seconds for revoking a lease no key uses any more
GRPC_OPTIONS = [
    ("rpc.grpc.keepalive_time_ms", 10000),  # notice a dead etcd under an idle watch (etcd allows >=5s)
    ("rpc.grpc.keepalive_timeout_ms", 5000),
    ("rpc.grpc.http2.max_pings_without_data", 0),
    ("rpc.grpc.initial_reconnect_backoff_ms", 500),
    ("rpc.grpc.max_reconnect_backoff_ms", 2000),
]
_GONE = object()  # a lease that no longer exists (expired or revoked)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _never_sent(exc) -> bool:
    """gRPC failed the call before sending it: the channel had no connection to send it on (its
    pick failed: "failed to connect to all addresses"), so the server never saw it. Any other
    UNAVAILABLE (a stream removed, a reset, etcd's "request timed out") may come after the
    request reached the server."""
    return (exc.code() == rpc.grpc.StatusCode.UNAVAILABLE
            and "failed to connect to all addresses" in (exc.details() or ""))


def _prefix_end(key: bytes) -> bytes:
    """etcd's range end for "every key starting with ``key``"."""
    end = bytearray(key)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[:i + 1])
    return b"\0"


def _parse_endpoint(url: str) -> tuple[str, str, int]:
    """``http(s)://host:port`` (or ``host:port``) -> (scheme, host for gRPC, port)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port or 2379
    except ValueError as exc:
        raise StoreError(f"-etcd-endpoints {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StoreError(f"-etcd-endpoints {url!r}: not an http(s)://host:port URL")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return parts.scheme, host, port


def _check_file(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as exc:
        raise StoreError(f"{flag} {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise StoreError(f"{flag} {path}: not a PEM file")
    return data


def _check_pair(certfile: str, cert: bytes, keyfile: str, key: bytes) -> None:
    """A key that does not belong to the certificate, or an expired certificate, gets a clear
    message here; gRPC would only say "Failed to create security handshaker"."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        return
    try:
        crt = x509.load_pem_x509_certificate(cert)
    except ValueError as exc:
        raise StoreError(f"-etcd-certfile {certfile}: not a certificate ({_one_line(exc)})") from None
    try:
        priv = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise StoreError(f"-etcd-keyfile {keyfile}: not an unencrypted private key"
                         f" ({_one_line(exc)})") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if priv.public_key().public_bytes(enc, pub) != crt.public_key().public_bytes(enc, pub):
        raise StoreError(f"-etcd-keyfile {keyfile} is not the key of -etcd-certfile {certfile}")
    not_after = getattr(crt, "not_valid_after_utc", None)
    if not_after is None:  # cryptography < 42: a naive UTC datetime
        not_after = crt.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    if not_after.timestamp() < time.time():
        raise StoreError(f"-etcd-certfile {certfile}: certificate expired at {not_after.isoformat()}")


@dataclass
class Conn:
    endpoint: str
    client: object
    metadata: tuple
    auth: bool


class EtcdStore(Store):
    def __init__(self, opts, prefix: str = "/coreos.com/network", *,
                 connect_timeout: float = CONNECT_TIMEOUT, op_timeout: float = OP_TIMEOUT):
        rpc.load()
        self.opts = opts
        self.prefix = prefix.rstrip("/")
        self.connect_timeout = connect_timeout
        self.op_timeout = op_timeout
        self.endpoints = list(opts.endpoints)
        if not self.endpoints:
            raise StoreError("-etcd-endpoints: no endpoints given")
        self._parsed = [_parse_endpoint(e) for e in self.endpoints]
        self.url = ",".join(self.endpoints)
        if bool(opts.certfile) != bool(opts.keyfile):
            raise StoreError("-etcd-certfile and -etcd-keyfile must be given together")
        pem = {flag: _check_file(flag, path) for flag, path in
               (("-etcd-cafile", opts.cafile), ("-etcd-certfile", opts.certfile),
                ("-etcd-keyfile", opts.keyfile)) if path}
        if opts.certfile:
            _check_pair(opts.certfile, pem["-etcd-certfile"], opts.keyfile, pem["-etcd-keyfile"])
        if bool(opts.username) != bool(opts.password):
            raise StoreError("-etcd-username and -etcd-password must be given together")
        self._config_key = f"{self.prefix}/config".encode()
        self._subnets = f"{self.prefix}/subnets/".encode()
        self._lock = threading.Lock()  # guards the connection
        self._ops_lock = threading.Lock()
        self._ops: Counter[str] = Counter()
        self._conn: Conn | None = None
        self._next = 0  # index of the endpoint to try first
        self._retired: list = []  # clients of dropped connections, open while a watch holds them
        self._held: Counter[int] = Counter()  # id(client) -> watches reading from it
        self._watches: weakref.WeakSet = weakref.WeakSet()  # to close them with the store
        self._closed = False
        self._dropped: str | None = None  # the endpoint dropped last, until another answers
        self._failover_listeners: list = []
        self._connection()

    # -- connection ---------------------------------------------------------------------------
    def count(self, op: str) -> None:
        """Count an operation in ``stats()`` (``weft_store_ops_total``)."""
        with self._ops_lock:
            self._ops[op] += 1

    def _open(self, index: int) -> Conn:
        """Connect to endpoint ``index`` and check it answers; raises rpc.grpc.RpcError."""
        scheme, host, port = self._parsed[index]
        o = self.opts
        kwargs = dict(timeout=self.connect_timeout, grpc_options=GRPC_OPTIONS)
        if scheme == "https":  # like etcd's clientv3: the scheme decides whether TLS is used
            kwargs.update(ca_cert=o.cafile or "", cert_cert=o.certfile or None,
                          cert_key=o.keyfile or None)
        client = rpc.Client(host=host, port=port, **kwargs)
        try:
            conn = Conn(self.endpoints[index], client, (), bool(o.username))
            if conn.auth:  # etcd3 would also send the token as call credentials: see above
                self._reauth(conn)
            # One cheap read proves the endpoint answers (and that TLS and auth work).
            client.kvstub.Range(rpc.etcdrpc.RangeRequest(key=self._config_key, count_only=True),
                                self.connect_timeout, metadata=conn.metadata)
            return conn
        except BaseException:
            client.close()
            raise

    def _connection(self) -> Conn:
        with self._lock:
            if self._closed:
                raise StoreError(f"etcd {self.url}: store is closed")
            if self._conn is not None:
                return self._conn
            errors = []
            n = len(self.endpoints)
            for k in range(n):
                index = (self._next + k) % n
                self.count("connect")
                try:
                    self._conn = self._open(index)
                    self._next = index
                    conn, dropped, self._dropped = self._conn, self._dropped, None
                    break
                except rpc.grpc.RpcError as exc:
                    err = self._error(exc, self.endpoints[index], self.connect_timeout)
                    if not isinstance(err, StoreUnavailable):
                        raise err from None
                    errors.append(str(err))
                except (OSError, ValueError) as exc:  # e.g. a TLS file gone since the start
                    raise StoreError(f"etcd {self.endpoints[index]}: {_one_line(exc)}") from None
            else:
                if n == 1:
                    raise StoreUnavailable(errors[0])
                raise StoreUnavailable(f"no etcd endpoint answers ({'; '.join(errors)})")
        if dropped is not None and dropped != conn.endpoint:
            for listener in self._failover_listeners:
                listener(conn.endpoint)
        return conn

    def on_failover(self, listener) -> None:
        """``listener(endpoint)`` is called when ``endpoint`` answered in place of one that was
        dropped as unavailable (not when the same endpoint answers again)."""
        self._failover_listeners.append(listener)

    def _drop(self, conn: Conn) -> None:
        """After UNAVAILABLE: the next call reconnects, starting at the next endpoint. The old
        channel stays open while an open watch still uses it."""
        with self._lock:
            if self._conn is conn:
                self._conn = None
                self._retired.append(conn.client)
                self._next = (self.endpoints.index(conn.endpoint) + 1) % len(self.endpoints)
                self._dropped = conn.endpoint
        self._close_retired()

    def _close_retired(self) -> None:
        with self._lock:
            dead = [c for c in self._retired if not self._held[id(c)]]
            self._retired = [c for c in self._retired if self._held[id(c)]]
        for client in dead:
            try:
                client.close()
            except Exception:
                pass

    def _reauth(self, conn: Conn) -> None:
        self.count("auth")
        resp = rpc.etcdrpc.AuthStub(conn.client.channel).Authenticate(
            rpc.etcdrpc.AuthenticateRequest(name=self.opts.username, password=self.opts.password),
            self.connect_timeout)
        conn.metadata = (("token", resp.token),)

    @staticmethod
    def _error(exc, endpoint: str, timeout: float) -> StoreError:
        code = exc.code() if hasattr(exc, "code") else None
        details = _one_line(exc.details() if hasattr(exc, "details") else exc) or str(code)
        if code in (rpc.grpc.StatusCode.UNAVAILABLE, rpc.grpc.StatusCode.UNKNOWN):
            if endpoint.startswith("https:") and any(
                    w in details for w in ("TSI_", "andshake", "SSL", "Tls", "Ssl")):
                details += " (TLS: check -etcd-cafile, -etcd-certfile, -etcd-keyfile)"
            elif (endpoint.startswith("http:") and "Socket closed" in details
                  and "Stream removed" not in details):  # not a stream that a dead server broke
                details += " (does the server want https?)"
        if code == rpc.grpc.StatusCode.UNAVAILABLE:
            return StoreUnavailable(f"etcd {endpoint}: {details}")
        if code == rpc.grpc.StatusCode.DEADLINE_EXCEEDED:
            return StoreUnavailable(f"etcd {endpoint}: no answer within {timeout:g}s")
        if code == rpc.grpc.StatusCode.CANCELLED:
            return StoreUnavailable(f"etcd {endpoint}: request cancelled ({details})")
        name = code.name.lower() if code is not None else "error"
        return StoreError(f"etcd {endpoint}: {details} ({name})")

    @staticmethod
    def _invalid_token(exc) -> bool:
        return (exc.code() == rpc.grpc.StatusCode.UNAUTHENTICATED
                and "invalid auth token" in (exc.details() or ""))

    def _do(self, op: str, fn, timeout: float | None = None, *, read: bool = False):
        """Run ``fn(conn, timeout)``: count it, re-authenticate once on an expired token, fail
        over once to the next endpoint when that is safe, and turn gRPC errors into one-line
        StoreErrors naming the endpoint.

        Failing over: an operation that meets a dead or silent member is sent once more, to the
        next endpoint that answers, so a cluster with one member down keeps answering (and the
        store's health stays up). Only when sending it again cannot apply it twice:
        - a read (``read=True``: ranges, lease TTLs): after any unavailability, a timeout included;
        - a write only when gRPC failed it before it left this process (``_never_sent``). Writes
          are compare-and-swap transactions (lease create/renew, the claim's take and refresh,
          ``ClaimChanged``) or deletes: one that timed out (DEADLINE_EXCEEDED), or whose stream
          broke (UNAVAILABLE "Stream removed", etcd's own "request timed out"), may have been
          applied, and sent again it would fail its compare and report someone else's doing
          (a claim "taken" by ourselves, a lease "taken" that we created). Those are reported;
          the caller's next attempt goes to the next endpoint.
        """
        timeout = self.op_timeout if timeout is None else timeout
        self.count(op)
        conn = self._connection()
        reauthed = failed_over = False
        while True:
            try:
                return fn(conn, timeout)
            except rpc.grpc.RpcError as exc:
                if not reauthed and conn.auth and self._invalid_token(exc):
                    reauthed = True
                    try:
                        self._reauth(conn)
                        continue
                    except rpc.grpc.RpcError as exc2:
                        exc = exc2
                err = self._error(exc, conn.endpoint, timeout)
                if not isinstance(err, StoreUnavailable):
                    raise err from None
                self._drop(conn)
                if failed_over or len(self.endpoints) == 1 or not self._may_resend(exc, read):
                    raise err from None
                failed_over = True
                self.count("failover")
                conn = self._connection()  # the next endpoint that answers, or StoreUnavailable

    @staticmethod
    def _may_resend(exc, read: bool) -> bool:
        code = exc.code()
        if code == rpc.grpc.StatusCode.DEADLINE_EXCEEDED:
            return read
        return code == rpc.grpc.StatusCode.UNAVAILABLE and (read or _never_sent(exc))

    # -- what the watch uses (controlplane.store.etcd_watch) --------------------------------------
    def connection(self) -> Conn:
        """The current connection: connecting, or failing over, to the first endpoint that
        answers; StoreUnavailable when none does."""
        return self._connection()

    def hold(self, conn: Conn) -> None:
        """A watch reads from ``conn``: keep its channel open, even once dropped, until released."""
        with self._lock:
            self._held[id(conn.client)] += 1

    def release(self, conn: Conn) -> None:
        with self._lock:
            self._held[id(conn.client)] -= 1
            if self._held[id(conn.client)] <= 0:
                del self._held[id(conn.client)]
        self._close_retired()

    def stream_error(self, conn: Conn, exc) -> StoreError:
        """A gRPC error of a stream on ``conn`` as one line. An unavailable connection is dropped
        (the next call goes to the next endpoint); an invalid auth token is renewed, so the watch
        created next carries a fresh one."""
        if conn.auth and self._invalid_token(exc):
            self.renew_token(conn)
        err = self._error(exc, conn.endpoint, self.op_timeout)
        if isinstance(err, StoreUnavailable):
            self._drop(conn)
        return err

    def renew_token(self, conn: Conn) -> None:
        """Re-authenticate ``conn`` (best effort: a failure shows in the next call)."""
        try:
            self._reauth(conn)
        except rpc.grpc.RpcError:
            pass

    def watch_range(self) -> tuple[bytes, bytes]:
        """One range, so events stay in revision order: from <prefix>/config to the end of
        <prefix>/subnets/. flanneld writes nothing else in it; weft's node claims
        (<prefix>/weft/...) sort after it, so their refreshes never reach a lease watcher."""
        return self._config_key, _prefix_end(self._subnets)

    def event_of(self, ev, cache: dict) -> StoreEvent | None:
        """A raw etcd watch event as a StoreEvent; None for a key in the range weft does not
        follow. ``cache``: lease TTLs already asked (one per lease per batch)."""
        kv = ev.kv
        rev = kv.mod_revision
        deleted = ev.type == rpc.kv_pb2.Event.DELETE
        if kv.key == self._config_key:
            return StoreEvent("config", None, rev, value=None if deleted else self._text(kv.value))
        if not kv.key.startswith(self._subnets):
            return None  # between config and subnets/ in the range, but not flanneld's
        subnet = self._subnet_of(kv.key)
        if subnet is None:
            return StoreEvent("foreign", None, rev, name=self._name_of(kv.key),
                              value=None if deleted else self._text(kv.value))
        if deleted:
            return StoreEvent("delete", subnet, rev)
        exp = self._expiration(kv.lease, cache)
        if exp is _GONE:  # superseded since (renewed with a new lease, or expired): already past
            exp = time.time()
        return StoreEvent("put", subnet, rev, LeaseRecord(subnet, self._text(kv.value), exp, rev))

    # -- leases (etcd's) ----------------------------------------------------------------------
    def _grant(self, conn: Conn, timeout: float, ttl: float) -> tuple[int, int]:
        self.count("grant")
        resp = conn.client.leasestub.LeaseGrant(
            rpc.etcdrpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)), ID=0), timeout,
            metadata=conn.metadata)
        if resp.error:
            raise StoreError(f"etcd {conn.endpoint}: lease grant: {_one_line(resp.error)}")
        return resp.ID, resp.TTL

    def _revoke(self, conn: Conn, lease_id: int, only_if_unused: bool = False) -> None:
        """Best effort: an error here leaves a lease that expires on its own."""
        if not lease_id:
            return
        try:
            if only_if_unused:
                self.count("ttl")
                info = conn.client.leasestub.LeaseTimeToLive(
                    rpc.etcdrpc.LeaseTimeToLiveRequest(ID=lease_id, keys=True), BEST_EFFORT_TIMEOUT,
                    metadata=conn.metadata)
                if info.TTL == -1 or len(info.keys):
                    return
            self.count("revoke")
            conn.client.leasestub.LeaseRevoke(rpc.etcdrpc.LeaseRevokeRequest(ID=lease_id),
                                              BEST_EFFORT_TIMEOUT, metadata=conn.metadata)
        except rpc.grpc.RpcError:
            pass

    def _expiration(self, lease_id: int, cache: dict | None = None):
        """None for no lease, _GONE for a lease that no longer exists, else epoch seconds."""
        if not lease_id:
            return None
        if cache is not None and lease_id in cache:
            return cache[lease_id]
        info = self._do("ttl", lambda c, t: c.client.leasestub.LeaseTimeToLive(
            rpc.etcdrpc.LeaseTimeToLiveRequest(ID=lease_id), t, metadata=c.metadata), read=True)
        exp = _GONE if info.TTL < 0 else time.time() + info.TTL
        if cache is not None:
            cache[lease_id] = exp
        return exp

    # -- keys ---------------------------------------------------------------------------------
    def _key(self, subnet: ipaddress.IPv4Network) -> bytes:
        return self._subnets + subnet_key(subnet).encode()

    def _name_of(self, key: bytes) -> str:
        """A key's name under ``<prefix>/subnets/``."""
        return key[len(self._subnets):].decode("utf-8", "replace")

    def _subnet_of(self, key: bytes) -> ipaddress.IPv4Network | None:
        """The subnet of a key directly under ``<prefix>/subnets/``; None for anything else."""
        if not key.startswith(self._subnets):
            return None
        return subnet_of_name(key[len(self._subnets):].decode("utf-8", "replace"))

    @staticmethod
    def _text(value: bytes) -> str:
        return value.decode("utf-8", "replace")

    # -- the Store interface ------------------------------------------------------------------
    def get_config(self) -> str | None:
        resp = self._do("get_config", lambda c, t: c.client.kvstub.Range(
            rpc.etcdrpc.RangeRequest(key=self._config_key), t, metadata=c.metadata), read=True)
        return self._text(resp.kvs[0].value) if resp.kvs else None

    def put_config(self, text: str) -> None:
        self._do("put_config", lambda c, t: c.client.kvstub.Put(
            rpc.etcdrpc.PutRequest(key=self._config_key, value=text.encode()), t, metadata=c.metadata))

    def scan_subnets(self) -> SubnetScan:
        resp = self._do("list", lambda c, t: c.client.kvstub.Range(
            rpc.etcdrpc.RangeRequest(key=self._subnets, range_end=_prefix_end(self._subnets)), t,
            metadata=c.metadata), read=True)
        records, foreign, cache = [], [], {}
        for kv in resp.kvs:
            subnet = self._subnet_of(kv.key)
            if subnet is None:  # someone else's key under subnets/
                foreign.append(ForeignKey(self._name_of(kv.key), kv.mod_revision))
                continue
            exp = self._expiration(kv.lease, cache)
            if exp is _GONE:
                continue  # expired since the range; its delete event follows the revision
            records.append(LeaseRecord(subnet, self._text(kv.value), exp, kv.mod_revision))
        return SubnetScan(records, foreign, resp.header.revision)

    def _get_live(self, op: str, key: bytes):
        """The key's kv and its expiration; None when it is absent or its etcd lease is gone."""
        resp = self._do(op, lambda c, t: c.client.kvstub.Range(
            rpc.etcdrpc.RangeRequest(key=key), t, metadata=c.metadata), read=True)
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        exp = self._expiration(kv.lease)
        return None if exp is _GONE else (kv, exp)

    def get_lease(self, subnet) -> LeaseRecord | None:
        live = self._get_live("get", self._key(subnet))
        if live is None:
            return None
        kv, exp = live
        return LeaseRecord(subnet, self._text(kv.value), exp, kv.mod_revision)

    def _put(self, subnet, value: str, ttl, must_exist: bool) -> LeaseRecord:
        key = self._key(subnet)
        compare = rpc.etcdrpc.Compare(key=key, target=rpc.etcdrpc.Compare.VERSION,
                                  result=(rpc.etcdrpc.Compare.GREATER if must_exist
                                          else rpc.etcdrpc.Compare.EQUAL),
                                  version=0)

        def txn(conn: Conn, timeout: float):
            lease_id, granted = self._grant(conn, timeout, ttl) if ttl is not None else (0, 0)
            put = rpc.etcdrpc.PutRequest(key=key, value=value.encode(), lease=lease_id,
                                     prev_kv=must_exist)
            try:
                resp = conn.client.kvstub.Txn(
                    rpc.etcdrpc.TxnRequest(compare=[compare],
                                       success=[rpc.etcdrpc.RequestOp(request_put=put)]),
                    timeout, metadata=conn.metadata)
            except BaseException:
                # The txn may have been applied all the same (a timeout). A create that failed
                # must not leave a key behind: revoking its lease removes it. A renewal must not
                # risk deleting the node's own key: its lease is left to expire.
                if not must_exist:
                    self._revoke(conn, lease_id)
                raise
            if not resp.succeeded:
                self._revoke(conn, lease_id)
                if must_exist:
                    raise LeaseNotFound(f"lease {subnet} does not exist")
                raise LeaseExists(f"lease {subnet} is taken")
            expires = time.time() + granted if lease_id else None
            if must_exist:
                old = resp.responses[0].response_put.prev_kv.lease
                if old and old != lease_id:
                    self._revoke(conn, old, only_if_unused=True)
            return LeaseRecord(subnet, value, expires, resp.header.revision)
        return self._do("update" if must_exist else "create", txn)

    def create_lease(self, subnet, value, ttl) -> LeaseRecord:
        return self._put(subnet, value, ttl, must_exist=False)

    def update_lease(self, subnet, value, ttl) -> LeaseRecord:
        return self._put(subnet, value, ttl, must_exist=True)

    def delete_lease(self, subnet) -> bool:
        key = self._key(subnet)

        def delete(conn: Conn, timeout: float):
            resp = conn.client.kvstub.DeleteRange(
                rpc.etcdrpc.DeleteRangeRequest(key=key, prev_kv=True), timeout, metadata=conn.metadata)
            for kv in resp.prev_kvs:
                self._revoke(conn, kv.lease, only_if_unused=True)
            return resp.deleted > 0
        return self._do("delete", delete)

    def watch(self, since_revision: int) -> Watch:
        self.count("watch")
        if self.opts.username:
            # etcd checks a watch's token only when the watch is created, and answers an expired
            # one with a cancel "permission denied", not "invalid auth token". One authenticated
            # call first renews the token if needed (and restarts its idle clock).
            self._do("auth_check", lambda c, t: c.client.kvstub.Range(
                rpc.etcdrpc.RangeRequest(key=self._config_key, count_only=True), t,
                metadata=c.metadata), read=True)
        w = EtcdWatch(self, since_revision)
        with self._lock:
            self._watches.add(w)
        return w

    # -- node claims: <prefix>/weft/claims/<ip>, outside <prefix>/subnets (flanneld's range) ------
    # A claim is a key attached to an etcd lease of the claim's TTL. A refresh keeps that lease
    # alive and re-puts the key with it (one write), so its revision moves: a newcomer waiting
    # on the claim sees that its holder is alive. A holder that dies leaves the lease to expire,
    # which deletes the key.
    def _claim_key(self, public_ip: str) -> bytes:
        return f"{self.prefix}/weft/claims/{public_ip}".encode()

    def get_claim(self, public_ip: str) -> ClaimRecord | None:
        live = self._get_live("get_claim", self._claim_key(public_ip))
        if live is None:
            return None
        kv, exp = live
        return ClaimRecord(public_ip, self._text(kv.value), exp, kv.mod_revision, kv.lease)

    def _claim_txn(self, conn: Conn, timeout: float, key: bytes, compare, put) -> int | None:
        """Put ``put`` if ``compare`` holds: the new revision, or None when it did not hold."""
        resp = conn.client.kvstub.Txn(
            rpc.etcdrpc.TxnRequest(compare=[compare], success=[rpc.etcdrpc.RequestOp(request_put=put)]),
            timeout, metadata=conn.metadata)
        return resp.header.revision if resp.succeeded else None

    def take_claim(self, public_ip, value, ttl, expected) -> ClaimRecord:
        key = self._claim_key(public_ip)
        if expected is None:
            compare = rpc.etcdrpc.Compare(key=key, target=rpc.etcdrpc.Compare.VERSION,
                                      result=rpc.etcdrpc.Compare.EQUAL, version=0)
        else:
            compare = rpc.etcdrpc.Compare(key=key, target=rpc.etcdrpc.Compare.MOD,
                                      result=rpc.etcdrpc.Compare.EQUAL, mod_revision=expected.revision)

        def take(conn: Conn, timeout: float):
            lease_id, granted = self._grant(conn, timeout, ttl)
            put = rpc.etcdrpc.PutRequest(key=key, value=value.encode(), lease=lease_id)
            try:
                revision = self._claim_txn(conn, timeout, key, compare, put)
            except BaseException:
                self._revoke(conn, lease_id)  # applied or not: no claim may outlive this error
                raise
            if revision is None:
                self._revoke(conn, lease_id)
                raise ClaimChanged(f"public IP {public_ip} is claimed" if expected is None
                                   else f"the claim of public IP {public_ip} changed")
            if expected is not None:
                self._revoke(conn, expected.lease_id, only_if_unused=True)
            return ClaimRecord(public_ip, value, time.time() + granted, revision, lease_id)
        return self._do("take_claim", take)

    def refresh_claim(self, public_ip, record, ttl) -> ClaimRecord:
        """Keeps the lease granted at take (its TTL stays the one given then)."""
        key = self._claim_key(public_ip)
        compare = rpc.etcdrpc.Compare(key=key, target=rpc.etcdrpc.Compare.MOD,
                                  result=rpc.etcdrpc.Compare.EQUAL, mod_revision=record.revision)

        def refresh(conn: Conn, timeout: float):
            self.count("keepalive")
            call = conn.client.leasestub.LeaseKeepAlive(
                iter([rpc.etcdrpc.LeaseKeepAliveRequest(ID=record.lease_id)]), timeout,
                metadata=conn.metadata)
            try:
                alive = next(call, None)  # one request, one answer: a keep-alive, not a stream
            finally:
                call.cancel()
            if alive is None or alive.TTL <= 0:
                raise ClaimChanged(f"the claim of public IP {public_ip} expired")
            put = rpc.etcdrpc.PutRequest(key=key, value=record.value.encode(), lease=record.lease_id)
            try:
                revision = self._claim_txn(conn, timeout, key, compare, put)
            except rpc.grpc.RpcError as exc:
                if exc.code() == rpc.grpc.StatusCode.NOT_FOUND:  # the lease expired just now
                    raise ClaimChanged(f"the claim of public IP {public_ip} expired") from None
                raise
            if revision is None:
                self._revoke(conn, record.lease_id, only_if_unused=True)
                raise ClaimChanged(f"the claim of public IP {public_ip} was taken or released")
            return ClaimRecord(public_ip, record.value, time.time() + alive.TTL, revision,
                               record.lease_id)
        return self._do("refresh_claim", refresh)

    def release_claim(self, public_ip, record) -> bool:
        key = self._claim_key(public_ip)

        def release(conn: Conn, timeout: float):
            compare = rpc.etcdrpc.Compare(key=key, target=rpc.etcdrpc.Compare.MOD,
                                      result=rpc.etcdrpc.Compare.EQUAL, mod_revision=record.revision)
            resp = conn.client.kvstub.Txn(rpc.etcdrpc.TxnRequest(
                compare=[compare],
                success=[rpc.etcdrpc.RequestOp(
                    request_delete_range=rpc.etcdrpc.DeleteRangeRequest(key=key))]),
                timeout, metadata=conn.metadata)
            self._revoke(conn, record.lease_id, only_if_unused=True)
            return resp.succeeded
        return self._do("release_claim", release)

    def stats(self) -> dict[str, float]:
        with self._ops_lock:
            return dict(self._ops)

    def close(self) -> None:
        for w in list(self._watches):
            w.close()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            clients = self._retired + ([self._conn.client] if self._conn else [])
            self._conn, self._retired = None, []
        for client in clients:
            try:
                client.close()
            except Exception:
                pass


