"""``bench faults``: the overlay under faults, measured, with nothing lost.

For each backend (``wire/dataplane``) a lab is built from the scenario (bench.lab); for each fault
(bench.faults_catalog) traffic flows the whole time, the fault is injected and healed, and a row
records what happened:

- data plane: a paced UDP stream with sequence numbers (1 datagram/ms) in both directions between
  the first pods of every node pair (bench.faults_traffic), lost datagrams per phase (baseline,
  fault, recovery) and the longest time with nothing delivered, when traffic resumed after the
  heal; plus one TCP connection pod 1 -> pod 2 that must not reset;
- control plane: every weftd exit (status, phase) and restart, the PIDs before and after, the
  leases before and after (``weftctl leases --json``), the time from the heal until every node is
  ready and knows as many peers as before the fault (``/metrics`` weft_peers), whether every
  node's data plane has every other node's subnet afterwards (tests/e2e.py's probes);
- health: each node's ``/readyz`` and ``/metrics`` sampled every ``TICK_S`` (answers per phase,
  the weft_* gauges' range per phase) and the lines of its log written during the fault that speak
  of the store, leases, errors.

Like systemd with the shipped unit (``Restart=on-failure``, ``RestartSec=5``), a weftd that exits
with a non-zero status is started again after ``restart_s``; every such exit is in the row.

Each fault states its goal as checks on those numbers; a row meets its goal when every check
holds, and misses it (saying which, with the value) otherwise. A number that could not be measured
is null, and a check on it fails.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import os
import re
import signal
import sys
import subprocess
import time
from dataclasses import dataclass

from .cli import Command, Failure, UsageError
from .lab import HEALTHZ_PORT, Lab, LabError, alive, venv_python
from .netns import http_get
from .procs import read_text
from .scale import parse_metrics as scale_metrics

SCHEMA = "weft-faults/1"
TICK_S = 0.25
LOG_WORDS = re.compile(r"(?i)store|etcd|sqlite|database|lease|revoked|error|warn|retry|readonly|read-only|"
                       r"disk|full|corrupt|config|unavailable|timeout|lost|expired")


@dataclass
class Plan:
    short: bool = False
    baseline_s: float = 3.0
    recovery_s: float = 5.0         # traffic keeps flowing this long after the heal (at least)
    converge_timeout_s: float = 30.0
    restart_s: float = 5.0          # the unit's RestartSec
    kill_gap_s: float = 1.0         # weftd killed: started again after this
    link_down_s: float = 10.0
    config_change_s: float = 5.0
    lease_ttl_s: int = 20           # the short-TTL lab of node-pause
    pause_past_ttl_s: float = 10.0  # node-pause: paused TTL + this
    etcd_pause_s: float = 30.0
    etcd_down_s: float = 5.0        # etcd killed: restarted on the same data dir after this
    store_fault_s: float = 10.0     # the SQLite file broken this long (weftd writes its claim every 5 s)
    stream_rate: float = 1000.0

    @classmethod
    def make(cls, short: bool) -> "Plan":
        if not short:
            return cls()
        return cls(short=True, baseline_s=1.5, recovery_s=3.0, converge_timeout_s=20.0, restart_s=1.0,
                   kill_gap_s=0.5, link_down_s=3.0, config_change_s=2.0, lease_ttl_s=6, pause_past_ttl_s=4.0,
                   etcd_pause_s=6.0, etcd_down_s=2.0, store_fault_s=6.0)


def node_metrics(got) -> dict[str, float] | None:
    """weft_* values of an http_get of /metrics (labels summed), without the backend's counters;
    None when it did not answer 200 or is not Prometheus text."""
    if not got or got[0] != 200:
        return None
    try:
        values = scale_metrics(got[1].decode("utf-8", "replace"))
    except ValueError:
        return None
    return {k: v for k, v in values.items() if k.startswith("weft_") and not k.startswith("weft_backend_")}


def weftctl(lab: Lab, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """weftctl against the lab's store, from node 1's namespace (where the store is reachable)."""
    try:
        return lab.exec(lab.node(1).namespace, [venv_python(), "-m", "controlplane.ctl", *lab.store_flags(), *args],
                        timeout=timeout)
    except LabError as exc:
        return subprocess.CompletedProcess(args, 124, "", str(exc))


def leases(lab: Lab) -> dict | None:
    """public IP -> subnet of every lease (reservations too), or None when weftctl cannot say."""
    res = weftctl(lab, "leases", "--json")
    if res.returncode != 0:
        return None
    try:
        return {d["public_ip"]: d["subnet"] for d in json.loads(res.stdout)}
    except (ValueError, KeyError, TypeError):
        return None


class FaultRun:
    """One (backend, fault) row: traffic, sampling, supervision and the phases of the fault."""

    def __init__(self, lab: Lab, backend: str, fault, plan: Plan, tool: str, progress):
        self.lab, self.backend, self.fault, self.plan, self.tool, self.progress = lab, backend, fault, plan, tool, progress
        self.marks: dict[str, float] = {}
        self.samples: list[dict] = []          # {t, node, readyz, metrics}
        self.exits: list[dict] = []
        self.restarts: list[dict] = []
        self.expected_down: set[int] = set()   # stopped by the fault itself: not an exit, no restart
        self.restart_at: dict[int, float] = {}
        self.waiting_ready: dict[int, float] = {}
        self.ready_at: dict[int, list[float]] = {}
        self.notes: dict = {}                  # what the fault itself observed (mid-fault checks)
        self.want_peers: dict[int, float] | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, len(lab.nodes)))

    # -- the clock of the row ---------------------------------------------------------------------
    def mark(self, name: str) -> float:
        self.marks[name] = time.monotonic()
        return self.marks[name]

    def phase(self, t: float) -> str:
        if "inject" in self.marks and t >= self.marks["inject"]:
            return "recovery" if "heal" in self.marks and t >= self.marks["heal"] else "fault"
        return "baseline"

    def rel(self, t: float | None) -> float | None:
        return None if t is None else round(t - self.marks["start"], 3)

    # -- sampling and supervision (one tick) -------------------------------------------------------
    def _sample_node(self, node) -> dict:
        t = time.monotonic()
        got = http_get(node.namespace, "127.0.0.1", HEALTHZ_PORT, "/readyz", timeout=0.5)
        metrics = http_get(node.namespace, "127.0.0.1", HEALTHZ_PORT, "/metrics", timeout=0.5)
        return {"t": t, "node": node.index, "readyz": got[0] if got else None,
                "metrics": node_metrics(metrics)}

    def tick(self) -> None:
        for sample in self.pool.map(self._sample_node, list(self.lab.nodes)):
            self.samples.append(sample)
        self.supervise()

    def supervise(self) -> None:
        now = time.monotonic()
        for node in self.lab.nodes:
            n = node.index
            if n in self.expected_down or n in self.restart_at:
                continue
            code = self.lab._exit_status(node)
            if code is not None:
                self.exits.append({"node": n, "status": code, "t": self.rel(now), "phase": self.phase(now),
                                   "log": _log_tail(node.log)})
                if code != 0:     # Restart=on-failure
                    self.restart_at[n] = now + self.plan.restart_s
                else:
                    self.expected_down.add(n)   # systemd would leave it stopped
        for n, due in list(self.restart_at.items()):
            if now >= due:
                del self.restart_at[n]
                self.start(n, by="supervisor")
        for n, since in list(self.waiting_ready.items()):
            node = self.lab.node(n)
            if os.path.exists(node.subnet_file) and self.lab.ready(n):
                del self.waiting_ready[n]
                self.lab._read_subnet(node)
                self.ready_at.setdefault(n, []).append(time.monotonic())

    def idle(self, seconds: float, label: str = "") -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.tick()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(TICK_S, left))

    # -- what faults do to daemons ----------------------------------------------------------------
    def stop(self, n: int, sig: int) -> None:
        """Stop node n's weftd with ``sig`` (SIGKILL, SIGTERM); the fault starts it again."""
        self.expected_down.add(n)
        self.lab.kill_node(n, sig)

    def start(self, n: int, by: str = "fault") -> None:
        self.lab.start_node(n, wait=False)
        node = self.lab.node(n)
        self.restarts.append({"node": n, "by": by, "t": self.rel(time.monotonic()), "pid": node.pid})
        self.expected_down.discard(n)
        self.waiting_ready[n] = time.monotonic()

    def wait_ready(self, n: int, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while n in self.waiting_ready and time.monotonic() < deadline:
            self.tick()
            time.sleep(TICK_S)
        return self.ready_at.get(n, [None])[-1]

    # -- convergence ------------------------------------------------------------------------------
    def baseline_peers(self) -> dict[int, float | None]:
        out = {}
        for node in self.lab.nodes:
            last = [s for s in self.samples if s["node"] == node.index and s["metrics"]
                    and s["t"] < self.marks["inject"]]
            out[node.index] = last[-1]["metrics"].get("weft_peers") if last else None
        return out

    def converge(self) -> float | None:
        """Seconds from the heal until every node answers /readyz 200 and has its baseline peers (or
        the peers the fault says it must end with, ``want_peers``)."""
        want = self.want_peers or self.baseline_peers()
        heal = self.marks["heal"]
        nodes = len(self.lab.nodes)

        def done(chunk) -> float | None:
            latest = {s["node"]: s for s in chunk}
            if len(latest) == nodes and all(
                    s["readyz"] == 200 and s["metrics"] and want.get(n) is not None
                    and s["metrics"].get("weft_peers") == want[n] for n, s in latest.items()):
                return round(max(s["t"] for s in latest.values()) - heal, 3)
            return None

        # the ticks since the heal (a fault may have sampled on after it), one chunk of samples each
        for i in range(0, len(self.samples) - nodes + 1, nodes):
            chunk = self.samples[i:i + nodes]
            if min(s["t"] for s in chunk) >= heal and (took := done(chunk)) is not None:
                return took
        deadline = heal + self.plan.converge_timeout_s
        while time.monotonic() < deadline:
            self.tick()
            took = done(self.samples[-nodes:])
            if took is not None:
                return took
            time.sleep(TICK_S)
        return None

    # -- the row ----------------------------------------------------------------------------------
    def run(self) -> dict:
        from .faults_traffic import Streams, TcpStream
        lab, plan, fault = self.lab, self.plan, self.fault
        row = {"fault": fault.name, "number": fault.number, "backend": self.backend, "goal": fault.goal,
               "status": "ok"}
        pods = {}
        for p in lab.pods:
            pods.setdefault(p.node, p)
        streams = Streams(lab, self.tool, fault.name, rate=plan.stream_rate, bound_s=fault.bound_s(plan) + 60)
        tcp = TcpStream(lab, pods[1], pods[2])
        row["leases_before"] = leases(lab)
        row["subnet_env_before"] = {n.index: read_text(n.subnet_file) for n in lab.nodes}
        pids_before = {n.index: n.pid for n in lab.nodes}
        log_sizes = {n.index: _size(n.log) for n in lab.nodes}
        self.mark("start")
        streams.start()
        tcp_result = None
        try:
            tcp.start()
            self.idle(plan.baseline_s)
            fault.run(self)                      # marks inject and heal
            heal = self.marks.get("heal")
            row["peers_converged_s"] = self.converge() if heal else None
            left = (heal or time.monotonic()) + plan.recovery_s - time.monotonic()
            if left > 0:
                self.idle(left)
            for n in list(self.restart_at):      # a supervisor restart still due: do it now, and wait
                self.restart_at[n] = 0
            self.supervise()
            for n in list(self.waiting_ready):
                self.wait_ready(n, 30)
            self.mark("end")
        finally:
            tcp_result = tcp.stop()
            streams.stop()
            self.pool.shutdown(wait=True)
        phases = [("baseline", self.marks["start"], self.marks.get("inject", self.marks["end"])),
                  ("fault", self.marks.get("inject", self.marks["end"]), self.marks.get("heal", self.marks["end"])),
                  ("recovery", self.marks.get("heal", self.marks["end"]), self.marks["end"] + 1.0)]
        row["data_plane"] = streams.analyse(phases, self.marks.get("heal"))
        row["data_plane"]["tcp"] = tcp_result
        row["times"] = {k: self.rel(v) for k, v in self.marks.items()}
        row["exits"], row["restarts"] = self.exits, self.restarts
        row["pids_before"] = pids_before
        row["pids_after"] = {n.index: n.pid for n in lab.nodes}
        row["ready_after_restart_s"] = {n: [round(t - self.marks.get("heal", t), 3) for t in ts]
                                        for n, ts in self.ready_at.items()}
        row["leases_after"] = leases(lab)
        row["subnet_env_after"] = {n.index: read_text(n.subnet_file) for n in lab.nodes}
        row["programmed_after"] = programmed_everywhere(lab)
        row["health"] = self.health_summary()
        row["log"] = {n.index: _log_lines(n.log, log_sizes[n.index]) for n in lab.nodes}
        row["notes"] = self.notes
        row["checks"] = fault.checks(self, row)
        failed = [c for c in row["checks"] if c["ok"] is False or (c["ok"] is None and c.get("required", True))]
        row["verdict"] = "missed" if failed else "met"
        row["why"] = [f"{c['name']}: {c['value']}" for c in failed]
        return row

    def health_summary(self) -> dict:
        out = {}
        for node in self.lab.nodes:
            per_phase: dict = {}
            for s in (x for x in self.samples if x["node"] == node.index):
                ph = per_phase.setdefault(self.phase(s["t"]), {"readyz": {}, "metrics": {}, "samples": 0})
                ph["samples"] += 1
                code = str(s["readyz"]) if s["readyz"] is not None else "no answer"
                ph["readyz"][code] = ph["readyz"].get(code, 0) + 1
                for k, v in (s["metrics"] or {}).items():
                    lo, hi = ph["metrics"].get(k, (v, v))
                    ph["metrics"][k] = (min(lo, v), max(hi, v))
            for ph in per_phase.values():
                ph["metrics"] = {k: list(v) for k, v in sorted(ph["metrics"].items())
                                 if k in INTERESTING or k.startswith("weft_store")}
            out[node.index] = per_phase
        return out


INTERESTING = ("weft_ready", "weft_peers", "weft_store_up", "weft_store_errors_total", "weft_watch_resyncs_total",
               "weft_lease_renewals_total", "weft_config_stale")


def programmed_everywhere(lab: Lab) -> dict | None:
    """Per node, the other nodes' subnets its data plane lacks (tests/e2e.py's probes); None when
    the probes cannot run (a node's weftd is not answering: absence from a dead daemon is no answer)."""
    programmed = e2e_probe()
    if programmed is None:
        return None
    out = {}
    for node in lab.nodes:
        try:
            out[node.index] = [o.subnet for o in lab.nodes if o is not node and not programmed(lab, node.index, o.subnet)]
        except Exception as exc:
            out[node.index] = f"cannot tell: {str(exc)[:120]}"
    return out


def e2e_probe():
    """tests/e2e.py's ``programmed(lab, n, subnet)`` (the repository's own data-plane probes), or None."""
    import sys
    from .lab import REPO
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    try:
        from tests.e2e import programmed
    except Exception:
        return None
    return programmed


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _log_tail(path: str) -> str:
    lines = read_text(path).strip().splitlines()
    return " | ".join(lines[-3:])[-400:]


def _log_lines(path: str, offset: int, limit: int = 8) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return []
    hits = [line.strip()[:240] for line in text.splitlines() if LOG_WORDS.search(line)]
    return hits[:limit] + ([f"... {len(hits) - limit} more"] if len(hits) > limit else [])


# -- a backend's labs and rows -------------------------------------------------------------------

STORE_TMPFS_MIB = 16   # the store's tmpfs when a fault fills its disk and the scenario sets none


def lab_scenario(scenario, backend: str, kind: str, plan: Plan, store_tmpfs: bool = False):
    """The scenario of a lab kind: "default", or "short-ttl" (weftd --lease-ttl plan.lease_ttl_s);
    ``store_tmpfs``: a SQLite store on a tmpfs of the lab's own (lab.store_tmpfs_mib)."""
    from .runner import scenario_for
    scn = scenario_for(scenario, backend)
    if store_tmpfs and scn.store == "sqlite" and not scn.store_tmpfs_mib:
        scn = dataclasses.replace(scn, store_tmpfs_mib=STORE_TMPFS_MIB)
    if kind == "short-ttl":
        flags = tuple(scn.weftd.flags) + ("--lease-ttl", str(plan.lease_ttl_s))
        scn = dataclasses.replace(scn, weftd=dataclasses.replace(scn.weftd, flags=flags))
    return scn


def healthy(lab: Lab, backend: str) -> str | None:
    """Why the lab cannot carry the next fault (a daemon gone, pods that do not reach each other)."""
    from .runner import check_connectivity
    for node in lab.nodes:
        if not (node.pid and alive(node.pid, node.start)) or not lab.ready(node.index):
            return f"node {node.index}'s weftd is not running and ready"
    try:
        check_connectivity(lab, backend)
    except Exception as exc:
        return str(exc)
    return None


def run_backend(scenario, backend: str, faults: list, plan: Plan, tool: str, progress) -> dict:
    rows: dict = {}
    by_lab: dict[str, list] = {}
    for fault in faults:
        why = fault.unavailable(scenario, backend)
        if why:
            rows[fault.name] = {"fault": fault.name, "number": fault.number, "backend": backend,
                                "goal": fault.goal, "status": "skipped", "reason": why}
            progress.show(f"{backend} {fault.name}: skipped", step=True)
        else:
            by_lab.setdefault(fault.lab, []).append(fault)
    for kind, group in by_lab.items():
        lab = None
        try:
            for fault in group:
                label = f"{backend} {fault.name}"
                try:
                    if lab is not None:
                        why = healthy(lab, backend)
                        if why:     # the last fault left the lab broken: the next one gets a fresh lab
                            progress.show(f"{label}: rebuilding the lab ({why[:80]})")
                            lab.down()
                            lab = None
                    if lab is None:
                        progress.show(f"{label}: building the lab")
                        lab = Lab(lab_scenario(scenario, backend, kind, plan,
                                               store_tmpfs=any(f.store_tmpfs for f in group)))
                        lab.up()
                        from .runner import check_connectivity
                        check_connectivity(lab, backend)
                    progress.show(label)
                    t0 = time.monotonic()
                    row = FaultRun(lab, backend, fault, plan, tool, progress).run()
                    row["seconds"] = round(time.monotonic() - t0, 1)
                    row["lab"] = {"kind": kind, "id": lab.id, "scenario": lab.scenario.name}
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:
                    row = {"fault": fault.name, "number": fault.number, "backend": backend, "goal": fault.goal,
                           "status": "failed", "reason": f"{type(exc).__name__}: {exc}".replace("\n", " | ")[:600]}
                rows[fault.name] = row
                progress.show(f"{label}: {row.get('verdict', row['status'])}", step=True)
        finally:
            if lab is not None:
                lab.down()
    return rows


def run(scenario, backends: list[str], faults: list, plan: Plan, progress) -> dict:
    from . import results
    from .errors import refuse_ipv6_only
    refuse_ipv6_only(scenario, "bench faults", "sends IPv4 traffic between the pods and writes IPv4 leases")
    from .flood_tool import build
    from .runner import unavailable
    tool = build()
    doc = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": results.machine(), "git": results.git_info(),
           "scenario": {"name": scenario.name, "path": scenario.path, "nodes": scenario.nodes,
                        "store": scenario.store},
           "plan": dataclasses.asdict(plan), "faults": {f.name: {"number": f.number, "title": f.title, "goal": f.goal}
                                                        for f in faults},
           "rows": []}
    for backend in backends:
        why = unavailable(backend)
        if why:
            for f in faults:
                doc["rows"].append({"fault": f.name, "number": f.number, "backend": backend, "goal": f.goal,
                                    "status": "skipped", "reason": why})
                progress.show(f"{backend} {f.name}: skipped", step=True)
            continue
        rows = run_backend(scenario, backend, faults, plan, tool, progress)
        doc["rows"].extend(rows[f.name] for f in faults)
    return doc


class FaultsCommand(Command):
    def add_arguments(self, p):
        from .faults_catalog import FAULT_NAMES
        p.add_argument("--scenario", default="scenarios/default.toml", help="scenario file (TOML)")
        p.add_argument("--backends", default="", help="comma-separated wire/dataplane list; default: bench run's")
        p.add_argument("--faults", default="", help=f"comma-separated subset of: {','.join(FAULT_NAMES)}")
        p.add_argument("--short", action="store_true", help="short fault durations (CI); the default keeps the real ones")
        p.add_argument("--out", default="", help="directory for faults.json and faults.md (default results/faults-<time>)")
        p.add_argument("--json", default="", help="also write the JSON document here")

    def run(self, args) -> int:
        from . import faults_report
        from .commands import _scenario_path
        from .faults_catalog import FAULT_NAMES, FAULTS
        from .runner import BARE, Progress, default_backends
        from .scenario import load
        from controlplane.backends import backend_names
        scenario = load(_scenario_path(args.scenario))
        backends = [b.strip() for b in args.backends.split(",") if b.strip()] or \
            [b for b in default_backends() if b != BARE]
        for b in backends:
            if b not in backend_names():
                raise UsageError(f"--backends: {b!r} is not a wire/dataplane (e.g. vxlan/kernel)")
        names = [f.strip() for f in args.faults.split(",") if f.strip()] or FAULT_NAMES
        bad = [f for f in names if f not in FAULT_NAMES]
        if bad:
            raise UsageError(f"--faults: unknown {', '.join(bad)} (known: {', '.join(FAULT_NAMES)})")
        if scenario.nodes < 2 or scenario.pods_per_node < 1:
            raise UsageError(f"{scenario.path}: faults need at least 2 nodes with a pod each")
        faults = [f for f in FAULTS if f.name in names]
        plan = Plan.make(args.short)
        progress = Progress(len(backends) * len(faults))
        previous = signal.signal(signal.SIGTERM, _interrupt)   # SIGTERM tears the labs down like Ctrl-C
        try:
            doc = run(scenario, backends, faults, plan, progress)
        finally:
            signal.signal(signal.SIGTERM, previous)
            progress.close()
        out = args.out or os.path.join("results", time.strftime("faults-%Y%m%d-%H%M%S"))
        paths = faults_report.write(doc, out, args.json)
        print(faults_report.terminal(doc))
        print(f"\nwrote {', '.join(paths)}")
        if not any(r.get("status") == "ok" for r in doc["rows"]):
            raise Failure("no fault could be measured")
        missed = [f"{r['backend']} {r['fault']}" for r in doc["rows"] if r.get("verdict") == "missed"]
        if missed:  # a fault lab whose goals are missed must be able to fail a pipeline
            print(f"bench faults: {len(missed)} row(s) missed their goal: {', '.join(missed)}", file=sys.stderr)
            return 1
        return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt
