"""Stores by name. ``open_store`` turns a ``--store`` URL (or flanneld's etcd flags) into a Store.

- ``sqlite:///var/lib/weft/weft.db``: the embedded default, one file shared by every daemon here.
- ``etcd``: etcd v3 at ``-etcd-endpoints`` (flanneld's flags: TLS files, username, password).
- ``etcd://host:port[,host:port...]``: the same, endpoints given in the URL.

Implementations are imported lazily, so the SQLite path never needs the etcd client.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from .base import (ForeignKey, LeaseExists, LeaseNotFound, LeaseRecord, Store, StoreError,
                   StoreCorrupt, StoreEvent, StoreUnavailable, SubnetScan, Watch, WatchCompacted)

DEFAULT_PREFIX = "/coreos.com/network"
DEFAULT_ETCD_ENDPOINTS = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
DEFAULT_SQLITE_URL = "sqlite:///var/lib/weft/weft.db"

STORES = {
    "sqlite": "controlplane.store.sqlite:SQLiteStore",
    "etcd": "controlplane.store.etcd:EtcdStore",
}


@dataclass
class EtcdOptions:
    endpoints: list[str] = field(default_factory=lambda: list(DEFAULT_ETCD_ENDPOINTS))
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""
    username: str = ""
    password: str = ""


def _load(name: str):
    module, _, cls = STORES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def open_store(url: str, prefix: str = DEFAULT_PREFIX, etcd: EtcdOptions | None = None,
               create: str = "file") -> Store:
    """Open the store named by ``url``; raises StoreError with one line on a bad URL.

    ``create`` (SQLite): ``never`` (the file must exist), ``file`` (it may be created in a
    directory that exists) or ``parents`` (missing directories may be created too)."""
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path:
            raise StoreError(f"--store {url!r}: no file path (use sqlite:///absolute/path)")
        return _load("sqlite")(path, prefix=prefix, create=create)
    if url == "etcd" or url.startswith("etcd://"):
        opts = etcd or EtcdOptions()
        if url.startswith("etcd://"):
            hosts = [h for h in url[len("etcd://"):].split(",") if h]
            if not hosts:
                raise StoreError(f"--store {url!r}: no endpoints")
            scheme = "https" if opts.cafile or opts.certfile else "http"
            opts = EtcdOptions([f"{scheme}://{h}" for h in hosts], opts.cafile, opts.certfile,
                               opts.keyfile, opts.username, opts.password)
        return _load("etcd")(opts, prefix=prefix)
    raise StoreError(f"--store {url!r}: unknown store (use sqlite:///PATH, etcd or etcd://HOST:PORT)")


__all__ = ["open_store", "EtcdOptions", "Store", "StoreError", "StoreUnavailable", "StoreCorrupt", "LeaseExists",
           "LeaseNotFound", "LeaseRecord", "StoreEvent", "ForeignKey", "SubnetScan", "Watch",
           "WatchCompacted", "STORES",
           "DEFAULT_PREFIX", "DEFAULT_SQLITE_URL", "DEFAULT_ETCD_ENDPOINTS"]
