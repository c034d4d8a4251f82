"""/healthz, /readyz and /metrics for weftd.

/healthz is 200 while the process serves and its threads run (the lease watch, the claim
refresh), 503 naming a thread that died. /readyz is 200 once the lease is held, the backend is set
up and subnet.env is written (flanneld's meaning), and stays 200 through a store outage for as
long as the lease has not expired (pod traffic does not need the store); it is 503 before that,
once the lease expired unrenewed, or when the lease watch stopped. A store outage shows on
/metrics: ``weft_store_up`` 0, ``weft_store_down_since_timestamp_seconds``,
``weft_store_errors_total{op}``. /metrics is Prometheus text, collected at scrape time from the
daemon's state: nothing is counted per packet in Python.
"""
from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


class DaemonCollector:
    def __init__(self, daemon):
        self.d = daemon

    def describe(self):
        return []  # collect() reads live state; nothing to describe before the daemon runs

    def collect(self):
        d = self.d
        ready = GaugeMetricFamily("weft_ready", "1 once lease, backend and subnet.env are in place")
        ready.add_metric([], 1.0 if d.ready else 0.0)
        yield ready
        lease = d.lease
        if lease is not None:
            info = GaugeMetricFamily("weft_lease_info", "the lease this node holds",
                                     labels=["subnet", "public_ip", "backend"])
            info.add_metric([str(lease.subnet), str(lease.attrs.public_ip),
                             d.backend.name() if d.backend else ""], 1.0)
            yield info
            exp = GaugeMetricFamily("weft_lease_expiration_timestamp_seconds",
                                    "when the lease expires (0: a reservation, never)")
            exp.add_metric([], float(lease.expiration or 0.0))
            yield exp
        peers = GaugeMetricFamily("weft_peers", "peers known and programmed")
        peers.add_metric([], float(len(d.peers)))
        yield peers
        changed = GaugeMetricFamily("weft_peers_changed_timestamp_seconds",
                                    "when the set of peers last changed (0: never)")
        changed.add_metric([], d.peers_changed_at)
        yield changed
        bad = GaugeMetricFamily("weft_peers_incompatible", "peers whose lease speaks another wire format")
        bad.add_metric([], float(len(d.incompatible)))
        yield bad
        events = CounterMetricFamily("weft_watch_events", "lease events seen", labels=["kind"])
        w = d.watcher
        wstats = dict(w.stats) if w is not None else {}
        for kind in ("added", "renewed", "removed", "expired"):
            events.add_metric([kind], float(wstats.get(kind, 0)))
        yield events
        for key, help_text in (("resyncs", "times the watch re-listed after falling behind"),
                               ("errors", "store errors while watching")):
            c = CounterMetricFamily(f"weft_watch_{key}", help_text)
            c.add_metric([], float(wstats.get(key, 0)))
            yield c
        if w is not None:
            invalid = CounterMetricFamily(
                "weft_leases_invalid", "writes under <prefix>/subnets/ this daemon refused to follow,"
                " by reason (each bad write counted once)", labels=["reason"])
            for reason, n in w.invalid.snapshot().items():
                invalid.add_metric([reason], float(n))
            yield invalid
        if d.config is not None:
            for key, help_text in (("changes", "new config texts seen in the store while running"
                                               " (never applied: that takes a restart)"),
                                   ("invalid", "of those, configs weftd could not start with")):
                c = CounterMetricFamily(f"weft_config_{key}", help_text)
                c.add_metric([], float(d.counters.get(f"config_{key}", 0)))
                yield c
            stale = GaugeMetricFamily("weft_config_stale", "1 while the config in the store is not"
                                      " the one this daemon runs with (changed, invalid or deleted)")
            stale.add_metric([], 1.0 if d.config_stale else 0.0)
            yield stale
        sh = d.store_health
        up = GaugeMetricFamily("weft_store_up", "1 while the store answers, 0 while it does not"
                               " (or never did yet)")
        up.add_metric([], 1.0 if sh.up else 0.0)
        yield up
        since = GaugeMetricFamily("weft_store_down_since_timestamp_seconds",
                                  "when the store stopped answering (0: it answers)")
        since.add_metric([], float(sh.down_since or 0.0) if not sh.up else 0.0)
        yield since
        errors = CounterMetricFamily("weft_store_errors", "failed store operations by op",
                                     labels=["op"])
        for op, n in sorted(dict(sh.errors).items()):
            errors.add_metric([op], float(n))
        yield errors
        outages = CounterMetricFamily("weft_store_outages", "times the store stopped answering")
        outages.add_metric([], float(sh.outages))
        yield outages
        dead = GaugeMetricFamily("weft_threads_dead", "threads of weftd that should run and do not")
        dead.add_metric([], float(len(d.dead_threads())))
        yield dead
        for key, help_text in (("renewals", "lease renewals"), ("renewal_errors", "failed renewals"),
                               ("reacquired", "leases taken again after they expired unrenewed")):
            c = CounterMetricFamily(f"weft_lease_{key}", help_text)
            c.add_metric([], float(d.counters.get("lease_reacquired" if key == "reacquired" else key, 0)))
            yield c
        if d.store is not None:
            ops = CounterMetricFamily("weft_store_ops", "store operations by kind", labels=["op"])
            for op, n in sorted(d.store.stats().items()):
                ops.add_metric([op], float(n))
            yield ops
        if d.backend is not None:
            for key, value in sorted(d.backend.stats().items()):
                g = GaugeMetricFamily(f"weft_backend_{_NAME_RE.sub('_', key)}",
                                      f"backend counter {key}", labels=["backend"])
                g.add_metric([d.backend.name()], float(value))
                yield g


class HealthServer:
    def __init__(self, host: str, port: int, daemon):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(DaemonCollector(daemon))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    dead = daemon.dead_threads()
                    if dead:
                        self._send(503, f"thread(s) stopped: {', '.join(dead)}\n".encode())
                    else:
                        self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok, why = daemon.readiness()
                    self._send(200 if ok else 503, f"{why}\n".encode())
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
