"""``bench run``: every way of moving pod traffic, measured the same way in one sitting.

For each backend (``wire/dataplane``, or ``bare`` for the underlay itself) the runner builds a
fresh lab from the scenario with that backend and checks that every pod reaches every other pod;
every lab stays up (paused) and rounds measure each backend in turn, pod to pod across nodes 1
and 2, ``repeat`` full runs plus ``tcp1_extra`` TCP-only ones, each TCP x1 sample followed by
its underlay twin in the same lab (``bench.results.paired_ratio``); then every lab is torn down. Each
probe is guarded (``measure.Guard``): one that other processes disturbed is retried, and its
foreign CPU is recorded with the raw run. Backends that cannot run here are skipped with the
reason. The result is one JSON document (``bench.results``).

A dual-stack scenario (its network config enables IPv6) measures each data plane that carries
IPv6 over both families: after the IPv4 probes of a run, TCP x1 with its underlay twin, ping and
the pinned request/response again to the IPv6 addresses (row keys ending ``_v6``), so the IPv6
ratios are paired the same way against the IPv6 underlay of the same lab. An IPv6-only scenario
(EnableIPv4 false) runs the IPv6 probes alone: its pods and its overlay have no IPv4, so its rows
have ``_v6`` keys only (the bare underlay's twin too: the nodes' IPv6 addresses).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

from controlplane.config import parse_config

from . import measure, results
from .measure import Endpoint, MeasureError
from .procs import peak_rss_mb, process_cpu
from .results import V6

BARE = "bare"
RETRIES = 3  # extra attempts of a probe disturbed by foreign load


def default_backends(scenario=None) -> list[str]:
    """What a default run measures: the bare underlay, then every data plane the backend
    registry marks for the bench (controlplane.backends), in its order; for a dual-stack
    ``scenario`` or an IPv6-only one, only those that carry IPv6."""
    from controlplane.backends import bench_backends, declaration
    names = bench_backends()
    if scenario is not None and scenario.has_ipv6:
        names = [b for b in names if getattr(declaration(b), "ipv6", False)]
    return [BARE, *names]


@dataclass
class Plan:
    """How long each probe runs and which run; --quick keeps what the CI gate needs."""
    repeat: int = 3
    # TCP x1 samples beyond the full runs (TCP-only runs): its median is over repeat + tcp1_extra.
    # In a noisy spell of the shared machine, isolated samples of every data path (bare too) land
    # 30-45 % low, up to 1 in 3 (docs/measurement-notes.md, "Noise"); a median of 5 took three such samples in one
    # run, so the default run takes 7 of 1 s (a TCP-only round, with the underlay twins, costs
    # ~14 s for 7 backends). The quick plan (the CI gate, its committed baseline) keeps 5 of 2 s.
    tcp1_extra: int = 4
    # Probe durations in whole seconds: iperf3 (3.12) reads -t as an integer.
    tcp1_s: int = 1
    tcp4_s: int = 1
    udp_s: int = 1
    udp_rate: str = "300M"
    pps_s: int = 1
    ping_count: int = 150
    ping_interval: float = 0.004
    # Sparse traffic (full plan): one echo every 50 ms, so a data plane that sleeps between packets
    # (a userspace engine in poll()) is woken by each one; the "ping every 50 ms" probe.
    sparse_count: int = 40
    sparse_interval: float = 0.05
    rr_s: int = 1
    nooffload_s: int = 1
    full: bool = True
    # The sender and the receiver on their node's CPU (the lab's node_cpus; README, "One CPU per
    # node"). On 2 vCPUs the scheduler otherwise picks a different layout per run, and throughput with it.
    pin: bool = True
    # Right after each TCP x1 sample, the same probe over the underlay (node 1 -> node 2) in the
    # same lab: a backend's ratio_to_bare is the median of its sample pairs, and the pairs that a
    # slow spell of the host touched are left out (README, "Ratios"; bench.results.paired_ratio).
    underlay_samples: bool = True
    throttle: dict = field(default_factory=dict)  # backend -> tbf rate on the sending pod (gate self-test)

    @classmethod
    def quick(cls, repeat: int = 3) -> "Plan":
        return cls(repeat=repeat, tcp1_extra=2, tcp1_s=2, ping_count=100, full=False)


class Progress:
    """One status line (redrawn on a terminal, appended otherwise) with a bar over all steps."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = max(total, 1), 0, stream
        self.tty = stream.isatty()
        self.t0 = time.monotonic()

    def show(self, label: str, step: bool = False) -> None:
        if step:
            self.done += 1
        width = 24
        filled = int(width * self.done / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{time.monotonic() - self.t0:5.0f}s  {label}")
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def unavailable(backend: str, ipv6: bool = False) -> str | None:
    """Why ``backend`` cannot run here (or, ``ipv6``, in a scenario that enables IPv6: dual-stack
    or IPv6-only), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if backend == BARE:
        return None
    from controlplane.backends import declaration
    decl = declaration(backend)
    if decl is None:
        return "not built yet (no such backend in this build of weft)"
    if ipv6 and not getattr(decl, "ipv6", False):
        return (f"carries IPv4 only, the scenario enables IPv6"
                f"{': ' + decl.no_ipv6_reason if getattr(decl, 'no_ipv6_reason', '') else ''}")
    if "bcc" in decl.requires:
        try:
            import bcc  # noqa: F401
        except Exception:
            return "needs bcc (Debian python3-bpfcc): run ./bootstrap"
        if not os.path.exists(f"/lib/modules/{os.uname().release}/build"):
            return "needs kernel headers at /lib/modules/$(uname -r)/build: run ./bootstrap"
    return None


def scenario_for(scenario, backend: str):
    """The scenario with its network config switched to ``backend`` (bare: allocation only)."""
    doc = json.loads(scenario.config_text)
    wire, _, dataplane = (("alloc", "", "kernel") if backend == BARE else backend.partition("/"))
    doc["Backend"] = {k: v for k, v in (doc.get("Backend") or {}).items()
                      if k.lower() not in ("type", "dataplane")}
    doc["Backend"].update({"Type": wire, "Dataplane": dataplane})
    text = json.dumps(doc)
    return dataclasses.replace(scenario, config_text=text, network=parse_config(text),
                               node_overrides={})


def guarded(lab_namespaces, probe, label: str, rows_meta: dict, pids=()):
    """Run ``probe()`` until other processes leave it alone (at most RETRIES extra tries).

    The returned guard is the kept attempt's; ``guard.pids_cpu_s`` is the CPU that ``pids`` (the
    lab's daemons) used during that attempt alone, so dividing it by ``guard.seconds`` is a rate."""
    for attempt in range(RETRIES + 1):
        if attempt:
            time.sleep(0.5 * attempt)  # let a passing burst of foreign load go by
        guard = measure.Guard(lab_namespaces)
        cpu0 = {p: process_cpu(p) for p in pids}
        with guard:
            value = probe()
        cpu1 = {p: process_cpu(p) for p in pids}
        gone = None in cpu0.values() or None in cpu1.values()  # a daemon exited: its CPU is unknown
        guard.pids_cpu_s = None if gone else sum(cpu1[p] - cpu0[p] for p in pids)
        rows_meta[f"{label}_foreign_cpu_s"] = round(guard.foreign_cpu_s, 3)
        rows_meta[f"{label}_attempts"] = attempt + 1
        if not guard.disturbed:
            break
    rows_meta[f"{label}_disturbed"] = guard.disturbed
    return value, guard


def _address(thing, family: int) -> str:
    """A node's underlay or a pod's address of ``family`` (4 or 6)."""
    if hasattr(thing, "public_ip"):  # a node
        return thing.public_ip if family == 4 else thing.public_ipv6
    return thing.ip if family == 4 else thing.ip6


def families(lab) -> tuple[int, ...]:
    """The IP versions the lab's overlay carries: (4,), (4, 6) dual-stack, (6,) IPv6-only."""
    return lab.scenario.families


def _pairs(lab, backend: str, family: int = 4) -> list[tuple[Endpoint, str]]:
    ends = lab.nodes if backend == BARE else lab.pods
    return [(Endpoint(a.namespace, _address(a, family)), _address(b, family))
            for a in ends for b in ends if a is not b]


def check_connectivity(lab, backend: str) -> None:
    bad = [f"{src.ns}->{dst}" for family in families(lab) for src, dst in _pairs(lab, backend, family)
           if not measure.reachable(src, dst)]
    if bad:
        raise MeasureError(f"no connectivity: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")


def endpoints(lab, backend: str, family: int = 4) -> tuple[Endpoint, Endpoint, str]:
    """Sender and receiver across nodes 1 and 2 (their ``family`` addresses), and the sender's interface."""
    if backend == BARE:
        a, b = lab.node(1), lab.node(2)
    else:
        a = next(p for p in lab.pods if p.node == 1)
        b = next(p for p in lab.pods if p.node == 2)
    return Endpoint(a.namespace, _address(a, family)), Endpoint(b.namespace, _address(b, family)), "eth0"


def engine_pids(lab) -> list[int] | None:
    """The engine processes of the lab's userspace data planes (each weftd's
    ``weft_backend_engine_pid``; nodes whose data plane has none add nothing). None when a weftd's
    /metrics cannot be read: its engine is unknown, and so is any sum it belongs in."""
    from .scale import metrics
    pids = []
    for node in lab.nodes:
        try:
            m = metrics(node.namespace)
        except Exception:
            return None
        if "weft_backend_engine_pid" in m:
            pids.append(int(m["weft_backend_engine_pid"]))
    return pids


def underlay_twin(lab, plan: Plan, progress: Progress, label: str, row: dict, spaces, cpus,
                  family: int) -> None:
    """Right after a TCP x1 sample, the same probe node 1 -> node 2 over the underlay of that
    family: its twin in the pair ``ratio_to_bare`` is made of (``underlay_tcp1_gbps[_v6]``)."""
    v6 = "_v6" if family == 6 else ""
    progress.show(f"{label}: {'IPv6 ' if v6 else ''}TCP 1 stream, its underlay twin")
    a, b = lab.node(1), lab.node(2)
    under, _ = guarded(spaces, lambda: measure.iperf3(Endpoint(a.namespace, _address(a, family)),
                                                      Endpoint(b.namespace, _address(b, family)),
                                                      plan.tcp1_s, cpus=cpus), "underlay" + v6, row)
    row["underlay_tcp1_gbps" + v6] = under["gbps"]


def measure_once(lab, backend: str, plan: Plan, progress: Progress, label: str,
                 tcp_only: bool = False) -> dict:
    src, dst, dev = endpoints(lab, backend)
    cpus = (lab.node_cpu(1), lab.node_cpu(2)) if plan.pin else None
    cpus = None if cpus and None in cpus else cpus
    spaces = [n.namespace for n in lab.nodes] + [p.namespace for p in lab.pods]
    pids = [n.pid for n in lab.nodes if n.pid] if backend != BARE else []
    engines = engine_pids(lab) if pids else []  # a userspace engine's CPU is its daemon's
    pids += engines or []
    row: dict = {}

    progress.show(f"{label}: TCP 1 stream")
    tcp1, guard = guarded(spaces, lambda: measure.iperf3(src, dst, plan.tcp1_s, cpus=cpus), "tcp1", row, pids)
    row.update(tcp1_gbps=tcp1["gbps"], retransmits=tcp1["retransmits"], tcp1_write_bytes=tcp1["write_bytes"],
               tcp1_seconds=tcp1["seconds"])
    gbits = tcp1["bytes"] * 8 / 1e9 if tcp1["bytes"] is not None else None
    row["core_s_per_gbit"] = guard.machine_busy_s / gbits if gbits else None
    if pids:  # bare has no daemons: no key at all, rather than a number that is missing
        row["daemon_cores"] = (guard.pids_cpu_s / guard.seconds
                               if guard.pids_cpu_s is not None and engines is not None else None)
    if plan.underlay_samples and backend != BARE:
        underlay_twin(lab, plan, progress, label, row, spaces, cpus, 4)
    if tcp_only:
        row["tcp_only"] = True
        return row

    progress.show(f"{label}: ping")
    row.update(measure.ping(src, dst.ip, plan.ping_count, plan.ping_interval, cpu=cpus[0] if cpus else None))
    if not plan.full:
        return row
    sparse_ping(plan, progress, label, row, src, dst, cpus, pids, complete=engines is not None)

    progress.show(f"{label}: TCP 4 streams")
    tcp4, _ = guarded(spaces, lambda: measure.iperf3(src, dst, plan.tcp4_s, streams=4, cpus=cpus), "tcp4", row)
    row["tcp4_gbps"] = tcp4["gbps"]
    progress.show(f"{label}: UDP at {plan.udp_rate}bit/s")
    udp = measure.iperf3(src, dst, plan.udp_s, udp_rate=plan.udp_rate, cpus=cpus)
    row.update(udp_loss_pct=udp["loss_pct"], udp_jitter_ms=udp["jitter_ms"])
    progress.show(f"{label}: small packets")
    small = measure.iperf3(src, dst, plan.pps_s, udp_rate="0", length=64, cpus=cpus)
    row["pps"] = small["pps"]
    if measure.have_sockperf():
        progress.show(f"{label}: request/response (pinned)")
        lab.steer_receive(False)  # the whole round trip on one CPU: no cross-CPU wake-ups
        try:
            row.update(measure.request_response(src, dst, plan.rr_s, cpu=cpus[0] if cpus else 0))
        finally:
            lab.steer_receive(True)
    progress.show(f"{label}: TCP 1 stream, pod offloads off")
    measure.set_offloads(src.ns, dev, False)
    measure.set_offloads(dst.ns, dev, False)
    try:
        row["tcp1_nooffload_gbps"] = measure.iperf3(src, dst, plan.nooffload_s, cpus=cpus)["gbps"]
    finally:
        measure.set_offloads(src.ns, dev, True)
        measure.set_offloads(dst.ns, dev, True)
    return row


def sparse_ping(plan: Plan, progress: Progress, label: str, row: dict, src: Endpoint, dst: Endpoint,
                cpus, pids=(), complete: bool = True, family: int = 4) -> None:
    """Echoes one every ``plan.sparse_interval`` s (``sparse_rtt_p50_us``/``_p99_us``): what a pod
    talking now and then sees, each packet finding the data plane idle. With ``pids`` (the lab's
    daemons and engines; bare and the IPv6 probe pass none) also their CPU during it,
    ``sparse_daemon_cores``: what staying ready for such traffic costs (a busy-polling engine
    would show here); None when they are not all known (``complete`` False) or one exited."""
    sfx = V6 if family == 6 else ""
    progress.show(f"{label}: {'IPv6 ' if sfx else ''}ping every {plan.sparse_interval * 1000:g} ms")
    cpu0 = [process_cpu(p) for p in pids]
    t0 = time.monotonic()
    got = measure.ping(src, dst.ip, plan.sparse_count, plan.sparse_interval, cpu=cpus[0] if cpus else None)
    seconds = time.monotonic() - t0
    cpu1 = [process_cpu(p) for p in pids]
    row["sparse_rtt_p50_us" + sfx] = got["rtt_p50_us"]
    row["sparse_rtt_p99_us" + sfx] = got["rtt_p99_us"]
    if pids:  # bare has no daemons: no key
        known = complete and None not in cpu0 + cpu1
        row["sparse_daemon_cores"] = (sum(cpu1) - sum(cpu0)) / seconds if known else None


def measure_ipv6(lab, backend: str, plan: Plan, progress: Progress, label: str, row: dict,
                 tcp_only: bool = False) -> None:
    """The IPv6 probes of one run into ``row`` (keys ending ``_v6``): TCP x1 with its IPv6
    underlay twin, then (unless ``tcp_only``) ping and, in a full plan, the pinned
    request/response. Same endpoints, pinning and guard as IPv4's."""
    src, dst, _ = endpoints(lab, backend, 6)
    cpus = (lab.node_cpu(1), lab.node_cpu(2)) if plan.pin else None
    cpus = None if cpus and None in cpus else cpus
    spaces = [n.namespace for n in lab.nodes] + [p.namespace for p in lab.pods]
    progress.show(f"{label}: IPv6 TCP 1 stream")
    tcp1, _ = guarded(spaces, lambda: measure.iperf3(src, dst, plan.tcp1_s, cpus=cpus), "tcp1_v6", row)
    row.update(tcp1_gbps_v6=tcp1["gbps"], retransmits_v6=tcp1["retransmits"])
    if plan.underlay_samples and backend != BARE:
        underlay_twin(lab, plan, progress, label, row, spaces, cpus, 6)
    if tcp_only:
        return
    progress.show(f"{label}: IPv6 ping")
    ping = measure.ping(src, dst.ip, plan.ping_count, plan.ping_interval, cpu=cpus[0] if cpus else None)
    row.update({f"{k}_v6": v for k, v in ping.items()})
    if not plan.full:
        return
    sparse_ping(plan, progress, label, row, src, dst, cpus, family=6)
    if not measure.have_rr6():  # as IPv4's RR without sockperf: not measured
        return
    progress.show(f"{label}: IPv6 request/response (pinned)")
    lab.steer_receive(False)
    try:
        row["rr_p50_us_v6"] = measure.request_response6(src, dst, plan.rr_s, cpu=cpus[0] if cpus else 0)
    finally:
        lab.steer_receive(True)


def build_lab(scenario, backend: str, plan: Plan, progress: Progress, lab_factory):
    """One backend's lab, up, connected and (for the gate's self-test) throttled."""
    lab = lab_factory(scenario_for(scenario, backend))
    progress.show(f"{backend}: building the lab")
    lab.up()
    try:
        check_connectivity(lab, backend)
        src, _, dev = endpoints(lab, backend, families(lab)[0])
        rate = plan.throttle.get(backend)
        if rate:
            measure.throttle(src.ns, dev, rate)
    except BaseException:
        lab.down()
        raise
    return lab


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def verdict(doc: dict, named=()) -> tuple[list[str], list[str]]:
    """Why a ``bench run`` failed (one item per backend), and the skips that are not failures.

    A backend that failed fails the run; so does one that was skipped although ``--backends``
    named it (``named``). A default backend this machine cannot run is skipped with its reason."""
    failures, notes = [], []
    for name, b in doc.get("backends", {}).items():
        status, reason = b.get("status"), b.get("reason", "")
        if status == "failed":
            failures.append(f"{name} failed: {reason}")
        elif status == "skipped" and name in named:
            failures.append(f"{name} skipped: {reason} (named in --backends)")
        elif status == "skipped":
            notes.append(f"{name} skipped: {reason} (this machine cannot run it)")
        elif status != "ok":
            failures.append(f"{name}: status {status!r}")
    return failures, notes


def run(scenario, backends: list[str], plan: Plan, lab_factory=None, stream=sys.stderr) -> dict:
    """Every backend's lab is built first and kept up (paused while another is measured); then
    each round measures every backend once. So a backend's samples are spread over the whole run,
    and a slow spell of the machine (docs/measurement-notes.md, "Noise") costs one sample of several backends instead
    of every sample of one."""
    from .lab import Lab
    doc = results.new_document(scenario, plan)
    runnable = [b for b in backends if not _skip_if_unavailable(doc, b, scenario.has_ipv6)]
    sitting = Sitting(doc, runnable, plan, stream)
    for b in backends:
        if b not in runnable:
            sitting.progress.show(f"{b}: skipped ({doc['backends'][b]['reason']})")
    try:
        sitting.build_labs(scenario, lab_factory or (lambda scn: Lab(scn)))
        for i in range(sitting.rounds):
            sitting.measure_round(i)
        sitting.summarize()
    finally:
        sitting.tear_down()
    for b in runnable:  # the document keeps the order of --backends
        doc["runs"].extend(sitting.rows[b] if doc["backends"].get(b, {}).get("status") == "ok" else [])
    doc["backends"] = {b: doc["backends"][b] for b in backends if b in doc["backends"]}
    sitting.progress.close()
    results.add_ratios(doc)
    return doc


def _skip_if_unavailable(doc: dict, backend: str, ipv6: bool = False) -> bool:
    """Record a backend this machine (or the scenario) cannot run as skipped, with the reason."""
    why = unavailable(backend, ipv6)
    if why:
        doc["backends"][backend] = {"status": "skipped", "reason": why}
    return bool(why)


class Sitting:
    """One ``bench run`` over its runnable backends: their labs, their rows of samples, the time
    each took. A backend that fails is recorded as failed and its lab goes; the others go on."""

    def __init__(self, doc: dict, runnable: list[str], plan: Plan, stream=sys.stderr):
        self.doc, self.plan = doc, plan
        self.rounds = plan.repeat + plan.tcp1_extra
        self.progress = Progress(len(runnable) * self.rounds, stream)
        self.runnable = runnable
        self.labs: dict = {}
        self.rows: dict[str, list] = {b: [] for b in runnable}
        self.spent: dict[str, float] = {b: 0.0 for b in runnable}

    def fail(self, b: str, exc: BaseException) -> None:
        # one broken backend must not cost the others' numbers
        self.doc["backends"][b] = {"status": "failed", "reason": _reason(exc)}
        self.progress.show(f"{b}: failed: {_reason(exc)}")
        self.progress.done += self.rounds - len(self.rows[b])
        lab = self.labs.pop(b, None)
        if lab is not None:
            lab.down()

    def build_labs(self, scenario, lab_factory) -> None:
        """Every backend's lab, up, connected and paused."""
        for b in self.runnable:
            t0 = time.monotonic()
            try:
                self.labs[b] = build_lab(scenario, b, self.plan, self.progress, lab_factory)
                self.labs[b].pause()
            except Exception as exc:
                self.fail(b, exc)
            self.spent[b] += time.monotonic() - t0

    def measure_round(self, i: int) -> None:
        """Round ``i``: each backend's lab resumed, measured once (TCP only after ``repeat``
        rounds) and paused again."""
        tcp_only = i >= self.plan.repeat
        for b in self.runnable:
            if b not in self.labs:
                continue
            lab, t0 = self.labs[b], time.monotonic()
            label = f"{b} {'TCP-only ' if tcp_only else ''}run {i + 1}/{self.rounds}"
            lab.resume()
            try:
                fams = families(lab)  # IPv6-only: no IPv4 probe at all (no pod has an IPv4 address)
                row = measure_once(lab, b, self.plan, self.progress, label, tcp_only=tcp_only) if 4 in fams else {}
                if 6 in fams:
                    measure_ipv6(lab, b, self.plan, self.progress, label, row, tcp_only=tcp_only)
            except Exception as exc:
                self.fail(b, exc)
                continue
            finally:
                if b in self.labs:
                    lab.pause()
                self.spent[b] += time.monotonic() - t0
            row.update(backend=b, repeat=i + 1)
            self.rows[b].append(row)
            self.progress.show(f"{label} done", step=True)

    def summarize(self) -> None:
        """Each backend still standing: its medians, and what only its lab can tell (daemon RSS)."""
        for b, lab in self.labs.items():
            rss = [peak_rss_mb(n.pid) for n in lab.nodes if n.pid] if b != BARE else []
            extra = {"daemon_rss_mb": max([r for r in rss if r is not None], default=None),
                     "lab": {"nodes": len(lab.nodes), "pods": len(lab.pods)}}
            if b != BARE:
                lab.resume()  # paused daemons answer no /metrics, where the engines' PIDs are
                engines = engine_pids(lab)
                if engines is None or engines:  # a userspace plane: its engines' peak RSS
                    rss = [peak_rss_mb(p) for p in engines or []]
                    extra["engine_rss_mb"] = (max(rss) if rss and None not in rss else None)
            self.doc["backends"][b] = results.summarize(self.rows[b], extra, seconds=self.spent[b])

    def tear_down(self) -> None:
        for lab in self.labs.values():
            lab.down()
