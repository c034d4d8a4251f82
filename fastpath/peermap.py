"""What ``weftctl peermap`` shows for the data planes that keep BPF maps: vxlan/ebpf, and the
source guards of vxlan/kernel and host-gw/kernel (their declarations name ``show``).

Reads the maps of the weft programs attached to a device in this network namespace
(``fastpath.bpf.live``): needs root, not bcc.
"""
from __future__ import annotations


def show(dev: str) -> tuple[dict, str]:
    """(the document, the text) for ``dev``; LookupError (one line) when no program is there."""
    from fastpath.bpf.live import NoProgram, read
    try:
        doc = read(dev)
    except OSError as exc:
        raise NoProgram(str(exc)) from None
    return doc, render(doc)


def render(doc: dict) -> str:
    """The peers as a table, then every counter of the programs, named as on /metrics
    (weft_backend_<name>_total): read from the maps, zeros included. drops_* are per reason
    (fastpath/bpf/drop_reasons.h)."""
    table = [("SUBNET", "PUBLIC IP", "VTEP MAC", "VNI", "")]
    table += [(e["subnet"], e["public_ip"], e["vtep_mac"], str(e["vni"]), "(this node)" if e["local"] else "")
              for e in doc["peers"]]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    counts = list(doc["counters"].items()) + [(f"drops_{k}", v) for k, v in doc["drops"].items()]
    if counts:
        width = max(len(k) for k, _ in counts)
        lines += ["", f"{'COUNTER'.ljust(width)}  VALUE"]
        lines += [f"{k.ljust(width)}  {v}" for k, v in counts]
    return "\n".join(lines)
