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

import numpy as np

from .stats import median, pair_kinds, quantile

SCHEMA = "weft-bench/1"
# Medians reported per backend: the list, in table order.
METRICS = ["tcp1_gbps", "tcp4_gbps", "udp_loss_pct", "rtt_p50_us", "rtt_p99_us", "ping_loss_pct", "rr_p50_us",
           "pps", "retransmits", "core_s_per_gbit", "daemon_cores", "tcp1_nooffload_gbps", "udp_jitter_ms"]
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
    """Per metric, the median over the runs that measured it and no foreign load disturbed (over
    all that measured it when every one was). Per metric, because TCP-only runs measure TCP x1
    alone: with run-wide exclusion one disturbed full run left only TCP-only rows, and every
    other metric null.

    A metric a run measured but got no value for (the tool left it out) is None in that run's
    row; ``missing`` maps such a metric to [runs without a value, runs that measured it], so a
    median of fewer runs, or a null, is said so. A metric the plan does not measure has no key in
    the rows and is simply None."""
    clean = [r for r in rows if not disturbed(r)]
    out = {"status": "ok", "runs": len(rows), "seconds": round(seconds, 1)}
    missing = {}
    for m in METRICS:
        measured = [r for r in clean if m in r] or [r for r in rows if m in r]
        out[m] = median(r[m] for r in measured)
        lacking = sum(1 for r in measured if r[m] is None)
        if lacking:
            missing[m] = [lacking, len(measured)]
    if missing:
        out["missing"] = missing
    out["disturbed_runs"] = len(rows) - len(clean)
    out.update(extra)
    return out


def pool_underlay(doc: dict) -> None:
    """bare's TCP x1 := the median of every undisturbed underlay sample of the run: its own lab's
    runs plus the one each backend's lab takes after each of its TCP x1 samples
    (``underlay_tcp1_gbps``). One lab's median of 3 moved by up to 15 % between runs."""
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


# A TCP x1 sample below this fraction of its series' typical speed (the 75th percentile of the
# backend's own samples, or of the run's underlay samples) was taken in one of the host's slow
# spells (docs/measurement-notes.md, "Noise"). A spell can outlast a pair (both halves slow) or begin or end inside
# it (one half slow: that pair's ratio says nothing), and in a spell the paths do not slow in
# proportion (a userspace engine's pair ratio rose from 0.63 to 0.73 in one).
SPELL_FRACTION = 0.8
MIN_PAIRS = 3


def _underlay_samples(doc: dict) -> list[float]:
    """Every undisturbed underlay TCP x1 sample of the run: the backends' twins and bare's own."""
    samples = [r["underlay_tcp1_gbps"] for r in doc["runs"]
               if r.get("underlay_tcp1_gbps") and not r.get("underlay_disturbed")]
    return samples + [r["tcp1_gbps"] for r in doc["runs"]
                      if r.get("backend") == "bare" and r.get("tcp1_gbps") and not r.get("tcp1_disturbed")]


def paired_ratio(doc: dict, name: str) -> dict | None:
    """``name``'s TCP x1 over the underlay, pair by pair: each of its samples divided by the
    underlay sample its lab took right after it (``underlay_tcp1_gbps``), ~2 s apart.

    Pairs are ``calm`` (both halves at their series' usual speed), ``spell`` (both slow: a spell
    of the host outlasted the pair) or ``mixed`` (one half slow). The ratio is the median over
    the calm pairs when there are MIN_PAIRS of them, else over calm and spell pairs, else (a run
    that spells cut to pieces) the backend's median over the run's underlay median."""
    pairs = [(r["tcp1_gbps"], r["underlay_tcp1_gbps"]) for r in doc["runs"]
             if r.get("backend") == name and r.get("tcp1_gbps") and r.get("underlay_tcp1_gbps")
             and not r.get("tcp1_disturbed") and not r.get("underlay_disturbed")]
    if not pairs:
        return None
    underlay = _underlay_samples(doc)
    own, twin = np.array(pairs, dtype=float).T
    kinds = pair_kinds(own < SPELL_FRACTION * quantile(own, 0.75),
                       twin < SPELL_FRACTION * quantile(underlay, 0.75))
    ratios = own / twin
    counts = {k: int(mask.sum()) for k, mask in kinds.items()}
    if counts["calm"] >= MIN_PAIRS:
        return {"ratio": median(ratios[kinds["calm"]]), "used": "calm", **counts}
    if counts["calm"] + counts["spell"] >= MIN_PAIRS:
        return {"ratio": median(ratios[kinds["calm"] | kinds["spell"]]), "used": "calm+spell", **counts}
    return {"ratio": median(own) / median(underlay), "used": "medians", **counts}


def add_ratios(doc: dict) -> None:
    """Throughput and latency relative to baselines measured in the same run.

    ``ratio_to_bare`` is the backend's paired ratio when its lab took underlay samples (every
    ``bench run`` does), else its TCP x1 median over bare's; ``ratio_to_vxlan_kernel`` divides the
    two backends' ``ratio_to_bare`` where both exist, so it is paired too."""
    pool_underlay(doc)
    ok = {n: b for n, b in doc["backends"].items() if b.get("status") == "ok"}
    bare, vxlan = ok.get("bare", {}), ok.get("vxlan/kernel", {})
    for name, b in ok.items():
        paired = paired_ratio(doc, name) if name != "bare" else None
        if paired:
            b["ratio_to_bare"] = paired.pop("ratio")
            b["ratio_to_bare_pairs"] = paired
        else:
            b["ratio_to_bare"] = _div(b.get("tcp1_gbps"), bare.get("tcp1_gbps"))
    for b in ok.values():
        b["ratio_to_vxlan_kernel"] = (_div(b.get("ratio_to_bare"), vxlan.get("ratio_to_bare"))
                                      or _div(b.get("tcp1_gbps"), vxlan.get("tcp1_gbps")))
        for base, key in ((bare, "ratio_to_bare"), (vxlan, "ratio_to_vxlan_kernel")):
            b["latency_" + key] = _div(b.get("rtt_p50_us"), base.get("rtt_p50_us"))


def _div(a, b):
    return a / b if a is not None and b else None  # 0 / x is a measured 0; x / 0 or a null: None
