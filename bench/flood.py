"""``bench flood``: hostile datagrams at each data plane's socket while pod traffic flows, and every
datagram accounted for in a counter.

For each data plane (``wire/dataplane``) a fresh lab is built from the scenario (bench.lab), plus
one more namespace on the underlay bridge, ``<prefix>fl``: the flooder, with its own underlay
address. A legitimate stream runs from pod 1x1 to pod 2x1 (paced UDP with sequence numbers), and
the flooder sends ``count`` crafted datagrams at node 2's data-plane port: whole Ethernet frames
from an AF_PACKET socket (``bench.flood_tool``), so outer headers can lie and outer sources can be
forged (node 1's address). The classes (``CLASSES``) are sent one after the other, each as a
segment: the stream resumes (SIGCONT), the class's share of the flood goes out, the stream pauses
(SIGSTOP), and once every queue has drained and every counter stands still the counters are read.
A first segment carries the stream alone (the control: its accounting must balance with no flood).

Accounting, per segment, in frames (a datagram sent as outer fragments is several frames):

    sent        = frames the flooder handed to its device (sent, or dropped by it: ENOBUFS)
    legit       = the stream's outer datagrams, counted where they leave node 1 (an nftables
                  counter in node 1's postrouting: daddr node 2, dport the data-plane port)
    before      = counted before the data plane takes them: backlog drops on the bridge ports
                  and node 2's eth0 (rx_dropped), node 2's IP checks (outer classes only),
                  reassembly (ReasmReqds - ReasmOKs: a reassembled datagram is counted again
                  below), UDP (InErrors: buffer, checksum, length; NoPorts), and a data plane's own
                  counters in front of its socket (``DATAPLANES[kind]["upstream"]``)
    socket      = Udp InDatagrams: datagrams the data plane's socket took (the engine's reads;
                  the kernel VXLAN socket's encap_rcv)
    reasons     = the data plane's own counters, one per outcome (``DATAPLANES[kind]["reasons"]``)
    unaccounted = sent + legit - before - reasons       (must be 0), made of:
      socket_only = socket - reasons                    (taken by the socket, in no reason counter)
      uncounted   = sent + legit - before - socket      (in no counter at all)

The stream lands in the same counters as the flood (delivered, or dropped on the way), which is
why it is counted once where it enters the underlay and subtracted whole. IP-level counters count
inner packets too when a data plane hands them to the kernel unchecked (vxlan/kernel and
vxlan/ebpf decapsulate in the kernel), so they are terminals only for the "outer" classes, whose
inner packets are well-formed or absent.

Nothing the flood provokes comes back to node 2 (see bench.flood_packets); the nodes hold
permanent neighbour entries for each other, and node 2 one for the flooder (no ARP while
counting); the flooder's IPv6 is off: node 2 receives the flood and the stream and nothing else,
so the per-device drop counters are theirs.
"""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

from . import flood_packets as fp, flood_report
from .cli import Command, Failure, UsageError
from .lab import HEALTHZ_PORT, Lab, LabError, alive
from .netns import http_get
from .scale import parse_samples
from .procs import proc_state

SCHEMA = "weft-flood/1"
DEFAULT_BACKENDS = ["udp/fastpath", "vxlan/fastpath", "udp/python", "vxlan/ebpf", "vxlan/kernel"]
REFERENCE = {"vxlan/kernel"}        # measured for comparison: its silent drops are reported, not a failure
DEFAULT_COUNT = 1_000_000
FLOODER = "fl"                      # <prefix>fl on the underlay bridge, port wfl
LEGIT_PORT = 7077
SEGMENT_MIN_S = 0.25                # the stream flows at least this long in every segment
SETTLE_TIMEOUT_S = 15.0
CLASS_MAX_S = 300.0                 # a class's flood stops by itself after this, sent or not
ENGINE, KERNEL, EBPF = "engine", "kernel", "ebpf"


# -- the classes: what is sent, and where each is expected to be counted ----------------------------
@dataclass(frozen=True)
class FloodClass:
    name: str
    layer: str                      # "outer": the kernel's IP/UDP checks see the lie; "payload": the data plane's
    wires: tuple
    build: Callable
    expect: dict                    # data-plane kind -> counters it should land in (display names)


# The outer IPv4 checks: the bridge's (br_netfilter loaded) or else node 2's.
_IP_CHECKS = ("bridge Ip InHdrErrors", "bridge IpExt InTruncatedPkts", "Ip InHdrErrors", "IpExt InTruncatedPkts")
_REASM = ("Ip ReasmReqds", "-Ip ReasmOKs")
_UDP_LIES = ("Udp InErrors (length)", "Udp InCsumErrors")
_VX = "vxdev rx_packets"            # the kernel VXLAN device decapsulated it (what follows is the stack's)
# Where a saturated node drops, whatever the class: backlogs and socket buffers. Never "unexpected".
SATURATION = ("bridge wfl rx_dropped", "bridge w1 rx_dropped", "eth0 rx_dropped", "Udp RcvbufErrors",
              "Udp MemErrors")


DELIVERED = {ENGINE: "rx_packets", KERNEL: _VX, EBPF: _VX}   # the counter of what a data plane delivers


def _e(engine, kernel, ebpf) -> dict:
    return {ENGINE: engine, KERNEL: kernel, EBPF: ebpf}


# The one table of classes: what each sends (bench.flood_packets) and the counters each is expected
# to land in per kind of data plane (display names; "*" ends a prefix, "-" marks a subtracted term).
# The accounting never depends on it: a class that lands elsewhere is still counted, and shown as
# "unexpected". vxlan/kernel is the reference: "(none)" marks its drops without a counter.
CLASSES: list[FloodClass] = [
    FloodClass("random", "payload", ("udp", "vxlan"), fp.pool_random,
               _e(("rx_drop_*",), (_VX, "vxdev rx_errors", "(none)"), ("drops_*",))),
    FloodClass("truncated", "payload", ("udp", "vxlan"), fp.pool_truncated,
               _e(("rx_drop_short", "rx_drop_bad_ip"), (_VX, "vxdev rx_errors", "(none)"), ("drops_truncated",))),
    # vxlan/ebpf: an inner IHL < 5 is drops_inner_not_ipv4 (not an IPv4 header it can read); a wrong inner
    # header checksum passes to the kernel, whose IP input drops it.
    FloodClass("bad_ip_len", "payload", ("udp", "vxlan"), fp.pool_bad_ip_len,
               _e(("rx_drop_bad_ip",), (_VX,), ("drops_truncated", "drops_malformed", "drops_inner_not_ipv4", _VX))),
    FloodClass("wrong_vni", "payload", ("vxlan",), fp.pool_wrong_vni,
               _e(("rx_drop_wrong_vni",), ("(none)",), ("drops_wrong_vni",))),
    FloodClass("bad_vxlan_flags", "payload", ("vxlan",), fp.pool_bad_vxlan_flags,
               _e(("rx_drop_bad_vxlan",), ("(none)",), ("drops_bad_vxlan",))),
    FloodClass("wrong_mac", "payload", ("vxlan",), fp.pool_wrong_mac,
               _e(("rx_drop_wrong_mac",), (_VX,), ("drops_wrong_mac",))),
    FloodClass("not_ipv4", "payload", ("udp", "vxlan"), fp.pool_not_ipv4,
               _e(("rx_drop_not_ipv4",), (_VX,), ("drops_inner_not_ipv4",))),
    FloodClass("non_peer", "payload", ("udp", "vxlan"), fp.pool_non_peer,
               _e(("rx_drop_unknown_peer",), (_VX,), ("drops_unknown_peer",))),
    FloodClass("spoofed_inner", "payload", ("udp", "vxlan"), fp.pool_spoofed_inner,
               _e(("rx_drop_spoofed_src",), (_VX,), ("drops_spoofed_src",))),
    FloodClass("outside_subnet", "payload", ("udp", "vxlan"), fp.pool_outside_subnet,
               _e(("rx_packets",), (_VX,), (_VX,))),
    FloodClass("oversized", "outer", ("udp", "vxlan"), fp.pool_oversized,
               _e(_REASM + ("rx_drop_oversized",), _REASM + (_VX,), ("drops_fragment", "Ip ReasmReqds"))),
    FloodClass("outer_truncated", "outer", ("udp", "vxlan"), fp.pool_outer_truncated,
               _e(_IP_CHECKS + _UDP_LIES, _IP_CHECKS + _UDP_LIES, _IP_CHECKS + _UDP_LIES + ("drops_malformed",))),
    FloodClass("outer_ip_lies", "outer", ("udp", "vxlan"), fp.pool_outer_ip_lies,
               _e(_IP_CHECKS, _IP_CHECKS, _IP_CHECKS + ("drops_malformed",))),
    FloodClass("outer_udp_lies", "outer", ("udp", "vxlan"), fp.pool_outer_udp_lies,
               _e(_UDP_LIES + ("rx_drop_unknown_peer",), _UDP_LIES + (_VX,),
                  _UDP_LIES + ("drops_malformed", "drops_unknown_peer"))),
]
CLASS_NAMES = [c.name for c in CLASSES]

# Counters (keys of a snapshot) by role. Underlay and kernel ones are the same for every data plane.
# The bridge validates outer IPv4 headers when br_netfilter is loaded (bridge-nf-call-iptables,
# on by default then): what it drops is counted in the bridge namespace's own Ip counters.
UNDERLAY = ("wire.wfl.rx_dropped", "wire.w1.rx_dropped", "n2.eth0.rx_dropped",
            "wire.Ip.InHdrErrors", "wire.IpExt.InTruncatedPkts", "wire.Ip.InDiscards")
IP_OUTER = (("n2.Ip.InHdrErrors", 1), ("n2.IpExt.InTruncatedPkts", 1), ("n2.Ip.InDiscards", 1),
            ("n2.Ip.InAddrErrors", 1), ("n2.Ip.InUnknownProtos", 1),
            ("n2.Ip.ReasmReqds", 1), ("n2.Ip.ReasmOKs", -1))
UDP_BEFORE = ("n2.Udp.InErrors", "n2.Udp.NoPorts")   # InErrors includes RcvbufErrors, InCsumErrors, MemErrors
SOCKET = "n2.Udp.InDatagrams"
# Per kind of data plane: its per-outcome counters (regular expressions over the snapshot's keys)
# and those it keeps in front of its socket. ``vxdev`` is the VXLAN device: the kernel counts what
# it decapsulates (rx_packets) and what it refuses for reserved bits (rx_errors); its rx_dropped
# also counts what the stack later drops of an inner frame it had counted, so it is no outcome.
# vxlan/ebpf's program on the underlay's ingress (from_underlay) counts every datagram to the port
# in one receive drop reason (/metrics: drops_<reason>) or as passed (underlay_passed, which the
# socket then takes).
_BPF_RX_DROPS = ("fragment", "malformed", "unknown_peer", "truncated", "bad_vxlan", "wrong_vni", "wrong_mac",
                 "inner_not_ipv4", "ecn", "spoofed_src", "gso_batch")
DATAPLANES = {
    ENGINE: {"reasons": (r"backend\.rx_packets", r"backend\.rx_drop_\w+"), "upstream": ()},
    KERNEL: {"reasons": (r"n2\.vxdev\.rx_(packets|errors)",), "upstream": ()},
    EBPF: {"reasons": (r"n2\.vxdev\.rx_(packets|errors)",),
           "upstream": (rf"backend\.drops_({'|'.join(_BPF_RX_DROPS)})",)},
}
# Shown beside the books, never summed: cross-checks and where things went next.
INFORMATIVE = ("n2.Udp.RcvbufErrors", "n2.Udp.InCsumErrors", "n2.Udp.MemErrors", "n2.Ip.ReasmFails",
               "n2.Ip.ReasmTimeout", "n2.Ip.InCsumErrors", "wire.Ip.InCsumErrors", SOCKET, "n2.vxdev.rx_dropped",
               "backend.rx_datagrams", "backend.rx_recv_errors", "backend.underlay_passed", "backend.rx_packets")
# The stream's counters; with the accounting's, what a settled snapshot must hold still.
LEGIT = ("n1.legit_out", "pod1.Udp.OutDatagrams", "pod2.Udp.InDatagrams", "pod2.Udp.InErrors", "pod2.Udp.NoPorts")


def kind_of(backend: str) -> str:
    dataplane = backend.partition("/")[2]
    return {"kernel": KERNEL, "ebpf": EBPF}.get(dataplane, ENGINE)


def display(key: str) -> str:
    """A snapshot key as the tables show it: rx_drop_short, Ip InHdrErrors, bridge Ip InHdrErrors."""
    if key.startswith("backend."):
        return key[len("backend."):]
    ns, _, rest = key.partition(".")
    rest = rest.replace(".", " ", 1)
    return {"n2": rest, "wire": f"bridge {rest}"}.get(ns, f"{ns} {rest}")


# -- reading counters -----------------------------------------------------------------------------
def parse_snmp(text: str) -> dict[str, int]:
    """/proc/net/snmp and /proc/net/netstat: header line, value line, per protocol."""
    out = {}
    lines = text.splitlines()
    for head, vals in zip(lines[::2], lines[1::2]):
        proto, _, names = head.partition(":")
        _, _, values = vals.partition(":")
        for name, value in zip(names.split(), values.split()):
            try:
                out[f"{proto}.{name}"] = int(value)
            except ValueError:
                pass
    return out


_DEV_FIELDS = ("rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "rx_fifo", "rx_frame", "rx_compressed",
               "rx_multicast", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped")


def parse_dev(text: str) -> dict[str, dict[str, int]]:
    out = {}
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        out[name.strip()] = dict(zip(_DEV_FIELDS, map(int, rest.split())))
    return out


def udp_rx_queued(text: str) -> int:
    """Bytes waiting in every UDP socket's receive queue (/proc/net/udp)."""
    total = 0
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 4 and ":" in fields[4]:
            total += int(fields[4].split(":")[1], 16)
    return total


def backend_counters(text: str) -> dict[str, int]:
    """The backend's stats of a /metrics page as ``backend.<stat name>`` (a counter's without
    /metrics' ``_total``: ``backend.rx_drop_short``); ValueError if it is not Prometheus text."""
    return {f"backend.{s.family[len('weft_backend_'):]}": int(s.value)
            for s in parse_samples(text) if s.family.startswith("weft_backend_")}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class Reader:
    """One snapshot of every counter the accounting uses, read without entering a namespace:
    /proc/<pid>/net/* shows the network namespace of <pid> (weftd for the nodes, a sleeper of
    ours for the bridge and the pods)."""

    def __init__(self, lab: Lab, pids: dict[str, int], vxdev: str | None):
        self.lab, self.pids, self.vxdev = lab, pids, vxdev

    def read(self) -> dict:
        snap: dict = {"t": time.monotonic(), "errors": []}
        for label, pid in self.pids.items():
            try:
                for name in ("snmp", "netstat"):
                    for k, v in parse_snmp(_read(f"/proc/{pid}/net/{name}")).items():
                        snap[f"{label}.{k}"] = v
                devs = parse_dev(_read(f"/proc/{pid}/net/dev"))
                for dev, stats in devs.items():
                    name = "vxdev" if dev == self.vxdev else dev
                    for k, v in stats.items():
                        snap[f"{label}.{name}.{k}"] = v
                snap[f"{label}.udp_queued"] = udp_rx_queued(_read(f"/proc/{pid}/net/udp"))
            except OSError as exc:
                snap["errors"].append(f"{label} (pid {pid}): {exc.strerror or exc}")
        got = http_get(self.lab.node(2).namespace, "127.0.0.1", HEALTHZ_PORT, "/metrics", timeout=3.0)
        try:
            if not got or got[0] != 200:
                raise ValueError("did not answer")
            snap.update(backend_counters(got[1].decode("utf-8", "replace")))
        except ValueError as exc:
            snap["errors"].append(f"node 2's /metrics: {exc}")
        res = self.lab.exec("n1", ["nft", "-j", "list", "counter", "ip", "weft_flood", "legit"], timeout=10)
        try:
            items = json.loads(res.stdout)["nftables"]
            snap["n1.legit_out"] = next(i["counter"]["packets"] for i in items if "counter" in i)
        except (ValueError, KeyError, StopIteration):
            snap["errors"].append(f"node 1's nft counter: {(res.stderr or res.stdout).strip()[:120]}")
        return snap


def watched(snap: dict) -> set[str]:
    """The keys the accounting reads (node 2's other Ip counters move with every /metrics read)."""
    keys = set(UNDERLAY) | {k for k, _ in IP_OUTER} | set(UDP_BEFORE) | {SOCKET} | set(LEGIT)
    for spec in DATAPLANES.values():
        keys |= set(_matching(snap, spec["reasons"] + spec["upstream"]))
    return keys


def stable(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in watched(a) | watched(b))


def settle(reader: Reader, timeout: float = SETTLE_TIMEOUT_S) -> dict:
    """Read until two snapshots 0.1 s apart agree and no UDP socket of node 2 or pod 2 holds data."""
    deadline = time.monotonic() + timeout
    prev = reader.read()
    while True:
        time.sleep(0.1)
        cur = reader.read()
        quiet = not cur.get("n2.udp_queued") and not cur.get("pod2.udp_queued")
        if quiet and stable(prev, cur) and not cur["errors"]:
            cur["settled"] = True
            return cur
        if time.monotonic() > deadline:
            cur["settled"] = False
            return cur
        prev = cur


# -- accounting -----------------------------------------------------------------------------------
def _matching(snap: dict, patterns) -> list[str]:
    return sorted(k for k in snap if any(re.fullmatch(p, k) for p in patterns))


def account(kind: str, cls: FloodClass | None, flood: dict | None, before: dict, after: dict) -> dict:
    """One segment's books: where the flood's frames (and the stream's datagrams) were counted."""
    d = lambda k: after.get(k, 0) - before.get(k, 0)  # noqa: E731
    spec = DATAPLANES[kind]
    sent = (flood["frames_ok"] + flood["frames_enobufs"]) if flood else 0
    legit = d("n1.legit_out")
    terms: dict[str, int] = {k: d(k) for k in UNDERLAY}
    if cls is not None and cls.layer == "outer":
        terms.update({k: sign * d(k) for k, sign in IP_OUTER})
    terms.update({k: d(k) for k in UDP_BEFORE})
    terms.update({k: d(k) for k in _matching(after, spec["upstream"])})
    before_dp = sum(terms.values())
    reasons = {k: d(k) for k in _matching(after, spec["reasons"])}
    socket = d(SOCKET)
    accounted = before_dp + sum(reasons.values()) - legit
    out = {
        "class": cls.name if cls else None,
        "layer": cls.layer if cls else None,
        "sent_datagrams": flood["datagrams"] if flood else 0,
        "sent_frames": sent,
        "flood": flood,
        "legit_outer": legit,
        "before": before_dp,
        "socket": socket,
        "reasons": sum(reasons.values()),
        "accounted": accounted,
        "unaccounted": sent - accounted,
        "socket_only": socket - sum(reasons.values()),
        "uncounted": sent + legit - before_dp - socket,
        "counters": {display(k): v for k, v in {**terms, **reasons}.items() if v},
        "breakdown": {display(k): d(k) for k in INFORMATIVE if d(k)},
        "settled": bool(after.get("settled")),
        "read_errors": after.get("errors", []),
    }
    # Udp InErrors is one term of the sum; the tables show its parts
    errors = out["counters"].pop("Udp InErrors", 0)
    for part in ("RcvbufErrors", "InCsumErrors", "MemErrors"):
        if d(f"n2.Udp.{part}"):
            out["counters"][f"Udp {part}"] = d(f"n2.Udp.{part}")
            errors -= d(f"n2.Udp.{part}")
    if errors:
        out["counters"]["Udp InErrors (length)"] = errors
    # reached the pod: what pod 2's UDP took in, read or dropped (its only UDP traffic is the stream)
    reached = d("pod2.Udp.InDatagrams") + d("pod2.Udp.InErrors") + d("pod2.Udp.NoPorts")
    lg = out["legit"] = {"sent": d("pod1.Udp.OutDatagrams"), "on_wire": legit, "reached_pod": reached,
                         "received": d("pod2.Udp.InDatagrams")}
    lg["lost"] = lg["sent"] - lg["received"]
    lg["lost_in_node1"] = lg["sent"] - lg["on_wire"]           # before the wire: not node 2's doing
    lg["lost_to_pod"] = lg["on_wire"] - lg["reached_pod"]       # underlay, node 2's data plane and forwarding
    lg["lost_at_pod_socket"] = lg["reached_pod"] - lg["received"]
    # The stream is delivered by the data plane like any packet: its share of the delivered counter
    # is known exactly when none of it was lost on the way to the pod (else the table says so).
    flood_counters = dict(out["counters"])
    delivered = DELIVERED[kind]
    if delivered in flood_counters or lg["on_wire"]:
        if lg["lost_to_pod"] == 0:
            flood_counters[delivered] = flood_counters.get(delivered, 0) - lg["on_wire"]
        else:
            flood_counters[delivered + " (with the stream)"] = flood_counters.pop(delivered, 0)
    out["flood_counters"] = {k: v for k, v in flood_counters.items() if v}
    if cls is not None:
        exp = cls.expect.get(kind, ())
        out["expected"] = list(exp)
        out["unexpected"] = sorted(c for c in out["flood_counters"]
                                   if not _expected(c, exp + SATURATION) and not c.endswith("(with the stream)"))
    return out


def _expected(counter: str, expect) -> bool:
    for e in expect:
        e = e.lstrip("-")
        if e.endswith("*") and counter.startswith(e[:-1]) or counter == e:
            return True
    return False


# -- processes in the lab -------------------------------------------------------------------------
def _json_tail(path: str) -> dict | None:
    try:
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise LabError(f"{what} after {timeout:.0f}s")
        time.sleep(0.02)


def _pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def _mac(ns: str, dev: str = "eth0") -> str:
    res = subprocess.run(["ip", "-n", ns, "-j", "link", "show", dev], capture_output=True, text=True, timeout=10)
    try:
        return json.loads(res.stdout)[0]["address"]
    except (ValueError, IndexError, KeyError):
        raise LabError(f"{ns}: no device {dev} ({res.stderr.strip()})") from None


def liveness(lab: Lab, snap: dict, before: dict | None = None) -> dict:
    """Is every part of node 2's (and node 1's) data plane still the one that started? weftd's
    PID and start time, its thread count, and the compiled engine's workers (each reports its
    thread's CPU time in /metrics while the thread exists)."""
    n1, n2 = lab.node(1), lab.node(2)
    try:
        threads = len(os.listdir(f"/proc/{n2.pid}/task"))
    except OSError:
        threads = 0
    out = {"weftd_node2_alive": alive(n2.pid, n2.start), "weftd_node2_pid": n2.pid,
           "weftd_node1_alive": alive(n1.pid, n1.start), "weftd_node2_threads": threads,
           "engine_workers": sorted(k for k in snap if re.fullmatch(r"backend\.worker\d+_cpu_seconds", k)),
           "metrics_answer": "backend.rx_datagrams" in snap or any(k.startswith("backend.") for k in snap)}
    if before is not None:
        lost_workers = set(before["engine_workers"]) - set(out["engine_workers"])
        out["threads_before"] = before["weftd_node2_threads"]
        out["lost_workers"] = sorted(lost_workers)
        out["crashes"] = (int(not out["weftd_node2_alive"]) + int(not out["weftd_node1_alive"])
                          + int(threads < before["weftd_node2_threads"]) + len(lost_workers)
                          + int(not out["metrics_answer"]))
    return out


def flooder_address(scenario) -> str:
    """The highest host address of the underlay that is neither a node's nor the store's."""
    taken = {scenario.node_ip(n) for n in range(1, scenario.nodes + 1)} | {scenario.store_ip}
    addr = scenario.underlay.broadcast_address - 1
    while addr in taken:
        addr -= 1
    if addr <= scenario.underlay.network_address:
        raise LabError(f"underlay {scenario.underlay} has no free address for the flooder")
    return str(addr)


def unknown_sources(scenario, own: str, rng: random.Random, n: int = 256) -> list[str]:
    """Outer sources that hold no lease: the flooder's own address and others (CGNAT space)."""
    taken = {str(scenario.node_ip(i)) for i in range(1, scenario.nodes + 1)}
    out = [own]
    while len(out) < n:
        a = str(ipaddress.IPv4Address(0x64400000 + rng.randrange(1, 1 << 22)))   # 100.64.0.0/10
        if a not in taken and a not in out:
            out.append(a)
    return out


def vtep_macs(lab: Lab) -> dict[str, str]:
    """Public IP -> VtepMAC, from the leases in the store."""
    argv = [lab.daemon[0], "-m", "controlplane.ctl", *lab.store_flags(), "leases", "--json"]
    res = lab.exec("n1", argv, timeout=30, check=True)
    out = {}
    for lease in json.loads(res.stdout):
        vtep = (lease.get("backend_data") or {}).get("VtepMAC")
        if vtep:
            out[lease["public_ip"]] = vtep
    return out


# -- one data plane -------------------------------------------------------------------------------
@dataclass
class Plan:
    count: int = DEFAULT_COUNT
    rate: float = 0.0               # flood datagrams/s (0: as fast as the sender goes)
    legit_rate: float = 20000.0     # the stream's datagrams/s
    legit_size: int = 256
    classes: tuple = tuple(CLASS_NAMES)
    seed: int = 1


def shares(total: int, n: int) -> list[int]:
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


class DataPlaneRun:
    """Builds the lab, runs every segment, and tears the lab down; ``result`` is the JSON."""

    def __init__(self, scenario, backend: str, plan: Plan, tool: str, progress, lab_cls=Lab):
        from .runner import scenario_for
        self.backend, self.plan, self.tool, self.progress = backend, plan, tool, progress
        self.kind = kind_of(backend)
        self.lab = lab_cls(scenario_for(scenario, backend))
        self.wire = backend.partition("/")[0]
        self.classes = [c for c in CLASSES if c.name in plan.classes and self.wire in c.wires]

    def run(self) -> dict:
        t0 = time.monotonic()
        lab = self.lab
        try:
            self.progress.show(f"{self.backend}: building the lab")
            lab.up()
            result = self._run(lab)
        finally:
            problems = lab.down()
        result["seconds"] = round(time.monotonic() - t0, 1)
        if problems:
            result["teardown_problems"] = problems
        return result

    # -- setup ------------------------------------------------------------------------------
    def _setup(self, lab: Lab) -> fp.Target:
        from .runner import check_connectivity
        s = lab.scenario
        check_connectivity(lab, self.backend)
        own = flooder_address(s)
        ns = lab.add_underlay_host(FLOODER, own)
        lab.exec(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                      "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        n1, n2 = lab.node(1), lab.node(2)
        macs = {n.public_ip: _mac(n.namespace) for n in lab.nodes}
        macs[own] = _mac(ns)
        # permanent neighbours: no ARP on the underlay while counting
        for node in lab.nodes:
            for ip, mac in macs.items():
                if ip != node.public_ip and (ip != own or node.index == 2):
                    lab.exec(node.namespace, ["ip", "neigh", "replace", ip, "lladdr", mac, "dev", "eth0",
                                              "nud", "permanent"], check=True)
        cfg = s.network.backend
        port = cfg.effective_port
        lab.exec("n1", ["nft", "-f", "-"], check=True, input=(
            "table ip weft_flood {\n counter legit { }\n chain post {\n"
            "  type filter hook postrouting priority 1000; policy accept;\n"
            f"  ip daddr {n2.public_ip} udp dport {port} counter name legit\n }}\n}}\n"))
        vteps = vtep_macs(lab) if self.wire == "vxlan" else {}
        rng = random.Random(self.plan.seed)
        return fp.Target(
            wire=self.wire, port=port, vni=getattr(cfg, "vni", 0),  # udp has no VNI
            dst_mac=macs[n2.public_ip], src_mac=macs[own],
            dst_ip=n2.public_ip, own_ip=own, peer_ip=n1.public_ip, network=s.network.network,
            subnets={n.index: ipaddress.IPv4Network(n.subnet) for n in lab.nodes}, node_mtu=n2.mtu,
            underlay_mtu=s.mtu, vtep_mac=vteps.get(n2.public_ip, ""), peer_vtep_mac=vteps.get(n1.public_ip, ""),
            unknown_sources=unknown_sources(s, own, rng))

    def _run(self, lab: Lab) -> dict:
        target = self._setup(lab)
        n1, n2 = lab.node(1), lab.node(2)
        pod1 = next(p for p in lab.pods if p.node == 1)
        pod2 = next(p for p in lab.pods if p.node == 2)
        cpu1, cpu2 = lab.node_cpu(1), lab.node_cpu(2)
        counts = shares(self.plan.count, len(self.classes))
        bound = int(len(self.classes) * (CLASS_MAX_S + SETTLE_TIMEOUT_S + 5) + 120)
        # a process per namespace whose /proc/<pid>/net the reader uses; they outlive the stream
        readers = {label: lab.spawn(ns, ["sleep", str(bound)], role=f"flood: counter reader in {label}").pid
                   for label, ns in (("wire", "wire"), ("pod1", pod1.namespace), ("pod2", pod2.namespace))}
        recv_log = os.path.join(lab.dir, "flood-recv.log")
        receiver = lab.spawn(pod2.namespace, _pinned(cpu2, [self.tool, "recv", pod2.ip, str(LEGIT_PORT), str(bound),
                                                            str(int(self.plan.legit_rate * bound) + 1)]),
                             log=recv_log, role="flood: stream receiver")
        _wait_for(lambda: "ready" in _read(recv_log), 10, "the stream's receiver is not ready")
        send_log = os.path.join(lab.dir, "flood-send.log")
        sender = lab.spawn(pod1.namespace, _pinned(cpu1, [self.tool, "send", pod2.ip, str(LEGIT_PORT),
                                                          str(self.plan.legit_rate), str(self.plan.legit_size),
                                                          str(bound)]),
                           log=send_log, role="flood: stream sender")
        _wait_for(lambda: proc_state(sender.pid) in ("T", "t") or sender.poll() is not None, 10,
                  "the stream's sender did not get ready")
        if sender.poll() is not None:
            raise LabError(f"the stream's sender exited: {_read(send_log).strip()[-200:]}")
        reader = Reader(lab, {"n1": n1.pid, "n2": n2.pid, **readers}, f"flannel.{target.vni}" if target.wire == "vxlan" else None)  # udp: no VXLAN device
        live0 = liveness(lab, reader.read())
        pools = self._pools(lab, target)
        segments = []
        try:
            snap = settle(reader)
            for cls, count in [(None, 0)] + list(zip(self.classes, counts)):
                label = f"{self.backend}: " + (f"{cls.name} ({count:,})" if cls else "the stream alone")
                self.progress.show(label)
                flood = None
                os.kill(sender.pid, signal.SIGCONT)
                started = time.monotonic()
                time.sleep(0.05)
                if cls is not None:
                    flood = self._flood(lab, cls, pools[cls.name], count, cpu1)
                time.sleep(max(0.0, SEGMENT_MIN_S - (time.monotonic() - started)))
                os.kill(sender.pid, signal.SIGSTOP)
                after = settle(reader)
                seg = account(self.kind, cls, flood, snap, after)
                seg["seconds"] = round(after["t"] - snap["t"], 3)
                segments.append(seg)
                snap = after
                self.progress.show(label, step=True)
                if not alive(n2.pid, n2.start):
                    break
        finally:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                if sender.poll() is None:
                    os.kill(sender.pid, sig)
            self._reap(sender)
        final = settle(reader)
        tail = account(self.kind, None, None, snap, final)   # what the stream sent after the last segment
        receiver.terminate()
        self._reap(receiver)
        live = liveness(lab, final, live0)
        live["forwards_after"] = lab.ping(pod1, pod2.ip, count=3)
        return self._summary(segments, tail, live, _json_tail(send_log), _json_tail(recv_log))

    def _pools(self, lab: Lab, target: fp.Target) -> dict:
        pools = {}
        for cls in self.classes:
            rng = random.Random(f"{self.plan.seed}/{cls.name}")
            path = os.path.join(lab.dir, f"flood-pool-{cls.name}.bin")
            fp.write_pool(path, cls.build(target, rng))
            pools[cls.name] = path
        return pools

    def _flood(self, lab: Lab, cls: FloodClass, pool: str, count: int, cpu: int | None) -> dict:
        log = os.path.join(lab.dir, f"flood-{cls.name}.log")
        proc = lab.spawn(FLOODER, _pinned(cpu, [self.tool, "flood", "eth0", pool, str(count), str(self.plan.rate),
                                                str(CLASS_MAX_S)]), log=log, role=f"flood: {cls.name}")
        try:
            proc.wait(CLASS_MAX_S + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        result = _json_tail(log)
        if result is None:
            raise LabError(f"the flooder ({cls.name}) printed no result; log {log}")
        return result

    @staticmethod
    def _reap(proc) -> None:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _summary(self, segments, tail, live, sent_app, recv_app) -> dict:
        flood = [s for s in segments if s["class"]]
        tot = lambda key: sum(s[key] for s in flood)  # noqa: E731
        counters: dict[str, int] = {}
        for s in flood:
            for k, v in s["flood_counters"].items():
                counters[k] = counters.get(k, 0) + v
        legit_keys = ("sent", "on_wire", "reached_pod", "received", "lost", "lost_in_node1", "lost_to_pod",
                      "lost_at_pod_socket")
        legit = {k: sum(s["legit"][k] for s in segments) + tail["legit"][k] for k in legit_keys}
        legit["loss_pct"] = round(100.0 * legit["lost"] / legit["sent"], 4) if legit["sent"] else None
        legit["sender"], legit["receiver"] = sent_app, recv_app
        seconds = sum((s["flood"] or {}).get("seconds", 0) for s in flood)
        control = next((s for s in segments if not s["class"]), None)
        return {
            "status": "ok", "kind": self.kind, "reference": self.backend in REFERENCE,
            "sent_datagrams": tot("sent_datagrams"), "sent_frames": tot("sent_frames"),
            "flood_rate_pps": round(tot("sent_datagrams") / seconds) if seconds else None,
            "accounted": tot("accounted"), "unaccounted": tot("unaccounted"),
            "socket_only": tot("socket_only"), "uncounted": tot("uncounted"),
            "control_unaccounted": control["unaccounted"] if control else None,
            "unaccounted_after": tail["unaccounted"],
            "settled": all(s["settled"] for s in segments) and tail["settled"],
            "counters": dict(sorted(counters.items(), key=lambda kv: -abs(kv[1]))),
            "unaccounted_classes": [s["class"] for s in flood if s["unaccounted"]],
            "crashes": live["crashes"], "liveness": live,
            "legit": legit, "segments": segments,
        }


# -- all data planes ------------------------------------------------------------------------------
def run(scenario, backends: list[str], plan: Plan, progress) -> dict:
    from . import results
    from .errors import refuse_ipv6_only
    refuse_ipv6_only(scenario, "bench flood", "sends IPv4 packets at the data planes and writes IPv4 leases")
    from .flood_tool import build
    from .runner import unavailable
    tool = build()
    doc = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": results.machine(), "git": results.git_info(),
           "scenario": {"name": scenario.name, "path": scenario.path, "nodes": scenario.nodes,
                        "store": scenario.store},
           "plan": dataclasses.asdict(plan), "backends": {}}
    for backend in backends:
        done = progress.done + steps(backend, plan)
        why = unavailable(backend)
        if why:
            doc["backends"][backend] = {"status": "skipped", "reason": why}
        else:
            try:
                doc["backends"][backend] = DataPlaneRun(scenario, backend, plan, tool, progress).run()
            except (LabError, OSError) as exc:
                doc["backends"][backend] = {"status": "failed", "reason": str(exc).replace("\n", " | ")}
            except Exception as exc:  # a probe's own failure (MeasureError ...) is this backend's, not the run's
                doc["backends"][backend] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        progress.done = done
        progress.show(f"{backend}: {doc['backends'][backend]['status']}")
    return doc


def steps(backend: str, plan: Plan) -> int:
    """Progress steps of one data plane: its control segment and one per class it takes."""
    wire = backend.partition("/")[0]
    return 1 + sum(1 for c in CLASSES if c.name in plan.classes and wire in c.wires)


# -- the command ----------------------------------------------------------------------------------


class FloodCommand(Command):
    def add_arguments(self, p):
        p.add_argument("--scenario", default="scenarios/default.toml", help="scenario file (TOML)")
        p.add_argument("--backends", default="",
                       help=f"comma-separated wire/dataplane list; default {','.join(DEFAULT_BACKENDS)}")
        p.add_argument("--count", type=int, default=DEFAULT_COUNT, help="hostile datagrams per data plane")
        p.add_argument("--rate", type=float, default=0.0, help="flood datagrams per second (0: as fast as it goes)")
        p.add_argument("--legit-rate", type=float, default=Plan.legit_rate,
                       help="the pod stream's datagrams per second")
        p.add_argument("--classes", default="", help=f"comma-separated subset of: {','.join(CLASS_NAMES)}")
        p.add_argument("--out", default="",
                       help="directory for flood.json and flood.md (default results/flood-<time>)")
        p.add_argument("--json", default="", help="also write the JSON document here")

    def run(self, args) -> int:
        from .commands import _scenario_path
        from .runner import Progress
        from .scenario import load
        from controlplane.backends import backend_names
        scenario = load(_scenario_path(args.scenario))
        backends = [b.strip() for b in args.backends.split(",") if b.strip()] or DEFAULT_BACKENDS
        for b in backends:
            wire, _, dp = b.partition("/")
            if wire not in ("udp", "vxlan") or b not in backend_names():
                raise UsageError(f"--backends: {b!r} is not a udp or vxlan data plane (e.g. vxlan/fastpath)")
        if args.count < 0:
            raise UsageError("--count must be 0 or more")
        if args.rate < 0 or args.legit_rate <= 0:
            raise UsageError("--rate must be 0 or more and --legit-rate above 0")
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip()) or tuple(CLASS_NAMES)
        bad = [c for c in classes if c not in CLASS_NAMES]
        if bad:
            raise UsageError(f"--classes: unknown {', '.join(bad)} (known: {', '.join(CLASS_NAMES)})")
        if scenario.nodes < 2 or scenario.pods_per_node < 1:
            raise UsageError(f"{scenario.path}: the flood needs at least 2 nodes with a pod each")
        plan = Plan(count=args.count, rate=args.rate, legit_rate=args.legit_rate, classes=classes)
        progress = Progress(sum(steps(b, plan) for b in backends))
        doc = run(scenario, backends, plan, progress)
        progress.close()
        out = args.out or os.path.join("results", time.strftime("flood-%Y%m%d-%H%M%S"))
        paths = flood_report.write(doc, out, args.json)
        print(flood_report.terminal(doc))
        print(f"\nwrote {', '.join(paths)}")
        ok = [b for b in doc["backends"].values() if b.get("status") == "ok"]
        if not ok:
            raise Failure("no data plane could be flooded")
        return 0
