"""``bench flood``'s tables: the terminal summary, results/.../flood.md and flood.json."""
from __future__ import annotations

import json
import os

from .report import markdown_table, text_table

def _n(v) -> str:
    return "n/a" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def summary_rows(doc: dict) -> list[tuple]:
    rows = [("data plane", "sent", "frames", "accounted", "unaccounted", "socket only", "uncounted", "crashes",
             "stream sent", "stream lost", "loss %", "flood pps")]
    for name, b in doc["backends"].items():
        if b.get("status") != "ok":
            continue
        lg = b["legit"]
        rows.append((name + (" (reference)" if b["reference"] else ""), _n(b["sent_datagrams"]), _n(b["sent_frames"]),
                     _n(b["accounted"]), _n(b["unaccounted"]), _n(b["socket_only"]), _n(b["uncounted"]),
                     _n(b["crashes"]), _n(lg["sent"]), _n(lg["lost"]), _n(lg["loss_pct"]), _n(b["flood_rate_pps"])))
    return rows


def where_counted(doc: dict) -> list[str]:
    """Per data plane, every counter the flood landed in (the stream subtracted), largest first."""
    return [f"{name}: " + ", ".join(f"{k} {v:,}" for k, v in b["counters"].items())
            for name, b in doc["backends"].items() if b.get("status") == "ok"]


def not_run(doc: dict) -> list[str]:
    return [f"{name}: {b['status']}: {b.get('reason', '')}" for name, b in doc["backends"].items()
            if b.get("status") != "ok"]


def class_rows(b: dict) -> list[tuple]:
    rows = [("class", "sent", "frames", "counted in", "unaccounted", "socket only", "stream lost")]
    for s in b["segments"]:
        counters = ", ".join(f"{k} {v:,}" for k, v in sorted(s["flood_counters"].items(), key=lambda kv: -abs(kv[1])))
        if s["unexpected"] if s["class"] else False:
            counters += f"  (unexpected: {', '.join(s['unexpected'])})"
        rows.append((s["class"] or "(stream alone)", _n(s["sent_datagrams"]), _n(s["sent_frames"]),
                     counters or "-", _n(s["unaccounted"]), _n(s["socket_only"]),
                     f"{s['legit']['lost']:,} of {s['legit']['sent']:,}"))
    return rows


NOTE = ("sent: flood datagrams; frames: what the flooder handed to its device (outer fragments count "
        "each); accounted: frames counted before the data plane plus the data plane's per-reason counters, "
        "minus the stream's datagrams (counted leaving node 1); socket only: taken by the data plane's socket "
        "(Udp InDatagrams) but in none of its reason counters; uncounted: in no counter at all.")


def terminal(doc: dict) -> str:
    parts = [text_table(summary_rows(doc))] + not_run(doc) + ["", "counted in:"] + where_counted(doc)
    for name, b in doc["backends"].items():
        if b.get("status") == "ok":
            parts.append(f"\n{name}: where the flood was counted\n" + text_table(class_rows(b)))
    parts.append("\n" + NOTE)
    return "\n".join(parts)


def markdown(doc: dict) -> str:
    p = doc["plan"]
    pace = "unpaced" if not p["rate"] else f"{p['rate']:,.0f}/s"
    parts = [f"# bench flood, {doc['created']}",
             f"{p['count']:,} hostile datagrams per data plane ({pace}), "
             f"stream {p['legit_rate']:,.0f} datagrams/s of {p['legit_size']} bytes, pod 1x1 to pod 2x1. "
             f"Machine: {doc['machine'].get('cpu_model', '')}, {doc['machine'].get('cores')} CPUs, "
             f"kernel {doc['machine'].get('kernel')}; git {doc['git'].get('commit', '')[:12]}"
             f"{' (dirty)' if doc['git'].get('dirty') else ''}.", "", markdown_table(summary_rows(doc)), ""]
    parts += [f"- {line}" for line in not_run(doc)] + ["", NOTE, "", "Counted in (the flood's share):", ""]
    parts += [f"- {line}" for line in where_counted(doc)]
    for name, b in doc["backends"].items():
        if b.get("status") == "ok":
            parts += ["", f"## {name}", "", markdown_table(class_rows(b))]
    return "\n".join(parts) + "\n"


def write(doc: dict, out: str, json_path: str = "") -> list[str]:
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "flood.json"), os.path.join(out, "flood.md")]
    for target in filter(None, [paths[0], json_path]):
        with open(target, "w") as f:
            json.dump(doc, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(doc))
    return paths
