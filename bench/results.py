"""The result document of ``bench run`` (schema ``weft-bench/1``, described in the README).

Top level: ``schema``, ``created``, ``machine``, ``versions``, ``git``, ``scenario``, ``plan``,
``backends`` (per backend: medians of its runs and ratios, or ``status`` skipped/failed with a
``reason``), ``runs`` (every raw run), and ``control_plane`` for scale scenarios.

A dual-stack run's backends also carry ``v6``: the IPv6 probes' medians (``V6_METRICS``, from the
rows' ``<metric>_v6`` keys) and their ratios, each against the IPv6 underlay of the same run, the
same way as IPv4's. A document without ``v6`` is an IPv4-only run. An IPv6-only run (EnableIPv4
false) measured no IPv4 at all: its backends have ``v6`` and no IPv4 medians or ratios (no keys,
rather than nulls that would read as numbers lost; ``has_ipv4``).
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
           "pps", "retransmits", "core_s_per_gbit", "daemon_cores", "tcp1_nooffload_gbps", "udp_jitter_ms",
           "sparse_rtt_p50_us", "sparse_rtt_p99_us", "sparse_daemon_cores"]
# The IPv6 probes of a dual-stack run (row key: metric + "_v6"), medians under a backend's "v6".
V6_METRICS = ["tcp1_gbps", "retransmits", "rtt_p50_us", "rtt_p99_us", "ping_loss_pct", "rr_p50_us",
              "sparse_rtt_p50_us", "sparse_rtt_p99_us"]
V6 = "_v6"
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


def disturbed(row: dict, family: int = 4) -> bool:
    """Whether foreign load disturbed one of the row's probes of ``family`` (IPv6 probes are
    labelled ``*_v6``, so a disturbed IPv6 probe costs IPv4's medians nothing, and the other way round)."""
    return any(v is True for k, v in row.items()
               if k.endswith("_disturbed") and k.endswith(V6 + "_disturbed") == (family == 6))


def summarize(rows: list[dict], extra: dict, seconds: float) -> dict:
    """Per metric, the median over the runs that measured it and no foreign load disturbed (over
    all that measured it when every one was). Per metric, because TCP-only runs measure TCP x1
    alone: with run-wide exclusion one disturbed full run left only TCP-only rows, and every
    other metric null.

    A metric a run measured but got no value for (the tool left it out) is None in that run's
    row; ``missing`` maps such a metric to [runs without a value, runs that measured it], so a
    median of fewer runs, or a null, is said so. A metric the plan does not measure has no key in
    the rows and is simply None."""
    out = {"status": "ok", "runs": len(rows), "seconds": round(seconds, 1)}
    if not rows or any(m in r for r in rows for m in METRICS):  # else an IPv6-only run: no IPv4 probe ran
        out.update(_medians(rows, METRICS))
    if any("tcp1_gbps" + V6 in r for r in rows):
        out["v6"] = _summarize_v6(rows)
    out.update(extra)
    return out


def _summarize_v6(rows: list[dict]) -> dict:
    """The IPv6 medians of a dual-stack backend's rows, by the same rules as IPv4's."""
    return _medians(rows, V6_METRICS, 6)


def _medians(rows: list[dict], metrics, family: int = 4) -> dict:
    """Each metric's median over the rows whose probes of that family were not disturbed (all
    rows when every one was), ``missing`` (metric -> [rows without a value, rows measured]) and
    ``disturbed_runs``. An IPv6 metric ``m`` is read from the rows' ``m + V6``."""
    suffix = V6 if family == 6 else ""
    clean = [r for r in rows if not disturbed(r, family)]
    out, missing = {}, {}
    for m in metrics:
        key = m + suffix
        measured = [r for r in clean if key in r] or [r for r in rows if key in r]
        out[m] = median(r[key] for r in measured)
        lacking = sum(1 for r in measured if r[key] is None)
        if lacking:
            missing[m] = [lacking, len(measured)]
    if missing:
        out["missing"] = missing
    out["disturbed_runs"] = len(rows) - len(clean)
    return out


def has_ipv4(b: dict) -> bool:
    """Whether a backend's summary has IPv4 numbers (False: an IPv6-only run's, ``v6`` alone)."""
    return "v6" not in b or any(m in b for m in METRICS)


def family_of(b: dict, family: int) -> dict | None:
    """A backend's numbers of ``family``: the backend itself (4), its ``v6`` part or None (6)."""
    return b if family == 4 else b.get("v6")


def pool_underlay(doc: dict, family: int = 4) -> None:
    """bare's TCP x1 := the median of every undisturbed underlay sample of the run: its own lab's
    runs plus the one each backend's lab takes after each of its TCP x1 samples
    (``underlay_tcp1_gbps``). One lab's median of 3 moved by up to 15 % between runs."""
    owner = doc["backends"].get("bare")
    if not owner or owner.get("status") != "ok":
        return
    bare, sfx = family_of(owner, family), V6 if family == 6 else ""
    if not bare or "tcp1_samples" in bare:
        return  # (already pooled)
    runs = [r for r in doc["runs"] if not disturbed(r, family)] or doc["runs"]
    samples = [r["tcp1_gbps" + sfx] for r in runs if r.get("backend") == "bare" and r.get("tcp1_gbps" + sfx)]
    samples += [r["underlay_tcp1_gbps" + sfx] for r in runs if r.get("underlay_tcp1_gbps" + sfx)]
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


def _underlay_samples(doc: dict, sfx: str = "") -> list[float]:
    """Every undisturbed underlay TCP x1 sample of the run: the backends' twins and bare's own
    (``sfx`` "_v6": the IPv6 ones)."""
    samples = [r["underlay_tcp1_gbps" + sfx] for r in doc["runs"]
               if r.get("underlay_tcp1_gbps" + sfx) and not r.get(f"underlay{sfx}_disturbed")]
    return samples + [r["tcp1_gbps" + sfx] for r in doc["runs"]
                      if r.get("backend") == "bare" and r.get("tcp1_gbps" + sfx)
                      and not r.get(f"tcp1{sfx}_disturbed")]


def paired_ratio(doc: dict, name: str, family: int = 4) -> dict | None:
    """``name``'s TCP x1 over the underlay, pair by pair: each of its samples divided by the
    underlay sample its lab took right after it (``underlay_tcp1_gbps``), ~2 s apart.

    Pairs are ``calm`` (both halves at their series' usual speed), ``spell`` (both slow: a spell
    of the host outlasted the pair) or ``mixed`` (one half slow). The ratio is the median over
    the calm pairs when there are MIN_PAIRS of them, else over calm and spell pairs, else (a run
    that spells cut to pieces) the backend's median over the run's underlay median. ``family``
    6: the IPv6 samples and their IPv6 underlay twins."""
    sfx = V6 if family == 6 else ""
    own_key, twin_key = "tcp1_gbps" + sfx, "underlay_tcp1_gbps" + sfx
    pairs = [(r[own_key], r[twin_key]) for r in doc["runs"]
             if r.get("backend") == name and r.get(own_key) and r.get(twin_key)
             and not r.get(f"tcp1{sfx}_disturbed") and not r.get(f"underlay{sfx}_disturbed")]
    if not pairs:
        return None
    underlay = _underlay_samples(doc, sfx)
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
    two backends' ``ratio_to_bare`` where both exist, so it is paired too. A dual-stack run's
    ``v6`` parts get the same ratios, against bare's and vxlan/kernel's ``v6``; an IPv6-only run
    has those alone."""
    if any(b.get("status") == "ok" and has_ipv4(b) for b in doc["backends"].values()):
        _add_ratios(doc, 4)
    if any(b.get("status") == "ok" and b.get("v6") for b in doc["backends"].values()):
        _add_ratios(doc, 6)


def _add_ratios(doc: dict, family: int) -> None:
    pool_underlay(doc, family)
    ok = {n: family_of(b, family) for n, b in doc["backends"].items()
          if b.get("status") == "ok" and family_of(b, family) is not None}
    bare, vxlan = ok.get("bare", {}), ok.get("vxlan/kernel", {})
    for name, b in ok.items():
        paired = paired_ratio(doc, name, family) if name != "bare" else None
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
