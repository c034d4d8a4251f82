"""The etcd v3 store, in flanneld's exact layout, over etcd's JSON gateway (``etcd_http``).

Layout (flanneld's ``pkg/subnet/etcd/registry.go``), so weftd and flanneld can share one etcd:
- config ``<prefix>/config``; leases ``<prefix>/subnets/<ip>-<len>`` (dual-stack:
  ``<ip>-<len>&<ip6>-<len6>``); values are stored as given.
- a TTL is an etcd lease granted with that TTL (whole seconds, rounded up) and attached to the key;
  a key with no lease is a reservation (``etcdctl put`` without ``--lease``).
- create = txn ``version(key) == 0`` then put; renew = txn ``version(key) > 0`` then put with a
  *new* lease, as flanneld does (no keep-alive stream); the previous lease is revoked afterwards
  when no other key uses it.
- a record's expiration is now + the remaining TTL of its lease (one ``LeaseTimeToLive`` per leased
  key, as flanneld does); its revision is the key's ``mod_revision``; ``list_leases`` returns the
  range's header revision, so list at R + watch from R loses nothing.

How it talks to etcd: JSON over HTTP/1.1 (``controlplane.store.etcd_http``), etcd's own gRPC
gateway on the client port (etcd 3.4 on), TLS and client certificates by the standard library's
``ssl``. The requests, answers and status codes are the v3 gRPC API's; gRPC, protobuf and the
``etcd3`` package are not needed (they cost weftd about 17 MB of RSS; docs/weftd.md, "The etcd client").
- The auth token (``Authenticate``) goes in each request's ``Authorization`` header; etcd's simple
  tokens expire after ``--auth-token-ttl`` (300 s) idle, so an "invalid auth token" answer
  re-authenticates and retries once.
- Endpoints are tried in order at connect time; after an UNAVAILABLE answer (or a timeout) the
  connection is dropped and the next call reconnects, starting at the next endpoint. The call
  that met the dead member is sent once more to the next endpoint when that is safe (reads, and
  writes that never left this process: the connect or TLS handshake failed; see ``_do``), and a
  watch goes on from the next endpoint at the last revision it received, so a cluster with a
  member down keeps answering without a failure.
- Watches (``controlplane.store.etcd_watch``, which names what it uses of this store): one
  ``/v3/watch`` stream at a time per watch, read by a thread into a queue: a watch whose start
  revision is compacted gets a response with ``compact_revision`` set (and ``canceled``), which
  becomes ``WatchCompacted``.
"""
from __future__ import annotations

import ipaddress
import math
import ssl
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..lease import NO_IPV4, lease_key_of_name, shown, subnet_key
from . import etcd_http as v3
from .base import (ClaimChanged, ClaimRecord, ForeignKey, LeaseExists, LeaseNotFound, LeaseRecord,
                   Store, StoreError, StoreEvent, StoreUnavailable, SubnetScan, Watch)
from .etcd_watch import EtcdWatch

CONNECT_TIMEOUT = 5.0  # seconds for connecting / authenticating to one endpoint
OP_TIMEOUT = 10.0  # seconds for one request
BEST_EFFORT_TIMEOUT = 2.0  # seconds for revoking a lease no key uses any more
_GONE = object()  # a lease that no longer exists (expired or revoked)
_FAILOVER_PAUSE = 0.1  # s between two rounds over the endpoints while none answers


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _prefix_end(key: bytes) -> bytes:
    """etcd's range end for "every key starting with ``key``"."""
    end = bytearray(key)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[:i + 1])
    return b"\0"


def _parse_endpoint(url: str) -> tuple[str, str, int]:
    """``http(s)://host:port`` (or ``host:port``) -> (scheme, host, port)."""
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


def _no_password() -> bytes:
    raise ValueError("the key is encrypted")  # never prompt on a terminal


def _tls_context(o) -> ssl.SSLContext:
    """The TLS settings of every https endpoint. A file that is not what its flag wants, a key
    that does not belong to the certificate, or an expired certificate gets a clear message
    here; a handshake would only fail with a less telling one."""
    try:
        ctx = ssl.create_default_context(cafile=o.cafile or None)  # none: the system's roots
    except ssl.SSLError as exc:
        raise StoreError(f"-etcd-cafile {o.cafile}: no usable CA certificate in it"
                         f" ({_one_line(exc)})") from None
    if not o.certfile:
        return ctx
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is not None:
        try:
            not_after = decode(o.certfile).get("notAfter")
        except (ssl.SSLError, ValueError) as exc:
            reason = exc.args[-1] if exc.args else exc  # SSLError("Error decoding ...",)
            raise StoreError(f"-etcd-certfile {o.certfile}: not a certificate"
                             f" ({_one_line(reason)})") from None
        if not_after and ssl.cert_time_to_seconds(not_after) < time.time():
            raise StoreError(f"-etcd-certfile {o.certfile}: certificate expired at {not_after}")
    try:
        ctx.load_cert_chain(o.certfile, o.keyfile, password=_no_password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise StoreError(f"-etcd-keyfile {o.keyfile} is not the key of -etcd-certfile"
                             f" {o.certfile}") from None
        raise StoreError(f"-etcd-keyfile {o.keyfile}: not an unencrypted private key"
                         f" ({_one_line(exc)})") from None
    except ValueError:
        raise StoreError(f"-etcd-keyfile {o.keyfile}: not an unencrypted private key"
                         " (it is encrypted)") from None
    return ctx


@dataclass
class Conn:
    endpoint: str
    client: v3.Client
    token: str | None  # the auth token, sent with every request (user/password only)
    auth: bool


class EtcdStore(Store):
    def __init__(self, opts, prefix: str = "/coreos.com/network", *,
                 connect_timeout: float = CONNECT_TIMEOUT, op_timeout: float = OP_TIMEOUT):
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
        for flag, path in (("-etcd-cafile", opts.cafile), ("-etcd-certfile", opts.certfile),
                           ("-etcd-keyfile", opts.keyfile)):
            if path:
                _check_file(flag, path)
        self._tls = (_tls_context(opts) if opts.cafile or opts.certfile
                     or any(p[0] == "https" for p in self._parsed) else None)
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
        """Connect to endpoint ``index`` and check it answers; raises v3.RpcError."""
        scheme, host, port = self._parsed[index]
        # like etcd's clientv3: the scheme decides whether TLS is used
        client = v3.Client(scheme, host, port, self._tls if scheme == "https" else None,
                           self.connect_timeout)
        try:
            conn = Conn(self.endpoints[index], client, None, bool(self.opts.username))
            if conn.auth:
                self._reauth(conn)
            # One cheap read proves the endpoint answers (and that TLS and auth work).
            client.range(self._config_key, self.connect_timeout, conn.token, count_only=True)
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
                except v3.RpcError as exc:
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
        if len(self.endpoints) > 1:
            # A watch on that member goes on from the next one (it would notice a dead host by
            # itself, but not a member that is paused or cut off from its cluster).
            conn.client.interrupt_streams()
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
        conn.token = conn.client.authenticate(self.opts.username, self.opts.password,
                                              self.connect_timeout)

    @staticmethod
    def _error(exc: v3.RpcError, endpoint: str, timeout: float) -> StoreError:
        code = exc.code()
        details = exc.details() or code
        if code == "UNAVAILABLE" and endpoint.startswith("https:") and exc.tls:
            details += " (TLS: check -etcd-cafile, -etcd-certfile, -etcd-keyfile)"
        if code == "UNAVAILABLE":
            return StoreUnavailable(f"etcd {endpoint}: {details}")
        if code == "DEADLINE_EXCEEDED":
            return StoreUnavailable(f"etcd {endpoint}: no answer within {timeout:g}s")
        if code == "CANCELLED":
            return StoreUnavailable(f"etcd {endpoint}: request cancelled ({details})")
        return StoreError(f"etcd {endpoint}: {details} ({code.lower()})")

    @staticmethod
    def _invalid_token(exc: v3.RpcError) -> bool:
        return exc.code() == "UNAUTHENTICATED" and "invalid auth token" in exc.details()

    def _do(self, op: str, fn, timeout: float | None = None, *, read: bool = False):
        """Run ``fn(conn, timeout)``: count it, re-authenticate once on an expired token, fail
        over to the next endpoint when that is safe, and turn RpcErrors into one-line
        StoreErrors naming the endpoint.

        Failing over: an operation that meets a dead or silent member is sent again, to the
        next endpoint that answers, so a cluster with one member down keeps answering (and the
        store's health stays up). It is sent again while ``timeout`` has not passed since the
        first failure, so a cluster electing a new leader (no member answers for a moment) is
        waited for. Only when sending it again cannot apply it twice:
        - a read (``read=True``: ranges, lease TTLs): after any unavailability, a timeout included;
        - a write only when it never left this process whole (``exc.sent`` False: the connect,
          the TLS handshake or the writing of the request failed). Writes
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
        reauthed = False
        resend_until = None  # once failing over: the end of the time a resend may take
        while True:
            try:
                return fn(conn, timeout)
            except v3.RpcError as exc:
                if not reauthed and conn.auth and self._invalid_token(exc):
                    reauthed = True
                    try:
                        self._reauth(conn)
                        continue
                    except v3.RpcError as exc2:
                        exc = exc2
                err = self._error(exc, conn.endpoint, timeout)
                if not isinstance(err, StoreUnavailable):
                    raise err from None
                self._drop(conn)
                if len(self.endpoints) == 1 or not self._may_resend(exc, read):
                    raise err from None
                if resend_until is None:
                    resend_until = time.monotonic() + timeout
                elif time.monotonic() >= resend_until:
                    raise err from None
                conn = self._failover(resend_until)

    def _failover(self, until: float) -> Conn:
        """The next endpoint that answers. When none does, ask them all again until ``until``:
        a cluster whose leader just died answers nothing (or "leader changed") until the others
        have elected one, which takes an election timeout or two (etcd's clientv3 retries
        repeatable requests the same way, within the caller's deadline)."""
        while True:
            self.count("failover")
            try:
                return self._connection()
            except StoreUnavailable:
                if time.monotonic() + _FAILOVER_PAUSE >= until:
                    raise
                time.sleep(_FAILOVER_PAUSE)

    @staticmethod
    def _may_resend(exc: v3.RpcError, read: bool) -> bool:
        if exc.code() == "DEADLINE_EXCEEDED":
            return read or not exc.sent
        return exc.code() == "UNAVAILABLE" and (read or not exc.sent)

    # -- what the watch uses (controlplane.store.etcd_watch) --------------------------------------
    def connection(self, until: float | None = None) -> Conn:
        """The current connection: connecting, or failing over, to the first endpoint that
        answers; StoreUnavailable when none does. With ``until`` (a monotonic time), none
        answering is asked again, round after round, until then (a cluster electing a leader)."""
        return self._connection() if until is None else self._failover(until)

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
        """An RpcError of a stream on ``conn`` as one line. An unavailable connection is dropped
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
        except v3.RpcError:
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
        deleted = ev.type == "DELETE"
        if kv.key == self._config_key:
            return StoreEvent("config", None, rev, value=None if deleted else self._text(kv.value))
        if not kv.key.startswith(self._subnets):
            return None  # between config and subnets/ in the range, but not flanneld's
        pair = self._subnet_of(kv.key)
        if pair is None:
            return StoreEvent("foreign", None, rev, name=self._name_of(kv.key),
                              value=None if deleted else self._text(kv.value))
        subnet, subnet6 = pair
        if deleted:
            return StoreEvent("delete", subnet, rev, subnet6=subnet6)
        exp = self._expiration(kv.lease, cache)
        if exp is _GONE:  # superseded since (renewed with a new lease, or expired): already past
            exp = time.time()
        return StoreEvent("put", subnet, rev, LeaseRecord(subnet, self._text(kv.value), exp, rev, subnet6),
                          subnet6=subnet6)

    # -- leases (etcd's) ----------------------------------------------------------------------
    def _grant(self, conn: Conn, timeout: float, ttl: float) -> tuple[int, int]:
        self.count("grant")
        lease_id, granted, error = conn.client.lease_grant(max(1, math.ceil(ttl)), timeout,
                                                           conn.token)
        if error:
            raise StoreError(f"etcd {conn.endpoint}: lease grant: {_one_line(error)}")
        return lease_id, granted

    def _revoke(self, conn: Conn, lease_id: int, only_if_unused: bool = False) -> None:
        """Best effort: an error here leaves a lease that expires on its own."""
        if not lease_id:
            return
        try:
            if only_if_unused:
                self.count("ttl")
                ttl, keys = conn.client.lease_time_to_live(lease_id, BEST_EFFORT_TIMEOUT,
                                                           conn.token, keys=True)
                if ttl == -1 or keys:
                    return
            self.count("revoke")
            conn.client.lease_revoke(lease_id, BEST_EFFORT_TIMEOUT, conn.token)
        except v3.RpcError:
            pass

    def _expiration(self, lease_id: int, cache: dict | None = None):
        """None for no lease, _GONE for a lease that no longer exists, else epoch seconds."""
        if not lease_id:
            return None
        if cache is not None and lease_id in cache:
            return cache[lease_id]
        ttl, _ = self._do("ttl", lambda c, t: c.client.lease_time_to_live(lease_id, t, c.token),
                          read=True)
        exp = _GONE if ttl < 0 else time.time() + ttl
        if cache is not None:
            cache[lease_id] = exp
        return exp

    # -- keys ---------------------------------------------------------------------------------
    def _key(self, subnet: ipaddress.IPv4Network, subnet6: ipaddress.IPv6Network | None = None) -> bytes:
        return self._subnets + subnet_key(subnet, subnet6).encode()

    def _dual_keys(self, subnet: ipaddress.IPv4Network) -> tuple[bytes, bytes]:
        """[start, end) of the dual-stack keys of ``subnet`` (``<ip>-<len>&...``; "'" follows '&')."""
        base = self._key(subnet)
        return base + b"&", base + b"'"

    def _name_of(self, key: bytes) -> str:
        """A key's name under ``<prefix>/subnets/``."""
        return key[len(self._subnets):].decode("utf-8", "replace")

    def _subnet_of(self, key: bytes):
        """(subnet, subnet6) of a lease key directly under ``<prefix>/subnets/``; None for anything else."""
        if not key.startswith(self._subnets):
            return None
        return lease_key_of_name(key[len(self._subnets):].decode("utf-8", "replace"))

    @staticmethod
    def _text(value: bytes) -> str:
        return value.decode("utf-8", "replace")

    # -- the Store interface ------------------------------------------------------------------
    def get_config(self) -> str | None:
        resp = self._do("get_config", lambda c, t: c.client.range(self._config_key, t, c.token),
                        read=True)
        return self._text(resp.kvs[0].value) if resp.kvs else None

    def put_config(self, text: str) -> None:
        self._do("put_config", lambda c, t: c.client.put(self._config_key, text.encode(), t,
                                                         c.token))

    def scan_subnets(self) -> SubnetScan:
        resp = self._do("list", lambda c, t: c.client.range(
            self._subnets, t, c.token, range_end=_prefix_end(self._subnets)), read=True)
        records, foreign, cache = [], [], {}
        for kv in resp.kvs:
            pair = self._subnet_of(kv.key)
            if pair is None:  # someone else's key under subnets/
                foreign.append(ForeignKey(self._name_of(kv.key), kv.mod_revision))
                continue
            exp = self._expiration(kv.lease, cache)
            if exp is _GONE:
                continue  # expired since the range; its delete event follows the revision
            records.append(LeaseRecord(pair[0], self._text(kv.value), exp, kv.mod_revision, pair[1]))
        return SubnetScan(records, foreign, resp.revision)

    def _get_live(self, op: str, key: bytes):
        """The key's kv and its expiration; None when it is absent or its etcd lease is gone."""
        resp = self._do(op, lambda c, t: c.client.range(key, t, c.token), read=True)
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        exp = self._expiration(kv.lease)
        return None if exp is _GONE else (kv, exp)

    def get_lease(self, subnet, subnet6=None) -> LeaseRecord | None:
        live = self._get_live("get", self._key(subnet, subnet6))
        if live is None:
            return None
        kv, exp = live
        return LeaseRecord(subnet, self._text(kv.value), exp, kv.mod_revision, subnet6)

    def _put(self, subnet, value: str, ttl, must_exist: bool, subnet6=None) -> LeaseRecord:
        key = self._key(subnet, subnet6)
        compare = [v3.compare_version(key, "GREATER" if must_exist else "EQUAL", 0)]
        # A lease is its identity (``LeaseRecord.ident``): its IPv4 subnet, so no other key of it,
        # v4-only or dual-stack; an IPv6-only lease's is its IPv6 subnet, which only its own key
        # (0.0.0.0-0&<ip6>-<len6>) names.
        if not must_exist and subnet != NO_IPV4:
            start, end = self._dual_keys(subnet)
            compare.append(v3.compare_version(start, "EQUAL", 0, range_end=end))
            if subnet6 is not None:
                compare.append(v3.compare_version(self._key(subnet), "EQUAL", 0))

        def txn(conn: Conn, timeout: float):
            lease_id, granted = self._grant(conn, timeout, ttl) if ttl is not None else (0, 0)
            put = v3.request_put(key, value.encode(), lease=lease_id, prev_kv=must_exist)
            try:
                resp = conn.client.txn(compare, [put], timeout, conn.token)
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
                    raise LeaseNotFound(f"lease {shown(subnet, subnet6)} does not exist")
                raise LeaseExists(f"lease {shown(subnet, subnet6)} is taken")
            expires = time.time() + granted if lease_id else None
            if must_exist:
                prev = resp.prev_kv(0)
                old = prev.lease if prev else 0
                if old and old != lease_id:
                    self._revoke(conn, old, only_if_unused=True)
            return LeaseRecord(subnet, value, expires, resp.revision, subnet6)
        return self._do("update" if must_exist else "create", txn)

    def create_lease(self, subnet, value, ttl, subnet6=None) -> LeaseRecord:
        return self._put(subnet, value, ttl, must_exist=False, subnet6=subnet6)

    def update_lease(self, subnet, value, ttl, subnet6=None) -> LeaseRecord:
        return self._put(subnet, value, ttl, must_exist=True, subnet6=subnet6)

    def delete_lease(self, subnet, subnet6=None) -> bool:
        key = self._key(subnet, subnet6)

        def delete(conn: Conn, timeout: float):
            deleted = conn.client.delete_range(key, timeout, conn.token)
            for kv in deleted:
                self._revoke(conn, kv.lease, only_if_unused=True)
            return len(deleted) > 0
        return self._do("delete", delete)

    def watch(self, since_revision: int) -> Watch:
        self.count("watch")
        if self.opts.username:
            # etcd checks a watch's token only when the watch is created, and answers an expired
            # one with a cancel "permission denied", not "invalid auth token". One authenticated
            # call first renews the token if needed (and restarts its idle clock).
            self._do("auth_check", lambda c, t: c.client.range(self._config_key, t, c.token,
                                                               count_only=True), read=True)
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
        resp = conn.client.txn([compare], [put], timeout, conn.token)
        return resp.revision if resp.succeeded else None

    def take_claim(self, public_ip, value, ttl, expected) -> ClaimRecord:
        key = self._claim_key(public_ip)
        if expected is None:
            compare = v3.compare_version(key, "EQUAL", 0)
        else:
            compare = v3.compare_mod(key, "EQUAL", expected.revision)

        def take(conn: Conn, timeout: float):
            lease_id, granted = self._grant(conn, timeout, ttl)
            put = v3.request_put(key, value.encode(), lease=lease_id)
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
        compare = v3.compare_mod(key, "EQUAL", record.revision)

        def refresh(conn: Conn, timeout: float):
            self.count("keepalive")
            alive = conn.client.lease_keep_alive(record.lease_id, timeout, conn.token)
            if alive <= 0:
                raise ClaimChanged(f"the claim of public IP {public_ip} expired")
            put = v3.request_put(key, record.value.encode(), lease=record.lease_id)
            try:
                revision = self._claim_txn(conn, timeout, key, compare, put)
            except v3.RpcError as exc:
                if exc.code() == "NOT_FOUND":  # the lease expired just now
                    raise ClaimChanged(f"the claim of public IP {public_ip} expired") from None
                raise
            if revision is None:
                self._revoke(conn, record.lease_id, only_if_unused=True)
                raise ClaimChanged(f"the claim of public IP {public_ip} was taken or released")
            return ClaimRecord(public_ip, record.value, time.time() + alive, revision,
                               record.lease_id)
        return self._do("refresh_claim", refresh)

    def release_claim(self, public_ip, record) -> bool:
        key = self._claim_key(public_ip)

        def release(conn: Conn, timeout: float):
            compare = v3.compare_mod(key, "EQUAL", record.revision)
            resp = conn.client.txn([compare], [v3.request_delete(key)], timeout, conn.token)
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


