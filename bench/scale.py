"""Control-plane scale: many daemons started at once, no traffic (``scenarios/scale-50.toml``).

For each store (SQLite and etcd) a lab of N alloc-backend nodes is built; the lab starts every
weftd within a fraction of a second. Measured:
- ``converge_p50_s`` / ``converge_p99_s`` / ``converge_max_s``: per daemon, the time from the
  first daemon's start until it knew all N-1 peers (its ``weft_peers_changed_timestamp_seconds``
  once ``weft_peers`` reached N-1);
- ``store_ops_per_s``: store operations of all daemons (``weft_store_ops_total``) per second
  from the first start until all converged;
- ``daemon_rss_mb_p50`` / ``_max``: peak RSS of the daemons;
- ``propagation_p50_ms`` / ``_p99_ms`` / ``_max_ms``: with every daemon running, one lease is
  added and then removed (``bench.leasewriter``, PROPAGATION_ROUNDS times each); per daemon and
  change, the time from the write being sent until the daemon's data plane took it (its
  ``weft_peers_changed_timestamp_seconds``). The convergence figures above mostly measure N
  Python start-ups sharing the CPUs; this one is what a running cluster sees.
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
PROPAGATION_ROUNDS = 5
PROPAGATION_TIMEOUT = 30.0


def boot_wall_time() -> float:
    """When the machine booted, in wall-clock seconds, to the microsecond: now minus
    CLOCK_BOOTTIME, the clock /proc/PID/stat's start times count on. (/proc/stat's ``btime`` is
    whole seconds: up to 1 s early.)"""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def start_wall_time(start_ticks: int, boot: float | None = None) -> float:
    """The wall-clock time a process started, from its /proc/PID/stat start time (clock ticks
    since boot, so to 1/CLK_TCK s)."""
    return (boot_wall_time() if boot is None else boot) + start_ticks / CLK_TCK


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample of a /metrics page."""
    family: str  # the metric's name: weft_backend_rx_packets
    type: str  # its family's TYPE: "counter", "gauge" ...
    name: str  # as exposed: a counter's ends in _total (weft_backend_rx_packets_total)
    labels: dict[str, str]
    value: float


def parse_samples(text: str) -> list[Sample]:
    """Every sample of Prometheus text with its family and type (prometheus_client's parser: a
    malformed page is a ValueError, never a silently shorter list). The one reader of /metrics
    for the bench and the tests."""
    return [Sample(family.name, family.type, s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as sample name -> value, the label sets of a name summed."""
    out: dict[str, float] = {}
    for sample in parse_samples(text):
        out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    """The samples named ``name`` as {value of ``label``: value} (``weft_store_errors_total`` by op)."""
    return {s.labels[label]: s.value for s in parse_samples(text) if s.name == name and label in s.labels}


def metrics_page(ns: str, timeout: float = 2.0) -> str:
    """weftd's /metrics text inside namespace ``ns``."""
    got = http_get(ns, "127.0.0.1", HEALTHZ_PORT, "/metrics", timeout)
    if got is None or got[0] != 200:
        raise LabError(f"{ns}: /metrics not reachable")
    return got[1].decode()


def metrics(ns: str, timeout: float = 2.0) -> dict[str, float]:
    """weftd's /metrics inside namespace ``ns``, as name -> value (labels summed)."""
    text = metrics_page(ns, timeout)
    try:
        return parse_metrics(text)
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
        seen = until_all_know(lab, n - 1, f"control plane on {store}", CONVERGE_TIMEOUT, 0.2, progress)
        converged = {idx: m["weft_peers_changed_timestamp_seconds"] - t0 for idx, m in seen.items()}
        # None: not exported, not 0
        ops: dict[int, float | None] = {idx: m.get("weft_store_ops_total") for idx, m in seen.items()}
        times = list(converged.values())
        t_all = max(times)
        delays = propagation(lab, progress, store)
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
            "propagation_samples": len(delays),
            "propagation_p50_ms": 1000 * quantile(delays, 0.5),
            "propagation_p99_ms": 1000 * quantile(delays, 0.99),
            "propagation_max_ms": 1000 * max(delays),
            "lab_build_s": time.time() - t_build,
        }
    finally:
        lab.down()


def until_all_know(lab, peers: int, label: str, timeout: float, poll: float,
                   progress=None) -> dict[int, dict[str, float]]:
    """Each node's /metrics, taken once its weftd knows ``peers`` peers (node index -> page);
    LabError naming how many did not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pending = {node.index: node for node in lab.nodes}
    seen: dict[int, dict[str, float]] = {}
    while pending and time.monotonic() < deadline:
        for idx, node in list(pending.items()):
            try:
                m = metrics(node.namespace)
            except (OSError, LabError):
                continue
            if m.get("weft_peers") == peers:
                seen[idx] = m
                del pending[idx]
        if progress:
            progress.show(f"{label}: {len(seen)}/{len(lab.nodes)} daemons know {peers} peers")
        if pending:
            time.sleep(poll)
    if pending:
        raise LabError(f"{label}: {len(pending)} of {len(lab.nodes)} daemons did not know {peers} "
                       f"peers within {timeout:.0f} s")
    return seen


def propagation(lab, progress=None, store: str = "") -> list[float]:
    """Seconds from each lease write being sent to each daemon's data plane taking it (the
    store's commit included: a watcher can see a write before its writer has the answer)."""
    from .leasewriter import write_in_lab
    n = len(lab.nodes)
    wire = lab.scenario.network.backend.type
    far = lab.scenario.network.subnet_count - 1 - PROPAGATION_ROUNDS  # clear of the nodes' leases
    delays: list[float] = []
    for r in range(PROPAGATION_ROUNDS):
        for action, peers in (("put", n), ("delete", n - 1)):
            label = f"{store} propagation {r + 1}/{PROPAGATION_ROUNDS} ({action})"
            t = write_in_lab(lab, action, 1, far + r, wire)["start_s"]
            seen = until_all_know(lab, peers, label, PROPAGATION_TIMEOUT, 0.02, progress)
            delays += [m["weft_peers_changed_timestamp_seconds"] - t for m in seen.values()]
    return delays


def run(scenario, stores=("sqlite", "etcd"), lab_factory=None, progress=None) -> dict:
    from .errors import refuse_ipv6_only
    from .lab import Lab
    refuse_ipv6_only(scenario, "bench run (control plane)", "writes IPv4 leases")
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


def render(rows: dict, heads: list[str], columns: list[tuple[str, str]], done_key: str) -> str:
    """One line per row of ``rows`` (name -> result): the name, then each (key, format) column;
    a failed row shows ``failed`` and its reason goes under the table."""
    lines, notes = [heads], []
    for name, r in rows.items():
        if done_key not in r:
            lines.append([name, "failed"] + [""] * (len(heads) - 2))
            notes.append(f"{name}: {r.get('reason', 'failed')}")
            continue
        lines.append([name] + [_num(r.get(k), f) for k, f in columns])
    widths = [max(len(r[i]) for r in lines) for i in range(len(heads))]
    return "\n".join(["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                      for r in lines] + notes)


def table(cp: dict) -> str:
    return render(cp, ["store", "nodes", "converge p50 s", "p99 s", "max s", "store ops/s", "RSS p50 MB",
                       "RSS max MB", "propagation p50 ms", "p99 ms", "max ms"],
                  [("nodes", "{}"), ("converge_p50_s", "{:.2f}"), ("converge_p99_s", "{:.2f}"),
                   ("converge_max_s", "{:.2f}"), ("store_ops_per_s", "{:.0f}"),
                   ("daemon_rss_mb_p50", "{:.0f}"), ("daemon_rss_mb_max", "{:.0f}"),
                   ("propagation_p50_ms", "{:.0f}"), ("propagation_p99_ms", "{:.0f}"),
                   ("propagation_max_ms", "{:.0f}")], "converge_p50_s")
