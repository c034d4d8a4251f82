"""``bench faults``' tables: the terminal summary, results/.../faults.md and faults.json."""
from __future__ import annotations

import json
import os

from .report import markdown_table, text_table


def _n(v, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v:.3g}{unit}"


def _gap(ms) -> str:
    if ms is None:
        return "n/a"
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.1f} ms"


def _readyz(row: dict) -> str:
    """What /readyz answered during the fault, per node: e.g. 1:200 2:503x4,none x8."""
    parts = []
    for n, phases in sorted(row.get("health", {}).items(), key=lambda kv: int(kv[0])):
        codes = phases.get("fault", {}).get("readyz", {})
        if not codes:
            continue
        text = ",".join(f"{c}" if len(codes) == 1 else f"{c}x{k}" for c, k in sorted(codes.items()))
        parts.append(f"{n}:{text}")
    return " ".join(parts) or "-"


def _store_up(row: dict) -> str:
    vals = []
    for n, phases in sorted(row.get("health", {}).items(), key=lambda kv: int(kv[0])):
        rng = phases.get("fault", {}).get("metrics", {}).get("weft_store_up")
        if rng:
            vals.append(f"{n}:{_n(rng[0])}" if rng[0] == rng[1] else f"{n}:{_n(rng[0])}..{_n(rng[1])}")
    return " ".join(vals) or "no metric"


def summary_rows(doc: dict) -> list[tuple]:
    rows = [("backend", "fault", "verdict", "lost fault/recov", "longest gap", "resumed", "TCP", "exits",
             "converged", "subnets", "/readyz in fault", "weft_store_up")]
    for r in doc["rows"]:
        if r.get("status") != "ok":
            continue
        dp = r["data_plane"]
        lp = dp.get("lost_by_phase", {})
        tcp = dp.get("tcp") or {}
        subnets = next((c for c in r["checks"] if c["name"] == "same subnets after"), None)
        rows.append((r["backend"], f"{r['number']} {r['fault']}", r["verdict"],
                     f"{_n(lp.get('fault'))}/{_n(lp.get('recovery'))} of {_n(dp.get('sent'))}",
                     _gap(dp.get("longest_gap_ms")), _n(dp.get("resumed_after_heal_s"), " s"),
                     "reset" if tcp.get("error") else "ok" if tcp.get("intact") else "n/a",
                     str(len(r["exits"])), _n(r.get("peers_converged_s"), " s"),
                     "n/a" if subnets is None or subnets["ok"] is None else "same" if subnets["ok"] else "changed",
                     _readyz(r), _store_up(r)))
    return rows


def missed(doc: dict) -> list[str]:
    return [f"{r['backend']} {r['fault']}: " + "; ".join(r["why"]) for r in doc["rows"]
            if r.get("status") == "ok" and r["verdict"] == "missed"]


def not_run(doc: dict) -> list[str]:
    return [f"{r['backend']} {r['fault']}: {r['status']}: {r.get('reason', '')}" for r in doc["rows"]
            if r.get("status") != "ok"]


NOTE = ("lost fault/recov: UDP datagrams lost (all streams, both directions of every node pair, 1 per ms each) "
        "sent during the fault / after the heal, of all sent; longest gap: the longest time one stream delivered "
        "nothing; resumed: from the heal (engine-kill: the new engine process's start) until every stream delivered "
        "a datagram sent after it; TCP: the pod 1 -> "
        "pod 2 connection; exits: weftd exits the fault did not cause itself; converged: from the heal until every "
        "node answered /readyz 200 with its baseline weft_peers; /readyz in fault: answers per node (xN samples).")


def terminal(doc: dict) -> str:
    parts = [text_table(summary_rows(doc))]
    if missed(doc):
        parts += ["", "missed:"] + [f"  {line}" for line in missed(doc)]
    if not_run(doc):
        parts += ["", "not run:"] + [f"  {line}" for line in not_run(doc)]
    return "\n".join(parts)


def markdown(doc: dict) -> str:
    lines = [f"# bench faults: {doc['scenario']['name']} ({doc['created']})", "", markdown_table(summary_rows(doc)), "", NOTE, ""]
    lines += ["## Goals", ""] + [f"- **{v['number']} {k}**: {v['title']}. Goal: {v['goal']}."
                                 for k, v in doc["faults"].items()] + [""]
    if missed(doc):
        lines += ["## Missed", ""] + [f"- {line}" for line in missed(doc)] + [""]
    if not_run(doc):
        lines += ["## Not run", ""] + [f"- {line}" for line in not_run(doc)] + [""]
    lines += ["## Checks", ""]
    for r in doc["rows"]:
        if r.get("status") != "ok":
            continue
        lines.append(f"- {r['backend']} {r['fault']} ({r['verdict']}):")
        for c in r["checks"]:
            mark = {True: "held", False: "MISSED", None: "not measured" if c["required"] else "note"}[c["ok"]]
            lines.append(f"  - {mark}: {c['name']}: {c['value']}")
        logs = {n: v for n, v in r.get("log", {}).items() if v}
        for n, v in logs.items():
            lines.append(f"  - node {n} log during the row: " + " / ".join(v[:4]))
    return "\n".join(lines) + "\n"


def write(doc: dict, out: str, json_path: str = "") -> list[str]:
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "faults.json"), os.path.join(out, "faults.md")]
    text = json.dumps(doc, indent=1, default=str)
    with open(paths[0], "w") as f:
        f.write(text)
    with open(paths[1], "w") as f:
        f.write(markdown(doc))
    if json_path:
        with open(json_path, "w") as f:
            f.write(text)
        paths.append(json_path)
    return paths
