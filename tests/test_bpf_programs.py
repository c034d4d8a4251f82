"""weft's BPF programs (fastpath/bpf/) without a network: mirrors, BPF_PROG_TEST_RUN, map speed.

- The Python mirrors (ctypes structs, Counter, DropReason) agree with what bcc compiled and with the
  header text.
- Each program runs under BPF_PROG_TEST_RUN on crafted frames: hit, miss, not IPv4, short, outside
  the Network, TTL 1; the frame it leaves behind is checked byte for byte (inner MACs, TTL and IP
  checksum) and so are the per-CPU counters and drop reasons. The receive program's FIB path runs
  in a scratch network namespace (a thread that entered it), never against the root namespace's FIB.
- The map follows add/remove; 1,000 synthetic leases go into the map in under 1 s, measured through
  the backend (vxlan/ebpf add_peer) and compared with vxlan/kernel programming the same 1,000 peers
  as neighbour + FDB + route entries, each in its own scratch namespace.

Programs are loaded (compiled by bcc), never attached, in this process.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
import subprocess
import time

import pytest

from .e2e import in_netns
from .conftest import needs_bcc, needs_root

pytestmark = [needs_root, needs_bcc]

import fastpath.bpf as fb  # noqa: E402  (importing needs no bcc; loading does)
from fastpath.bpf import sysbpf  # noqa: E402

OUR_MAC = "02:0e:00:00:00:01"
PEER_MAC = "02:0e:00:00:00:02"
POD_MAC = "02:aa:00:00:00:05"
CNI_MAC = "02:bb:00:00:00:01"
NETWORK = ipaddress.IPv4Network("10.244.0.0/16")
PREFIX = f"wbp{os.getpid() % 1000}-"


# -- packets ---------------------------------------------------------------------------------------

def ip_checksum(hdr: bytes) -> int:
    s = sum(struct.unpack("!10H", hdr[:20]))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def frame(src: str, dst: str, ttl: int = 64, dmac: str = CNI_MAC, smac: str = POD_MAC,
          ethertype: int = 0x0800, payload: bytes = b"weft" * 16) -> bytes:
    total = 20 + 8 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, ttl, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", ip_checksum(hdr)) + hdr[12:]
    udp = struct.pack("!HHHH", 1234, 5678, 8 + len(payload), 0)
    return fb.mac_bytes(dmac) + fb.mac_bytes(smac) + struct.pack("!H", ethertype) + hdr + udp + payload


def ip_of(pkt: bytes) -> dict:
    ttl = pkt[14 + 8]
    return {"dmac": fb.mac_text(pkt[0:6]), "smac": fb.mac_text(pkt[6:12]), "ttl": ttl,
            "csum_ok": ip_checksum(pkt[14:34]) == 0, "daddr": socket.inet_ntoa(pkt[30:34])}


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def progs():
    p = fb.Programs()
    yield p
    p.close()


@pytest.fixture
def fresh(progs):
    """Programs with an empty peer map, zeroed counters and the default config."""
    for e in progs.peer_entries():
        progs.delete_peer(fb.peer_key(ipaddress.IPv4Network(e["subnet"])))
    progs.clear_counters()
    progs.set_config(config(flags=fb.CFG_DEFAULT))
    return progs


def config(flags: int, ifindex: int = 7, mtu: int = 1450) -> fb.Config:
    return fb.Config(vtep_mac=(ctypes.c_uint8 * 6)(*fb.mac_bytes(OUR_MAC)), vxlan_ifindex=ifindex,
                     local_ipv4=int(ipaddress.IPv4Address("198.18.0.1")),
                     network=struct.unpack("=I", NETWORK.network_address.packed)[0],
                     netmask=struct.unpack("=I", NETWORK.netmask.packed)[0], mtu=mtu, flags=flags)


def add_peer(progs, subnet="10.244.2.0/24", ip="198.18.0.2", mac=PEER_MAC):
    progs.put_peer(fb.peer_key(ipaddress.IPv4Network(subnet)),
                   fb.peer_value(ipaddress.IPv4Address(ip), 1, mac))


def run(progs, name: str, pkt: bytes, ctx: bytes | None = None) -> tuple[int, bytes]:
    rc, out, _ = sysbpf.test_run(progs.fns[name].fd, pkt, ctx)
    return rc, out


# -- mirrors ---------------------------------------------------------------------------------------

def test_struct_mirrors_match_compiled_layout(progs):
    """Field by field against the types bcc builds from the compiled layout (in-process compile),
    and sizes against the maps weftd's loader actually created."""
    bpf, _ = fb.build_in_process()
    try:
        peers, cfg, eps = bpf[b"weft_peers"], bpf[b"weft_config"], bpf[b"weft_endpoints"]
        for mirror, compiled in ((fb.PeerKey, peers.Key), (fb.Peer, peers.Leaf), (fb.Config, cfg.Leaf),
                                 (fb.Endpoint, eps.Leaf)):
            assert ctypes.sizeof(mirror) == ctypes.sizeof(compiled), mirror.__name__
            ours = [(n, getattr(mirror, n).offset, getattr(mirror, n).size) for n, _ in mirror._fields_]
            theirs = [(n, getattr(compiled, n).offset, getattr(compiled, n).size) for n, _ in compiled._fields_]
            assert ours == theirs, mirror.__name__
    finally:
        bpf.cleanup()
    assert (progs.peers.key_size, progs.peers.value_size) == (8, 16) == (ctypes.sizeof(fb.PeerKey), 16)
    assert progs.config.value_size == ctypes.sizeof(fb.Config) == 32
    assert (progs.endpoints.key_size, progs.endpoints.value_size) == (4, ctypes.sizeof(fb.Endpoint)) == (4, 16)
    assert progs.counters.value_size == progs.drops.value_size == 8


def test_enum_mirrors_match_headers():
    drops = fb.header_enum("drop_reasons.h", "WEFT_DROP_")
    assert drops == {r.name: int(r) for r in fb.DropReason}
    counters = fb.header_enum("types.h", "WEFT_CNT_")
    assert counters == {c.name: int(c) for c in fb.Counter}
    with open(os.path.join(fb.BPF_DIR, "types.h")) as f:
        text = f.read()
    for name, value in (("RX_REDIRECT", fb.CFG_RX_REDIRECT), ("RX_NEIGH", fb.CFG_RX_NEIGH),
                        ("TTL_DEC", fb.CFG_TTL_DEC), ("PODS_REDIRECT", fb.CFG_PODS_REDIRECT),
                        ("RX_PEER", fb.CFG_RX_PEER), ("OUTER_CSUM", fb.CFG_OUTER_CSUM)):
        shift = int(text.split(f"WEFT_CFG_{name}")[1].split("<<")[1].split(")")[0])
        assert 1 << shift == value, name


def test_every_drop_goes_through_weft_drop():
    """No bare TC_ACT_SHOT in the programs: each drop has a reason and a counter."""
    for name in fb.PROGRAM_FILES:
        with open(os.path.join(fb.BPF_DIR, name)) as f:
            text = f.read()
        assert "TC_ACT_SHOT" not in text, name


# -- weft_to_overlay (flannel.N egress) ------------------------------------------------------------

def test_to_overlay_hit_rewrites_inner_macs(fresh):
    add_peer(fresh)
    pkt = frame("10.244.1.2", "10.244.2.7", dmac=OUR_MAC, smac=OUR_MAC)
    rc, out = run(fresh, "weft_to_overlay", pkt)
    assert rc == sysbpf.TC_ACT_OK
    got = ip_of(out)
    assert (got["dmac"], got["smac"], got["ttl"]) == (PEER_MAC, OUR_MAC, 64)  # the stack did the TTL
    assert out[12:] == pkt[12:]
    c = fresh.counter_sums()
    assert c["tx_packets"] == 1 and c["tx_bytes"] == len(pkt)


@pytest.mark.parametrize("pkt,reason", [
    (frame("10.244.1.2", "10.244.9.7"), "no_peer"),
    (frame("10.244.1.2", "192.0.2.1"), "not_overlay"),
    (frame("10.244.1.2", "10.244.2.7", ethertype=0x86DD), "not_ipv4"),
])  # (SHORT cannot be crafted here: BPF_PROG_TEST_RUN refuses an IPv4 frame shorter than 34 bytes)
def test_to_overlay_drops_with_reason(fresh, pkt, reason):
    add_peer(fresh)
    rc, _ = run(fresh, "weft_to_overlay", pkt)
    assert rc == sysbpf.TC_ACT_SHOT
    drops = fresh.drop_sums()
    assert drops[reason] == 1 and sum(drops.values()) == 1
    assert fresh.counter_sums()["map_miss"] == (1 if reason == "no_peer" else 0)


def test_lpm_picks_the_longest_prefix(fresh):
    add_peer(fresh, "10.244.0.0/16", "198.18.0.9", "02:0e:00:00:00:09")
    add_peer(fresh, "10.244.2.0/24", "198.18.0.2", PEER_MAC)
    _, out = run(fresh, "weft_to_overlay", frame("10.244.1.2", "10.244.2.7"))
    assert ip_of(out)["dmac"] == PEER_MAC
    _, out = run(fresh, "weft_to_overlay", frame("10.244.1.2", "10.244.3.7"))
    assert ip_of(out)["dmac"] == "02:0e:00:00:00:09"


# -- weft_from_pods (cni0 ingress) -------------------------------------------------------------------

def test_from_pods_hit_redirects_with_ttl_and_macs(fresh):
    add_peer(fresh)
    rc, out = run(fresh, "weft_from_pods", frame("10.244.1.2", "10.244.2.7", ttl=64))
    assert rc == sysbpf.TC_ACT_REDIRECT
    got = ip_of(out)
    assert (got["dmac"], got["smac"], got["ttl"], got["csum_ok"]) == (PEER_MAC, OUR_MAC, 63, True)
    c = fresh.counter_sums()
    assert c["pods_redirect"] == 1 and c["tx_packets"] == 1


@pytest.mark.parametrize("pkt,counter", [
    (frame("10.244.1.2", "10.244.9.7"), "map_miss"),     # in the Network, no peer: the stack
    (frame("10.244.1.2", "10.244.2.7", ttl=1), "pods_stack"),  # the stack sends ICMP time exceeded
    (frame("10.244.1.2", "8.8.8.8"), None),              # not overlay traffic: untouched, uncounted
    (frame("10.244.1.2", "10.244.2.7", ethertype=0x0806), None),
])
def test_from_pods_leaves_the_rest_to_the_stack(fresh, pkt, counter):
    add_peer(fresh)
    rc, out = run(fresh, "weft_from_pods", pkt)
    assert rc == sysbpf.TC_ACT_OK
    c = fresh.counter_sums()
    assert c["tx_packets"] == 0
    if counter:
        assert c[counter] == 1
    else:
        assert out == pkt and sum(c.values()) == 0
    assert sum(fresh.drop_sums().values()) == 0


def test_from_pods_switched_off_through_the_config_map(fresh):
    add_peer(fresh)
    fresh.set_config(config(flags=fb.CFG_DEFAULT & ~fb.CFG_PODS_REDIRECT))
    pkt = frame("10.244.1.2", "10.244.2.7")
    assert run(fresh, "weft_from_pods", pkt) == (sysbpf.TC_ACT_OK, pkt)


def test_from_pods_too_big_without_gso_goes_to_the_stack(fresh):
    add_peer(fresh)
    fresh.set_config(config(flags=fb.CFG_DEFAULT, mtu=100))
    rc, _ = run(fresh, "weft_from_pods", frame("10.244.1.2", "10.244.2.7", payload=b"x" * 200))
    assert rc == sysbpf.TC_ACT_OK and fresh.counter_sums()["pods_stack"] == 1


# -- weft_from_overlay (flannel.N ingress) -------------------------------------------------------------

def test_from_overlay_counts_and_passes_without_redirect_flag(fresh):
    fresh.set_config(config(flags=0))
    pkt = frame("10.244.2.7", "10.244.1.2", dmac=OUR_MAC, smac=PEER_MAC)
    assert run(fresh, "weft_from_overlay", pkt) == (sysbpf.TC_ACT_OK, pkt)
    c = fresh.counter_sums()
    assert (c["rx_packets"], c["rx_bytes"], c["rx_stack"]) == (1, len(pkt), 1)


@pytest.fixture
def scratch_ns():
    """A namespace with veth d0 (10.244.1.1/24, pod 10.244.1.2 at POD_MAC), forwarding on."""
    name = PREFIX + "fib"
    if name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        pytest.fail(f"namespace {name} exists; not touching it")
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "d0", "address", CNI_MAC, "type", "veth", "peer", "name", "d1"],
                    ["addr", "add", "10.244.1.1/24", "dev", "d0"],
                    ["link", "set", "d0", "up"], ["link", "set", "d1", "up"],
                    ["neigh", "replace", "10.244.1.2", "lladdr", POD_MAC, "dev", "d0", "nud", "permanent"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True, timeout=10)
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv4.conf.all.forwarding=1"],
                       check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10)


def skb_ctx(ingress_ifindex: int) -> bytes:
    """A struct __sk_buff for BPF_PROG_TEST_RUN with ingress_ifindex set (offset 36)."""
    ctx = bytearray(192)  # sizeof(struct __sk_buff) in 6.1 headers
    struct.pack_into("=I", ctx, 36, ingress_ifindex)
    return bytes(ctx)


def test_from_overlay_fib_redirects_to_the_pod(fresh, scratch_ns):
    def go():
        d0 = socket.if_nametoindex("d0")
        pkt = frame("10.244.2.7", "10.244.1.2", ttl=63, dmac=OUR_MAC, smac=PEER_MAC)
        res = [sysbpf.test_run(fresh.fns["weft_from_overlay"].fd, pkt, skb_ctx(1))[:2]]
        # no neighbour for .9: redirect_neigh lets the kernel resolve it
        res.append(sysbpf.test_run(fresh.fns["weft_from_overlay"].fd,
                                   frame("10.244.2.7", "10.244.1.9", dmac=OUR_MAC), skb_ctx(1))[:2])
        # not for a local pod (our own address): the stack
        res.append(sysbpf.test_run(fresh.fns["weft_from_overlay"].fd,
                                   frame("10.244.2.7", "10.244.1.1", dmac=OUR_MAC), skb_ctx(1))[:2])
        return d0, res
    _, [(rc, out), (rc2, _), (rc3, _)] = in_netns(scratch_ns, go)
    assert rc == sysbpf.TC_ACT_REDIRECT
    got = ip_of(out)
    assert (got["dmac"], got["smac"], got["ttl"], got["csum_ok"]) == (POD_MAC, CNI_MAC, 62, True)
    assert rc2 == sysbpf.TC_ACT_REDIRECT
    assert rc3 == sysbpf.TC_ACT_OK
    c = fresh.counter_sums()
    assert c["rx_redirect"] == 2 and c["rx_stack"] == 1 and c["rx_packets"] == 3


# -- the map and the control plane ----------------------------------------------------------------------

def test_map_follows_add_and_remove(fresh):
    add_peer(fresh, "10.244.2.0/24")
    add_peer(fresh, "10.244.3.0/24", "198.18.0.3", "02:0e:00:00:00:03")
    assert {e["subnet"] for e in fresh.peer_entries()} == {"10.244.2.0/24", "10.244.3.0/24"}
    assert fresh.delete_peer(fb.peer_key(ipaddress.IPv4Network("10.244.2.0/24")))
    assert not fresh.delete_peer(fb.peer_key(ipaddress.IPv4Network("10.244.2.0/24")))
    assert [e["subnet"] for e in fresh.peer_entries()] == ["10.244.3.0/24"]
    rc, _ = run(fresh, "weft_to_overlay", frame("10.244.1.2", "10.244.2.7"))
    assert rc == sysbpf.TC_ACT_SHOT
    # sysbpf reads the same map by id, as weftctl peermap does
    info, ids = sysbpf.prog_info(fresh.fns["weft_to_overlay"].fd)
    maps = sysbpf.maps_of_prog(info.id)
    try:
        assert {"weft_peers", "weft_config", "weft_counters", "weft_drops"} <= set(maps)
        fd, mi = maps["weft_peers"]
        items = [fb.decode_peer(k, v) for k, v in sysbpf.map_items(fd, mi.key_size, mi.value_size)]
        assert items == fresh.peer_entries()
    finally:
        for fd, _ in maps.values():
            os.close(fd)


N_PEERS = 1000
RESULTS: dict[str, float] = {}


def _leases(n: int):
    from controlplane.lease import Lease, LeaseAttrs
    out = []
    for i in range(n):
        subnet = ipaddress.IPv4Network(f"10.{100 + i // 250}.{i % 250}.0/24")
        ip = ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.19.0.1")) + i)
        mac = f"02:0f:00:00:{i >> 8:02x}:{i & 0xff:02x}"
        out.append((Lease(subnet, LeaseAttrs(ip, "vxlan", {"VNI": 1, "VtepMAC": mac}), time.time() + 3600),))
    return out


@pytest.mark.parametrize("kind", ["vxlan/ebpf", "vxlan/kernel"])
def test_program_1000_peers(kind):
    """1,000 synthetic leases through the backend's add_peer (control plane only), in a scratch netns."""
    from controlplane.config import parse_config
    from controlplane.lease import Lease
    from .test_ebpf_e2e import Agent
    name = PREFIX + ("e" if kind.endswith("ebpf") else "k")
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    agent = None
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                       check=True, timeout=10)
        subprocess.run(["ip", "-n", name, "addr", "add", "198.18.0.1/15", "dev", "eth0"], check=True, timeout=10)
        subprocess.run(["ip", "-n", name, "link", "set", "eth0", "up"], check=True, timeout=10)
        agent = Agent(name)
        config = parse_config('{"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}}')
        addr = ipaddress.IPv4Address("198.18.0.1")
        agent.backend("b", kind, config, {"name": "eth0", "address": addr, "public_ip": addr, "mtu": 1500})
        attrs = agent.call("b", "lease_attrs", None)
        agent.call("b", "setup", Lease(ipaddress.IPv4Network("10.99.0.0/24"), attrs, time.time() + 3600))
        leases = _leases(N_PEERS)
        seconds = agent.timed("b", "add_peer", leases)
        RESULTS[kind] = seconds
        print(f"\n{kind}: {N_PEERS} peers programmed in {seconds * 1000:.1f} ms")
        if kind == "vxlan/ebpf":
            assert len(agent.call("b", "peer_map")) == N_PEERS
            assert seconds < 1.0
            removal = agent.timed("b", "remove_peer", leases)
            print(f"{kind}: {N_PEERS} peers removed in {removal * 1000:.1f} ms")
            assert agent.call("b", "peer_map") == []
        else:
            assert agent.call("b", "stats")["peers_programmed"] == N_PEERS
        agent.call("b", "teardown")
    finally:
        if agent is not None:
            agent.stop()
        subprocess.run(["ip", "netns", "del", name], timeout=10)
    if len(RESULTS) == 2:
        print(f"ebpf vs kernel: {RESULTS['vxlan/kernel'] / RESULTS['vxlan/ebpf']:.0f}x faster")


def test_from_overlay_redirect_peer_only_when_the_neighbour_agrees(fresh, scratch_ns):
    """A learnt endpoint whose MAC matches the kernel's neighbour entry: redirect_peer into the pod;
    a stale one (other MAC): the FIB redirect, as if it were not learnt."""
    pkt = frame("10.244.2.7", "10.244.1.2", ttl=63, dmac=OUR_MAC, smac=PEER_MAC)

    def go():
        d1 = socket.if_nametoindex("d1")
        out = []
        for mac in (POD_MAC, "02:aa:00:00:00:99"):
            fresh.set_endpoints({ipaddress.IPv4Address("10.244.1.2"): (d1, mac, CNI_MAC)})
            out.append(sysbpf.test_run(fresh.fns["weft_from_overlay"].fd, pkt, skb_ctx(1))[:2])
        return out
    [(rc, out), (rc2, out2)] = in_netns(scratch_ns, go)
    assert rc == rc2 == sysbpf.TC_ACT_REDIRECT
    got = ip_of(out)
    assert (got["dmac"], got["smac"], got["ttl"], got["csum_ok"]) == (POD_MAC, CNI_MAC, 62, True)
    c = fresh.counter_sums()
    assert c["rx_peer"] == 1 and c["rx_redirect"] == 1
    fresh.set_endpoints({})
    assert fresh.endpoint_count() == 0


def test_from_overlay_outside_the_network_meets_the_stack(fresh):
    """Only pod traffic takes a shortcut: other destinations keep the stack's netfilter (no FIB
    lookup happens, so this runs in the test's own namespace)."""
    pkt = frame("10.244.2.7", "192.0.2.1", dmac=OUR_MAC, smac=PEER_MAC)
    assert run(fresh, "weft_from_overlay", pkt) == (sysbpf.TC_ACT_OK, pkt)
    c = fresh.counter_sums()
    assert (c["rx_stack"], c["rx_redirect"], c["rx_peer"]) == (1, 0, 0)
