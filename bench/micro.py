"""Comparing pytest-benchmark results across machines: every median is divided by the median
of ``test_calibration`` (a fixed pure-Python workload) measured in the same run, so a faster or
slower machine cancels out and only a change in the code's own cost remains.

pytest-benchmark's own ``--benchmark-compare-fail`` compares absolute times; use it on one
machine (``pytest benchmarks --benchmark-autosave``, then ``--benchmark-compare
--benchmark-compare-fail=median:25%``), never across machines.
"""
from __future__ import annotations

CALIBRATION = "test_calibration"


def normalized(doc: dict) -> dict[str, float]:
    stats = {b["name"]: b["stats"]["median"] for b in doc.get("benchmarks", [])}
    cal = stats.pop(CALIBRATION, None)
    if not cal:
        raise ValueError(f"no {CALIBRATION} in the benchmark results")
    return {name: t / cal for name, t in stats.items()}


def compare_micro(base: dict, cur: dict, tolerance: float,
                  selected: set[str] | None = None) -> tuple[list[str], list[str]]:
    """Lines to print and failures. A baselined benchmark that did not run fails, unless it is
    outside ``selected`` (the names -k chose; None: every benchmark was to run)."""
    b, c = normalized(base), normalized(cur)
    lines, failed = [], []
    for name in sorted(b):
        if name not in c:
            if selected is not None and name not in selected:
                lines.append(f"note {name}: in the baseline, not selected (-k)")
            else:
                failed.append(f"{name}: in the baseline, not run")
                lines.append(f"FAIL {name}: in the baseline, not run")
            continue
        change = c[name] / b[name] - 1
        bad = change > tolerance
        if bad:
            failed.append(f"{name} {change:+.0%}")
        lines.append(f"{'FAIL' if bad else 'ok':4} {name:48} {b[name]:9.4f} -> {c[name]:9.4f} x calibration ({change:+.0%})")
    lines += [f"note {name}: not in the baseline" for name in sorted(set(c) - set(b))]
    return lines, failed
