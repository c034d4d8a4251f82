"""Read a running node's maps from any process in its network namespace (``weftctl peermap``).

The programs' maps belong to weftd. Rather than pinning them in a bpffs (``ip netns exec`` gives
each process a private mount namespace, so a pin made by weftd is invisible to a weftctl started
the same way), we find the program attached to the VXLAN device's egress in *this* network
namespace and open its maps by id. Needs root (CAP_BPF/CAP_SYS_ADMIN), not bcc.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess

from . import Counter, DropReason, decode_peer, peer_sort_key
from .sysbpf import map_items, maps_of_prog


class NoProgram(LookupError):
    """No weft program is attached where we looked; str() is one line."""


def filters(dev: str, hook: str = "egress") -> list[dict]:
    """The BPF filters on one clsact hook of ``dev``: [{"prio", "handle", "name", "id"}].

    Read with ``tc -j`` (iproute2): pyroute2 0.9.7 does not decode TCA_BPF_ID."""
    try:
        res = subprocess.run(["tc", "-j", "filter", "show", "dev", dev, hook], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NoProgram(f"tc filter show dev {dev} {hook}: {exc}") from None
    if res.returncode != 0:
        raise NoProgram(f"{dev}: {res.stderr.strip() or 'tc failed'} (run in the node's namespace, "
                        "e.g. ip netns exec NODE weftctl peermap)")
    out = []
    for f in json.loads(res.stdout or "[]"):
        opts = f.get("options") or {}
        prog = opts.get("prog") or {}
        if f.get("kind") == "bpf" and prog.get("id"):
            out.append({"prio": f.get("pref"), "handle": int(str(opts.get("handle", "0")), 0),
                        "name": prog.get("name") or opts.get("bpf_name", ""), "id": prog["id"]})
    return out


def attached_prog_id(dev: str, hook: str = "egress") -> int:
    for f in filters(dev, hook):
        if str(f["name"]).startswith("weft_"):
            return f["id"]
    raise NoProgram(f"{dev}: no weft BPF program attached (is weftd running with vxlan/ebpf?)")


def attached_prog_ids(dev: str) -> list[int]:
    """The weft programs on ``dev``'s egress, then ingress (flannel.N: both; the underlay
    interface of a vxlan/kernel node with the source guard: ingress)."""
    ids = []
    for hook in ("egress", "ingress"):
        ids += [f["id"] for f in filters(dev, hook) if str(f["name"]).startswith("weft_")]
    if not ids:
        raise NoProgram(f"{dev}: no weft BPF program attached (is weftd running with vxlan/ebpf, or "
                        "vxlan/kernel or host-gw/kernel with --source-guard on this interface?)")
    return ids


def read(dev: str = "flannel.1") -> dict:
    """{"device", "program_id", "peers": [...], "peer_ips": {PublicIP: subnets}, "counters": {...},
    "drops": {...}}, from the maps of the weft programs attached to ``dev`` (one compile: they
    share their maps)."""
    ids = attached_prog_ids(dev)
    prog_id = ids[0]
    maps: dict = {}
    try:
        for pid in ids:
            for name, (fd, info) in maps_of_prog(pid).items():
                if name in maps:
                    os.close(fd)
                else:
                    maps[name] = (fd, info)
        out = {"device": dev, "program_id": prog_id, "peers": [], "peer_ips": {}, "counters": {}, "drops": {}}
        for name in ("weft_peer_ips", "weft_peer_ips6"):  # PublicIP (PublicIPv6) -> subnets it holds
            if name in maps:
                fd, info = maps[name]
                out["peer_ips"].update({str(ipaddress.ip_address(bytes(k[:info.key_size]))): int.from_bytes(v[:4], "little")
                                        for k, v in map_items(fd, info.key_size, info.value_size)})
        for name in ("weft_peers", "weft_peers6"):  # IPv4 subnets, then IPv6 (dual-stack) ones
            if name in maps:
                fd, info = maps[name]
                out["peers"] += sorted((decode_peer(k, v) for k, v in map_items(fd, info.key_size, info.value_size)),
                                       key=peer_sort_key)
        for name, enum_cls, key in (("weft_counters", Counter, "counters"), ("weft_drops", DropReason, "drops")):
            if name not in maps:
                continue
            fd, info = maps[name]
            sums: dict[int, int] = {}
            for k, v in map_items(fd, info.key_size, info.value_size, percpu=True):
                idx = int.from_bytes(k[:4], "little")
                sums[idx] = sum(int.from_bytes(v[i:i + 8], "little") for i in range(0, len(v), 8))
            for member in enum_cls:
                if member.name not in ("MAX", "NONE"):
                    out[key][member.name.lower()] = sums.get(int(member), 0)
        return out
    finally:
        for fd, _ in maps.values():
            os.close(fd)
