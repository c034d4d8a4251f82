"""/healthz, /readyz and /metrics for weftd.

/healthz is 200 while the process serves and its threads run (the lease watch, the claim
refresh), 503 naming a thread that died. /readyz is 200 once the lease is held, the backend is set
up and subnet.env is written (flanneld's meaning), and stays 200 through a store outage for as
long as the lease has not expired (pod traffic does not need the store); it is 503 before that,
once the lease expired unrenewed, or when the lease watch stopped. A store outage shows on
/metrics: ``weft_store_up`` 0, ``weft_store_down_since_timestamp_seconds``,
``weft_store_errors_total{op}``. /metrics is Prometheus text, collected at scrape time from the
daemon's status snapshot (``Daemon.status()``, ``controlplane.status``): nothing is counted per
packet in Python.
"""
from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .status import WATCH_EVENT_KINDS, DaemonStatus

_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


class DaemonCollector:
    """Prometheus families from one ``DaemonStatus`` per scrape (``status()`` takes it). Counts
    that only grow are counters (prometheus_client names them ``..._total``); levels, states
    and timestamps are gauges. The backend's stats are labelled ``backend``: the levels it
    declares (``Backend.GAUGES``: peers_programmed, engine_pid ...) are gauges
    ``weft_backend_<name>``, every other stat a counter ``weft_backend_<name>_total``."""

    def __init__(self, status):
        self.status = status

    def describe(self):
        return []  # collect() reads live state; nothing to describe before the daemon runs

    def collect(self):
        st: DaemonStatus = self.status()
        yield _gauge("weft_ready", "1 once lease, backend and subnet.env are in place", st.set_up)
        lease = st.lease
        if lease is not None:
            # An empty label is an absent one (Prometheus): an IPv4-only lease has no subnet6,
            # an IPv6-only lease no subnet and public_ip.
            info = GaugeMetricFamily("weft_lease_info", "the lease this node holds",
                                     labels=["subnet", "public_ip", "subnet6", "public_ipv6", "backend"])
            info.add_metric([_text(lease.subnet), _text(lease.public_ip), _text(lease.subnet6),
                             _text(lease.public_ipv6), st.backend or ""], 1.0)
            yield info
            yield _gauge("weft_lease_expiration_timestamp_seconds",
                         "when the lease expires (0: a reservation, never)", lease.expiration or 0.0)
        yield _gauge("weft_peers", "peers known and programmed", st.peers)
        yield _gauge("weft_peers_changed_timestamp_seconds",
                     "when the set of peers last changed (0: never)", st.peers_changed_at)
        if st.peers_initial_sync_s is not None:
            yield _gauge("weft_peers_initial_sync_seconds", "how long the first listing of the leases "
                         "took to go through the data plane", st.peers_initial_sync_s)
        yield _gauge("weft_peers_incompatible", "peers whose lease speaks another wire format",
                     st.peers_incompatible)
        w = st.watch
        events = CounterMetricFamily("weft_watch_events", "lease events seen", labels=["kind"])
        for kind in WATCH_EVENT_KINDS:
            events.add_metric([kind], float(w.events.get(kind, 0) if w else 0))
        yield events
        yield _counter("weft_watch_resyncs", "times the watch re-listed after falling behind",
                       w.resyncs if w else 0)
        yield _counter("weft_watch_errors", "store errors while watching", w.errors if w else 0)
        if w is not None:
            yield _by_label(CounterMetricFamily, "weft_leases_invalid", "writes under <prefix>/subnets/"
                            " this daemon refused to follow, by reason (each bad write counted once)",
                            "reason", w.leases_invalid, sort=False)
        if st.config is not None:
            yield _counter("weft_config_changes", "new config texts seen in the store while running"
                           " (never applied: that takes a restart)", st.config.changes)
            yield _counter("weft_config_invalid", "of those, configs weftd could not start with",
                           st.config.invalid)
            yield _gauge("weft_config_stale", "1 while the config in the store is not the one this"
                         " daemon runs with (changed, invalid or deleted)", st.config.stale)
        store = st.store
        yield _gauge("weft_store_up", "1 while the store answers, 0 while it does not (or never did"
                     " yet)", store.up)
        yield _gauge("weft_store_down_since_timestamp_seconds",
                     "when the store stopped answering (0: it answers)", store.down_since or 0.0)
        yield _by_label(CounterMetricFamily, "weft_store_errors", "failed store operations by op", "op",
                        store.errors)
        yield _counter("weft_store_outages", "times the store stopped answering", store.outages)
        yield _gauge("weft_threads_dead", "threads of weftd that should run and do not",
                     len(st.dead_threads))
        yield _counter("weft_lease_renewals", "lease renewals", st.renewals)
        yield _counter("weft_lease_renewal_errors", "failed renewals", st.renewal_errors)
        yield _counter("weft_lease_reacquired", "leases taken again after they expired unrenewed",
                       st.leases_reacquired)
        yield _counter("weft_link_up_resyncs", "data plane resyncs because the underlay interface "
                       "came back up", st.link_up_resyncs)
        if store.ops is not None:
            yield _by_label(CounterMetricFamily, "weft_store_ops", "store operations by kind", "op",
                            store.ops)
        if st.backend is not None:
            for key, value in sorted(st.backend_stats.items()):
                level = key in st.backend_gauges
                family = (GaugeMetricFamily if level else CounterMetricFamily)(
                    f"weft_backend_{_NAME_RE.sub('_', key)}",
                    f"the data plane's {key} ({'a level' if level else 'only grows'})", labels=["backend"])
                family.add_metric([st.backend], float(value))
                yield family


def _text(value) -> str:
    """A label's value: "" (Prometheus: no such label) for what is not there."""
    return "" if value is None else str(value)


def _gauge(name: str, help_text: str, value) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help_text)
    g.add_metric([], float(value))
    return g


def _counter(name: str, help_text: str, value) -> CounterMetricFamily:
    c = CounterMetricFamily(name, help_text)
    c.add_metric([], float(value))
    return c


def _by_label(family, name: str, help_text: str, label: str, values: dict, sort: bool = True):
    m = family(name, help_text, labels=[label])
    for key, n in (sorted(values.items()) if sort else values.items()):
        m.add_metric([key], float(n))
    return m


class HealthServer:
    def __init__(self, host: str, port: int, daemon):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(DaemonCollector(daemon.status))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    dead = daemon.status(counts=False).dead_threads
                    if dead:
                        self._send(503, f"thread(s) stopped: {', '.join(dead)}\n".encode())
                    else:
                        self._send(200, b"ok\n")
                elif path == "/readyz":
                    st = daemon.status(counts=False)
                    self._send(200 if st.ready else 503, f"{st.ready_reason}\n".encode())
                elif path == "/metrics":
                    self._send(200, generate_latest(registry), "text/plain; version=0.0.4")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code, body, ctype="text/plain"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="healthz", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
