"""Tables and charts of a ``bench run`` document: terminal, Markdown and PNG.

``bench report FILE`` re-renders all of them from the JSON alone.
"""
from __future__ import annotations

import math
import os

from .results import has_ipv4

# (key, heading, format) in table order.
COLUMNS = [
    ("tcp1_gbps", "TCP×1 Gb/s", "{:.2f}"),
    ("ratio_to_bare", "×bare", "{:.2f}"),
    ("ratio_to_vxlan_kernel", "×vxlan", "{:.2f}"),
    ("tcp4_gbps", "TCP×4 Gb/s", "{:.2f}"),
    ("retransmits", "retrans", "{:.0f}"),
    ("udp_loss_pct", "UDP loss %", "{:.2f}"),
    ("rtt_p50_us", "RTT p50 µs", "{:.0f}"),
    ("rtt_p99_us", "RTT p99 µs", "{:.0f}"),
    ("ping_loss_pct", "ping loss %", "{:.1f}"),
    ("rr_p50_us", "RR p50 µs", "{:.1f}"),
    ("sparse_rtt_p50_us", "50ms-ping p50 µs", "{:.0f}"),
    ("pps", "kpps", "{:.0f}"),
    ("core_s_per_gbit", "core-s/Gb", "{:.3f}"),
    ("tcp1_nooffload_gbps", "no-TSO Gb/s", "{:.2f}"),
    ("daemon_rss_mb", "RSS MB", "{:.0f}"),
    ("engine_rss_mb", "engine MB", "{:.0f}"),
]


HEADINGS = {key: heading for key, heading, _ in COLUMNS}


def text_table(rows) -> str:
    """Rows of cells as left-aligned columns (the first row is the heading; rows may be short)."""
    widths = [max(len(str(r[i])) for r in rows if len(r) > i) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def markdown_table(rows) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _cell(b: dict, key: str, fmt: str) -> str:
    v = b.get(key)
    if _missing(v):
        return "–"
    if key == "pps":
        v = v / 1000
    return fmt.format(v)


def _runs(plan: dict) -> str:
    repeat, extra = plan.get("repeat", "?"), plan.get("tcp1_extra") or 0
    return f"{repeat} runs" + (f" (TCP x1: {repeat + extra})" if extra and repeat != "?" else "")


def _pairs_note(p: dict) -> str:
    """How a backend's paired ratio_to_bare was taken, when the host's slow spells touched it."""
    mixed = f"{p['mixed']} with one half in a slow spell of the host"
    if p["used"] == "calm":
        out = [mixed] if p["mixed"] else []
        out += [f"{p['spell']} inside a slow spell of the host"] if p["spell"] else []
        return f"is the median of its {p['calm']} calm sample pairs; left out: {', '.join(out)}"
    if p["used"] == "calm+spell":
        return (f"is the median of {p['calm']} calm and {p['spell']} spell pairs (too few calm)"
                + (f"; left out: {mixed}" if p["mixed"] else ""))
    return (f"is its median over the underlay's: spells cut its pairs to pieces ({p['calm']} calm, "
            f"{p['spell']} spell, {p['mixed']} mixed)")


def dual_stack(doc: dict) -> bool:
    """Whether the run measured IPv6 (a dual-stack or IPv6-only scenario): its tables get a family column."""
    return any(b.get("status") == "ok" and isinstance(b.get("v6"), dict) for b in doc["backends"].values())


def ipv6_only(doc: dict) -> bool:
    """Whether the run measured IPv6 alone (an IPv6-only scenario: no backend has IPv4 numbers)."""
    ok = [b for b in doc["backends"].values() if b.get("status") == "ok"]
    return bool(ok) and not any(has_ipv4(b) for b in ok)


# What a backend has once, whatever the family: an IPv6-only run shows it on the IPv6 row.
PER_BACKEND = ("daemon_rss_mb", "engine_rss_mb")


def rows(doc: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """Headings, one row per measured backend, and a note per skipped or failed one. A
    dual-stack run has a ``family`` column and an IPv6 row under each backend's IPv4 row; an
    IPv6-only run has the IPv6 rows alone."""
    both, only6 = dual_stack(doc), ipv6_only(doc)
    heads = ["backend"] + (["family"] if both else []) + [h for _, h, _ in COLUMNS]
    body, notes = [], []
    for name, b in doc["backends"].items():
        if b.get("status") != "ok":
            notes.append(f"{name}: {b.get('status')}: {b.get('reason', '')}")
            continue
        parts = [("IPv4", "", b)] if has_ipv4(b) else []
        if both and isinstance(b.get("v6"), dict):
            own = {k: b[k] for k in PER_BACKEND if k in b and not has_ipv4(b)}  # else on the IPv4 row
            parts.append(("IPv6", " IPv6", {**b["v6"], **own}))
        for family, label, part in parts:
            body.append([name] + ([family] if both else []) + [_cell(part, k, f) for k, _, f in COLUMNS])
            notes += _notes(name + label, part)
    full = doc.get("plan", {}).get("full", True)  # the quick plan measures no RR
    probes = "TCP x1, ping and RR" if full else "TCP x1 and ping"
    rr = "; RR over IPv6 is bench's own probe (sockperf 3.7 has no IPv6)" if full else ""
    if only6:
        notes.append(f"IPv6-only run: {probes} to the pods' (bare: the nodes') IPv6 addresses, "
                     "ratios against the IPv6 underlay of the same run (EnableIPv4 false: every row is "
                     f"IPv6){rr}")
    elif both:
        notes.append(f"IPv6 rows: {probes} to the pods' (bare: the nodes') IPv6 addresses, ratios against "
                     "the IPv6 underlay of the same run (the other columns are the backend's, on its IPv4 row)"
                     f"{rr}")
    return heads, body, notes


def _notes(name: str, b: dict) -> list[str]:
    notes = []
    for key, (without, measured) in (b.get("missing") or {}).items():
        label = HEADINGS.get(key, key)
        notes.append(f"{name}: {label} is missing: no value in {without} of {measured} runs"
                     if _missing(b.get(key)) else
                     f"{name}: {label}: no value in {without} of {measured} runs (the median of the others)")
    if b.get("tcp1_samples"):
        notes.append(f"{name}: TCP x1 is the median of {b['tcp1_samples']} underlay samples, taken in "
                     f"every backend's lab (its own lab's median: {_cell(b, 'tcp1_gbps_own_lab', '{:.2f}')})")
    pairs = b.get("ratio_to_bare_pairs")
    if isinstance(pairs, dict) and (pairs.get("spell") or pairs.get("mixed")):
        notes.append(f"{name}: ×bare {_pairs_note(pairs)}")
    return notes


def terminal(doc: dict) -> str:
    heads, body, notes = rows(doc)
    fixed = 2 if dual_stack(doc) else 1  # backend (and family): left-aligned, always shown
    present = [i for i in range(len(heads)) if i < fixed or any(r[i] != "–" for r in body)]
    heads = [heads[i] for i in present]
    body = [[r[i] for i in present] for r in body]
    widths = [max(len(x) for x in col) for col in zip(heads, *body)] if body else [len(h) for h in heads]
    line = lambda cells: "  ".join(c.rjust(w) if i >= fixed else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(heads), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
    m, s = doc.get("machine", {}), doc.get("scenario", {})
    out.append("")
    out.append(f"{m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, kernel {m.get('kernel', '?')}; "
               f"scenario {s.get('name', '?')} ({s.get('store', '?')}); median of {_runs(doc.get('plan', {}))}; "
               f"commit {doc.get('git', {}).get('commit', '')[:10]}")
    out += notes
    return "\n".join(out)


def markdown(doc: dict) -> str:
    heads, body, notes = rows(doc)
    out = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    m = doc.get("machine", {})
    out += ["", f"Machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, kernel "
                f"{m.get('kernel', '?')}. Medians of {doc.get('plan', {}).get('repeat', '?')} runs; "
                "ratios against `bare` and `vxlan/kernel` measured in the same run."]
    out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def figure(ok: dict, title: str, unit: str, series: list, log: bool = False):
    """One grouped bar chart over the backends in ``ok``; None when no series has a value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ok)
    series = [(k, label) for k, label in series if any(ok[n].get(k) is not None for n in names)]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) + 2), 4))
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        have = [(x, ok[n][key]) for x, n in zip(xs, names) if not _missing(ok[n].get(key))]
        bars = ax.bar([x for x, _ in have], [v for _, v in have], width, label=label, color=f"C{i}")
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
        for x, n in zip(xs, names):  # a missing value is no bar (never a 0 one), and says so
            if _missing(ok[n].get(key)):
                ax.text(x, 0.01, "n/a", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                        fontsize=8, rotation=90, color=f"C{i}")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(unit)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def charts(doc: dict, directory: str) -> list[str]:
    """PNG bar charts: throughput, latency, CPU per Gbit. Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a dual-stack run's IPv6 medians as "<key>_v6", so each chart draws them beside IPv4's
    ok = {n: {**b, **{f"{k}_v6": v for k, v in (b.get("v6") or {}).items()}}
          for n, b in doc["backends"].items() if b.get("status") == "ok"}
    if not ok:
        return []
    os.makedirs(directory, exist_ok=True)
    written = []
    specs = [
        ("throughput.png", "Pod-to-pod throughput", "Gbit/s",
         [("tcp1_gbps", "TCP 1 stream"), ("tcp4_gbps", "TCP 4 streams"), ("tcp1_nooffload_gbps", "TCP 1, no TSO"),
          ("tcp1_gbps_v6", "TCP 1 stream, IPv6")]),
        ("latency.png", "Pod-to-pod latency", "µs",
         [("rtt_p50_us", "ping p50"), ("rtt_p99_us", "ping p99"), ("rr_p50_us", "UDP RR p50 (pinned)"),
          ("sparse_rtt_p50_us", "ping p50, one every 50 ms"),
          ("rtt_p50_us_v6", "ping p50, IPv6"), ("rr_p50_us_v6", "UDP RR p50 (pinned), IPv6")]),
        ("cpu.png", "CPU cost per Gbit (whole machine)", "core-seconds / Gbit", [("core_s_per_gbit", "TCP 1 stream")]),
    ]
    for filename, title, unit, series in specs:
        fig = figure(ok, title, unit, series, log=filename == "latency.png")
        if fig is None:
            continue
        path = os.path.join(directory, filename)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(doc: dict, directory: str) -> list[str]:
    """results.md + charts in ``directory``; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    md = os.path.join(directory, "results.md")
    with open(md, "w") as f:
        f.write(markdown(doc))
    return [md] + charts(doc, directory)
