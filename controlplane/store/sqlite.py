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
import urllib.parse
from collections import Counter

from ..lease import NO_IPV4, lease_key_of_name, shown, subnet_key
from .base import (ForeignKey, LeaseExists, LeaseNotFound, LeaseRecord, Store, StoreError,
                   StoreEvent, StoreUnavailable, SubnetScan, Watch, WatchCompacted)
from .base import ClaimChanged, ClaimRecord, StoreCorrupt

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
_SUBNETS_END = "subnets0"  # the first key after every "subnets/..." ('0' follows '/')


def _clean(key, value, expires):
    """A row as the types weft writes. Another program may have written the file with other
    types (SQLite keeps what it is given): text as bytes, a TTL that is no number."""
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    elif value is not None and not isinstance(value, str):
        value = str(value)
    if not isinstance(expires, (int, float)) or isinstance(expires, bool):
        expires = None
    return str(key), value, expires


def _subnet_of(key: str):
    """(subnet, subnet6) of a lease key ``subnets/<ip>-<len>[&<ip6>-<len6>]``; None for any other
    key under subnets/."""
    return lease_key_of_name(key[len(_SUBNETS):])


def _v4_range(subnet) -> tuple[str, str]:
    """The keys ``subnets/<ip>-<len>&...`` (the dual-stack keys of one IPv4 subnet) lie in
    [start, end): '&' is followed by "'" in ASCII."""
    base = _SUBNETS + subnet_key(subnet)
    return base + "&", base + "'"
# Node claims (controlplane.claim) live in a table of their own: no revision, no event, no reaping,
# so lease watchers and the event history never see them.
_CLAIMS_SCHEMA = """CREATE TABLE IF NOT EXISTS claims (
    prefix TEXT NOT NULL, ip TEXT NOT NULL, value TEXT NOT NULL, expires REAL NOT NULL,
    generation INTEGER NOT NULL, PRIMARY KEY (prefix, ip))"""


CREATE_MODES = ("never", "file", "parents")


def _inode_of(path: str) -> int | None:
    """The file's inode (None: gone): a file moved aside or replaced has another."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _connect(path: str, must_exist: bool = False) -> sqlite3.Connection:
    if must_exist:  # SQLite's own check, so nothing is created even if the file goes meanwhile
        target, uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw", True
    else:
        target, uri = path, False
    conn = sqlite3.connect(target, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False, uri=uri)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


class SQLiteStore(Store):
    """``create`` says what opening may create: ``never`` (the file must exist: commands that
    only read, so a typo in the path is an error, not an empty store), ``file`` (the file, in a
    directory that exists) or ``parents`` (missing directories too: only the default path)."""

    def __init__(self, path: str, prefix: str = "/coreos.com/network", create: str = "file"):
        if create not in CREATE_MODES:
            raise ValueError(f"create={create!r}: one of {', '.join(CREATE_MODES)}")
        self.path = path
        self.prefix = prefix.rstrip("/")
        self.url = f"sqlite://{os.path.abspath(path)}"
        self._lock = threading.Lock()
        self._ops: Counter[str] = Counter()
        directory = os.path.dirname(os.path.abspath(path))
        if create == "never" and not os.path.exists(path):
            raise StoreError(f"store sqlite://{path}: no such file (nothing to read; check --store)")
        if create == "file" and not os.path.isdir(directory):
            raise StoreError(f"store sqlite://{path}: directory {directory} does not exist"
                             " (check --store)")
        self._create = create
        self._claims_ready = False
        self._conn: sqlite3.Connection | None = None
        self._inode = 0
        try:
            if create == "parents":
                os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"sqlite store {path}: {exc.strerror}") from None
        with self._lock:
            self._open()

    def _open(self) -> None:
        """(Re)connect and make sure the schema is there; the caller holds the lock."""
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        try:
            conn = _connect(self.path, must_exist=self._create == "never")
            try:
                # journal_mode needs a moment of exclusive access; racing openers retry via busy_timeout.
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
                self._inode = os.stat(self.path).st_ino
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        except OSError as exc:
            raise StoreUnavailable(f"sqlite store {self.path}: {exc.strerror}") from None
        self._conn = conn
        self._claims_ready = False

    def _error(self, exc: sqlite3.Error) -> StoreError:
        """A sqlite3 error as one line naming the file. The connection is reopened by the next
        operation: a file replaced, restored or repaired meanwhile is then read afresh."""
        self._broken = True
        text = str(exc)
        if not isinstance(exc, sqlite3.OperationalError) and isinstance(exc, sqlite3.DatabaseError) \
                and ("not a database" in text or "malformed" in text):
            return StoreCorrupt(f"store file {os.path.abspath(self.path)} is not a weft SQLite database"
                                f" (corrupt?): move it aside and restart weftd; leases will be"
                                f" re-acquired (sqlite: {text})")
        if isinstance(exc, sqlite3.DatabaseError):  # read-only, disk full, I/O error, locked
            return StoreUnavailable(f"sqlite store {self.path}: {text}")
        return StoreError(f"sqlite store {self.path}: {text}")

    _broken = False

    def _ready_conn(self, write: bool) -> sqlite3.Connection:
        """The connection, reopened after an error or when the file was replaced; the caller holds
        the lock. A write into a file that is no longer writable is refused here, as SQLite refuses
        it to every connection opened since (this one's open descriptor would still write)."""
        inode = _inode_of(self.path)
        if self._broken or self._conn is None or inode != self._inode:
            self._broken = True
            self._open()
            self._broken = False
        if write and not os.access(self.path, os.W_OK):
            raise StoreUnavailable(f"sqlite store {self.path}: attempt to write a readonly database"
                                   " (the file is not writable)")
        return self._conn

    # -- transactions --------------------------------------------------------------------
    def _write(self, fn, op: str):
        """Run ``fn(conn)`` in one IMMEDIATE transaction; expired keys are reaped first."""
        with self._lock:
            self._ops[op] += 1
            try:
                conn = self._ready_conn(write=True)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._reap(conn)
                    result = fn(conn)
                    conn.execute("COMMIT")
                    return result
                except BaseException:
                    try:  # SQLite may have rolled back already (disk full): keep the first error
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def _read(self, fn, op: str):
        with self._lock:
            self._ops[op] += 1
            try:
                conn = self._ready_conn(write=False)
                conn.execute("BEGIN")
                try:
                    return fn(conn)
                finally:
                    try:
                        conn.execute("COMMIT")
                    except sqlite3.Error:
                        pass
            except sqlite3.Error as exc:
                raise self._error(exc) from None

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
        due = self._read(lambda c: c.execute("SELECT 1 FROM kv WHERE expires IS NOT NULL AND"
                                             " expires <= ? LIMIT 1", (now,)).fetchone(), op="reap_check")
        if due:
            self._write(lambda c: None, op="reap")

    # -- the Store interface --------------------------------------------------------------
    def get_config(self) -> str | None:
        row = self._read(lambda c: c.execute(
            "SELECT value FROM kv WHERE prefix = ? AND key = 'config'", (self.prefix,)).fetchone(),
            op="get_config")
        return _clean("config", row[0], None)[1] if row else None

    def put_config(self, text: str) -> None:
        def put(conn):
            rev = self._event(conn, self.prefix, "config", "put", text)
            conn.execute("INSERT OR REPLACE INTO kv VALUES (?, 'config', ?, NULL, ?)",
                         (self.prefix, text, rev))
        self._write(put, op="put_config")

    def scan_subnets(self) -> SubnetScan:
        now = time.time()

        def list_all(conn):
            rev = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
            # A range, not LIKE: LIKE ignores case, and SUBNETS/... is not flannel's key.
            rows = conn.execute(
                "SELECT key, value, expires, revision FROM kv WHERE prefix = ? AND key >= ?"
                " AND key < ? AND (expires IS NULL OR expires > ?) ORDER BY key",
                (self.prefix, _SUBNETS, _SUBNETS_END, now)).fetchall()
            return rows, rev
        rows, rev = self._read(list_all, op="list")
        records, foreign = [], []
        for key, value, expires, revision in rows:
            key, value, expires = _clean(key, value, expires)
            pair = _subnet_of(key)
            if pair is None:
                foreign.append(ForeignKey(key[len(_SUBNETS):], revision))
            else:
                records.append(LeaseRecord(pair[0], value, expires, revision, pair[1]))
        return SubnetScan(records, foreign, rev)

    def get_lease(self, subnet, subnet6=None) -> LeaseRecord | None:
        key = _SUBNETS + subnet_key(subnet, subnet6)
        row = self._read(lambda c: c.execute(
            "SELECT value, expires, revision FROM kv WHERE prefix = ? AND key = ?"
            " AND (expires IS NULL OR expires > ?)", (self.prefix, key, time.time())).fetchone(),
            op="get")
        if not row:
            return None
        _, value, expires = _clean(key, row[0], row[1])
        return LeaseRecord(subnet, value, expires, row[2], subnet6)

    def _put(self, subnet, value: str, ttl, must_exist: bool, subnet6=None) -> LeaseRecord:
        key = _SUBNETS + subnet_key(subnet, subnet6)
        start, end = _v4_range(subnet)
        name = subnet_key(subnet, subnet6)

        def put(conn):
            exists = conn.execute("SELECT 1 FROM kv WHERE prefix = ? AND key = ?",
                                  (self.prefix, key)).fetchone()
            if must_exist and not exists:
                raise LeaseNotFound(f"lease {name} does not exist")
            # A lease is its identity (``LeaseRecord.ident``): its IPv4 subnet, so a key of the
            # same IPv4 subnet with or without another IPv6 part holds it too; an IPv6-only
            # lease's is its IPv6 subnet, which only its own key (0.0.0.0-0&<ip6>-<len6>) names.
            if not must_exist and (exists or subnet != NO_IPV4 and conn.execute(
                    "SELECT 1 FROM kv WHERE prefix = ? AND ((key >= ? AND key < ?) OR key = ?)",
                    (self.prefix, start, end, _SUBNETS + subnet_key(subnet))).fetchone()):
                raise LeaseExists(f"lease {shown(subnet, subnet6)} is taken")
            expires = None if ttl is None else time.time() + ttl
            rev = self._event(conn, self.prefix, key, "put", value, expires)
            conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?)",
                         (self.prefix, key, value, expires, rev))
            return LeaseRecord(subnet, value, expires, rev, subnet6)
        return self._write(put, op="update" if must_exist else "create")

    def create_lease(self, subnet, value, ttl, subnet6=None) -> LeaseRecord:
        return self._put(subnet, value, ttl, must_exist=False, subnet6=subnet6)

    def update_lease(self, subnet, value, ttl, subnet6=None) -> LeaseRecord:
        return self._put(subnet, value, ttl, must_exist=True, subnet6=subnet6)

    def delete_lease(self, subnet, subnet6=None) -> bool:
        key = _SUBNETS + subnet_key(subnet, subnet6)

        def delete(conn):
            if conn.execute("DELETE FROM kv WHERE prefix = ? AND key = ?", (self.prefix, key)).rowcount:
                self._event(conn, self.prefix, key, "delete")
                return True
            return False
        return self._write(delete, op="delete")

    def watch(self, since_revision: int) -> Watch:
        return _SQLiteWatch(self, since_revision)

    # -- node claims: a table of their own, outside kv and its events (no watcher sees them) --
    def _claims(self) -> None:
        """Create the claims table on first use (a read first: daemons starting at once need
        not queue for the write lock just to find it there)."""
        if self._claims_ready:
            return
        if not self._read(lambda c: c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                                              " AND name = 'claims'").fetchone(), op="init_claims"):
            self._write(lambda c: c.execute(_CLAIMS_SCHEMA) and None, op="init_claims")
        self._claims_ready = True

    def get_claim(self, public_ip: str) -> ClaimRecord | None:
        self._claims()
        row = self._read(lambda c: c.execute(
            "SELECT value, expires, generation FROM claims WHERE prefix = ? AND ip = ?"
            " AND expires > ?", (self.prefix, public_ip, time.time())).fetchone(), op="get_claim")
        return ClaimRecord(public_ip, row[0], row[1], row[2]) if row else None

    def _claim_row(self, conn, public_ip: str):
        return conn.execute("SELECT value, expires, generation FROM claims WHERE prefix = ? AND ip = ?",
                            (self.prefix, public_ip)).fetchone()

    def _put_claim(self, conn, public_ip: str, value: str, ttl: float, row) -> ClaimRecord:
        # The generation only ever grows per row; with the value (a random instance id inside)
        # it tells one holder's claim from the next, even after a delete and a re-create.
        generation = row[2] + 1 if row else 1
        expires = time.time() + ttl
        conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                     (self.prefix, public_ip, value, expires, generation))
        return ClaimRecord(public_ip, value, expires, generation)

    def take_claim(self, public_ip, value, ttl, expected) -> ClaimRecord:
        self._claims()

        def take(conn):
            row = self._claim_row(conn, public_ip)
            if expected is None:
                if row and row[1] > time.time():
                    raise ClaimChanged(f"public IP {public_ip} is claimed")
            elif not row or (row[0], row[2]) != (expected.value, expected.revision):
                raise ClaimChanged(f"the claim of public IP {public_ip} changed")
            return self._put_claim(conn, public_ip, value, ttl, row)
        return self._write(take, op="take_claim")

    def refresh_claim(self, public_ip, record, ttl) -> ClaimRecord:
        self._claims()

        def refresh(conn):
            row = self._claim_row(conn, public_ip)
            if not row or (row[0], row[2]) != (record.value, record.revision):
                raise ClaimChanged(f"the claim of public IP {public_ip} was taken or released")
            if row[1] <= time.time():
                raise ClaimChanged(f"the claim of public IP {public_ip} expired")
            return self._put_claim(conn, public_ip, record.value, ttl, row)
        return self._write(refresh, op="refresh_claim")

    def release_claim(self, public_ip, record) -> bool:
        self._claims()
        return self._write(lambda c: c.execute(
            "DELETE FROM claims WHERE prefix = ? AND ip = ? AND value = ? AND generation = ?",
            (self.prefix, public_ip, record.value, record.revision)).rowcount > 0, op="release_claim")

    def stats(self) -> dict[str, float]:
        with self._lock:
            return dict(self._ops)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


class _SQLiteWatch(Watch):
    def __init__(self, store: SQLiteStore, since: int):
        self._store = store
        self._since = since
        self._closed = False
        self._inode = _inode_of(store.path)
        try:
            self._conn = _connect(store.path)
        except sqlite3.Error as exc:
            raise store._error(exc) from None

    def _poll(self) -> list[StoreEvent]:
        conn = self._conn
        conn.execute("BEGIN")
        try:
            if _inode_of(self._store.path) != self._inode:
                raise StoreUnavailable(f"sqlite store {self._store.path}: the file was replaced")
            compacted = conn.execute("SELECT value FROM meta WHERE name = 'compacted'").fetchone()[0]
            revision = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
            if revision < self._since:  # an older file (restored from a backup): history differs
                raise WatchCompacted(f"revision {self._since} is past the store's {revision}"
                                     " (file restored from an older copy?)")
            if self._since < compacted:
                raise WatchCompacted(f"revision {self._since} is compacted (oldest kept {compacted + 1})")
            rows = conn.execute(
                "SELECT revision, key, kind, value, expires, expired FROM events"
                " WHERE revision > ? AND prefix = ? ORDER BY revision LIMIT 1000",
                (self._since, self._store.prefix)).fetchall()
        finally:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error:
                pass
        events = []
        for rev, key, kind, value, expires, expired in rows:
            self._since = rev
            key, value, expires = _clean(key, value, expires)
            text = value if kind == "put" else None
            if key == "config":
                events.append(StoreEvent("config", None, rev, value=text))
                continue
            if not key.startswith(_SUBNETS):
                continue
            pair = _subnet_of(key)
            if pair is None:
                events.append(StoreEvent("foreign", None, rev, name=key[len(_SUBNETS):], value=text))
                continue
            subnet, subnet6 = pair
            record = LeaseRecord(subnet, value, expires, rev, subnet6) if kind == "put" else None
            events.append(StoreEvent(kind, subnet, rev, record, bool(expired), subnet6=subnet6))
        if not rows:
            # Nothing new: move past other prefixes' revisions, and turn due expiries into events.
            self._store.reap_expired()
        return events

    def get(self, timeout: float) -> list[StoreEvent]:
        deadline = time.monotonic() + timeout
        while not self._closed:
            try:
                events = self._poll()
            except sqlite3.Error as exc:
                raise self._store._error(exc) from None
            if events:
                return events
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            time.sleep(min(POLL_INTERVAL, left))
        return []

    def close(self) -> None:
        self._closed = True
        try:
            self._conn.close()
        except sqlite3.Error:
            pass
