"""Comparing two ``bench run`` documents, and the CI gate.

The gate compares ratios measured within each run (``ratio_to_bare`` for throughput,
``latency_ratio_to_bare`` for ping RTT), never absolute numbers, so a baseline taken on one
machine can gate a run on another. A backend fails the gate when its throughput ratio falls by
more than ``tolerance`` (relative) or its latency ratio rises by more than ``latency_tolerance``.

Default tolerances come from measured run-to-run noise on the 2-vCPU lab machine (see README,
"Gate tolerances"): the largest swing of ``ratio_to_bare`` over consecutive quick runs, with margin.
"""
from __future__ import annotations

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
