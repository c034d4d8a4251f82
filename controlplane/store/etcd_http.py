"""A small etcd v3 client over etcd's JSON gateway: the standard library's http.client and ssl.

etcd (3.4 on) serves its v3 API as JSON on the client port as well as gRPC (the gRPC-gateway):
``POST /v3/kv/range``, ``/v3/kv/txn``, ``/v3/lease/grant``, ``/v3/watch`` (a stream of JSON
lines) and the rest, behind the same TLS and client-certificate checks. The messages are the
gRPC ones in protobuf's JSON mapping (bytes in base64, 64-bit integers as strings, fields at
their default left out) and errors carry the gRPC status code: ``{"code": 16, "message":
"etcdserver: invalid auth token"}``. The auth token goes in the ``Authorization`` header, other
gRPC metadata as ``Grpc-Metadata-<name>`` headers.

Why not gRPC: grpcio, protobuf and the etcd3 package cost weftd about 17 MB of its RSS (their
shared objects, a handful of threads with their malloc arenas) for the eight calls below; see
docs/weftd.md, "The etcd client". This module is what the store needs and nothing more:

- ``Client(endpoint, ...)``: one endpoint; a small pool of kept-alive HTTP/1.1 connections, so
  calls from several threads each get a connection of their own.
- every call raises ``RpcError`` with a gRPC status name (``exc.code()``), a one-line message
  (``exc.details()``) and ``exc.sent``: False when the request never left this process (the TCP
  connect or the TLS handshake failed), so a write may be sent again elsewhere.
- ``Client.watch(...)``: a ``WatchStream`` on a connection of its own; ``responses()`` yields each
  ``WatchResponse`` as it arrives.
"""
from __future__ import annotations

import base64
import http.client
import json
import select
import socket
import ssl
import threading
from dataclasses import dataclass, field

# gRPC status codes by number (etcd's gateway sends the number).
_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
          "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
          "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
          "UNAUTHENTICATED")
MAX_IDLE = 4  # kept-alive connections per endpoint (the daemon uses two or three threads)
# TCP keepalive on a watch's connection: a member whose host vanished (no FIN, no RST) ends the
# stream after about KEEPIDLE + KEEPINTVL * KEEPCNT seconds (gRPC's keepalive did this before).
KEEPIDLE, KEEPINTVL, KEEPCNT = 10, 5, 1


def _one_line(text) -> str:
    return " ".join(str(text).split())


class RpcError(Exception):
    """A failed call: ``code()`` is a gRPC status name ("UNAVAILABLE", "DEADLINE_EXCEEDED",
    "UNAUTHENTICATED", ...), ``details()`` one line, ``sent`` False when the request never left."""

    def __init__(self, code: str, details: str, *, sent: bool = True, tls: bool = False):
        super().__init__(f"{code}: {details}")
        self._code, self._details, self.sent, self.tls = code, _one_line(details), sent, tls

    def code(self) -> str:
        return self._code

    def details(self) -> str:
        return self._details


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


@dataclass
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int

    @classmethod
    def of(cls, d: dict) -> "KeyValue":
        return cls(_bytes(d.get("key")), _bytes(d.get("value")), int(d.get("mod_revision", 0)),
                   int(d.get("lease", 0)))


@dataclass
class Event:
    type: str  # "PUT" or "DELETE"
    kv: KeyValue


@dataclass
class WatchResponse:
    created: bool = False
    canceled: bool = False
    cancel_reason: str = ""
    compact_revision: int = 0
    events: list = field(default_factory=list)

    @classmethod
    def of(cls, d: dict) -> "WatchResponse":
        return cls(bool(d.get("created")), bool(d.get("canceled")), d.get("cancel_reason", ""),
                   int(d.get("compact_revision", 0)),
                   [Event(e.get("type", "PUT"), KeyValue.of(e.get("kv", {})))
                    for e in d.get("events", ())])


@dataclass
class RangeResponse:
    kvs: list
    revision: int  # the store's revision when it answered (the response header's)


@dataclass
class TxnResponse:
    succeeded: bool
    revision: int
    responses: list  # raw: [{"response_put": {...}}, ...]

    def prev_kv(self, index: int) -> KeyValue | None:
        """The previous key-value of the put at ``index`` (asked with ``prev_kv=True``)."""
        prev = self.responses[index].get("response_put", {}).get("prev_kv")
        return KeyValue.of(prev) if prev else None


def _revision(doc: dict) -> int:
    return int(doc.get("header", {}).get("revision", 0))


def compare_version(key: bytes, result: str, version: int, range_end: bytes = b"") -> dict:
    """Txn compare on the version of ``key`` (of every key in [key, range_end) when given);
    ``result`` "EQUAL", "GREATER", "LESS" or "NOT_EQUAL"."""
    cmp = {"key": b64(key), "target": "VERSION", "result": result, "version": version}
    if range_end:
        cmp["range_end"] = b64(range_end)
    return cmp


def compare_mod(key: bytes, result: str, mod_revision: int) -> dict:
    return {"key": b64(key), "target": "MOD", "result": result, "mod_revision": mod_revision}


def request_put(key: bytes, value: bytes, lease: int = 0, prev_kv: bool = False) -> dict:
    put = {"key": b64(key), "value": b64(value)}
    if lease:
        put["lease"] = lease
    if prev_kv:
        put["prev_kv"] = True
    return {"request_put": put}


def request_delete(key: bytes) -> dict:
    return {"request_delete_range": {"key": b64(key)}}


def _readable(sock: socket.socket) -> bool:
    poll = select.poll()  # not select(): any fd number
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(0))


def _error_of(status: int, body: bytes) -> RpcError:
    """A non-200 answer: etcd's JSON error, or whatever else answered on that port."""
    try:
        doc = json.loads(body)
        code = int(doc.get("code", doc.get("grpc_code", 2)))  # a stream's error: grpc_code
        message = doc.get("message") or doc.get("error") or f"HTTP {status}"
        return RpcError(_CODES[code] if 0 <= code < len(_CODES) else "UNKNOWN", message)
    except (ValueError, TypeError, AttributeError):
        text = _one_line(body[:200].decode("utf-8", "replace")) or f"HTTP {status}"
        if "HTTP request to an HTTPS server" in text:
            return RpcError("UNAVAILABLE", f"the server answered: {text} (does the server want https?)")
        return RpcError("UNAVAILABLE" if status >= 500 else "UNIMPLEMENTED",
                        f"not etcd's v3 JSON API (HTTP {status}: {text}; etcd 3.4 or later needed)")


def _message(doc: dict) -> dict:
    """A streaming method's line (``{"result": {...}}`` or ``{"error": {...}}``) or a plain answer."""
    if isinstance(doc.get("error"), dict):
        raise _error_of(500, json.dumps(doc["error"]).encode())
    return doc["result"] if isinstance(doc.get("result"), dict) else doc


def _transport_error(exc: BaseException, sent: bool, timeout: float, *,
                     connecting: bool = False) -> RpcError:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return RpcError("DEADLINE_EXCEEDED", f"no answer within {timeout:g}s", sent=sent)
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or exc.__class__.__name__
        return RpcError("UNAVAILABLE", f"TLS: {reason} ({_one_line(exc)})", sent=sent, tls=True)
    if isinstance(exc, (http.client.RemoteDisconnected, http.client.IncompleteRead)):
        return RpcError("UNAVAILABLE", "connection closed by the server", sent=sent)
    if isinstance(exc, http.client.HTTPException):
        return RpcError("UNAVAILABLE", f"bad HTTP answer ({_one_line(exc) or type(exc).__name__})",
                        sent=sent)
    what = getattr(exc, "strerror", None) or _one_line(exc) or type(exc).__name__
    return RpcError("UNAVAILABLE", f"failed to connect: {what}" if connecting else what, sent=sent)


class Client:
    def __init__(self, scheme: str, host: str, port: int, ssl_context: ssl.SSLContext | None,
                 connect_timeout: float):
        self.host, self.port = host.strip("[]"), port
        self.tls = scheme == "https"
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []
        self._streams: set = set()
        self._closed = False

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        """A fresh connection (TLS handshake done); RpcError(sent=False) when that fails."""
        if self.tls:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=self.ssl_context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise _transport_error(exc, False, timeout, connecting=True) from None
        return conn

    def _take(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """A connection for one request, and whether it is a fresh one."""
        with self._lock:
            if self._closed:
                raise RpcError("CANCELLED", "client closed", sent=False)
            while self._idle:
                conn = self._idle.pop()
                # Readable while idle: the server closed it (or sent garbage). Never reuse it:
                # a request written there fails after it "left", which would make a write unsure.
                if conn.sock is not None and not _readable(conn.sock):
                    return conn, False
                conn.close()
        return self._connect(min(timeout, self.connect_timeout)), True

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def call(self, method: str, body: dict, timeout: float, token: str | None = None) -> dict:
        """POST ``/v3/<method>`` with ``body``; the answer as a dict (a stream's one ``result``)."""
        conn, fresh = self._take(timeout)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        sent = False
        try:
            conn.sock.settimeout(timeout)
            # A request that failed while being written never left whole: etcd acts on a whole
            # body only, so no member can have applied it (a member that died between the
            # pool's idle check and this send: "Broken pipe"). Only after it is written may a
            # lost answer hide an applied write.
            conn.request("POST", "/v3/" + method, json.dumps(body), headers)
            sent = True
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            err = _transport_error(exc, sent, timeout)
            if fresh and not self.tls and isinstance(exc, (http.client.RemoteDisconnected,
                                                            ConnectionResetError)):
                # a TLS-only etcd closes a plaintext connection without a word (a reset when
                # it closes before reading all of the request)
                err = RpcError(err.code(), err.details() + " (does the server want https?)")
            raise err from None
        if resp.status != 200:
            conn.close()
            raise _error_of(resp.status, data)
        self._give_back(conn)
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise RpcError("UNKNOWN", f"/v3/{method}: the answer is not a JSON object")
        return _message(doc)

    # -- the calls the store makes (``timeout`` seconds, ``token`` from ``authenticate``) ------
    def authenticate(self, name: str, password: str, timeout: float) -> str:
        return self.call("auth/authenticate", {"name": name, "password": password}, timeout)["token"]

    def range(self, key: bytes, timeout: float, token: str | None, *, range_end: bytes = b"",
              count_only: bool = False) -> RangeResponse:
        body = {"key": b64(key)}
        if range_end:
            body["range_end"] = b64(range_end)
        if count_only:
            body["count_only"] = True
        doc = self.call("kv/range", body, timeout, token)
        return RangeResponse([KeyValue.of(kv) for kv in doc.get("kvs", ())], _revision(doc))

    def put(self, key: bytes, value: bytes, timeout: float, token: str | None) -> int:
        return _revision(self.call("kv/put", {"key": b64(key), "value": b64(value)}, timeout, token))

    def txn(self, compare: list, success: list, timeout: float, token: str | None) -> TxnResponse:
        """``compare``: ``compare_*()`` dicts; ``success``: ``request_*()`` dicts."""
        doc = self.call("kv/txn", {"compare": compare, "success": success}, timeout, token)
        return TxnResponse(bool(doc.get("succeeded")), _revision(doc), doc.get("responses", []))

    def delete_range(self, key: bytes, timeout: float, token: str | None) -> list:
        """Deletes ``key``; the deleted key-values (empty when there was none)."""
        doc = self.call("kv/deleterange", {"key": b64(key), "prev_kv": True}, timeout, token)
        return [KeyValue.of(kv) for kv in doc.get("prev_kvs", ())]

    def lease_grant(self, ttl: int, timeout: float, token: str | None) -> tuple[int, int, str]:
        """(lease ID, granted TTL, error text from etcd or "")."""
        doc = self.call("lease/grant", {"TTL": ttl}, timeout, token)
        return int(doc.get("ID", 0)), int(doc.get("TTL", 0)), doc.get("error", "")

    def lease_revoke(self, lease_id: int, timeout: float, token: str | None) -> None:
        self.call("lease/revoke", {"ID": lease_id}, timeout, token)

    def lease_time_to_live(self, lease_id: int, timeout: float, token: str | None,
                           keys: bool = False) -> tuple[int, int]:
        """(remaining TTL, -1 for a lease that does not exist; number of keys attached)."""
        body = {"ID": lease_id, "keys": True} if keys else {"ID": lease_id}
        doc = self.call("lease/timetolive", body, timeout, token)
        return int(doc.get("TTL", 0)), len(doc.get("keys", ()))

    def lease_keep_alive(self, lease_id: int, timeout: float, token: str | None) -> int:
        """One keep-alive (not a stream): the lease's TTL now, 0 when it no longer exists."""
        return int(self.call("lease/keepalive", {"ID": lease_id}, timeout, token).get("TTL", 0))

    def watch(self, create: dict, token: str | None, metadata: dict, timeout: float) -> "WatchStream":
        return WatchStream(self, create, token, metadata, timeout)

    def interrupt_streams(self) -> None:
        """End every watch stream on this endpoint now (their readers see the stream end)."""
        with self._lock:
            streams = list(self._streams)
        for s in streams:
            s.interrupt()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        self.interrupt_streams()


class WatchStream:
    """``POST /v3/watch`` with one create request; the answer is a stream of JSON lines, read by
    ``responses()`` (blocking) until the stream ends or ``interrupt()`` is called."""

    def __init__(self, client: Client, create: dict, token: str | None, metadata: dict,
                 timeout: float):
        self._client = client
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        for name, value in metadata.items():
            headers["Grpc-Metadata-" + name] = value
        self._conn = client._connect(min(timeout, client.connect_timeout))
        sock = self._conn.sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for opt, value in (("TCP_KEEPIDLE", KEEPIDLE), ("TCP_KEEPINTVL", KEEPINTVL),
                               ("TCP_KEEPCNT", KEEPCNT)):
                if hasattr(socket, opt):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
            sock.settimeout(timeout)
            self._conn.request("POST", "/v3/watch", json.dumps({"create_request": create}), headers)
            self._resp = self._conn.getresponse()
            if self._resp.status != 200:
                raise _error_of(self._resp.status, self._resp.read())
            sock.settimeout(None)  # from here on the stream may stay silent for hours
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise _transport_error(exc, True, timeout) from None
        except RpcError:
            self._conn.close()
            raise
        self._sock = sock
        with client._lock:
            client._streams.add(self)

    def responses(self):
        """Each WatchResponse as it comes; RpcError when the stream ends, breaks or carries an
        error message."""
        while True:
            try:
                line = self._resp.readline()
            except (OSError, http.client.HTTPException) as exc:
                raise _transport_error(exc, True, 0) from None
            if not line:  # the member went away (or interrupt()): never a normal end
                raise RpcError("UNAVAILABLE", "watch stream ended")
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
            if not isinstance(doc, dict):
                raise RpcError("UNKNOWN", "watch: a line of the stream is not a JSON object")
            yield WatchResponse.of(_message(doc))

    def interrupt(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        with self._client._lock:
            self._client._streams.discard(self)
        self.interrupt()
        self._conn.close()
