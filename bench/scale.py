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
import re
import time

from .errors import LabError
from .lab import HEALTHZ_PORT
from .measure import percentile
from .netns import http_get
from .procs import CLK_TCK, peak_rss_mb

CONVERGE_TIMEOUT = 90.0


def _btime() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime"):
                return float(line.split()[1])
    return 0.0


def metrics(ns: str, timeout: float = 2.0) -> dict[str, float]:
    """weftd's /metrics inside namespace ``ns``, as name -> value (labels summed)."""
    got = http_get(ns, "127.0.0.1", HEALTHZ_PORT, "/metrics", timeout)
    if got is None or got[0] != 200:
        raise LabError(f"{ns}: /metrics not reachable")
    out: dict[str, float] = {}
    for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})? (\S+)$", got[1].decode(), re.M):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def measure_store(scenario, store: str, lab_factory, progress=None) -> dict:
    scn = dataclasses.replace(scenario, store=store)
    lab = lab_factory(scn)
    t_build = time.time()
    lab.up()
    try:
        n = len(lab.nodes)
        boot = _btime()
        starts = [boot + node.start / CLK_TCK for node in lab.nodes if node.start]
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
                    ops[idx] = m.get("weft_store_ops_total", 0.0)
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
        return {
            "nodes": n, "store": store,
            "start_spread_s": (max(starts) - min(starts)) if starts else None,
            "converge_p50_s": percentile(times, 0.5), "converge_p99_s": percentile(times, 0.99),
            "converge_max_s": t_all,
            "store_ops_total": sum(ops.values()),
            "store_ops_per_s": sum(ops.values()) / t_all if t_all > 0 else None,
            "daemon_rss_mb_p50": percentile(rss, 0.5) if rss else None,
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


def table(cp: dict) -> str:
    heads = ["store", "nodes", "converge p50 s", "p99 s", "max s", "store ops/s", "RSS p50 MB", "RSS max MB"]
    rows = [heads]
    for store, r in cp.items():
        if "converge_p50_s" not in r:
            rows.append([store, r.get("reason", "failed")] + [""] * 6)
            continue
        rows.append([store, str(r["nodes"]), f"{r['converge_p50_s']:.2f}", f"{r['converge_p99_s']:.2f}",
                     f"{r['converge_max_s']:.2f}", f"{r['store_ops_per_s'] or 0:.0f}",
                     f"{r['daemon_rss_mb_p50'] or 0:.0f}", f"{r['daemon_rss_mb_max'] or 0:.0f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
