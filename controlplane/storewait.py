"""weftd's start waits for the store, as flanneld does: opening it, reading the config, taking the
claim and acquiring the lease are retried while the store does not answer, until it answers or
weftd is told to stop. Configuration errors (``StoreError`` other than unavailability: bad flags,
a missing directory or TLS file) and a corrupt SQLite file (an operator must act) are not retried.

The log says it once and then once every ``WAIT_LOG_INTERVAL`` seconds, not once per retry:
"waiting for the store at URL: reason". Every failure also feeds the store's health (``weft_store_up``
0, ``weft_store_errors_total``), which /metrics shows from the start.
"""
from __future__ import annotations

import logging
import threading
import time

from . import flags
from .claim import WAIT_LOG_INTERVAL
from .config import NetworkConfig
from .manager import ConfigMissing, LeaseManager
from .store import StoreCorrupt, StoreUnavailable
from .store.monitor import MonitoredStore, StoreHealth

log = logging.getLogger("weft.daemon")

STORE_RETRY = 0.5  # seconds between attempts while waiting for the store at start
STOPPED = object()  # what a wait returns when weftd was told to stop first


class StoreWaiter:
    def __init__(self, health: StoreHealth, stop: threading.Event):
        self.url = health.url  # as given on the command line, for the log
        self.health = health
        self.stop = stop
        self.last_log: float | None = None

    def until(self, op: str, fn):
        """``fn()``, retried while the store is unavailable; ``STOPPED`` when told to stop first."""
        while not self.stop.is_set():
            try:
                result = fn()
            except StoreCorrupt:
                raise
            except StoreUnavailable as exc:
                self._unavailable(exc, op)
                self.stop.wait(STORE_RETRY)
                continue
            self.last_log = None
            return result
        return STOPPED

    def _unavailable(self, exc: Exception, op: str) -> None:
        self.health.failed(op, exc)
        now = time.monotonic()
        if self.last_log is None or now - self.last_log >= WAIT_LOG_INTERVAL:
            log.warning("waiting for the store at %s: %s", self.url, exc)
            self.last_log = now

    def open_store(self, args):
        """The store named by weftd's flags, monitored by ``health``; ``STOPPED``."""
        def open_once():
            store = flags.open_store_from_args(args)
            self.health.url = store.url or self.health.url
            self.health.answered("open")
            return MonitoredStore(store, self.health)
        return self.until("open", open_once)

    def config(self, manager: LeaseManager) -> NetworkConfig | None:
        """The network config, waiting while the store does not answer or holds none (logged
        once); None when told to stop first."""
        warned = False
        while not self.stop.is_set():
            try:
                got = self.until("get_config", manager.get_config)
                return None if got is STOPPED else got
            except ConfigMissing as exc:
                if not warned:
                    log.warning("%s; waiting", exc)
                    warned = True
                self.stop.wait(1.0)
        return None
