"""Control-plane scale: many daemons started at once, no traffic (``scenarios/scale-50.toml``).

For each store (SQLite and etcd) a lab of N alloc-backend nodes is built; the lab starts every
weftd within a fraction of a second. Measured:
- ``converge_p50_s`` / ``converge_p99_s`` / ``converge_max_s``: per daemon, the time from the
  first daemon's start until it knew all N-1 peers (its ``weft_peers_changed_timestamp_seconds``
  once ``weft_peers`` reached N-1);
- ``store_ops_per_s``: store operations of all daemons (``weft_store_ops_total``) per second
  from the first start until all converged;
- ``daemon_rss_mb_p50`` / ``_max``: peak RSS of the daemons.
"""
from __future__ import annotations

import dataclasses
import time

from prometheus_client.parser import text_string_to_metric_families

from .errors import LabError
from .lab import HEALTHZ_PORT
from .netns import http_get
from .procs import CLK_TCK, peak_rss_mb
from .stats import quantile

CONVERGE_TIMEOUT = 90.0


def boot_wall_time() -> float:
    """When the machine booted, in wall-clock seconds, to the microsecond: now minus
    CLOCK_BOOTTIME, the clock /proc/PID/stat's start times count on. (/proc/stat's ``btime`` is
    whole seconds: up to 1 s early.)"""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def start_wall_time(start_ticks: int, boot: float | None = None) -> float:
    """The wall-clock time a process started, from its /proc/PID/stat start time (clock ticks
    since boot, so to 1/CLK_TCK s)."""
    return (boot_wall_time() if boot is None else boot) + start_ticks / CLK_TCK


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as sample name -> value, the label sets of a name summed (prometheus_client's
    parser: a malformed page is a ValueError, never a silently shorter dict)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def metrics(ns: str, timeout: float = 2.0) -> dict[str, float]:
    """weftd's /metrics inside namespace ``ns``, as name -> value (labels summed)."""
    got = http_get(ns, "127.0.0.1", HEALTHZ_PORT, "/metrics", timeout)
    if got is None or got[0] != 200:
        raise LabError(f"{ns}: /metrics not reachable")
    try:
        return parse_metrics(got[1].decode())
    except ValueError as exc:
        raise LabError(f"{ns}: /metrics is not Prometheus text: {exc}") from None


def measure_store(scenario, store: str, lab_factory, progress=None) -> dict:
    scn = dataclasses.replace(scenario, store=store)
    lab = lab_factory(scn)
    t_build = time.time()
    lab.up()
    try:
        n = len(lab.nodes)
        boot = boot_wall_time()
        starts = [start_wall_time(node.start, boot) for node in lab.nodes if node.start]
        t0 = min(starts) if starts else t_build
        deadline = time.monotonic() + CONVERGE_TIMEOUT
        pending = {node.index: node for node in lab.nodes}
        converged: dict[int, float] = {}
        ops: dict[int, float] = {}
        while pending and time.monotonic() < deadline:
            for idx, node in list(pending.items()):
                try:
                    m = metrics(node.namespace)
                except (OSError, LabError):
                    continue
                if m.get("weft_peers") == n - 1:
                    converged[idx] = m["weft_peers_changed_timestamp_seconds"] - t0
                    ops[idx] = m.get("weft_store_ops_total")  # None: not exported, not 0
                    del pending[idx]
            if progress:
                progress.show(f"control plane on {store}: {n - len(pending)}/{n} daemons know every peer")
            if pending:
                time.sleep(0.2)
        if pending:
            raise LabError(f"{store}: {len(pending)} of {n} daemons did not learn every peer "
                           f"within {CONVERGE_TIMEOUT:.0f} s")
        times = list(converged.values())
        t_all = max(times)
        rss = [r for r in (peak_rss_mb(node.pid) for node in lab.nodes if node.pid) if r is not None]
        ops_total = None if None in ops.values() else sum(ops.values())
        return {
            "nodes": n, "store": store,
            "start_spread_s": (max(starts) - min(starts)) if starts else None,
            "converge_p50_s": quantile(times, 0.5), "converge_p99_s": quantile(times, 0.99),
            "converge_max_s": t_all,
            "store_ops_total": ops_total,
            "store_ops_per_s": ops_total / t_all if ops_total is not None and t_all > 0 else None,
            "daemon_rss_mb_p50": quantile(rss, 0.5) if rss else None,
            "daemon_rss_mb_max": max(rss) if rss else None,
            "lab_build_s": time.time() - t_build,
        }
    finally:
        lab.down()


def run(scenario, stores=("sqlite", "etcd"), lab_factory=None, progress=None) -> dict:
    from .lab import Lab
    lab_factory = lab_factory or (lambda scn: Lab(scn))
    out = {}
    for store in stores:
        try:
            out[store] = measure_store(scenario, store, lab_factory, progress)
        except Exception as exc:
            out[store] = {"status": "failed", "reason": str(exc).splitlines()[0] if str(exc) else repr(exc)}
    return out


def _num(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def table(cp: dict) -> str:
    heads = ["store", "nodes", "converge p50 s", "p99 s", "max s", "store ops/s", "RSS p50 MB", "RSS max MB"]
    rows = [heads]
    for store, r in cp.items():
        if "converge_p50_s" not in r:
            rows.append([store, r.get("reason", "failed")] + [""] * 6)
            continue
        rows.append([store, str(r["nodes"])] + [_num(r.get(k), f) for k, f in (
            ("converge_p50_s", "{:.2f}"), ("converge_p99_s", "{:.2f}"), ("converge_max_s", "{:.2f}"),
            ("store_ops_per_s", "{:.0f}"), ("daemon_rss_mb_p50", "{:.0f}"), ("daemon_rss_mb_max", "{:.0f}"))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
