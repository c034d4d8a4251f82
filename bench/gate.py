"""Comparing two ``bench run`` documents, and the CI gate.

The gate compares ratios measured within each run (``ratio_to_bare`` for throughput,
``latency_ratio_to_bare`` for ping RTT), never absolute numbers, so a baseline taken on one
machine can gate a run on another. A backend fails the gate when its throughput ratio falls by
more than ``tolerance`` (relative), its latency ratio rises by more than ``latency_tolerance``
(relative), or its ping loss rises by more than ``loss_tolerance`` percentage points.

Every backend of the baseline must be judged: one that is missing from the run, did not run
(``failed``/``skipped``), or has a null where the gate needs a number fails the gate, naming
the backend and why. A backend the baseline itself has no number for (it failed there, or the
baseline predates the metric) cannot be judged on it: a note says so. A backend in the run but
not in the baseline is a note. A dual-stack baseline (its backends carry ``v6``) gates the IPv6
ratios too, as metrics ``v6 ratio_to_bare`` etc.; an IPv4-only baseline judges IPv4 alone, an
IPv6-only one (no IPv4 numbers, ``results.has_ipv4``) IPv6 alone.

Default tolerances come from measured run-to-run noise on the 2-vCPU lab machine (see README,
"Gate tolerances"): the largest swing of ``ratio_to_bare`` over consecutive quick runs, with margin.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from .results import has_ipv4
from .stats import median

DEFAULT_TOLERANCE = 0.25
DEFAULT_LATENCY_TOLERANCE = 1.0
# Percentage points. Ping loss was 0 in every run of the committed baseline (100 echoes a run,
# so one lost echo is 1 point); a loss above one point over the baseline's is not noise.
DEFAULT_LOSS_TOLERANCE = 1.0


@dataclass
class Finding:
    backend: str
    metric: str
    baseline: float | None
    current: float | None
    change: float | None  # relative (+0.10 = 10 % higher), or percentage points for ping loss
    failed: bool
    why: str = ""  # set when there is no number to compare: what is wrong instead

    def line(self) -> str:
        verdict = "FAIL" if self.failed else "ok"
        head = f"{verdict:4} {self.backend:16} {self.metric:24}"
        if self.why:
            return f"{head} {self.why}"
        change = f"{self.change:+.2f} pp" if self.metric.endswith("ping_loss_pct") else f"{self.change:+.1%}"
        return f"{head} {self.baseline:8.3f} -> {self.current:8.3f} ({change})"

    def summary(self) -> str:
        if self.why:
            return f"{self.backend} {self.metric}: {self.why}"
        change = f"{self.change:+.2f} pp" if self.metric.endswith("ping_loss_pct") else f"{self.change:+.1%}"
        return f"{self.backend} {self.metric} {change}"


# (metric, which tolerance, worse when lower, relative change); bare's ratios are 1 by definition
GATED = (("ratio_to_bare", "tolerance", True, True),
         ("latency_ratio_to_bare", "latency_tolerance", False, True),
         ("ping_loss_pct", "loss_tolerance", False, False))


def gate(baseline: dict, current: dict, tolerance: float = DEFAULT_TOLERANCE,
         latency_tolerance: float = DEFAULT_LATENCY_TOLERANCE,
         loss_tolerance: float = DEFAULT_LOSS_TOLERANCE,
         only: list[str] | None = None) -> tuple[list[Finding], list[str]]:
    """A finding for every gated metric of every backend of the baseline (or of ``only``, names
    the baseline must have), and notes on what the baseline cannot judge and on backends it does
    not have."""
    tolerances = {"tolerance": tolerance, "latency_tolerance": latency_tolerance,
                  "loss_tolerance": loss_tolerance}
    findings, notes = [], []
    now = current.get("backends", {})
    judged = baseline.get("backends", {})
    if only is not None:
        unknown = [n for n in only if n not in judged]
        if unknown:
            raise ValueError(f"not in the baseline: {', '.join(unknown)} (it has {', '.join(judged)})")
        judged = {n: judged[n] for n in only}
    for name, base in judged.items():
        cur = now.get(name)
        if base.get("status") != "ok":
            notes.append(f"{name}: {base.get('status')} in the baseline ({base.get('reason', '')}): "
                         "it cannot judge this backend; remake the baseline")
            continue
        if cur is None:
            findings.append(Finding(name, "status", None, None, None, True, "not in the run"))
            continue
        if cur.get("status") != "ok":
            findings.append(Finding(name, "status", None, None, None, True,
                                    f"{cur.get('status')}: {cur.get('reason', '')}"))
            continue
        parts = [("", base, cur)] if has_ipv4(base) else []  # an IPv6-only baseline: IPv6 alone
        if isinstance(base.get("v6"), dict):  # a dual-stack baseline: the IPv6 ratios too
            parts.append(("v6 ", base["v6"], cur.get("v6") or {}))
        for prefix, base_part, cur_part in parts:
            for metric, which, worse_is_lower, relative in GATED:
                if name == "bare" and metric != "ping_loss_pct":
                    continue
                label = prefix + metric
                b, c = base_part.get(metric), cur_part.get(metric)
                if b is None or (relative and not b):
                    notes.append(f"{name}: the baseline has no {label}: it cannot judge it"
                                 + (" (made before ping loss was recorded; remake it with bench baseline)"
                                    if metric == "ping_loss_pct" and not prefix else ""))
                    continue
                if c is None:
                    findings.append(Finding(name, label, b, None, None, True, f"{label} is null in the run"))
                    continue
                change = c / b - 1 if relative else c - b
                tol = tolerances[which]
                failed = change < -tol if worse_is_lower else change > tol
                findings.append(Finding(name, label, b, c, change, failed))
    for name in now:
        if name not in baseline.get("backends", {}):
            notes.append(f"{name}: not in the baseline, so not judged")
        elif only is not None and name not in only:
            notes.append(f"{name}: not in --backends, so not judged")
    return findings, notes


def compare_table(a: dict, b: dict, metrics: list[str]) -> str:
    """Side by side: each backend's metrics in A and B, with B's change."""
    rows = [("backend", "metric", "A", "B", "change")]
    names = list(a.get("backends", {})) + [n for n in b.get("backends", {}) if n not in a.get("backends", {})]
    for name in names:
        ba, bb = a["backends"].get(name, {}), b.get("backends", {}).get(name, {})
        if ba.get("status") != "ok" and bb.get("status") != "ok":
            continue
        # IPv4's metrics, then (dual-stack runs) the same metrics of the IPv6 part as "v6 <metric>"
        for m, va, vb in ([(m, ba.get(m), bb.get(m)) for m in metrics]
                          + [(f"v6 {m}", (ba.get("v6") or {}).get(m), (bb.get("v6") or {}).get(m)) for m in metrics]):
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
BASELINE_METRICS = ("ratio_to_bare", "latency_ratio_to_bare", "ping_loss_pct", "ratio_to_vxlan_kernel",
                    "latency_ratio_to_vxlan_kernel", "tcp1_gbps", "rtt_p50_us", "core_s_per_gbit")


class BaselineError(ValueError):
    """Runs that cannot make one baseline; one line."""


def _spread(parts: list[dict]) -> dict:
    """The gated ratios of each run, side by side (how far apart the runs of a baseline were)."""
    return {m: [None if p.get(m) is None else round(p[m], 3) for p in parts]
            for m in ("ratio_to_bare", "latency_ratio_to_bare", "ping_loss_pct")}


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
            mid = median(b.get(m) for b in ok)
            if mid is not None:
                merged[m] = mid
        if has_ipv4(merged):  # (an IPv6-only baseline has no IPv4 ratios to spread)
            merged["baseline_spread"] = _spread(ok)
        v6 = [b["v6"] for b in ok if isinstance(b.get("v6"), dict)]
        if v6:  # a dual-stack or IPv6-only baseline: the IPv6 part's medians the same way
            merged["v6"] = copy.deepcopy(v6[-1])
            for m in BASELINE_METRICS:
                mid = median(p.get(m) for p in v6)
                if mid is not None:
                    merged["v6"][m] = mid
            if not has_ipv4(merged):
                merged["v6"]["baseline_spread"] = _spread(v6)
        merged["baseline_runs"] = len(ok)
        base["backends"][name] = merged
    base["runs"] = [r for d in docs for r in d.get("runs", [])]
    base["baseline"] = {"method": f"per backend, the median of each ratio over {len(docs)} "
                                  f"`bench run{'' if fulls == {True} else ' --quick'}` runs (bench baseline)",
                        "created": [d.get("created") for d in docs]}
    return base
