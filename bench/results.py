"""The result document of ``bench run`` (schema ``weft-bench/1``, described in the README).

Top level: ``schema``, ``created``, ``machine``, ``versions``, ``git``, ``scenario``, ``plan``,
``backends`` (per backend: medians of its runs and ratios, or ``status`` skipped/failed with a
``reason``), ``runs`` (every raw run), and ``control_plane`` for scale scenarios.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import subprocess

from .measure import median

SCHEMA = "weft-bench/1"
# Medians reported per backend: the list, in table order.
METRICS = ["tcp1_gbps", "tcp4_gbps", "udp_loss_pct", "rtt_p50_us", "rtt_p99_us", "rr_p50_us", "pps",
           "retransmits", "core_s_per_gbit", "daemon_cores", "tcp1_nooffload_gbps", "udp_jitter_ms"]
BASELINES = {"bare": "ratio_to_bare", "vxlan/kernel": "ratio_to_vxlan_kernel"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(argv) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu_model": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "memory_mb": mem, "hostname": platform.node()}


def versions() -> dict:
    iperf = _cmd(["iperf3", "--version"]).splitlines()
    return {"weft": "0.1.0", "python": platform.python_version(),
            "iperf3": iperf[0] if iperf else "", "sockperf": _cmd(["sockperf", "--version"]).split("\n")[0]}


def git_info() -> dict:
    return {"commit": _cmd(["git", "rev-parse", "HEAD"]),
            "dirty": bool(_cmd(["git", "status", "--porcelain", "--untracked-files=no"]))}


def new_document(scenario, plan) -> dict:
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "versions": versions(), "git": git_info(),
        "scenario": {"name": scenario.name, "path": scenario.path, "nodes": scenario.nodes,
                     "store": scenario.store},
        "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "throttle"}
        | {"throttle": dict(plan.throttle)},
        "backends": {}, "runs": [],
    }


def disturbed(row: dict) -> bool:
    return any(v is True for k, v in row.items() if k.endswith("_disturbed"))


def summarize(rows: list[dict], extra: dict, seconds: float) -> dict:
    """Medians over the runs no foreign load disturbed (over all runs when every one was)."""
    clean = [r for r in rows if not disturbed(r)]
    use = clean or rows
    out = {"status": "ok", "runs": len(rows), "seconds": round(seconds, 1)}
    for m in METRICS:
        out[m] = median(r.get(m) for r in use)
    out["disturbed_runs"] = len(rows) - len(clean)
    out.update(extra)
    return out


def pool_underlay(doc: dict) -> None:
    """bare's TCP x1 := the median of every undisturbed underlay sample of the run: its own lab's
    runs plus the one each backend's lab takes (``underlay_tcp1_gbps``). One lab's median of 3
    moved by up to 15 % between runs; the reference of every ratio_to_bare needs to move less."""
    bare = doc["backends"].get("bare")
    if not bare or bare.get("status") != "ok" or "tcp1_samples" in bare:
        return  # (already pooled)
    runs = [r for r in doc["runs"] if not disturbed(r)] or doc["runs"]
    samples = [r["tcp1_gbps"] for r in runs if r.get("backend") == "bare" and r.get("tcp1_gbps")]
    samples += [r["underlay_tcp1_gbps"] for r in runs if r.get("underlay_tcp1_gbps")]
    if samples:
        bare["tcp1_gbps_own_lab"] = bare.get("tcp1_gbps")
        bare["tcp1_gbps"] = median(samples)
        bare["tcp1_samples"] = len(samples)


def add_ratios(doc: dict) -> None:
    """Throughput and latency relative to baselines measured in the same run."""
    pool_underlay(doc)
    backends = doc["backends"]
    for base, key in BASELINES.items():
        ref = backends.get(base, {})
        for name, b in backends.items():
            if b.get("status") != "ok":
                continue
            t, rt = b.get("tcp1_gbps"), ref.get("tcp1_gbps") if ref.get("status") == "ok" else None
            b[key] = (t / rt) if t and rt else None
            lat, rlat = b.get("rtt_p50_us"), ref.get("rtt_p50_us") if ref.get("status") == "ok" else None
            b["latency_" + key] = (lat / rlat) if lat and rlat else None
