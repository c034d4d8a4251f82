"""The store contract on the embedded SQLite store, plus what only a shared file can do."""
from __future__ import annotations

import sqlite3

import pytest

from controlplane.store import StoreError, open_store
from controlplane.store.sqlite import SQLiteStore

from .store_contract import StoreContract


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def make_store(self, tmp_path):
        path = tmp_path / "weft.db"
        return lambda prefix: SQLiteStore(str(path), prefix=prefix)

    @pytest.fixture
    def write_raw(self):
        def write(store, key, value):
            """The store's tables written with a connection of its own, as another program would."""
            conn = sqlite3.connect(store.path, timeout=15, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
                rev = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
                conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, NULL, 0)",
                             (rev, store.prefix, key, "put" if value is not None else "delete", value))
                if value is None:
                    conn.execute("DELETE FROM kv WHERE prefix = ? AND key = ?", (store.prefix, key))
                else:
                    conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, NULL, ?)",
                                 (store.prefix, key, value, rev))
                conn.execute("COMMIT")
            finally:
                conn.close()
        return write

    @pytest.fixture
    def compact_store(self):
        def compact(store):
            with sqlite3.connect(store.path) as conn:
                rev = conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
                conn.execute("DELETE FROM events WHERE revision <= ?", (rev,))
                conn.execute("UPDATE meta SET value=? WHERE name='compacted'", (rev,))
        return compact


def test_open_store_urls(tmp_path):
    s = open_store(f"sqlite://{tmp_path}/x.db")
    assert isinstance(s, SQLiteStore)
    s.close()
    with pytest.raises(StoreError, match="unknown store"):
        open_store("mysql://x")
    with pytest.raises(StoreError, match="no file path"):
        open_store("sqlite://")


def test_not_a_database_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError) as exc:
        SQLiteStore(str(bad))
    assert "bad.db" in str(exc.value) and "\n" not in str(exc.value)
