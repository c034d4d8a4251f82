"""bench flood: the crafted classes say what they are, and a real flood of every data plane in the
lab leaves no datagram uncounted, crashes nothing, and lets the pods' stream through."""
from __future__ import annotations

import ipaddress
import json
import os
import random
import socket
import struct

import pytest

from bench import flood, flood_packets as fp
from fastpath.engine.reference import RX_OUTCOMES, ReferenceEngine

from .conftest import needs_bcc, needs_root
from .daemons import run_tool

SUBNETS = {n: ipaddress.IPv4Network(f"10.244.{n}.0/24") for n in (1, 2, 3)}
VTEP = {1: "5e:00:00:00:00:01", 2: "5e:00:00:00:00:02", 3: "5e:00:00:00:00:03"}
PEERS = {1: "198.18.0.1", 2: "198.18.0.2", 3: "198.18.0.3"}
COUNT = 20000


def target(wire: str) -> fp.Target:
    return fp.Target(wire=wire, port=8472 if wire == "vxlan" else 8285, vni=1, dst_mac="02:00:00:00:00:02",
                     src_mac="02:00:00:00:00:99", dst_ip=PEERS[2], own_ip="198.19.255.253", peer_ip=PEERS[1],
                     network=ipaddress.IPv4Network("10.244.0.0/16"), subnets=SUBNETS,
                     node_mtu=1450 if wire == "vxlan" else 1472, vtep_mac=VTEP[2], peer_vtep_mac=VTEP[1],
                     unknown_sources=["198.19.255.253", "100.64.7.9", "100.100.1.1"])


def outer_fields(frame: bytes):
    """What Linux's IPv4 and UDP input checks make of one outer frame: (source, flags+offset,
    UDP segment trimmed to its length), or None where they drop it (a fragment is passed whole)."""
    ip = frame[14:]
    if frame[12:14] != b"\x08\x00" or len(ip) < 20 or ip[0] >> 4 != 4 or ip[0] & 15 < 5:
        return None
    ihl = (ip[0] & 15) * 4
    total = int.from_bytes(ip[2:4], "big")
    if len(ip) < ihl or fp.checksum(ip[:ihl]) != 0 or total > len(ip) or total < ihl or ip[9] != 17:
        return None
    src, frag, seg = str(ipaddress.IPv4Address(ip[12:16])), int.from_bytes(ip[6:8], "big"), ip[ihl:total]
    if frag & 0x3FFF:
        return src, frag, seg
    if len(seg) < 8:
        return None
    length = int.from_bytes(seg[4:6], "big")
    if length < 8 or length > len(seg):
        return None
    seg = seg[:length]
    pseudo = fp.ip4(src) + fp.ip4(ip[16:20]) + struct.pack("!BBH", 0, 17, length)
    if seg[6:8] != b"\0\0" and fp.checksum(pseudo + seg) != 0:
        return None
    return src, frag, seg


def reassemble(frames: list[bytes]) -> tuple[str, bytes]:
    """The UDP datagram the outer fragments of one class datagram make (checked as the kernel would)."""
    parts, src = {}, None
    for fr in frames:
        src, frag, data = outer_fields(fr)
        parts[(frag & 0x1FFF) * 8] = (data, bool(frag & 0x2000))
    seg, off = b"", 0
    for start in sorted(parts):
        assert start == off, "fragments leave a hole"
        seg += parts[start][0]
        off += len(parts[start][0])
    assert not parts[max(parts)][1], "the last fragment says more follow"
    return src, seg


def engine(wire: str) -> tuple[ReferenceEngine, list]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink = os.open(os.devnull, os.O_WRONLY)
    eng = ReferenceEngine(sink, sock.fileno(), mode=wire, network="10.244.0.0/16", subnet_len=24,
                          local_subnet=str(SUBNETS[2]), vni=1, vtep_mac=VTEP[2],
                          mtu=1450 if wire == "vxlan" else 1472)
    for n in (1, 3):
        eng.set_route(str(SUBNETS[n]), PEERS[n], VTEP[n] if wire == "vxlan" else None)
    return eng, [sock, sink]


@pytest.mark.parametrize("wire", ["udp", "vxlan"])
def test_each_class_lands_where_the_table_says_in_the_reference_engine(wire):
    """Every datagram of every class, as the engine's socket would hand it over, lands in exactly
    one outcome counter of the reference engine (the compiled engine's oracle), and in one the
    class table expects; the outer lies really lie, and outer fragments reassemble."""
    t = target(wire)
    eng, keep = engine(wire)
    try:
        for cls in flood.CLASSES:
            if wire not in cls.wires:
                continue
            pool = cls.build(t, random.Random(cls.name))
            assert len(pool) == fp.POOL and all(pool), cls.name
            before = dict(eng.counters)
            fed = 0
            for dgram in pool:
                if cls.name == "oversized":
                    assert len(dgram) >= 2 and all(len(f) <= 14 + 1500 for f in dgram)
                    src, seg = reassemble(dgram)
                    pseudo = fp.ip4(src) + fp.ip4(t.dst_ip) + struct.pack("!BBH", 0, 17, len(seg))
                    assert fp.checksum(pseudo + seg) == 0, "reassembled UDP checksum"
                    eng._inject_rx(seg[8:], src)
                    fed += 1
                    continue
                assert len(dgram) == 1
                fields = outer_fields(dgram[0])
                if cls.layer == "payload":
                    assert fields is not None and len(fields[2]) == len(dgram[0]) - 34, \
                        f"{cls.name}: a payload class's outer headers lie"
                if fields is None:
                    assert cls.layer == "outer"
                    continue
                eng._inject_rx(fields[2][8:], fields[0])
                fed += 1
            if cls.name in ("outer_truncated", "outer_ip_lies"):
                assert fed == 0, f"{cls.name}: the kernel would take {fed} of them"
            elif cls.name == "outer_udp_lies":
                assert 0 < fed < fp.POOL // 3, "only the datagrams with trailing junk pass"
            moved = {k: eng.counters[k] - before[k] for k in eng.counters if eng.counters[k] != before[k]}
            outcomes = {k: v for k, v in moved.items() if k in RX_OUTCOMES}
            assert moved.get("rx_datagrams", 0) == fed == sum(outcomes.values()), (cls.name, moved)
            expect = cls.expect[flood.ENGINE]
            assert all(flood._expected(k, expect) for k in outcomes), (cls.name, outcomes, expect)
            if cls.layer == "payload":
                assert fed == fp.POOL
    finally:
        eng.close()
        for k in keep:
            k.close() if hasattr(k, "close") else os.close(k)


def test_accounting_balances_subtracts_the_stream_and_names_what_is_missing():
    """The books of one segment, from counter snapshots: the stream is subtracted where it left
    node 1, the outer IP counters count only for outer classes, and a datagram the socket took
    without a reason counter is unaccounted (socket only)."""
    cls = next(c for c in flood.CLASSES if c.name == "wrong_vni")
    base = {"n1.legit_out": 10, "n2.Udp.InDatagrams": 10, "n2.vxdev.rx_packets": 10, "n2.Ip.InHdrErrors": 0,
            "pod1.Udp.OutDatagrams": 10, "pod2.Udp.InErrors": 0, "pod2.Udp.InDatagrams": 10}
    after = dict(base, **{"n1.legit_out": 110, "n2.Udp.InDatagrams": 1110, "n2.vxdev.rx_packets": 110,
                          "n2.Ip.InHdrErrors": 7, "pod1.Udp.OutDatagrams": 112, "pod2.Udp.InErrors": 1,
                          "pod2.Udp.InDatagrams": 109})
    sent = {"datagrams": 1000, "frames_ok": 990, "frames_enobufs": 10}
    books = flood.account(flood.KERNEL, cls, sent, base, after)
    assert books["sent_frames"] == 1000 and books["legit_outer"] == 100
    assert books["socket_only"] == 1000 and books["uncounted"] == 0 and books["unaccounted"] == 1000
    assert "Ip InHdrErrors" not in books["flood_counters"]       # inner packets: not a payload class's term
    assert books["legit"] == {"sent": 102, "on_wire": 100, "reached_pod": 100, "received": 99, "lost": 3,
                              "lost_in_node1": 2, "lost_to_pod": 0, "lost_at_pod_socket": 1}
    books = flood.account(flood.ENGINE, cls, sent, base, dict(after, **{"backend.rx_drop_wrong_vni": 1000,
                                                                        "backend.rx_packets": 100}))
    assert books["unaccounted"] == 0 and books["socket_only"] == 0
    assert books["flood_counters"] == {"rx_drop_wrong_vni": 1000} and books["unexpected"] == []


@needs_root
@needs_bcc
def test_flood_every_data_plane(tmp_path):
    """A real flood (20,000 per data plane) of every default data plane in its own lab."""
    out = tmp_path / "out"
    r = run_tool("bench.cli", "flood", "--count", str(COUNT), "--out", str(out), "--json",
                 str(tmp_path / "f.json"), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "f.json").read_text())
    assert (out / "flood.md").read_text().count("|") > 20 and "unaccounted" in r.stdout
    assert set(doc["backends"]) == set(flood.DEFAULT_BACKENDS)
    for name, b in doc["backends"].items():
        assert b["status"] == "ok", (name, b.get("reason"))
        assert b["sent_datagrams"] == COUNT and b["sent_frames"] >= COUNT, name
        assert b["crashes"] == 0 and b["liveness"]["forwards_after"], (name, b["liveness"])
        assert b["settled"], name
        assert b["uncounted"] == 0 and b["control_unaccounted"] == 0, (name, b["uncounted"])
        lg = b["legit"]
        assert lg["sent"] > 0 and lg["received"] > 0 and isinstance(lg["loss_pct"], float), (name, lg)
        # the apps' own totals (sequence numbers) agree with the kernel's counters, segment by segment summed
        assert lg["sender"]["sent"] == lg["sent"] and lg["receiver"]["unique"] == lg["received"], (name, lg)
        assert lg["receiver"]["duplicates"] == 0, (name, lg)
        if b["reference"]:
            # the kernel's VXLAN drops a wrong VNI without a counter: the books must show it
            seg = next(s for s in b["segments"] if s["class"] == "wrong_vni")
            assert 0.9 * seg["sent_frames"] <= seg["socket_only"] == seg["unaccounted"], seg
        else:
            assert b["unaccounted"] == 0 and b["socket_only"] == 0, (name, b["unaccounted_classes"])
