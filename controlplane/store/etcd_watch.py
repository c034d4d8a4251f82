"""The etcd store's watch: one etcd watch stream at a time on ``<prefix>/config`` through
``<prefix>/subnets/``, read by a thread, turned into ``StoreEvent``s.

What the watch needs from its store (``EtcdStore`` provides exactly this, and nothing else of the
store is used here):
- ``connection(until=None)``: the store's current connection (a ``Conn``), connecting or failing
  over to the next endpoint that answers; ``StoreError`` when none does (with ``until``: when
  none did, round after round, until then).
- ``hold(conn)`` / ``release(conn)``: the watch uses ``conn``; the store keeps a connection it
  dropped open until no watch holds it.
- ``stream_error(conn, exc)``: the ``StoreError`` for an ``RpcError`` of a stream on ``conn``; the
  store drops the connection when it is unavailable and renews an invalid auth token.
- ``renew_token(conn)``: re-authenticate (best effort), after a watch canceled for its token.
- ``watch_range()``: the (key, range end) to watch.
- ``event_of(event, cache)``: a raw etcd event as a ``StoreEvent`` (None: not a key weft
  follows); ``cache`` lives for one ``get`` (lease TTLs).
- ``count(op)``, ``endpoints``, ``prefix``, ``op_timeout``.

When the member under the stream dies, the watch fails over to the next endpoint, from the last
revision it *received* (events not yet returned included): a watch is a read, so nothing is
missed and nothing is applied twice. Like the store's reads it asks the endpoints again, round
after round, for up to ``op_timeout`` from the first failure: a cluster whose leader died answers
nothing (and refuses a watch: no leader) until the others have elected one. Only once that time
has passed without an answer (or with one endpoint) does ``get`` raise StoreUnavailable, and the
caller re-creates the watch. Opening a watch waits the same way.
"""
from __future__ import annotations

import collections
import queue
import threading
import time

from .etcd_http import RpcError, b64
from .base import StoreError, StoreEvent, StoreUnavailable, Watch, WatchCompacted


_REOPEN_PAUSE = 0.1  # seconds between watches that end before answering (an election)


def _one_line(text) -> str:
    return " ".join(str(text).split())


class _Stream:
    """One watch stream (``/v3/watch``) on one connection. Its thread puts ``(self, response or
    error)`` on the watch's queue, so the answers of a stream the watch has left behind are told
    apart. The stream never ends by itself: a member going away is an RpcError."""

    def __init__(self, conn, create: dict, out: queue.Queue, name: str, timeout: float):
        self.conn = conn
        self._stop = threading.Event()
        # hasleader: etcd ends the stream when the member loses its leader (flanneld's
        # WithRequireLeader), instead of leaving a silent watch on a partitioned member.
        self.call = conn.client.watch(create, conn.token, {"hasleader": "true"}, timeout)
        self._thread = threading.Thread(target=self._run, args=(out,), daemon=True, name=name)
        self._thread.start()

    def _run(self, out: queue.Queue) -> None:
        try:
            for resp in self.call.responses():
                out.put((self, resp))
                if resp.canceled or resp.compact_revision:
                    return
        except RpcError as exc:
            if not self._stop.is_set():
                out.put((self, exc))
        except Exception as exc:  # never let the reader die silently
            if not self._stop.is_set():
                out.put((self, StoreError(f"etcd {self.conn.endpoint}: watch: {_one_line(exc)}")))

    def close(self) -> None:
        self._stop.set()
        self.call.close()
        self._thread.join(timeout=2)


class EtcdWatch(Watch):
    def __init__(self, store, since: int):
        self._store = store
        self._since = since  # the last revision returned by get()
        self._received = since  # the last revision received (events still in the backlog too)
        self._queue: queue.Queue = queue.Queue()
        self._backlog: collections.deque = collections.deque()  # raw events / terminal errors
        self._closed = False
        self._failing_since: float | None = None  # the first failure since the last answer
        self._stream = self._open()

    @property
    def endpoint(self) -> str:
        """The endpoint the watch reads from now."""
        return self._stream.conn.endpoint

    def _open(self, until: float | None = None, failing: bool = False) -> _Stream:
        """A stream from the first endpoint that answers, from the last revision received. With
        more than one endpoint, unavailable ones are asked again until ``until`` (default: the
        op timeout from now); ``failing``: the current member is known to be gone."""
        store = self._store
        key, end = store.watch_range()
        create = {"key": b64(key), "range_end": b64(end), "start_revision": self._received + 1}
        if len(store.endpoints) == 1:
            until = None
        elif until is None:
            until = time.monotonic() + store.op_timeout
        while True:
            try:  # failing over (counted by the store), round after round until ``until``
                conn = store.connection(until if failing else None)
            except StoreUnavailable:
                if failing or until is None:
                    raise
                failing = True
                continue
            try:
                stream = _Stream(conn, create, self._queue, f"etcd-watch-{store.prefix}",
                                 store.op_timeout)
            except RpcError as exc:
                err = store.stream_error(conn, exc)  # drops an unavailable member's connection
                if until is None or not isinstance(err, StoreUnavailable) or time.monotonic() >= until:
                    raise err from None
                failing = True
                continue
            store.hold(conn)
            return stream

    def _fail_over(self) -> bool:
        """The stream's member is unavailable: go on from the next endpoint that answers. False
        when that is not possible (one endpoint, or none answered for ``op_timeout`` since the
        first failure after the last answer)."""
        store = self._store
        if len(store.endpoints) == 1:
            return False
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        else:
            time.sleep(_REOPEN_PAUSE)  # a stream ended again before any answer: no tight loop
        until = self._failing_since + store.op_timeout
        if time.monotonic() >= until:
            return False
        old = self._stream
        try:
            self._stream = self._open(until, failing=True)
        except StoreError:
            return False
        old.close()
        store.release(old.conn)
        return True

    def _take(self, entry) -> None:
        """Queue entry -> backlog entries (single events or a terminal error)."""
        stream, item = entry
        if stream is not self._stream:
            return  # a stream this watch has left behind
        store = self._store
        conn = stream.conn
        if isinstance(item, RpcError):
            err = store.stream_error(conn, item)
            if not (isinstance(err, StoreUnavailable) and self._fail_over()):
                self._backlog.append(err)
        elif isinstance(item, Exception):
            self._backlog.append(item)
        elif item.compact_revision:
            self._backlog.append(WatchCompacted(
                f"etcd {conn.endpoint}: revision {self._received} is compacted (oldest kept"
                f" {item.compact_revision})"))
        else:
            self._failing_since = None
            self._backlog.extend(item.events)
            for ev in item.events:
                self._received = max(self._received, ev.kv.mod_revision)
            if item.canceled:
                reason = _one_line(item.cancel_reason) or "canceled by the server"
                msg = f"etcd {conn.endpoint}: watch: {reason}"
                if conn.auth and "invalid auth token" in reason:
                    store.renew_token(conn)  # the caller re-creates the watch with a fresh token
                    self._backlog.append(StoreUnavailable(msg))
                else:
                    self._backlog.append(StoreError(msg))

    def get(self, timeout: float) -> list[StoreEvent]:
        deadline = time.monotonic() + max(0.0, timeout)
        events: list[StoreEvent] = []
        cache: dict = {}
        while not self._closed:
            while True:  # move whatever has arrived into the backlog
                try:
                    self._take(self._queue.get_nowait())
                except queue.Empty:
                    break
            while self._backlog:
                head = self._backlog[0]
                if isinstance(head, Exception):
                    if events:
                        return events  # the error comes on the next call
                    raise type(head)(str(head))  # the watch stays failed; a fresh traceback each time
                try:
                    event = self._store.event_of(head, cache)
                except StoreError:
                    if events:
                        return events
                    raise  # the event stays in the backlog
                self._backlog.popleft()
                self._since = max(self._since, head.kv.mod_revision)
                if event is not None:
                    events.append(event)
            if events:
                return events
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            try:
                self._take(self._queue.get(timeout=left))
            except queue.Empty:
                return []
        return []

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stream.close()
        self._store.release(self._stream.conn)
