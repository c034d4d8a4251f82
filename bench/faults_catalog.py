"""The faults ``bench faults`` injects, each with its goal as checks on the measured numbers.

A fault's ``run(ctx)`` injects and heals (``ctx.mark("inject")``, ``ctx.mark("heal")``) while
bench.faults.FaultRun keeps the traffic flowing, samples every node and supervises the daemons;
``checks(ctx, row)`` turns the goal into checks: ``ok`` True (held), False (missed, with the value),
None (not measured: a miss when the check is required, a note otherwise).
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import time

from .procs import _signal, read_text

TARGET = 2   # the node a node fault hits: pod 1x1 -> pod 2x1 carries the TCP stream


def check(name: str, ok, value, required: bool = True) -> dict:
    return {"name": name, "ok": ok, "value": value, "required": required}


def userspace(backend: str) -> bool:
    return backend.partition("/")[2] not in ("kernel", "ebpf")


# -- checks shared by the faults -----------------------------------------------------------------
def tcp_intact(row) -> dict:
    tcp = row["data_plane"].get("tcp") or {}
    if not tcp:
        return check("TCP stream did not reset", None, "not measured")
    ok = tcp.get("error") is None and tcp.get("intact")
    return check("TCP stream did not reset", ok,
                 f"error {tcp.get('error')}, {tcp.get('received_bytes')}/{tcp.get('sent_bytes')} bytes, "
                 f"longest stall {tcp.get('longest_stall_s')} s")


def no_exits(row, who: str = "no weftd exited") -> dict:
    exits = row["exits"]
    return check(who, not exits, "none" if not exits else
                 "; ".join(f"node {e['node']} status {e['status']} in {e['phase']} ({e['log'][-160:]})" for e in exits))


def same_subnets(row, only_ip: str | None = None) -> dict:
    before, after = row.get("leases_before"), row.get("leases_after")
    if before is None or after is None:
        return check("same subnets after", None, f"leases not readable (before {before is not None}, "
                                                  f"after {after is not None})")
    if only_ip:
        before, after = {only_ip: before.get(only_ip)}, {only_ip: after.get(only_ip)}
    changed = {ip: f"{before.get(ip)} -> {after.get(ip)}" for ip in set(before) | set(after)
               if before.get(ip) != after.get(ip)}
    return check("same subnets after", not changed, "same" if not changed else changed)


def converged(row, within: float | None = None) -> dict:
    took = row.get("peers_converged_s")
    name = "every node ready with its peers again" + (f" within {within:g} s of the heal" if within else "")
    if took is None:
        return check(name, False, "not within the wait")
    return check(name, within is None or took <= within, f"{took} s")


def programmed_after(row) -> dict:
    p = row.get("programmed_after")
    if p is None:
        return check("every data plane has every peer after", None, "probes unavailable")
    bad = {n: v for n, v in p.items() if v}
    return check("every data plane has every peer after", not bad, "yes" if not bad else bad)


def lost_zero(row, streams=None, name: str = "0 datagrams lost") -> dict:
    """Datagrams sent during the fault and after the heal that never arrived (what the lab lost
    before the fault, in the baseline, is shown beside: it is no effect of the fault)."""
    dp = row["data_plane"]
    rows = [dp["streams"][s] for s in (streams if streams is not None else dp["streams"])]
    if not rows or any(r["lost"] is None for r in rows):
        return check(name, None, "not measured")
    lost = sum(r["lost_by_phase"].get("fault", 0) + r["lost_by_phase"].get("recovery", 0) for r in rows)
    before = sum(r["lost_by_phase"].get("baseline", 0) for r in rows)
    gap = max(r["longest_gap_ms"] for r in rows)
    return check(name, lost == 0, f"{lost} lost in the fault and after, longest gap {gap} ms, {before} lost before "
                 "the fault" + (f" (streams {', '.join(streams)})" if streams is not None else ""))


def peers_min(ctx, row, node: int, phase: str):
    vals = (row["health"].get(node, {}).get(phase, {}).get("metrics", {}).get("weft_peers"))
    return vals[0] if vals else None


# -- the faults ----------------------------------------------------------------------------------
class Fault:
    name = number = title = goal = ""
    lab = "default"
    store: str | None = None
    store_tmpfs = False     # needs the SQLite store on a tmpfs of the lab's own (a disk to fill)

    def unavailable(self, scenario, backend: str) -> str | None:
        if self.store and scenario.store != self.store:
            example = {"etcd": "scenarios/seed.toml", "sqlite": "scenarios/default.toml"}[self.store]
            return f"needs a scenario with store = \"{self.store}\" (e.g. {example})"
        return None

    def bound_s(self, plan) -> float:
        return plan.baseline_s + plan.recovery_s + plan.converge_timeout_s + 60

    def run(self, ctx) -> None:
        raise NotImplementedError

    def checks(self, ctx, row) -> list[dict]:
        raise NotImplementedError


class WeftdRestart(Fault):
    lab = "default"

    def __init__(self, sig: int):
        self.sig = sig
        kill = sig == signal.SIGKILL
        self.name = "weftd-kill" if kill else "weftd-term"
        self.number = "3a" if kill else "3b"
        self.title = ("weftd killed (-9) under traffic, started again" if kill
                      else "weftd stopped with SIGTERM and started again (an upgrade)")
        self.goal = ("0 lost, on every plane (the userspace engines run in a process of their own that "
                     "outlives weftd and that the restarted weftd adopts); TCP does not reset; same subnet; no "
                     "other exit; every node's peers right again")

    def run(self, ctx) -> None:
        if userspace(ctx.backend):
            ctx.notes["engine_pid_before"] = engine_pid(ctx.lab, TARGET)
        ctx.mark("inject")
        ctx.stop(TARGET, self.sig)
        ctx.idle(ctx.plan.kill_gap_s)
        ctx.mark("heal")
        ctx.start(TARGET)
        if userspace(ctx.backend):
            ctx.wait_ready(TARGET, ctx.plan.converge_timeout_s)
            ctx.notes["engine_pid_after"] = engine_pid(ctx.lab, TARGET)

    def checks(self, ctx, row) -> list[dict]:
        dp = row["data_plane"]
        out = []
        lost = lost_zero(row)
        if userspace(ctx.backend) and lost["ok"] is False and not row["notes"].get("engine_pid_before"):
            lost["value"] += " (weftd exports no engine pid: the engine runs inside weftd and stops with it)"
        out.append(lost)
        ready = row["ready_after_restart_s"].get(TARGET)
        out.append(check(f"node {TARGET}'s weftd ready again", bool(ready), f"{ready[0]} s after the start"
                         if ready else "not ready"))
        out += [tcp_intact(row), no_exits(row), same_subnets(row), converged(row), programmed_after(row)]
        if userspace(ctx.backend):
            before, after = row["notes"].get("engine_pid_before"), row["notes"].get("engine_pid_after")
            out.append(check("the engine process outlived weftd (same pid after)", None if not before else
                             before == after, f"{before} -> {after}", required=False))
        return out


def engine_pid(lab, n: int) -> int | None:
    """The pid of node n's userspace engine process as its weftd exports it in /metrics
    (``weft_backend_engine_pid``), or None (no answer, or no such gauge: the engine runs inside weftd)."""
    from .errors import LabError
    from .scale import metrics
    try:
        pid = int(metrics(lab.node(n).namespace, timeout=0.5).get("weft_backend_engine_pid", 0))
    except LabError:
        return None
    return pid if pid > 0 else None


def _started_monotonic(pid: int) -> float | None:
    """When process ``pid`` started, on time.monotonic()'s clock (its start time in /proc is in
    clock ticks since boot, CLOCK_BOOTTIME's origin)."""
    from .procs import proc_start_time
    ticks = proc_start_time(pid)
    if ticks is None:
        return None
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - age


class EngineKill(Fault):
    name, number = "engine-kill", "3c"
    title = "a node's userspace engine process killed (-9) under traffic; its weftd starts it again"
    goal = ("traffic back within 1 s of the engine's restart; no weftd exit; same subnets; every node's peers "
            "right again")
    RESUME_WITHIN_S = 1.0
    WAIT_RESTART_S = 15.0

    def unavailable(self, scenario, backend: str) -> str | None:
        if not userspace(backend):
            return "the engine process exists only on the userspace planes (fastpath, python)"
        return super().unavailable(scenario, backend)

    def run(self, ctx) -> None:
        from .procs import proc_start_time
        lab, node = ctx.lab, ctx.lab.node(TARGET)
        old = engine_pid(lab, TARGET)
        ctx.notes["engine_pid_before"] = old
        if old is None or old == node.pid:
            ctx.notes["engine"] = ("weftd exports no weft_backend_engine_pid: the engine runs inside weftd, "
                                   "there is no engine process to kill")
            ctx.mark("inject")
            ctx.mark("heal")
            return
        start = proc_start_time(old)
        ctx.mark("inject")
        ctx.notes["killed"] = _signal(old, start, signal.SIGKILL)
        # the restart: a new engine pid in /metrics; its process's start time is the restart
        new, deadline = None, time.monotonic() + self.WAIT_RESTART_S
        next_tick = time.monotonic()
        while time.monotonic() < deadline:
            pid = engine_pid(lab, TARGET)
            if pid is not None and pid != old:
                new = pid
                break
            if time.monotonic() >= next_tick:
                ctx.tick()
                next_tick = time.monotonic() + 0.25
            time.sleep(0.02)
        ctx.notes["engine_pid_after"] = new
        began = _started_monotonic(new) if new else None
        if began is None:
            ctx.notes["engine"] = f"no new engine process within {self.WAIT_RESTART_S:g} s of the kill"
            ctx.mark("heal")
            return
        ctx.marks["heal"] = max(began, ctx.marks["inject"])   # the restart, to the clock tick
        ctx.notes["engine_restarted_after_s"] = round(ctx.marks["heal"] - ctx.marks["inject"], 3)

    def checks(self, ctx, row) -> list[dict]:
        notes = row["notes"]
        resumed = row["data_plane"].get("resumed_after_heal_s")
        after = notes.get("engine_restarted_after_s")
        return [check("the engine process was killed", bool(notes.get("killed")),
                      notes.get("engine") or f"pid {notes.get('engine_pid_before')}"),
                check("the engine was started again", after is not None,
                      f"pid {notes.get('engine_pid_after')}, {after} s after the kill" if after is not None
                      else notes.get("engine", "not restarted")),
                check(f"traffic back within {self.RESUME_WITHIN_S:g} s of the engine's restart",
                      None if resumed is None or after is None else resumed <= self.RESUME_WITHIN_S,
                      f"{resumed} s (slowest stream); lost {row['data_plane'].get('lost_by_phase')}"),
                tcp_intact(row), no_exits(row), same_subnets(row), converged(row), programmed_after(row)]


class LinkDown(Fault):
    name, number = "link-down", "6"
    title = "a node cut from the underlay (its eth0 down), then back"
    goal = "the others keep its routes; traffic resumes within 1 s of the link coming back; no exit; same subnets"

    def run(self, ctx) -> None:
        lab, node = ctx.lab, ctx.lab.node(TARGET)
        ctx.mark("inject")
        lab.exec(node.namespace, ["ip", "link", "set", "eth0", "down"], check=True)
        ctx.idle(ctx.plan.link_down_s / 2)
        ctx.notes["others_keep_its_subnet_mid_fault"] = _others_program(lab, TARGET)
        ctx.idle(ctx.plan.link_down_s / 2)
        lab.exec(node.namespace, ["ip", "link", "set", "eth0", "up"], check=True)
        ctx.mark("heal")   # the link is up once the command returns

    def checks(self, ctx, row) -> list[dict]:
        kept = row["notes"].get("others_keep_its_subnet_mid_fault")
        drops = {n: (peers_min(ctx, row, n, "baseline"), peers_min(ctx, row, n, "fault"))
                 for n in row["health"] if n != TARGET}
        held = kept is not None and all(v is True for v in kept.values()) and all(
            b is not None and f is not None and f >= b for b, f in drops.values())
        resumed = row["data_plane"].get("resumed_after_heal_s")
        return [check("the others keep its routes", held, f"programmed mid-fault {kept}; weft_peers min "
                      f"(baseline, fault) {drops}"),
                check("traffic resumes within 1 s of link up", None if resumed is None else resumed <= 1.0,
                      f"{resumed} s (slowest stream); lost {row['data_plane'].get('lost_by_phase')}"),
                tcp_intact(row), no_exits(row), same_subnets(row), converged(row), programmed_after(row)]


def _others_program(lab, victim: int) -> dict | None:
    from .faults import e2e_probe
    programmed = e2e_probe()
    if programmed is None:
        return None
    subnet = lab.node(victim).subnet
    out = {}
    for node in lab.nodes:
        if node.index != victim:
            try:
                out[node.index] = programmed(lab, node.index, subnet)
            except Exception as exc:
                out[node.index] = f"cannot tell: {str(exc)[:100]}"
    return out


class ConfigChange(Fault):
    name, number = "config-change", "7"
    title = "the network config changed (another Network) while the daemons run, then put back"
    goal = "no exit; every weftd keeps its config (subnet.env, leases) and stays ready; 0 lost"

    def run(self, ctx) -> None:
        from .faults import weftctl
        lab = ctx.lab
        doc = json.loads(lab.scenario.config_text)
        changed = dict(doc, Network="10.250.0.0/16" if doc.get("Network") != "10.250.0.0/16" else "10.251.0.0/16")
        paths = {}
        for label, d in (("changed", changed), ("original", doc)):
            paths[label] = os.path.join(lab.dir, f"faults-config-{label}.json")
            lab._file(paths[label])
            with open(paths[label], "w") as f:
                json.dump(d, f)
        ctx.mark("inject")
        put = weftctl(lab, "config", "put", paths["changed"])
        ctx.notes["changed_config"] = changed
        ctx.notes["put_changed"] = {"status": put.returncode, "output": (put.stderr or put.stdout).strip()[-200:]}
        ctx.idle(ctx.plan.config_change_s)
        ctx.notes["subnet_env_mid_fault"] = {n.index: read_text(n.subnet_file) for n in lab.nodes}
        ctx.mark("heal")
        back = weftctl(lab, "config", "put", paths["original"])
        ctx.notes["put_original"] = {"status": back.returncode, "output": (back.stderr or back.stdout).strip()[-200:]}

    def checks(self, ctx, row) -> list[dict]:
        notes = row["notes"]
        before, mid, after = row["subnet_env_before"], notes.get("subnet_env_mid_fault", {}), row["subnet_env_after"]
        changed = [n for n in before if mid.get(n) != before[n] or after.get(n) != before[n]]
        not_ready = {n: ph.get("fault", {}).get("readyz") for n, ph in row["health"].items()
                     if set(ph.get("fault", {}).get("readyz", {"none": 1})) != {"200"}}
        return [check("the changed config was stored", notes.get("put_changed", {}).get("status") == 0,
                      notes.get("put_changed")),
                no_exits(row),
                check("every subnet.env unchanged", not changed, "unchanged" if not changed else f"nodes {changed}"),
                same_subnets(row),
                check("every node stays ready", not not_ready, "200 throughout" if not not_ready else not_ready),
                lost_zero(row), tcp_intact(row)]


class NodePause(Fault):
    name, number = "node-pause", "4"
    title = "a node's weftd paused (SIGSTOP) past its lease TTL, then resumed"
    goal = ("the others remove it; on resume it takes a lease again (same subnet) without exiting, "
            "and its pods reach every other pod within 2 s")
    lab = "short-ttl"

    def bound_s(self, plan) -> float:
        return super().bound_s(plan) + plan.lease_ttl_s + plan.pause_past_ttl_s

    def run(self, ctx) -> None:
        lab, node = ctx.lab, ctx.lab.node(TARGET)
        from .faults import leases
        ctx.mark("inject")
        _signal(node.pid, node.start, signal.SIGSTOP)
        ctx.idle(ctx.plan.lease_ttl_s + ctx.plan.pause_past_ttl_s - 1.0)
        during = leases(lab)
        ctx.notes["lease_held_late_in_pause"] = None if during is None else node.public_ip in during
        ctx.idle(1.0)
        ctx.mark("heal")
        _signal(node.pid, node.start, signal.SIGCONT)

    def checks(self, ctx, row) -> list[dict]:
        node = ctx.lab.node(TARGET)
        drops = {n: (peers_min(ctx, row, n, "baseline"), peers_min(ctx, row, n, "fault"))
                 for n in row["health"] if n != TARGET}
        removed = all(b is not None and f is not None and f < b for b, f in drops.values())
        held = row["notes"].get("lease_held_late_in_pause")
        mine = [k for k in row["data_plane"]["streams"] if str(TARGET) in k.split("->")]
        resumed = [row["data_plane"]["streams"][k]["resumed_after_heal_s"] for k in mine]
        worst = None if None in resumed or not resumed else max(resumed)
        same_pid = row["pids_before"].get(TARGET) == row["pids_after"].get(TARGET)
        return [check("the others remove it", removed and held is False,
                      f"weft_peers min (baseline, fault) {drops}; its lease late in the pause: "
                      f"{'held' if held else 'gone' if held is False else 'unknown'}"),
                check("it resumes without exiting", same_pid and not row["exits"],
                      f"pid {row['pids_before'].get(TARGET)} -> {row['pids_after'].get(TARGET)}, exits {row['exits']}"),
                same_subnets(row, only_ip=node.public_ip),
                check("its pods reach every other pod within 2 s of resume",
                      None if worst is None else worst <= 2.0, f"{worst} s (streams {dict(zip(mine, resumed))})"),
                tcp_intact(row), converged(row), programmed_after(row)]


class EtcdOutage(Fault):
    name, number = "etcd-outage", "1"
    title = ("etcd paused (SIGSTOP), then killed and restarted on the same data dir; a node's weftd starts "
             "during the outage (a joiner); a lease is released with weftctl once etcd is back")
    goal = ("0 lost between existing pods; no weftd exits; the joiner waits and comes up once etcd returns; "
            "every node converged within 2 s of etcd's return; a metric and the log say the store is away")
    store = "etcd"
    JOINER = 3

    def unavailable(self, scenario, backend: str) -> str | None:
        if scenario.nodes < 3:
            return "needs 3 nodes (two existing, one joiner)"
        if scenario.store == "etcd" and scenario.etcd_members != 1:
            return "pauses the one etcd: needs lab.etcd_members = 1 (e.g. scenarios/seed.toml)"
        return super().unavailable(scenario, backend)

    def bound_s(self, plan) -> float:
        return super().bound_s(plan) + plan.etcd_pause_s + plan.etcd_down_s + 30

    def run(self, ctx) -> None:
        from .faults import weftctl
        from .procs import proc_start_time
        lab, plan = ctx.lab, ctx.plan
        etcd = lab._etcd
        joiner = lab.node(self.JOINER)
        # the joiner is a node with no lease: its weftd stopped, its lease released
        ctx.stop(self.JOINER, signal.SIGTERM)
        rel = weftctl(lab, "release", joiner.subnet)
        ctx.notes["joiner_lease_released_before"] = rel.returncode == 0
        # an extra lease (a node that is not running), released once etcd is back: a watch event
        # after the outage that every node must see
        fake_ip, fake_key, fake_value = _extra_lease(lab)
        etcd.etcdctl("put", fake_key, fake_value)
        ctx.notes["extra_lease"] = {"key": fake_key, "public_ip": fake_ip}
        ctx.idle(1.5)
        ctx.want_peers = {n.index: len(lab.nodes) - 1 for n in lab.nodes}
        ctx.mark("inject")
        os.kill(etcd.pid, signal.SIGSTOP)
        ctx.idle(plan.etcd_pause_s / 2)
        ctx.notes["joiner_started_t"] = ctx.rel(time.monotonic())
        ctx.start(self.JOINER)
        ctx.idle(plan.etcd_pause_s / 2)
        etcd.kill()                          # SIGKILL ends a stopped process too
        ctx.mark("etcd_killed")
        ctx.idle(plan.etcd_down_s)
        ctx.mark("etcd_restart")
        etcd.restart()
        lab.ledger.add("process", pid=etcd.pid, start=proc_start_time(etcd.pid), role="etcd (restarted)",
                       ns=lab.store_ns)
        ctx.mark("heal")                     # etcd is back (healthy)
        ctx.tick()
        ctx.notes["peers_before_release"] = {s["node"]: (s["metrics"] or {}).get("weft_peers")
                                             for s in ctx.samples[-len(lab.nodes):]}
        rel = weftctl(lab, "release", fake_key.rpartition("/")[2].replace("-", "/"))
        ctx.notes["extra_lease_released"] = {"status": rel.returncode, "t": ctx.rel(time.monotonic()),
                                             "output": (rel.stderr or rel.stdout).strip()[-200:]}

    def checks(self, ctx, row) -> list[dict]:
        existing = [k for k in row["data_plane"]["streams"] if str(self.JOINER) not in k.split("->")]
        ready = row["ready_after_restart_s"].get(self.JOINER) or []
        store_up = {n: row["health"].get(n, {}).get("fault", {}).get("metrics", {}).get("weft_store_up")
                    for n in row["health"] if n != self.JOINER}
        away = all(v is not None and v[0] == 0 for v in store_up.values())
        logs = {n: [l for l in row["log"].get(n, []) if re.search(r"(?i)store|etcd", l)]
                for n in row["log"] if n != self.JOINER}
        readyz = {n: row["health"].get(n, {}).get("fault", {}).get("readyz") for n in row["health"]}
        return [lost_zero(row, existing, "0 lost between existing pods"), no_exits(row),
                check("the joiner waits and comes up once etcd returns", bool(ready) and ready[0] >= 0,
                      f"ready {ready[0]} s after etcd's return" if ready else "never ready"),
                converged(row, within=2.0),
                check("the extra lease's release was stored", row["notes"].get("extra_lease_released", {})
                      .get("status") == 0, row["notes"].get("extra_lease_released")),
                check("a metric says the store is away", away, f"weft_store_up (min, max) in the fault: {store_up}"),
                check("the log says the store is away", all(logs.values()) and bool(logs),
                      {n: v[:2] for n, v in logs.items()}),
                check("/readyz during the outage (the documented rule)", None, readyz, required=False),
                same_subnets(row)]


class SqliteFault(Fault):
    """The SQLite store file broken under running daemons (which write to it every few seconds: the
    claim refresh), then repaired."""
    store = "sqlite"
    goal = ("the data plane never loses a datagram; the daemons report the fault (log, metric, /readyz), "
            "retry, and recover (store up again, no exit, same subnets)")

    def __init__(self, kind: str):
        self.kind = kind
        self.name = f"sqlite-{kind}"
        self.number = "5"
        self.title = {"readonly": "the SQLite file made read-only (chattr +i on the file and its WAL), then writable",
                      "corrupt": "the SQLite file checkpointed, then every byte of it overwritten with garbage, then restored",
                      "full": "the disk of the SQLite file (a small tmpfs) filled by a filler file, then the filler "
                              "removed"}[kind]
        # disk-full needs a disk that can be filled: the lab puts the store on a tmpfs of its own
        self.store_tmpfs = kind == "full"

    def run(self, ctx) -> None:
        lab = ctx.lab
        path = lab.store["path"]
        files = [f for f in (path, path + "-wal") if os.path.exists(f)]
        saved = filler = None
        if self.kind == "full":
            filler = lab._file(os.path.join(os.path.dirname(path), "faults-filler"))
        ctx.mark("inject")
        try:
            if self.kind == "full":
                ctx.notes["disk"] = _fill(path, filler)
            elif self.kind == "readonly":
                for f in files:
                    subprocess.run(["chattr", "+i", f], check=True, capture_output=True, timeout=10)
            else:
                # Checkpoint first: in WAL mode the latest page 1 (and every page written since the
                # last checkpoint) is read from the WAL, so garbage in the main file alone is never
                # seen. Then every byte of the main file is garbage until the repair puts it back.
                cp = subprocess.run(["sqlite3", path, "PRAGMA busy_timeout=5000; PRAGMA wal_checkpoint(TRUNCATE);"],
                                    capture_output=True, text=True, timeout=30)
                ctx.notes["checkpoint"] = (cp.stdout or cp.stderr).strip()[-120:]
                with open(path, "r+b") as f:
                    saved = f.read()
                    f.seek(0)
                    f.write(bytes((0xDE, 0xAD)) * (len(saved) // 2) + b"\xde" * (len(saved) % 2))
                    f.flush()
                    os.fsync(f.fileno())
            ctx.notes["files"] = files
            ctx.idle(ctx.plan.store_fault_s / 2)
            ctx.notes["healthz_mid_fault"] = _healthz(lab)
            # what a fresh reader of the file sees now (the running daemons may hold cached pages)
            from .faults import weftctl
            probe = weftctl(lab, "leases", "--json")
            ctx.notes["fresh_reader_during_fault"] = {"status": probe.returncode,
                                                      "output": (probe.stderr or "").strip()[-200:]}
            ctx.idle(ctx.plan.store_fault_s / 2)
        finally:
            if filler is not None and os.path.exists(filler):
                os.unlink(filler)
                ctx.notes.setdefault("disk", {})["free_after_heal_bytes"] = _free(os.path.dirname(path))
            if self.kind == "readonly":
                for f in files:
                    subprocess.run(["chattr", "-i", f], capture_output=True, timeout=10)
            elif saved is not None:
                with open(path, "r+b") as f:
                    f.write(saved)
                    f.flush()
                    os.fsync(f.fileno())
        ctx.mark("heal")
        # the daemons retry on their own schedule: wait (bounded) until each says the store is up again
        ctx.notes["store_up_again_s"] = None
        deadline = ctx.marks["heal"] + ctx.plan.converge_timeout_s
        while time.monotonic() < deadline:
            ctx.tick()
            latest = ctx.samples[-len(lab.nodes):]
            if all((smp["metrics"] or {}).get("weft_store_up") == 1 for smp in latest):
                ctx.notes["store_up_again_s"] = round(max(smp["t"] for smp in latest) - ctx.marks["heal"], 3)
                break
            time.sleep(0.25)
        ctx.notes["healthz_after"] = _healthz(lab)

    def checks(self, ctx, row) -> list[dict]:
        fault = {n: row["health"].get(n, {}).get("fault", {}) for n in row["health"]}
        up = {n: f.get("metrics", {}).get("weft_store_up") for n, f in fault.items()}
        errors = {n: f.get("metrics", {}).get("weft_store_errors_total") for n, f in fault.items()}
        reported = all((u is not None and u[0] == 0) or (e is not None and e[1] > e[0])
                       for u, e in zip(up.values(), errors.values()))
        logs = {n: [l for l in row["log"].get(n, []) if re.search(r"(?i)store|sqlite|database", l)]
                for n in row["log"]}
        again = row["notes"].get("store_up_again_s")
        fresh = row["notes"].get("fresh_reader_during_fault")
        # the documented rule: /readyz stays 200 through a store outage while the lease has not
        # expired (the faults are far shorter than the lease TTL)
        not_ready = {n: f.get("readyz") for n, f in fault.items() if set(f.get("readyz", {"none": 1})) != {"200"}}
        healthz = {k: row["notes"].get(k) for k in ("healthz_mid_fault", "healthz_after")}
        threads_ok = all(isinstance(v, dict) and v and all(code == 200 for code, _ in v.values())
                         for v in healthz.values())
        out = []
        if self.kind == "full":
            disk = row["notes"].get("disk") or {}
            out.append(check("the disk was full", disk.get("free_after_fill_bytes") == 0,
                             f"{disk.get('filled_bytes')} bytes of filler, {disk.get('free_after_fill_bytes')} bytes "
                             f"free then (of {disk.get('size_bytes')}), {disk.get('free_after_heal_bytes')} after"))
        return out + [lost_zero(row), no_exits(row),
                check("the fault is reported by a metric", reported,
                      f"weft_store_up (min, max) {up}; weft_store_errors_total (min, max) {errors}; "
                      f"a fresh reader (weftctl leases) during the fault: {fresh}"),
                check("the fault is in the log", all(logs.values()), {n: v[:2] for n, v in logs.items()}),
                check("/readyz 200 during the fault (the documented rule: the lease has not expired)",
                      not not_ready, "200 throughout" if not not_ready else not_ready),
                check("/healthz 200 during the fault and after (no thread stopped)", threads_ok, healthz),
                check("the store is up again on every node (weft_store_up 1)", again is not None,
                      f"{again} s after the repair" if again is not None
                      else f"not within {ctx.plan.converge_timeout_s:g} s of the repair"),
                same_subnets(row), converged(row), programmed_after(row)]


def _free(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _fill(db: str, filler: str) -> dict:
    """Fill the disk of ``db`` with ``filler`` (at most the disk's size). The WAL is checkpointed
    and truncated first: a WAL keeps its pages after a checkpoint and SQLite writes over them, so
    on a full disk writes could go on in the old pages and the fault would not be seen."""
    directory = os.path.dirname(db)
    cp = subprocess.run(["sqlite3", db, "PRAGMA busy_timeout=5000; PRAGMA wal_checkpoint(TRUNCATE);"],
                        capture_output=True, text=True, timeout=30)
    st = os.statvfs(directory)
    size = st.f_blocks * st.f_frsize
    written = 0
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (1 << 20, 4096, 1):      # big blocks, then the last pages
            block = b"\0" * chunk
            while written <= size:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return {"checkpoint": (cp.stdout or cp.stderr).strip()[-120:], "size_bytes": size, "filled_bytes": written,
            "free_after_fill_bytes": _free(directory)}


def _healthz(lab) -> dict:
    """Each node's /healthz (status, body): 503 names a weftd thread that stopped."""
    from .lab import HEALTHZ_PORT
    from .netns import http_get
    out = {}
    for node in lab.nodes:
        got = http_get(node.namespace, "127.0.0.1", HEALTHZ_PORT, "/healthz", timeout=1.0)
        out[node.index] = (got[0], got[1].decode("utf-8", "replace").strip()[:160]) if got else (None, "no answer")
    return out


class EtcdLeader(Fault):
    name, number = "etcd-leader", "2"
    title = ("a 3-member etcd cluster's leader (made the first endpoint weftd is given) killed (-9), a lease "
             "released meanwhile, the member restarted on its data dir")
    goal = ("weftd (all three -etcd-endpoints) fails over: 0 lost; no exit; the release during the fault seen "
            "by every node within 2 s (no missed watch event); weft_store_up 1 on every node from 2 s after the "
            "new leader's election until the member's restart; same subnets")
    store = "etcd"
    STORE_UP_WITHIN_S = 2.0     # the store's health needs 2 s of answers after an outage (monitor.BACK_AFTER)
    WATCH_AFTER_S = 2.0         # the member stays away at least this long after the window, to see it hold

    def unavailable(self, scenario, backend: str) -> str | None:
        if scenario.store == "etcd" and scenario.etcd_members < 3:
            return "needs lab.etcd_members = 3 (e.g. scenarios/seed-etcd3.toml)"
        return super().unavailable(scenario, backend)

    def bound_s(self, plan) -> float:
        return super().bound_s(plan) + plan.etcd_down_s + 40

    def run(self, ctx) -> None:
        from .faults import weftctl
        from .procs import proc_start_time
        lab, plan = ctx.lab, ctx.plan
        fake_ip, fake_key, fake_value = _extra_lease(lab)
        lab._etcd.etcdctl("put", fake_key, fake_value)
        ctx.notes["extra_lease"] = {"key": fake_key, "public_ip": fake_ip}
        # The worst case for weftd: the member it talks to first (the first endpoint listed) is the
        # leader that dies. etcd moves leadership on request (etcdctl move-leader).
        first = lab.etcd_members[0]
        ctx.notes["moved_leader"] = _make_leader(lab.etcd_members, first)
        ctx.idle(1.5)
        ctx.want_peers = {n.index: len(lab.nodes) - 1 for n in lab.nodes}   # the extra lease gone
        leader = _leader(lab.etcd_members)
        ctx.notes["leader"] = leader.name if leader else None
        ctx.notes["leader_is_first_endpoint"] = leader is first
        if leader is None:
            raise RuntimeError("no etcd member says it is the leader")
        survivors = [m for m in lab.etcd_members if m is not leader]
        ctx.mark("inject")
        leader.kill()
        # the failover: a survivor elected leader (polled while the traffic is sampled)
        elected = None
        while elected is None and time.monotonic() - ctx.marks["inject"] < 15.0:
            ctx.tick()
            if _leader(survivors, timeout=2) is not None:
                elected = time.monotonic()
        ctx.notes["new_leader_after_s"] = None if elected is None else round(elected - ctx.marks["inject"], 3)
        if elected is not None:
            ctx.marks["failover"] = elected
        left = ctx.marks["inject"] + 1.0 - time.monotonic()
        if left > 0:
            ctx.idle(left)
        rel = weftctl(lab, "release", fake_key.rpartition("/")[2].replace("-", "/"))
        ctx.notes["extra_lease_released"] = {"status": rel.returncode, "t": ctx.rel(time.monotonic()),
                                             "output": (rel.stderr or rel.stdout).strip()[-200:]}
        t_rel = time.monotonic()
        want = len(lab.nodes) - 1
        seen = None
        # the member stays away at least etcd_down_s, and past the store-up window plus a while
        hold_until = max(t_rel + plan.etcd_down_s,
                         (elected or t_rel) + self.STORE_UP_WITHIN_S + self.WATCH_AFTER_S)
        while time.monotonic() - t_rel < max(plan.etcd_down_s, 10.0) or time.monotonic() < hold_until:
            ctx.tick()
            latest = {smp["node"]: smp for smp in ctx.samples[-len(lab.nodes):]}
            if seen is None and all((smp["metrics"] or {}).get("weft_peers") == want for smp in latest.values()):
                seen = round(time.monotonic() - t_rel, 3)
            if seen is not None and time.monotonic() >= hold_until:
                break
            time.sleep(0.1)
        ctx.notes["release_seen_by_all_s"] = seen
        ctx.notes["store_up_after_failover"] = self._store_up_window(ctx)
        leader.restart()
        lab.ledger.add("process", pid=leader.pid, start=proc_start_time(leader.pid), role="etcd (restarted)",
                       ns=lab.store_ns)
        ctx.mark("heal")

    def _store_up_window(self, ctx) -> dict | None:
        """weft_store_up per node in the samples from STORE_UP_WITHIN_S after the election until now
        (the member still away), and when each node last read 0 (seconds after the election)."""
        elected = ctx.marks.get("failover")
        if elected is None:
            return None
        start = elected + self.STORE_UP_WITHIN_S
        out = {}
        for node in ctx.lab.nodes:
            mine = [s for s in ctx.samples if s["node"] == node.index and s["t"] >= ctx.marks["inject"]]
            window = [(s["metrics"] or {}).get("weft_store_up") for s in mine if s["t"] >= start]
            zeros = [s["t"] for s in mine if (s["metrics"] or {}).get("weft_store_up") != 1]
            out[node.index] = {"samples": len(window), "values": sorted(set(window), key=str),
                               "last_not_up_s": round(max(zeros) - elected, 3) if zeros else None}
        return out

    def checks(self, ctx, row) -> list[dict]:
        seen = row["notes"].get("release_seen_by_all_s")
        window = row["notes"].get("store_up_after_failover")
        up = (window is not None and all(w["samples"] >= 2 and w["values"] == [1.0] for w in window.values()))
        return [lost_zero(row), no_exits(row),
                check("the killed leader was the first endpoint", row["notes"].get("leader_is_first_endpoint"),
                      f"{row['notes'].get('leader')} (moved: {row['notes'].get('moved_leader')})"),
                check("a survivor was elected leader", row["notes"].get("new_leader_after_s") is not None,
                      f"{row['notes'].get('new_leader_after_s')} s after the kill"),
                check("the release was stored during the fault",
                      row["notes"].get("extra_lease_released", {}).get("status") == 0,
                      row["notes"].get("extra_lease_released")),
                check("every node saw the release within 2 s", None if seen is None else seen <= 2.0,
                      f"{seen} s" if seen is not None else "not seen"),
                check(f"weft_store_up 1 on every node from {self.STORE_UP_WITHIN_S:g} s after the election until "
                      "the member's restart", None if window is None else up,
                      "no election seen" if window is None else window),
                check("/readyz while the leader was away (reported, not a goal)", None,
                      {n: h.get("fault", {}).get("readyz") for n, h in row["health"].items()}, required=False),
                tcp_intact(row), same_subnets(row), converged(row), programmed_after(row)]


def _make_leader(members, target) -> str:
    """Move etcd's leadership to ``target`` (etcdctl move-leader, sent to the current leader)."""
    leader = _leader(members)
    if leader is None:
        return "no leader"
    if leader is target:
        return "already"
    status = json.loads(target.etcdctl("endpoint", "status", "-w", "json", timeout=10))
    member_id = status[0]["Status"]["header"]["member_id"]
    leader.etcdctl("move-leader", format(member_id, "x"), timeout=15)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _leader(members) is target:
            return f"from {leader.name}"
        time.sleep(0.1)
    return f"from {leader.name}: not moved within 10 s"


def _leader(members, timeout: float = 10):
    for m in members:
        try:
            status = json.loads(m.etcdctl("endpoint", "status", "-w", "json", timeout=timeout))
        except Exception:
            continue
        for st in status:
            # no leader (an election): etcdctl's JSON leaves the zero "leader" out
            if st["Status"]["header"]["member_id"] == st["Status"].get("leader"):
                return m
    return None


def _extra_lease(lab) -> tuple[str, str, str]:
    """A lease for a node that does not run: node 1's value with another public IP (and VtepMAC), in a
    subnet no one holds; its key and value as etcdctl writes them (flannel's layout)."""
    import ipaddress
    s = lab.scenario
    ip = str(s.underlay.broadcast_address - 5)
    held = {n.subnet for n in lab.nodes}
    plen = ipaddress.IPv4Network(lab.node(1).subnet).prefixlen
    subnet = next(str(n) for n in reversed(list(s.network.network.subnets(new_prefix=plen))) if str(n) not in held)
    node1 = lab.node(1).subnet.replace("/", "-")
    value = json.loads(lab._etcd.etcdctl("get", f"{s.prefix}/subnets/{node1}", "--print-value-only").strip())
    value["PublicIP"] = ip
    if isinstance(value.get("BackendData"), dict) and "VtepMAC" in value["BackendData"]:
        value["BackendData"]["VtepMAC"] = "02:66:61:75:6c:74"
    return ip, f"{s.prefix}/subnets/{subnet.replace('/', '-')}", json.dumps(value, separators=(",", ":"))


FAULTS: list[Fault] = [EtcdOutage(), EtcdLeader(), WeftdRestart(signal.SIGKILL), WeftdRestart(signal.SIGTERM),
                       EngineKill(), NodePause(),
                       SqliteFault("readonly"), SqliteFault("corrupt"), SqliteFault("full"), LinkDown(), ConfigChange()]
FAULT_NAMES = [f.name for f in FAULTS]
