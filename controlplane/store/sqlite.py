"""The embedded store: one SQLite file shared by every daemon on a machine.

Design notes
- Several weftd processes (one per network namespace) open the same file. WAL mode lets readers
  run beside one writer; every write is a ``BEGIN IMMEDIATE`` transaction, so writers serialise on
  the file lock and no update is lost. ``busy_timeout`` makes a writer wait rather than fail.
- Like etcd, one store-wide revision numbers every change, and an ``events`` table keeps the
  recent history: a watcher polls ``events`` after the revision it has seen. Old events are
  compacted away; a watcher that fell behind them gets ``WatchCompacted`` and re-lists.
- TTLs are enforced on read (an expired key is invisible at once) and reaped by the next writer
  or watcher, which records the removal as an event marked ``expired``.
- Keys mirror etcd's layout under a prefix (``-etcd-prefix``), so one file can hold several
  networks, as one etcd can.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import Counter

from ..lease import LeaseFormatError, parse_subnet_key, subnet_key
from .base import (LeaseExists, LeaseNotFound, LeaseRecord, Store, StoreError, StoreEvent,
                   StoreUnavailable, Watch, WatchCompacted)

HISTORY_KEEP = 20000  # events kept for watchers that fall behind
COMPACT_EVERY = 2000  # revisions between compactions
POLL_INTERVAL = 0.05  # seconds between a watcher's polls
BUSY_TIMEOUT_MS = 15000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (
    prefix TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    expires REAL, revision INTEGER NOT NULL, PRIMARY KEY (prefix, key));
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY, prefix TEXT NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL,
    value TEXT, expires REAL, expired INTEGER NOT NULL DEFAULT 0);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compacted', 0);
"""

_SUBNETS = "subnets/"


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


class SQLiteStore(Store):
    def __init__(self, path: str, prefix: str = "/coreos.com/network"):
        self.path = path
        self.prefix = prefix.rstrip("/")
        self.url = f"sqlite://{os.path.abspath(path)}"
        self._lock = threading.Lock()
        self._ops: Counter[str] = Counter()
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
            self._conn = _connect(path)
            # journal_mode needs a moment of exclusive access; racing openers retry via busy_timeout.
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._write(lambda c: c.executescript(_SCHEMA) and None, op="init", script=True)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"sqlite store {path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"sqlite store {path}: {exc.strerror}") from None

    # -- transactions --------------------------------------------------------------------
    def _write(self, fn, op: str, script: bool = False):
        """Run ``fn(conn)`` in one IMMEDIATE transaction; expired keys are reaped first."""
        with self._lock:
            self._ops[op] += 1
            try:
                if script:  # executescript commits on its own
                    return fn(self._conn)
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._reap(self._conn)
                    result = fn(self._conn)
                    self._conn.execute("COMMIT")
                    return result
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"sqlite store {self.path}: {exc}") from None
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from None

    def _read(self, fn, op: str):
        with self._lock:
            self._ops[op] += 1
            try:
                self._conn.execute("BEGIN")
                try:
                    return fn(self._conn)
                finally:
                    self._conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"sqlite store {self.path}: {exc}") from None
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from None

    @staticmethod
    def _next_revision(conn: sqlite3.Connection) -> int:
        conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        rev = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
        if rev % COMPACT_EVERY == 0 and rev > HISTORY_KEEP:
            cut = rev - HISTORY_KEEP
            conn.execute("DELETE FROM events WHERE revision <= ?", (cut,))
            conn.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (cut,))
        return rev

    def _event(self, conn, prefix, key, kind, value=None, expires=None, expired=False) -> int:
        rev = self._next_revision(conn)
        conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (rev, prefix, key, kind, value, expires, int(expired)))
        return rev

    def _reap(self, conn: sqlite3.Connection) -> None:
        now = time.time()
        rows = conn.execute("SELECT prefix, key FROM kv WHERE expires IS NOT NULL AND expires <= ?"
                            " ORDER BY expires", (now,)).fetchall()
        for prefix, key in rows:
            conn.execute("DELETE FROM kv WHERE prefix = ? AND key = ?", (prefix, key))
            self._event(conn, prefix, key, "delete", expired=True)

    def reap_expired(self) -> None:
        """Turn expired keys into delete events now (readers already ignore them)."""
        now = time.time()
        with self._lock:
            due = self._conn.execute("SELECT 1 FROM kv WHERE expires IS NOT NULL AND expires <= ?"
                                     " LIMIT 1", (now,)).fetchone()
        if due:
            self._write(lambda c: None, op="reap")

    # -- the Store interface --------------------------------------------------------------
    def _record(self, key: str, value: str, expires, revision) -> LeaseRecord:
        return LeaseRecord(parse_subnet_key(key), value, expires, revision)

    def get_config(self) -> str | None:
        row = self._read(lambda c: c.execute(
            "SELECT value FROM kv WHERE prefix = ? AND key = 'config'", (self.prefix,)).fetchone(),
            op="get_config")
        return row[0] if row else None

    def put_config(self, text: str) -> None:
        def put(conn):
            rev = self._event(conn, self.prefix, "config", "put", text)
            conn.execute("INSERT OR REPLACE INTO kv VALUES (?, 'config', ?, NULL, ?)",
                         (self.prefix, text, rev))
        self._write(put, op="put_config")

    def list_leases(self) -> tuple[list[LeaseRecord], int]:
        now = time.time()

        def list_all(conn):
            rev = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
            rows = conn.execute(
                "SELECT key, value, expires, revision FROM kv WHERE prefix = ? AND key LIKE ?"
                " AND (expires IS NULL OR expires > ?) ORDER BY key",
                (self.prefix, _SUBNETS + "%", now)).fetchall()
            return rows, rev
        rows, rev = self._read(list_all, op="list")
        records = []
        for key, value, expires, revision in rows:
            try:
                records.append(self._record(key, value, expires, revision))
            except LeaseFormatError:
                continue  # a key someone else wrote under subnets/ that is not a subnet
        return records, rev

    def get_lease(self, subnet) -> LeaseRecord | None:
        key = _SUBNETS + subnet_key(subnet)
        row = self._read(lambda c: c.execute(
            "SELECT value, expires, revision FROM kv WHERE prefix = ? AND key = ?"
            " AND (expires IS NULL OR expires > ?)", (self.prefix, key, time.time())).fetchone(),
            op="get")
        return LeaseRecord(subnet, row[0], row[1], row[2]) if row else None

    def _put(self, subnet, value: str, ttl, must_exist: bool) -> LeaseRecord:
        key = _SUBNETS + subnet_key(subnet)

        def put(conn):
            exists = conn.execute("SELECT 1 FROM kv WHERE prefix = ? AND key = ?",
                                  (self.prefix, key)).fetchone()
            if must_exist and not exists:
                raise LeaseNotFound(f"lease {subnet} does not exist")
            if not must_exist and exists:
                raise LeaseExists(f"lease {subnet} is taken")
            expires = None if ttl is None else time.time() + ttl
            rev = self._event(conn, self.prefix, key, "put", value, expires)
            conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?)",
                         (self.prefix, key, value, expires, rev))
            return LeaseRecord(subnet, value, expires, rev)
        return self._write(put, op="update" if must_exist else "create")

    def create_lease(self, subnet, value, ttl) -> LeaseRecord:
        return self._put(subnet, value, ttl, must_exist=False)

    def update_lease(self, subnet, value, ttl) -> LeaseRecord:
        return self._put(subnet, value, ttl, must_exist=True)

    def delete_lease(self, subnet) -> bool:
        key = _SUBNETS + subnet_key(subnet)

        def delete(conn):
            if conn.execute("DELETE FROM kv WHERE prefix = ? AND key = ?", (self.prefix, key)).rowcount:
                self._event(conn, self.prefix, key, "delete")
                return True
            return False
        return self._write(delete, op="delete")

    def watch(self, since_revision: int) -> Watch:
        return _SQLiteWatch(self, since_revision)

    def stats(self) -> dict[str, float]:
        with self._lock:
            return dict(self._ops)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _SQLiteWatch(Watch):
    def __init__(self, store: SQLiteStore, since: int):
        self._store = store
        self._since = since
        self._conn = _connect(store.path)
        self._closed = False

    def _poll(self) -> list[StoreEvent]:
        conn = self._conn
        conn.execute("BEGIN")
        try:
            compacted = conn.execute("SELECT value FROM meta WHERE name = 'compacted'").fetchone()[0]
            if self._since < compacted:
                raise WatchCompacted(f"revision {self._since} is compacted (oldest kept {compacted + 1})")
            rows = conn.execute(
                "SELECT revision, key, kind, value, expires, expired FROM events"
                " WHERE revision > ? AND prefix = ? ORDER BY revision LIMIT 1000",
                (self._since, self._store.prefix)).fetchall()
        finally:
            conn.execute("COMMIT")
        events = []
        for rev, key, kind, value, expires, expired in rows:
            self._since = rev
            if not key.startswith(_SUBNETS):
                continue
            try:
                subnet = parse_subnet_key(key)
            except LeaseFormatError:
                continue
            record = LeaseRecord(subnet, value, expires, rev) if kind == "put" else None
            events.append(StoreEvent(kind, subnet, rev, record, bool(expired)))
        if not rows:
            # Nothing new: move past other prefixes' revisions, and turn due expiries into events.
            self._store.reap_expired()
        return events

    def get(self, timeout: float) -> list[StoreEvent]:
        deadline = time.monotonic() + timeout
        while not self._closed:
            try:
                events = self._poll()
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"sqlite store {self._store.path}: {exc}") from None
            if events:
                return events
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            time.sleep(min(POLL_INTERVAL, left))
        return []

    def close(self) -> None:
        self._closed = True
        self._conn.close()
