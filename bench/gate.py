"""Comparing two ``bench run`` documents, and the CI gate.

The gate compares ratios measured within each run (``ratio_to_bare`` for throughput,
``latency_ratio_to_bare`` for ping RTT), never absolute numbers, so a baseline taken on one
machine can gate a run on another. A backend fails the gate when its throughput ratio falls by
more than ``tolerance`` (relative) or its latency ratio rises by more than ``latency_tolerance``.

Default tolerances come from measured run-to-run noise on the 2-vCPU lab machine (see README,
"Gate tolerances"): the largest swing of ``ratio_to_bare`` over consecutive quick runs, with margin.
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

DEFAULT_TOLERANCE = 0.25
DEFAULT_LATENCY_TOLERANCE = 1.0


@dataclass
class Finding:
    backend: str
    metric: str
    baseline: float
    current: float
    change: float  # relative: +0.10 = 10 % higher
    failed: bool

    def line(self) -> str:
        verdict = "FAIL" if self.failed else "ok"
        return (f"{verdict:4} {self.backend:16} {self.metric:24} {self.baseline:8.3f} -> "
                f"{self.current:8.3f} ({self.change:+.1%})")


def gate(baseline: dict, current: dict, tolerance: float = DEFAULT_TOLERANCE,
         latency_tolerance: float = DEFAULT_LATENCY_TOLERANCE) -> tuple[list[Finding], list[str]]:
    """Findings for every backend measured in both documents, and notes on the rest."""
    findings, notes = [], []
    for name, base in baseline.get("backends", {}).items():
        cur = current.get("backends", {}).get(name)
        if base.get("status") != "ok":
            continue
        if cur is None or cur.get("status") != "ok":
            why = "absent" if cur is None else f"{cur.get('status')}: {cur.get('reason', '')}"
            notes.append(f"{name}: in the baseline but not measured now ({why})")
            continue
        for metric, tol, worse_is_lower in (("ratio_to_bare", tolerance, True),
                                            ("latency_ratio_to_bare", latency_tolerance, False)):
            b, c = base.get(metric), cur.get(metric)
            if not b or c is None or name == "bare":
                continue
            change = c / b - 1
            failed = change < -tol if worse_is_lower else change > tol
            findings.append(Finding(name, metric, b, c, change, failed))
    return findings, notes


def compare_table(a: dict, b: dict, metrics: list[str]) -> str:
    """Side by side: each backend's metrics in A and B, with B's change."""
    rows = [("backend", "metric", "A", "B", "change")]
    names = list(a.get("backends", {})) + [n for n in b.get("backends", {}) if n not in a.get("backends", {})]
    for name in names:
        ba, bb = a["backends"].get(name, {}), b.get("backends", {}).get(name, {})
        if ba.get("status") != "ok" and bb.get("status") != "ok":
            continue
        for m in metrics:
            va, vb = ba.get(m), bb.get(m)
            if va is None and vb is None:
                continue
            fa = "–" if va is None else f"{va:.3f}"
            fb = "–" if vb is None else f"{vb:.3f}"
            ch = f"{vb / va - 1:+.1%}" if va and vb is not None else ""
            rows.append((name, m, fa, fb, ch))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths))) for r in rows)


# What a baseline keeps per backend: the gate's two ratios and what a person reads beside them.
BASELINE_METRICS = ("ratio_to_bare", "latency_ratio_to_bare", "ratio_to_vxlan_kernel",
                    "latency_ratio_to_vxlan_kernel", "tcp1_gbps", "rtt_p50_us", "core_s_per_gbit")


class BaselineError(ValueError):
    """Runs that cannot make one baseline; one line."""


def merge_baseline(docs: list[dict]) -> dict:
    """One baseline from several runs of the same plan: per backend, the median of each metric
    over the runs it succeeded in (so one slow run moves nothing), the spread of the two gated
    ratios under ``baseline_spread``, every raw run, and ``baseline`` saying how it was made."""
    if not docs:
        raise BaselineError("no runs given")
    fulls = {bool(d.get("plan", {}).get("full")) for d in docs}
    if len(fulls) > 1:
        raise BaselineError("the runs mix --quick and full plans; a baseline compares like with like")
    base = copy.deepcopy(docs[-1])
    for name in {n for d in docs for n in d.get("backends", {})}:
        ok = [d["backends"][name] for d in docs if d.get("backends", {}).get(name, {}).get("status") == "ok"]
        if not ok:  # skipped or failed every time: keep what the last run that had it said
            base["backends"][name] = copy.deepcopy(
                next(d["backends"][name] for d in reversed(docs) if name in d.get("backends", {})))
            continue
        merged = copy.deepcopy(ok[-1])
        for m in BASELINE_METRICS:
            vals = [b[m] for b in ok if b.get(m) is not None]
            if vals:
                merged[m] = statistics.median(vals)
        merged["baseline_spread"] = {m: [round(b.get(m) or 0.0, 3) for b in ok]
                                     for m in ("ratio_to_bare", "latency_ratio_to_bare")}
        merged["baseline_runs"] = len(ok)
        base["backends"][name] = merged
    base["runs"] = [r for d in docs for r in d.get("runs", [])]
    base["baseline"] = {"method": f"per backend, the median of each ratio over {len(docs)} "
                                  f"`bench run{'' if fulls == {True} else ' --quick'}` runs (bench baseline)",
                        "created": [d.get("created") for d in docs]}
    return base
