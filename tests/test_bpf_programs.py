"""weft's BPF programs (fastpath/bpf/) without a network: mirrors, BPF_PROG_TEST_RUN, map speed.

- The Python mirrors (ctypes structs, Counter, DropReason) agree with what bcc compiled and with the
  header text.
- Each program runs under BPF_PROG_TEST_RUN on crafted frames: hit, miss, not IPv4, short, outside
  the Network, TTL 1; the frame it leaves behind is checked byte for byte (inner MACs, TTL and IP
  checksum) and so are the per-CPU counters and drop reasons. The receive program's FIB path runs
  in a scratch network namespace (a thread that entered it), never against the root namespace's FIB.
- weft_from_underlay (the underlay interface's ingress) on crafted VXLAN datagrams: each class of
  foreign, spoofed or malformed datagram lands in its drop reason, a peer's passes, other traffic is
  untouched; 3,000 random mutations are each counted exactly once; UDP GSO batches datagram by
  datagram. The MTU guard of weft_from_pods keys on gso_size (GSO), not gso_segs.
- IPv6 (dual-stack): the same for every program's IPv6 branch (weft_peers6, the IPv6 underlay's
  datagrams by drop reason, UDP GSO batches, 2,000 random mutations, the 1430 MTU guard, the FIB
  and redirect_peer receive paths), and IPv6 left alone on a node without IPv6.
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
OUR_IP = "198.18.0.1"
PUBLIC_IP = "203.0.113.1"  # behind NAT: peers send to this, the NAT box forwards to OUR_IP
PORT = 8472
VNI = 1
PREFIX = f"wbp{os.getpid() % 1000}-"


# -- packets ---------------------------------------------------------------------------------------

def ip_checksum(hdr: bytes) -> int:
    s = sum(struct.unpack("!10H", hdr[:20]))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src: str, dst: str, proto: int, body: bytes, ttl: int = 64, tos: int = 0, frag: int = 0) -> bytes:
    """An IPv4 header (checksum filled in) + body."""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(body), 1, frag, ttl, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", ip_checksum(hdr)) + hdr[12:] + body


def frame(src: str, dst: str, ttl: int = 64, dmac: str = CNI_MAC, smac: str = POD_MAC,
          ethertype: int = 0x0800, payload: bytes = b"weft" * 16, proto: int = 17, tos: int = 0) -> bytes:
    if proto == 6:  # TCP, 20-byte header (doff 5), ACK
        l4 = struct.pack("!HHIIBBHHH", 1234, 5678, 1, 1, 5 << 4, 0x10, 65535, 0, 0) + payload
    else:
        l4 = struct.pack("!HHHH", 1234, 5678, 8 + len(payload), 0) + payload
    return (fb.mac_bytes(dmac) + fb.mac_bytes(smac) + struct.pack("!H", ethertype)
            + ipv4(src, dst, proto, l4, ttl=ttl, tos=tos))


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
        progs.delete_peer(fb.peer_key(ipaddress.ip_network(e["subnet"])))
    progs.clear_counters()
    progs.set_config(config(flags=fb.CFG_DEFAULT))
    return progs


def config(flags: int, ifindex: int = 7, mtu: int = 1450) -> fb.Config:
    return fb.Config(vtep_mac=(ctypes.c_uint8 * 6)(*fb.mac_bytes(OUR_MAC)), vxlan_ifindex=ifindex,
                     local_ipv4=int(ipaddress.IPv4Address(OUR_IP)),
                     network=struct.unpack("=I", NETWORK.network_address.packed)[0],
                     netmask=struct.unpack("=I", NETWORK.netmask.packed)[0], mtu=mtu, flags=flags,
                     vxlan_port=socket.htons(PORT), vni=VNI,
                     public_ipv4=int(ipaddress.IPv4Address(PUBLIC_IP)))


def add_peer(progs, subnet="10.244.2.0/24", ip="198.18.0.2", mac=PEER_MAC):
    progs.put_peer(fb.peer_key(ipaddress.IPv4Network(subnet)),
                   fb.peer_value(ipaddress.IPv4Address(ip), 1, mac))


def skb_ctx(ingress_ifindex: int = 0, gso_segs: int = 0, gso_size: int = 0) -> bytes:
    """A struct __sk_buff for BPF_PROG_TEST_RUN (6.1 layout, 192 bytes) with the fields the kernel
    lets a test set: ingress_ifindex (offset 36), gso_segs (164), gso_size (176). A TCP skb that
    is not GSO still carries gso_segs 1 (tcp_skb_pcount); GSO is gso_size > 0."""
    ctx = bytearray(192)
    struct.pack_into("=I", ctx, 36, ingress_ifindex)
    struct.pack_into("=I", ctx, 164, gso_segs)
    struct.pack_into("=I", ctx, 176, gso_size)
    return bytes(ctx)


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
        peers6, ips6 = bpf[b"weft_peers6"], bpf[b"weft_peer_ips6"]
        for mirror, compiled in ((fb.PeerKey, peers.Key), (fb.Peer, peers.Leaf), (fb.Config, cfg.Leaf),
                                 (fb.Endpoint, eps.Leaf), (fb.Peer6Key, peers6.Key), (fb.Peer6, peers6.Leaf),
                                 (fb.IP6, ips6.Key)):
            assert ctypes.sizeof(mirror) == ctypes.sizeof(compiled), mirror.__name__
            ours = [(n, getattr(mirror, n).offset, getattr(mirror, n).size) for n, _ in mirror._fields_]
            theirs = [(n, getattr(compiled, n).offset, getattr(compiled, n).size) for n, _ in compiled._fields_]
            assert ours == theirs, mirror.__name__
    finally:
        bpf.cleanup()
    assert (progs.peers.key_size, progs.peers.value_size) == (8, 16) == (ctypes.sizeof(fb.PeerKey), 16)
    # the IPv4 fields first, as before dual-stack (offsets unchanged), then the IPv6 ones, then
    # host-gw/ebpf's underlay ifindex
    assert progs.config.value_size == ctypes.sizeof(fb.Config) == 40 + 8 + 4 * 16 + 4
    assert fb.Config.public_ipv4.offset == 36 and fb.Config.vtep_mac6.offset == 40
    assert fb.Config.underlay_ifindex.offset == 112
    assert (progs.peer_ips.key_size, progs.peer_ips.value_size) == (4, 4)
    assert (progs.peers6.key_size, progs.peers6.value_size) == (20, 28)
    assert (progs.peer_ips6.key_size, progs.peer_ips6.value_size) == (16, 4)
    assert (progs.endpoints6.key_size, progs.endpoints6.value_size) == (16, 16)
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
                        ("RX_PEER", fb.CFG_RX_PEER), ("OUTER_CSUM", fb.CFG_OUTER_CSUM),
                        ("RX_CHECK", fb.CFG_RX_CHECK), ("POD_PORT", fb.CFG_POD_PORT)):
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


# The MTU guard: what is too big for the overlay goes to the stack (which answers with ICMP "frag
# needed"), keyed on GSO (gso_size), not on gso_segs. Overlay MTU 1450; TCP, IPv4 + TCP headers 40.
@pytest.mark.parametrize("payload,gso_segs,gso_size,to_stack", [
    (1500, 1, 0, True),       # an ordinary TCP skb (gso_segs 1, no GSO) of 1540 bytes: too big
    (1410, 1, 0, False),      # 1450 bytes exactly: fits
    (1500, 0, 0, True),       # no gso_segs at all (e.g. UDP): too big
    (2820, 2, 1410, False),   # GSO, segments of 40 + 1410 = 1450: fit
    (2822, 2, 1411, True),    # GSO, segments of 1451: one byte too big for the overlay
], ids=["tcp-1540", "tcp-1450", "udp-1540", "gso-fits", "gso-seg-too-big"])
def test_from_pods_mtu_guard_keys_on_gso_size(fresh, payload, gso_segs, gso_size, to_stack):
    add_peer(fresh)
    pkt = frame("10.244.1.2", "10.244.2.7", proto=6, payload=b"x" * payload)
    rc, _ = run(fresh, "weft_from_pods", pkt, skb_ctx(gso_segs=gso_segs, gso_size=gso_size))
    c = fresh.counter_sums()
    if to_stack:
        assert (rc, c["pods_stack"], c["pods_redirect"]) == (sysbpf.TC_ACT_OK, 1, 0)
    else:
        assert (rc, c["pods_stack"], c["pods_redirect"]) == (sysbpf.TC_ACT_REDIRECT, 0, 1)
        assert c["tx_packets"] == max(gso_segs, 1)



# -- weft_from_pod_port (tc ingress of each pod's host veth: before the bridge) ------------------------
POD_PORT = 42  # the pod's host-side veth (ingress_ifindex under BPF_PROG_TEST_RUN)


@pytest.mark.parametrize("case", ["hit", "l2-to-another-pod", "other-port", "not-learnt", "miss", "ttl-1"])
def test_from_pod_port_takes_only_a_learnt_pods_frames_to_its_gateway(fresh, case):
    """On the pod's own port, a frame to the gateway (bridge MAC) from the pod's learnt address is
    encapsulated and redirected as on cni0; anything else (a frame switched to another MAC, an
    address learnt on another port, a source not learnt yet) goes on to the bridge untouched; so
    does what the stack must take (a miss, TTL 1), uncounted: cni0's program counts it next."""
    add_peer(fresh)
    fresh.set_endpoints({ipaddress.IPv4Address("10.244.1.2"): (POD_PORT, POD_MAC, CNI_MAC)})
    try:
        pkt = frame("10.244.1.3" if case == "not-learnt" else "10.244.1.2",
                    "10.244.9.7" if case == "miss" else "10.244.2.7", ttl=1 if case == "ttl-1" else 64,
                    dmac="02:aa:00:00:00:06" if case == "l2-to-another-pod" else CNI_MAC)
        rc, out = run(fresh, "weft_from_pod_port", pkt, skb_ctx(POD_PORT + (case == "other-port")))
    finally:
        fresh.set_endpoints({})
    c = fresh.counter_sums()
    if case == "hit":
        assert rc == sysbpf.TC_ACT_REDIRECT
        got = ip_of(out)
        assert (got["dmac"], got["smac"], got["ttl"], got["csum_ok"]) == (PEER_MAC, OUR_MAC, 63, True)
        assert c["pods_redirect"] == 1 and c["tx_packets"] == 1
    else:
        assert (rc, out) == (sysbpf.TC_ACT_OK, pkt) and sum(c.values()) == 0

# -- weft_from_overlay (flannel.N ingress) -------------------------------------------------------------
# BPF_PROG_TEST_RUN cannot give a frame a tunnel key (the VXLAN device's metadata), so the paths
# behind the receive check run with it off here; tests/test_ebpf_e2e.py checks it on real packets.
RX_NO_CHECK = fb.CFG_DEFAULT & ~fb.CFG_RX_CHECK


def test_from_overlay_without_a_tunnel_key_is_dropped(fresh):
    """With the receive check on (the default), a frame that did not come out of the VXLAN socket
    (no tunnel key: no sender to check) is dropped, counted."""
    pkt = frame("10.244.2.7", "10.244.1.2", dmac=OUR_MAC, smac=PEER_MAC)
    rc, _ = run(fresh, "weft_from_overlay", pkt)
    assert rc == sysbpf.TC_ACT_SHOT
    assert fresh.drop_sums()["tunnel_key"] == 1 and fresh.counter_sums()["rx_packets"] == 1


def test_from_overlay_counts_and_passes_without_redirect_flag(fresh):
    fresh.set_config(config(flags=0))
    pkt = frame("10.244.2.7", "10.244.1.2", dmac=OUR_MAC, smac=PEER_MAC)
    assert run(fresh, "weft_from_overlay", pkt) == (sysbpf.TC_ACT_OK, pkt)
    c = fresh.counter_sums()
    assert (c["rx_packets"], c["rx_bytes"], c["rx_stack"]) == (1, len(pkt), 1)


@pytest.fixture
def scratch_ns():
    """A namespace with veth d0 (10.244.1.1/24 and fd10:244:0:1::1/64; pod 10.244.1.2 and
    fd10:244:0:1::2 at POD_MAC), forwarding on in both families."""
    name = PREFIX + "fib"
    if name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        pytest.fail(f"namespace {name} exists; not touching it")
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "d0", "address", CNI_MAC, "type", "veth", "peer", "name", "d1"],
                    ["addr", "add", "10.244.1.1/24", "dev", "d0"],
                    ["link", "set", "d0", "up"], ["link", "set", "d1", "up"],
                    ["neigh", "replace", "10.244.1.2", "lladdr", POD_MAC, "dev", "d0", "nud", "permanent"],
                    ["addr", "add", "fd10:244:0:1::1/64", "dev", "d0", "nodad"],
                    ["neigh", "replace", "fd10:244:0:1::2", "lladdr", POD_MAC, "dev", "d0", "nud", "permanent"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True, timeout=10)
        for key in ("net.ipv4.conf.all.forwarding=1", "net.ipv6.conf.all.forwarding=1"):
            subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", key], check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10)




def test_from_overlay_fib_redirects_to_the_pod(fresh, scratch_ns):
    fresh.set_config(config(flags=RX_NO_CHECK))

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


# -- weft_from_underlay (the underlay interface's ingress) ------------------------------------------------
# Node 198.18.0.1 holds 10.244.1.0/24; peers 198.18.0.2 (10.244.2.0/24) and 198.18.0.3 (10.244.3.0/24).
# BPF_PROG_TEST_RUN gives the frame the loopback device, whose MAC is 00:..:00: a frame to that MAC
# is PACKET_HOST, any other unicast MAC PACKET_OTHERHOST (not for this host).
HOST_MAC = "00:00:00:00:00:00"
PEER3_MAC = "02:0e:00:00:00:03"


def vxlan_datagram(outer_src="198.18.0.2", inner_src="10.244.2.7", inner_dst="10.244.1.2", *,
                   outer_dst=OUR_IP, dport=PORT, vx_flags=0x08000000, vni=VNI, vni_low=0,
                   inner_dmac=OUR_MAC, inner_smac=PEER_MAC, inner_type=0x0800, outer_tos=0,
                   inner_tos=0, frag=0, dmac=HOST_MAC, payload=b"weft" * 8, udp_len=None) -> bytes:
    """A VXLAN datagram as it arrives on the underlay: outer Ethernet + IPv4 + UDP + VXLAN + the
    inner frame (a UDP packet from inner_src to inner_dst)."""
    inner = frame(inner_src, inner_dst, dmac=inner_dmac, smac=inner_smac, ethertype=inner_type,
                  payload=payload, tos=inner_tos)
    vx = struct.pack("!II", vx_flags, (vni << 8) | vni_low) + inner
    udp = struct.pack("!HHHH", 40000, dport, udp_len if udp_len is not None else 8 + len(vx), 0) + vx
    return (fb.mac_bytes(dmac) + fb.mac_bytes("02:ee:00:00:00:02") + b"\x08\x00"
            + ipv4(outer_src, outer_dst, 17, udp, tos=outer_tos, frag=frag))


def with_ip_header(pkt: bytes, **fields) -> bytes:
    """pkt with outer IPv4 header fields replaced (ihl, tot_len, check) and no checksum fix-up."""
    hdr = bytearray(pkt[14:34])
    if "tot_len" in fields:
        struct.pack_into("!H", hdr, 2, fields["tot_len"])
    if "check" in fields:
        struct.pack_into("!H", hdr, 10, fields["check"])
    if "ihl" in fields:
        hdr[0] = 0x40 | fields["ihl"]
    return pkt[:14] + bytes(hdr) + pkt[34:]


@pytest.fixture
def underlay(fresh):
    """The maps as vxlan/ebpf fills them: our own subnet (local) and two peers."""
    fresh.put_peer(fb.peer_key(ipaddress.IPv4Network("10.244.1.0/24")),
                   fb.peer_value(ipaddress.IPv4Address(OUR_IP), VNI, OUR_MAC, fb.PEER_LOCAL))
    add_peer(fresh, "10.244.2.0/24", "198.18.0.2", PEER_MAC)
    add_peer(fresh, "10.244.3.0/24", "198.18.0.3", PEER3_MAC)
    return fresh


def underlay_buckets(progs) -> dict[str, int]:
    """Every counter a datagram to our port can land in, by name (drops_<reason>, underlay_passed)."""
    drops = progs.drop_sums()
    out = {f"drops_{r.name.lower()}": drops[r.name.lower()] for r in fb.UNDERLAY_REASONS}
    out["underlay_passed"] = progs.counter_sums()["underlay_passed"]
    return out


def test_from_underlay_passes_a_peers_datagram(underlay):
    pkt = vxlan_datagram()
    assert run(underlay, "weft_from_underlay", pkt) == (sysbpf.TC_ACT_OK, pkt)
    # to our PublicIP (a second address), and to the link's broadcast: the VXLAN socket takes both
    assert run(underlay, "weft_from_underlay", vxlan_datagram(outer_dst=PUBLIC_IP))[0] == sysbpf.TC_ACT_OK
    assert run(underlay, "weft_from_underlay", vxlan_datagram(outer_dst="198.18.0.255",
                                                               dmac="ff:ff:ff:ff:ff:ff"))[0] == sysbpf.TC_ACT_OK
    # a GRO packet counts its segments
    assert run(underlay, "weft_from_underlay", pkt, skb_ctx(gso_segs=5, gso_size=len(pkt) - 84))[0] == sysbpf.TC_ACT_OK
    b = underlay_buckets(underlay)
    assert b["underlay_passed"] == 8 and sum(b.values()) == 8
    assert underlay.peer_ip_entries() == {"198.18.0.2": 1, "198.18.0.3": 1}  # our own IP is no peer


BAD = {
    # the rule: the outer source is the PublicIP of the lease that holds the inner source
    "spoofed-other-peer": (vxlan_datagram(inner_src="10.244.3.7"), "spoofed_src"),
    "spoofed-our-subnet": (vxlan_datagram(inner_src="10.244.1.9"), "spoofed_src"),
    "spoofed-outside-network": (vxlan_datagram(inner_src="192.0.2.1"), "spoofed_src"),
    "non-peer": (vxlan_datagram(outer_src="198.18.0.66"), "unknown_peer"),
    "non-peer-claims-a-subnet": (vxlan_datagram(outer_src="198.18.0.66", inner_src="10.244.9.1"), "unknown_peer"),
    "our-own-ip": (vxlan_datagram(outer_src=OUR_IP, inner_src="10.244.1.9"), "unknown_peer"),
    "wrong-vni": (vxlan_datagram(vni=2), "wrong_vni"),
    "no-i-flag": (vxlan_datagram(vx_flags=0), "bad_vxlan"),
    "extra-flag": (vxlan_datagram(vx_flags=0x0C000000), "bad_vxlan"),
    "reserved-vni-byte": (vxlan_datagram(vni_low=1), "bad_vxlan"),
    "inner-dmac-not-ours": (vxlan_datagram(inner_dmac="02:0e:00:00:00:77"), "wrong_mac"),
    "inner-smac-ours": (vxlan_datagram(inner_smac=OUR_MAC), "wrong_mac"),
    "inner-ipv6": (vxlan_datagram(inner_type=0x86DD), "inner_not_ipv4"),
    "inner-arp": (vxlan_datagram(inner_type=0x0806), "inner_not_ipv4"),
    "ecn-ce-on-not-ect": (vxlan_datagram(outer_tos=3, inner_tos=0), "ecn"),
    "first-fragment": (vxlan_datagram(frag=0x2000), "fragment"),
    "bad-ip-checksum": (with_ip_header(vxlan_datagram(), check=0x1234), "malformed"),
    "ip-options": (None, "malformed"),
    "udp-len-short": (vxlan_datagram(udp_len=60), "malformed"),
    "udp-len-long": (vxlan_datagram(udp_len=1400), "malformed"),
    "udp-len-below-header": (vxlan_datagram(udp_len=4), "malformed"),
    "vxlan-header-only": (vxlan_datagram()[:50], "malformed"),  # cut: IPv4 total length lies
}


def _truncated(n: int) -> bytes:
    """A datagram whose UDP payload is n bytes (lengths consistent)."""
    full = vxlan_datagram()
    body = full[42:42 + n]
    udp = struct.pack("!HHHH", 40000, PORT, 8 + n, 0) + body
    return full[:14] + ipv4("198.18.0.2", OUR_IP, 17, udp)


BAD["truncated-empty"] = (_truncated(0), "truncated")
BAD["truncated-vxlan-only"] = (_truncated(8), "truncated")
BAD["truncated-no-inner-ip"] = (_truncated(8 + 14 + 10), "truncated")
def _inner_len_lies() -> bytes:
    """Inner IPv4 total length 200 in a datagram that carries 36 bytes of it."""
    pkt = bytearray(vxlan_datagram())
    struct.pack_into("!H", pkt, 84 - 20 + 2, 200)
    return bytes(pkt)


BAD["inner-total-length-lies"] = (_inner_len_lies(), "truncated")


def _ip_options() -> bytes:
    """The peer's datagram with 4 bytes of IPv4 options (NOPs): consistent, but not what a VTEP sends."""
    full = vxlan_datagram()
    udp = full[34:]
    hdr = bytearray(full[14:34])
    hdr[0] = 0x46
    struct.pack_into("!H", hdr, 2, 24 + len(udp))
    hdr += b"\x01" * 4
    struct.pack_into("!H", hdr, 10, 0)
    s = sum(struct.unpack("!12H", bytes(hdr)))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", hdr, 10, ~s & 0xFFFF)
    return full[:14] + bytes(hdr) + udp


BAD["ip-options"] = (_ip_options(), "malformed")


@pytest.mark.parametrize("name", sorted(BAD))
def test_from_underlay_drops_by_reason(underlay, name):
    pkt, reason = BAD[name]
    rc, _ = run(underlay, "weft_from_underlay", pkt)
    b = underlay_buckets(underlay)
    assert rc == sysbpf.TC_ACT_SHOT, (name, b)
    assert b[f"drops_{reason}"] == 1 and sum(b.values()) == 1, (name, b)


@pytest.mark.parametrize("name,pkt", [
    ("other-port", vxlan_datagram(dport=4789)),
    ("later-fragment", vxlan_datagram(frag=100)),                  # no UDP header to tell the port
    ("to-a-pod", vxlan_datagram(outer_dst="10.244.1.2")),          # a pod's own UDP port 8472
    ("forwarded", vxlan_datagram(outer_dst="198.18.0.99")),        # for another host, routed by us
    ("not-for-this-host", vxlan_datagram(dmac="02:ee:00:00:00:99")),  # PACKET_OTHERHOST
    ("tcp", vxlan_datagram()[:23] + b"\x06" + vxlan_datagram()[24:]),
    ("ipv6-ethertype", vxlan_datagram()[:12] + b"\x86\xdd" + vxlan_datagram()[14:]),
])
def test_from_underlay_leaves_other_traffic_alone(underlay, name, pkt):
    assert run(underlay, "weft_from_underlay", pkt) == (sysbpf.TC_ACT_OK, pkt), name
    assert sum(underlay_buckets(underlay).values()) == 0


def _ours(pkt: bytes) -> bool:
    """Whether from_underlay must count pkt: IPv4 for this host, UDP, not a later fragment, to our
    port, to an address outside the Network (the program's definition, said independently)."""
    other_host = not pkt[0] & 1 and pkt[0:6] != b"\0" * 6  # unicast, not the loopback device's MAC
    if len(pkt) < 38 or other_host or pkt[12:14] != b"\x08\x00":
        return False
    ver, ihl = pkt[14] >> 4, (pkt[14] & 15) * 4
    frag = struct.unpack("!H", pkt[20:22])[0]
    if ver != 4 or ihl < 20 or pkt[23] != 17 or frag & 0x1FFF or len(pkt) < 14 + ihl + 4:
        return False
    if not pkt[0] & 1 and pkt[30:34] not in (socket.inet_aton(OUR_IP), socket.inet_aton(PUBLIC_IP)):
        return False
    return struct.unpack("!H", pkt[14 + ihl + 2:14 + ihl + 4])[0] == PORT


def test_from_underlay_counts_every_datagram_exactly_once(underlay):
    """3,000 random mutations of datagrams (bytes flipped, cut, from peers, non-peers and spoofed):
    every one to our port lands in exactly one bucket, and passes only when it keeps the rule; the
    rest is untouched and uncounted."""
    import random
    rng = random.Random(13)
    seeds = [vxlan_datagram(), vxlan_datagram(inner_src="10.244.3.7"), vxlan_datagram(outer_src="198.18.0.3",
             inner_src="10.244.3.4", inner_smac=PEER3_MAC), vxlan_datagram(outer_src="198.18.0.9")]
    ours = passed = 0
    prev = underlay_buckets(underlay)
    for i in range(3000):
        pkt = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            kind = rng.random()
            if kind < 0.6:  # flip a byte, mostly in the headers
                pos = rng.randrange(min(len(pkt), 100) if rng.random() < 0.8 else len(pkt))
                pkt[pos] = rng.randrange(256)
            elif kind < 0.8:
                pkt = pkt[:rng.randint(38, len(pkt))]
            else:
                pkt = pkt + bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        pkt = bytes(pkt)
        rc, _ = run(underlay, "weft_from_underlay", pkt)
        now = underlay_buckets(underlay)
        delta = sum(now.values()) - sum(prev.values())
        did_pass = now["underlay_passed"] - prev["underlay_passed"]
        prev = now
        if _ours(pkt):
            ours += 1
            assert delta == 1, (i, pkt.hex())
            assert rc == (sysbpf.TC_ACT_OK if did_pass else sysbpf.TC_ACT_SHOT), (i, pkt.hex())
            if did_pass:
                passed += 1
                outer_src = ipaddress.IPv4Address(pkt[26:30])
                inner_src = ipaddress.IPv4Address(pkt[14 + 20 + 8 + 8 + 14 + 12:][:4])
                holder = {"10.244.2.0/24": "198.18.0.2", "10.244.3.0/24": "198.18.0.3"}
                assert any(inner_src in ipaddress.IPv4Network(n) and str(outer_src) == ip
                           for n, ip in holder.items()), (i, pkt.hex())
        else:
            assert (rc, delta) == (sysbpf.TC_ACT_OK, 0), (i, pkt.hex())
    b = underlay_buckets(underlay)
    assert sum(b.values()) == ours and b["underlay_passed"] == passed
    print(f"\n{ours} of 3000 to our port; {passed} passed; {b}")
    assert ours > 1500 and passed > 50 and sum(1 for v in b.values() if v) >= 8, b


def gso_batch(datagrams: list[bytes], outer_src: str = "198.18.0.2") -> bytes:
    """A UDP GSO batch as a UDP_SEGMENT send arrives over a veth: one outer Ethernet + IPv4 + UDP
    header, then the VXLAN datagrams' payloads back to back (gso_size = the first one's length)."""
    body = b"".join(d[42:] for d in datagrams)
    udp = struct.pack("!HHHH", 40000, PORT, 8 + len(body), 0) + body
    return fb.mac_bytes(HOST_MAC) + fb.mac_bytes("02:ee:00:00:00:02") + b"\x08\x00" + ipv4(outer_src, OUR_IP, 17, udp)


def test_from_underlay_checks_every_datagram_of_a_gso_batch(underlay):
    """A vxlan/fastpath peer sends UDP_SEGMENT batches; over a veth one skb carries them all. Each
    datagram is checked and counted; one bad datagram drops the batch (the rest: gso_batch)."""
    good = [vxlan_datagram(inner_src=f"10.244.2.{i}") for i in range(1, 6)]
    gso = len(good[0]) - 42
    ctx = skb_ctx(gso_segs=5, gso_size=gso)
    rc, _ = run(underlay, "weft_from_underlay", gso_batch(good), ctx)
    assert rc == sysbpf.TC_ACT_OK
    assert underlay_buckets(underlay)["underlay_passed"] == 5
    bad = good[:2] + [vxlan_datagram(inner_src="10.244.3.9")] + good[3:4] + [vxlan_datagram(vni=9)]
    rc, _ = run(underlay, "weft_from_underlay", gso_batch(bad), ctx)
    b = underlay_buckets(underlay)
    assert rc == sysbpf.TC_ACT_SHOT
    assert (b["drops_spoofed_src"], b["drops_wrong_vni"], b["drops_gso_batch"], b["underlay_passed"]) == (1, 1, 3, 5)
    # a short last datagram is checked as what it is
    tail = vxlan_datagram(payload=b"")
    rc, _ = run(underlay, "weft_from_underlay", gso_batch(good[:2] + [tail]), skb_ctx(gso_segs=3, gso_size=gso))
    assert rc == sysbpf.TC_ACT_OK and underlay_buckets(underlay)["underlay_passed"] == 8
    # a non-peer's batch: one hash lookup, every datagram counted
    rc, _ = run(underlay, "weft_from_underlay", gso_batch(good, outer_src="198.18.0.66"), ctx)
    assert rc == sysbpf.TC_ACT_SHOT and underlay_buckets(underlay)["drops_unknown_peer"] == 5
    # more datagrams than one UDP_SEGMENT send of vxlan/fastpath holds (64): malformed, each counted
    tiny = _truncated(8 + 14 + 20)
    rc, _ = run(underlay, "weft_from_underlay", gso_batch([tiny] * 70), skb_ctx(gso_segs=70, gso_size=42))
    b = underlay_buckets(underlay)
    assert rc == sysbpf.TC_ACT_SHOT and b["drops_malformed"] == 70
    assert sum(b.values()) == 5 + 5 + 3 + 5 + 70


def test_peer_ips_follow_the_peer_map(fresh):
    """weft_peer_ips holds a PublicIP while any subnet maps to it, and never our own entry's."""
    ip = ipaddress.IPv4Address
    fresh.put_peer(fb.peer_key(ipaddress.IPv4Network("10.244.1.0/24")),
                   fb.peer_value(ip(OUR_IP), VNI, OUR_MAC, fb.PEER_LOCAL))
    add_peer(fresh, "10.244.2.0/24", "198.18.0.2")
    add_peer(fresh, "10.244.4.0/24", "198.18.0.2")      # a second subnet, same PublicIP
    assert fresh.peer_ip_entries() == {"198.18.0.2": 2}
    add_peer(fresh, "10.244.2.0/24", "198.18.0.2")      # renewed: no change
    assert fresh.peer_ip_entries() == {"198.18.0.2": 2}
    assert fresh.delete_peer(fb.peer_key(ipaddress.IPv4Network("10.244.4.0/24")))
    assert fresh.peer_ip_entries() == {"198.18.0.2": 1}
    add_peer(fresh, "10.244.2.0/24", "198.18.0.5")      # the subnet moved to another node
    assert fresh.peer_ip_entries() == {"198.18.0.5": 1}
    assert fresh.delete_peer(fb.peer_key(ipaddress.IPv4Network("10.244.2.0/24")))
    assert fresh.peer_ip_entries() == {}


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
    fresh.set_config(config(flags=RX_NO_CHECK))

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
    fresh.set_config(config(flags=RX_NO_CHECK))
    assert run(fresh, "weft_from_overlay", pkt) == (sysbpf.TC_ACT_OK, pkt)
    c = fresh.counter_sums()
    assert (c["rx_stack"], c["rx_redirect"], c["rx_peer"]) == (1, 0, 0)


# -- weft_hostgw_guard (host-gw's opt-in source guard, the underlay interface's ingress) -------------
# Node 198.18.0.1 (u0) holds 10.244.1.0/24. Peers by lease: 10.244.2 at 198.18.0.2 (PEER_MAC),
# 10.244.3 at 198.18.0.3 (PEER3_MAC), 10.244.4 at 198.18.0.4 (no neighbour entry), 10.244.5 at
# 192.0.2.5 (reached over another interface, d0), 10.244.6 at 203.0.113.6 (no route), 10.244.7 at
# 198.19.0.7 (behind a gateway, 198.18.0.2: not on the segment). The FIB is a scratch namespace's.
HG_LEASES = {"10.244.2.0/24": "198.18.0.2", "10.244.3.0/24": "198.18.0.3", "10.244.4.0/24": "198.18.0.4",
             "10.244.5.0/24": "192.0.2.5", "10.244.6.0/24": "203.0.113.6", "10.244.7.0/24": "198.19.0.7"}
THIRD_MAC = "02:66:00:00:00:66"  # a host on the segment that holds no lease


@pytest.fixture
def hostgw(fresh):
    """The maps as host-gw/kernel's guard fills them (config: the Network; our subnet local; a
    peer entry per lease) and a scratch namespace with the underlay u0 and neighbours."""
    cfg = config(flags=0)
    cfg.vxlan_port, cfg.vni = 0, 0
    cfg.vtep_mac = (ctypes.c_uint8 * 6)()
    fresh.set_config(cfg)
    fresh.put_peer(fb.peer_key(ipaddress.IPv4Network("10.244.1.0/24")),
                   fb.peer_value(ipaddress.IPv4Address(OUR_IP), 0, HOST_MAC, fb.PEER_LOCAL))
    for subnet, ip in HG_LEASES.items():
        add_peer(fresh, subnet, ip, HOST_MAC)
    name = PREFIX + "hg"
    if name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        pytest.fail(f"namespace {name} exists; not touching it")
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "u0", "type", "veth", "peer", "name", "u1"],
                    ["addr", "add", "198.18.0.1/24", "dev", "u0"],
                    ["link", "set", "u0", "up"], ["link", "set", "u1", "up"],
                    ["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
                    ["addr", "add", "192.0.2.1/24", "dev", "d0"],
                    ["link", "set", "d0", "up"], ["link", "set", "d1", "up"],
                    ["neigh", "replace", "198.18.0.2", "lladdr", PEER_MAC, "dev", "u0", "nud", "permanent"],
                    ["neigh", "replace", "198.18.0.3", "lladdr", PEER3_MAC, "dev", "u0", "nud", "reachable"],
                    ["neigh", "replace", "192.0.2.5", "lladdr", PEER_MAC, "dev", "d0", "nud", "permanent"],
                    ["route", "add", "198.19.0.0/16", "via", "198.18.0.2", "dev", "u0"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True, timeout=10)
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv4.conf.all.forwarding=1"],
                       check=True, timeout=10)
        yield fresh, name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10)


def hostgw_buckets(progs) -> dict[str, int]:
    """Every counter a checked packet can land in (drops_hostgw_<reason>, hostgw_passed)."""
    drops = progs.drop_sums()
    out = {f"drops_{r.name.lower()}": drops[r.name.lower()] for r in fb.HOSTGW_REASONS}
    out["hostgw_passed"] = progs.counter_sums()["hostgw_passed"]
    return out


def hostgw_frame(src: str, smac: str, dst: str = "10.244.1.2", **kw) -> bytes:
    return frame(src, dst, dmac=HOST_MAC, smac=smac, **kw)


def _hostgw_run(progs, ns: str, pkts: list[tuple[bytes, str, bytes | None]]) -> list[tuple[int, bytes]]:
    """Run weft_hostgw_guard on each (frame, ingress device, ctx extra) inside the scratch namespace."""
    def go():
        out = []
        for pkt, dev, segs in pkts:
            ctx = skb_ctx(socket.if_nametoindex(dev), **(segs or {}))
            out.append(sysbpf.test_run(progs.fns["weft_hostgw_guard"].fd, pkt, ctx)[:2])
        return out
    return in_netns(ns, go)


def test_hostgw_guard_passes_the_lease_holders_packets(hostgw):
    progs, ns = hostgw
    pkt = hostgw_frame("10.244.2.7", PEER_MAC)
    tcp = hostgw_frame("10.244.3.7", PEER3_MAC, proto=6)  # neighbour REACHABLE, not PERMANENT
    res = _hostgw_run(progs, ns, [(pkt, "u0", None), (tcp, "u0", None),
                                  (pkt, "u0", {"gso_segs": 5, "gso_size": 100})])  # GSO: by segment
    assert res == [(sysbpf.TC_ACT_OK, pkt), (sysbpf.TC_ACT_OK, tcp), (sysbpf.TC_ACT_OK, pkt)]
    b = hostgw_buckets(progs)
    assert b["hostgw_passed"] == 7 and sum(b.values()) == 7, b


HOSTGW_BAD = {
    # (source, frame's source MAC, ingress device) -> the one counter
    "a peer claims another peer's subnet": (("10.244.3.7", PEER_MAC, "u0"), "drops_hostgw_spoofed"),
    "a third host claims a peer's subnet": (("10.244.2.7", THIRD_MAC, "u0"), "drops_hostgw_spoofed"),
    "our own subnet from the underlay": (("10.244.1.9", PEER_MAC, "u0"), "drops_hostgw_own_subnet"),
    "a source no lease holds": (("10.244.99.1", PEER_MAC, "u0"), "drops_hostgw_no_peer"),
    "the lease holder's neighbour unresolved": (("10.244.4.7", PEER_MAC, "u0"), "drops_hostgw_no_neigh"),
    "the lease holder on another interface": (("10.244.5.7", PEER_MAC, "u0"), "drops_hostgw_not_routed"),
    "the lease holder unreachable": (("10.244.6.7", PEER_MAC, "u0"), "drops_hostgw_not_routed"),
    "the lease holder behind a gateway": (("10.244.7.7", PEER_MAC, "u0"), "drops_hostgw_not_routed"),
    "the right MAC on the wrong interface": (("10.244.2.7", PEER_MAC, "d0"), "drops_hostgw_not_routed"),
}


@pytest.mark.parametrize("name", sorted(HOSTGW_BAD))
def test_hostgw_guard_drops_by_reason(hostgw, name):
    progs, ns = hostgw
    (src, smac, dev), bucket = HOSTGW_BAD[name]
    [(rc, _)] = _hostgw_run(progs, ns, [(hostgw_frame(src, smac), dev, None)])
    b = hostgw_buckets(progs)
    assert rc == sysbpf.TC_ACT_SHOT and b[bucket] == 1 and sum(b.values()) == 1, (name, b)


def test_hostgw_guard_leaves_the_rest_untouched(hostgw):
    """Outside the Network (the node's own underlay traffic), not IPv4 (ARP), not for this host
    (the kernel drops it before IP), an IPv4 header the kernel refuses (IHL 4): passed as is,
    counted nowhere. (A frame cut inside the IPv4 header is refused by BPF_PROG_TEST_RUN itself.)"""
    progs, ns = hostgw
    spoofed = hostgw_frame("10.244.3.7", PEER_MAC)
    arp = (fb.mac_bytes("ff:ff:ff:ff:ff:ff") + fb.mac_bytes(THIRD_MAC) + b"\x08\x06"
           + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + fb.mac_bytes(THIRD_MAC)
           + socket.inet_aton("10.244.2.7") + bytes(6) + socket.inet_aton("198.18.0.1"))
    pkts = [hostgw_frame("198.18.0.66", THIRD_MAC, dst="198.18.0.1"),          # underlay
            hostgw_frame("10.244.3.7", PEER_MAC, ethertype=0x86DD),           # not IPv4
            arp,
            frame("10.244.3.7", "10.244.1.2", dmac="02:77:00:00:00:01", smac=PEER_MAC),  # other host
            spoofed[:14] + b"\x44" + spoofed[15:]]                               # IHL 4
    res = _hostgw_run(progs, ns, [(p, "u0", None) for p in pkts])
    assert res == [(sysbpf.TC_ACT_OK, p) for p in pkts]
    assert sum(hostgw_buckets(progs).values()) == 0


def test_hostgw_guard_ignores_vxlan_config_and_from_underlay_ignores_hostgw_config(hostgw):
    """The two guards share a compile: weft_from_underlay with host-gw's config (no VXLAN port)
    leaves a VXLAN datagram alone, uncounted."""
    progs, _ = hostgw
    pkt = vxlan_datagram()
    assert run(progs, "weft_from_underlay", pkt) == (sysbpf.TC_ACT_OK, pkt)
    assert sum(underlay_buckets(progs).values()) == 0


# -- IPv6 (dual-stack): the IPv6 side of every program ---------------------------------------------------
# Node 2001:db8:198:18::1 (PublicIPv6 2001:db8:ff::1) holds fd10:244:0:1::/64; peers ::2
# (fd10:244:0:2::/64, PEER6_MAC) and ::3 (fd10:244:0:3::/64, PEER3_MAC6). Our IPv6 VtepMAC differs
# from the device's (OUR_MAC): a lease vxlan/kernel made keeps its flannel-v6 MAC.
NETWORK6 = ipaddress.IPv6Network("fd10:244::/56")
OUR_IP6 = "2001:db8:198:18::1"
PUBLIC_IP6 = "2001:db8:ff::1"
PEER_IP6, PEER3_IP6 = "2001:db8:198:18::2", "2001:db8:198:18::3"
OUR_MAC6 = "02:0e:00:00:06:01"
PEER6_MAC = "02:0e:00:00:06:02"
PEER3_MAC6 = "02:0e:00:00:06:03"


def config6(flags: int = fb.CFG_DEFAULT, mtu: int = 1450) -> fb.Config:
    cfg = config(flags, mtu=mtu)
    cfg.vtep_mac6 = (ctypes.c_uint8 * 6)(*fb.mac_bytes(OUR_MAC6))
    cfg.mtu6 = mtu - 20
    cfg.network6 = fb.ip6_bytes(NETWORK6.network_address)
    cfg.netmask6 = fb.ip6_bytes(NETWORK6.netmask)
    cfg.local_ipv6 = fb.ip6_bytes(ipaddress.IPv6Address(OUR_IP6))
    cfg.public_ipv6 = fb.ip6_bytes(ipaddress.IPv6Address(PUBLIC_IP6))
    return cfg


def ipv6(src: str, dst: str, nexthdr: int, body: bytes, hlim: int = 64, tclass: int = 0) -> bytes:
    return (struct.pack("!IHBB", (6 << 28) | (tclass << 20), len(body), nexthdr, hlim)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + body)


def frame6(src: str, dst: str, hlim: int = 64, dmac: str = CNI_MAC, smac: str = POD_MAC,
           payload: bytes = b"weft" * 16, proto: int = 17, tclass: int = 0, ethertype: int = 0x86DD) -> bytes:
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", 1234, 5678, 1, 1, 5 << 4, 0x10, 65535, 0, 0) + payload
    else:
        l4 = struct.pack("!HHHH", 1234, 5678, 8 + len(payload), 0) + payload
    return (fb.mac_bytes(dmac) + fb.mac_bytes(smac) + struct.pack("!H", ethertype)
            + ipv6(src, dst, proto, l4, hlim=hlim, tclass=tclass))


def ip6_of(pkt: bytes) -> dict:
    return {"dmac": fb.mac_text(pkt[0:6]), "smac": fb.mac_text(pkt[6:12]), "hlim": pkt[14 + 7],
            "daddr": str(ipaddress.IPv6Address(pkt[38:54]))}


@pytest.fixture
def dual(fresh):
    """A dual-stack node's maps: both families' own subnets (local) and two peers each."""
    fresh.set_config(config6())
    v6 = ipaddress.IPv6Network
    fresh.put_peer(fb.peer_key(ipaddress.IPv4Network("10.244.1.0/24")),
                   fb.peer_value(ipaddress.IPv4Address(OUR_IP), VNI, OUR_MAC, fb.PEER_LOCAL))
    fresh.put_peer(fb.peer_key(v6("fd10:244:0:1::/64")),
                   fb.peer_value(ipaddress.IPv6Address(OUR_IP6), VNI, OUR_MAC6, fb.PEER_LOCAL))
    add_peer(fresh, "10.244.2.0/24", "198.18.0.2", PEER_MAC)
    for subnet, ip, mac in (("fd10:244:0:2::/64", PEER_IP6, PEER6_MAC), ("fd10:244:0:3::/64", PEER3_IP6, PEER3_MAC6)):
        fresh.put_peer(fb.peer_key(v6(subnet)), fb.peer_value(ipaddress.IPv6Address(ip), VNI, mac))
    return fresh


def test_peer_map_v6_entries_and_peer_ips6(dual):
    """weft_peers6 decodes as written, sorted after the IPv4 entries; weft_peer_ips6 follows it."""
    entries = {e["subnet"]: e for e in dual.peer_entries()}
    assert entries["fd10:244:0:2::/64"] == {"subnet": "fd10:244:0:2::/64", "public_ip": PEER_IP6, "vni": 1,
                                            "vtep_mac": PEER6_MAC, "local": False}
    assert entries["fd10:244:0:1::/64"]["local"] is True
    assert dual.peer_ip_entries() == {"198.18.0.2": 1, PEER_IP6: 1, PEER3_IP6: 1}
    dual.put_peer(fb.peer_key(ipaddress.IPv6Network("fd10:244:0:3::/64")),
                  fb.peer_value(ipaddress.IPv6Address(PEER_IP6), VNI, PEER6_MAC))  # moved to peer 2
    assert dual.peer_ip_entries() == {"198.18.0.2": 1, PEER_IP6: 2}
    assert dual.delete_peer(fb.peer_key(ipaddress.IPv6Network("fd10:244:0:3::/64")))
    assert dual.delete_peer(fb.peer_key(ipaddress.IPv6Network("fd10:244:0:2::/64")))
    assert dual.peer_ip_entries() == {"198.18.0.2": 1}
    assert sorted(dual.peer_entries(), key=fb.peer_sort_key)[-1]["subnet"] == "fd10:244:0:1::/64"


def test_to_overlay6_hit_rewrites_inner_macs(dual):
    pkt = frame6("fd10:244:0:1::", "fd10:244:0:2::7", dmac=OUR_MAC, smac=OUR_MAC)
    rc, out = run(dual, "weft_to_overlay", pkt)
    assert rc == sysbpf.TC_ACT_OK
    got = ip6_of(out)
    assert (got["dmac"], got["smac"], got["hlim"]) == (PEER6_MAC, OUR_MAC6, 64)
    assert out[12:] == pkt[12:]
    c = dual.counter_sums()
    assert c["tx_packets"] == 1 and c["tx_bytes"] == len(pkt)


@pytest.mark.parametrize("dst,reason", [
    ("fd10:244:0:9::7", "no_peer"),        # in the IPv6Network, no peer
    ("ff02::16", "not_overlay"),           # the device's own multicast listener report
    ("2001:db8::7", "not_overlay"),
])
def test_to_overlay6_drops_with_reason(dual, dst, reason):
    rc, _ = run(dual, "weft_to_overlay", frame6("fd10:244:0:1::", dst))
    assert rc == sysbpf.TC_ACT_SHOT
    drops = dual.drop_sums()
    assert drops[reason] == 1 and sum(drops.values()) == 1


def test_ipv6_on_a_node_without_ipv6_is_left_alone_or_refused(dual):
    """Without IPv6 in weft_config (an IPv4-only node with a stale weft_peers6 entry): from_pods
    leaves IPv6 to the stack uncounted, to_overlay drops it as not IPv4."""
    dual.set_config(config(fb.CFG_DEFAULT))
    pkt = frame6("fd10:244:0:1::2", "fd10:244:0:2::7")
    assert run(dual, "weft_from_pods", pkt) == (sysbpf.TC_ACT_OK, pkt)
    assert sum(dual.counter_sums().values()) == 0
    assert run(dual, "weft_to_overlay", pkt)[0] == sysbpf.TC_ACT_SHOT
    assert dual.drop_sums()["not_ipv4"] == 1


def test_from_pods6_hit_redirects_with_hop_limit_and_macs(dual):
    rc, out = run(dual, "weft_from_pods", frame6("fd10:244:0:1::2", "fd10:244:0:2::7", hlim=64))
    assert rc == sysbpf.TC_ACT_REDIRECT
    got = ip6_of(out)
    assert (got["dmac"], got["smac"], got["hlim"]) == (PEER6_MAC, OUR_MAC6, 63)
    c = dual.counter_sums()
    assert c["pods_redirect"] == 1 and c["tx_packets"] == 1
    # the IPv4 side is unchanged by IPv6 being on: IPv4 MACs, TTL and checksum
    rc, out = run(dual, "weft_from_pods", frame("10.244.1.2", "10.244.2.7", ttl=64))
    got = ip_of(out)
    assert rc == sysbpf.TC_ACT_REDIRECT
    assert (got["dmac"], got["smac"], got["ttl"], got["csum_ok"]) == (PEER_MAC, OUR_MAC, 63, True)


def test_from_pod_port_switched_off_through_the_config_map(fresh):
    add_peer(fresh)
    fresh.set_config(config(flags=fb.CFG_DEFAULT & ~fb.CFG_POD_PORT))
    fresh.set_endpoints({ipaddress.IPv4Address("10.244.1.2"): (POD_PORT, POD_MAC, CNI_MAC)})
    try:
        pkt = frame("10.244.1.2", "10.244.2.7")
        assert run(fresh, "weft_from_pod_port", pkt, skb_ctx(POD_PORT)) == (sysbpf.TC_ACT_OK, pkt)
    finally:
        fresh.set_endpoints({})


@pytest.mark.parametrize("dmac", [CNI_MAC, "02:aa:00:00:00:06"], ids=["to-gateway", "l2-to-another-pod"])
def test_from_pod_port6_takes_a_learnt_pods_frames_to_its_gateway(dual, dmac):
    dual.set_endpoints({ipaddress.IPv6Address("fd10:244:0:1::2"): (POD_PORT, POD_MAC, CNI_MAC)})
    try:
        pkt = frame6("fd10:244:0:1::2", "fd10:244:0:2::7", hlim=64, dmac=dmac)
        rc, out = run(dual, "weft_from_pod_port", pkt, skb_ctx(POD_PORT))
    finally:
        dual.set_endpoints({})
    if dmac == CNI_MAC:
        got = ip6_of(out)
        assert rc == sysbpf.TC_ACT_REDIRECT
        assert (got["dmac"], got["smac"], got["hlim"]) == (PEER6_MAC, OUR_MAC6, 63)
        assert dual.counter_sums()["pods_redirect"] == 1
    else:
        assert (rc, out) == (sysbpf.TC_ACT_OK, pkt) and dual.counter_sums()["pods_redirect"] == 0


def _hop_by_hop() -> bytes:
    pkt = bytearray(frame6("fd10:244:0:1::2", "fd10:244:0:2::7"))
    pkt[14 + 6] = 0  # next header: hop-by-hop options
    return bytes(pkt)


@pytest.mark.parametrize("pkt,counter", [
    (frame6("fd10:244:0:1::2", "fd10:244:0:9::7"), "map_miss"),
    (frame6("fd10:244:0:1::2", "fd10:244:0:2::7", hlim=1), "pods_stack"),  # time exceeded: the stack's
    (_hop_by_hop(), "pods_stack"),
    # the pod resolves its IPv6 gateway (cni0) by neighbour discovery: the bridge answers, untouched
    (frame6("fe80::5", "ff02::1:ff00:1", dmac="33:33:ff:00:00:01", proto=58), None),
    (frame6("fd10:244:0:1::2", "fd10:244:0:1::1", proto=58), None),       # to the gateway itself
    (frame6("fd10:244:0:1::2", "2001:db8::9"), None),                     # outside the IPv6Network
])
def test_from_pods6_leaves_the_rest_to_the_stack(dual, pkt, counter):
    rc, out = run(dual, "weft_from_pods", pkt)
    assert rc == sysbpf.TC_ACT_OK
    c = dual.counter_sums()
    assert c["tx_packets"] == 0
    if counter:
        assert c[counter] == 1
    else:
        assert out == pkt and sum(c.values()) == 0
    assert sum(dual.drop_sums().values()) == 0


# The IPv6 overlay MTU is 20 bytes below the IPv4 one (1450 - 20 = 1430): the outer header is IPv6.
@pytest.mark.parametrize("payload,gso_size,to_stack", [
    (1430 - 40 - 20, 0, False),     # 1430 bytes: fits
    (1430 - 40 - 20 + 1, 0, True),  # 1431: the stack (Packet Too Big)
    (2 * 1370, 1370, False),        # GSO, segments of 40 + 20 + 1370 = 1430
    (2 * 1371, 1371, True),
], ids=["1430", "1431", "gso-fits", "gso-too-big"])
def test_from_pods6_mtu_guard(dual, payload, gso_size, to_stack):
    pkt = frame6("fd10:244:0:1::2", "fd10:244:0:2::7", proto=6, payload=b"x" * payload)
    rc, _ = run(dual, "weft_from_pods", pkt, skb_ctx(gso_segs=2 if gso_size else 1, gso_size=gso_size))
    c = dual.counter_sums()
    assert (rc, c["pods_stack"]) == ((sysbpf.TC_ACT_OK, 1) if to_stack else (sysbpf.TC_ACT_REDIRECT, 0))


def test_from_overlay6_without_a_tunnel_key_is_dropped(dual):
    pkt = frame6("fd10:244:0:2::7", "fd10:244:0:1::2", dmac=OUR_MAC6, smac=PEER6_MAC)
    assert run(dual, "weft_from_overlay", pkt)[0] == sysbpf.TC_ACT_SHOT
    assert dual.drop_sums()["tunnel_key"] == 1


def test_from_overlay6_stack_frames_get_the_device_mac(dual):
    """A frame left to the stack (outside the IPv6Network, or redirect off) addressed to our IPv6
    VtepMAC gets the device's MAC, which the stack takes as PACKET_HOST."""
    dual.set_config(config6(RX_NO_CHECK))
    rc, out = run(dual, "weft_from_overlay", frame6("fd10:244:0:2::7", "2001:db8::1", dmac=OUR_MAC6, smac=PEER6_MAC))
    assert rc == sysbpf.TC_ACT_OK and ip6_of(out)["dmac"] == OUR_MAC
    dual.set_config(config6(0))
    pkt = frame6("fd10:244:0:2::7", "fd10:244:0:1::2", dmac=OUR_MAC, smac=PEER6_MAC)
    assert run(dual, "weft_from_overlay", pkt) == (sysbpf.TC_ACT_OK, pkt)  # the device's MAC already
    c = dual.counter_sums()
    assert (c["rx_stack"], c["rx_redirect"], c["rx_packets"]) == (2, 0, 2)


def test_from_overlay6_fib_redirects_to_the_pod(dual, scratch_ns):
    dual.set_config(config6(RX_NO_CHECK))

    def go():
        fd = dual.fns["weft_from_overlay"].fd
        res = [sysbpf.test_run(fd, frame6("fd10:244:0:2::7", "fd10:244:0:1::2", hlim=63, dmac=OUR_MAC6,
                                          smac=PEER6_MAC), skb_ctx(1))[:2]]
        # no neighbour for ::9: redirect_neigh lets the kernel resolve it (neighbour discovery)
        res.append(sysbpf.test_run(fd, frame6("fd10:244:0:2::7", "fd10:244:0:1::9", dmac=OUR_MAC6), skb_ctx(1))[:2])
        # hop limit 1: the stack (time exceeded)
        res.append(sysbpf.test_run(fd, frame6("fd10:244:0:2::7", "fd10:244:0:1::2", hlim=1, dmac=OUR_MAC6),
                                   skb_ctx(1))[:2])
        return res
    [(rc, out), (rc2, _), (rc3, _)] = in_netns(scratch_ns, go)
    assert rc == sysbpf.TC_ACT_REDIRECT
    got = ip6_of(out)
    assert (got["dmac"], got["smac"], got["hlim"]) == (POD_MAC, CNI_MAC, 62)
    assert (rc2, rc3) == (sysbpf.TC_ACT_REDIRECT, sysbpf.TC_ACT_OK)
    c = dual.counter_sums()
    assert c["rx_redirect"] == 2 and c["rx_stack"] == 1 and c["rx_packets"] == 3


def test_from_overlay6_redirect_peer_only_when_the_neighbour_agrees(dual, scratch_ns):
    """weft_endpoints6: a learnt IPv6 pod whose MAC the neighbour table confirms gets the frame
    through bpf_redirect_peer; a stale entry (other MAC) takes the FIB redirect."""
    pkt = frame6("fd10:244:0:2::7", "fd10:244:0:1::2", hlim=63, dmac=OUR_MAC6, smac=PEER6_MAC)
    dual.set_config(config6(RX_NO_CHECK))

    def go():
        d1 = socket.if_nametoindex("d1")
        out = []
        for mac in (POD_MAC, "02:aa:00:00:00:99"):
            dual.set_endpoints({ipaddress.IPv6Address("fd10:244:0:1::2"): (d1, mac, CNI_MAC),
                                ipaddress.IPv4Address("10.244.1.2"): (d1, POD_MAC, CNI_MAC)})
            out.append(sysbpf.test_run(dual.fns["weft_from_overlay"].fd, pkt, skb_ctx(1))[:2])
        return out
    [(rc, out), (rc2, _)] = in_netns(scratch_ns, go)
    assert rc == rc2 == sysbpf.TC_ACT_REDIRECT
    got = ip6_of(out)
    assert (got["dmac"], got["smac"], got["hlim"]) == (POD_MAC, CNI_MAC, 62)
    c = dual.counter_sums()
    assert c["rx_peer"] == 1 and c["rx_redirect"] == 1
    assert dual.endpoint_count() == 2  # one per family, each in its own map
    assert len(dual.endpoints6.items()) == 1 and len(dual.endpoints.items()) == 1
    dual.set_endpoints({})
    assert dual.endpoint_count() == 0


def vxlan_datagram6(outer_src=PEER_IP6, inner_src="fd10:244:0:2::7", inner_dst="fd10:244:0:1::2", *,
                    outer_dst=OUR_IP6, dport=PORT, vx_flags=0x08000000, vni=VNI, vni_low=0,
                    inner_dmac=OUR_MAC6, inner_smac=PEER6_MAC, outer_tc=0, inner_tc=0, dmac=HOST_MAC,
                    payload=b"weft" * 8, udp_len=None, inner=None, nexthdr=17) -> bytes:
    """A VXLAN datagram over the IPv6 underlay, as a flannel-v6.<VNI> peer sends it."""
    if inner is None:
        inner = frame6(inner_src, inner_dst, dmac=inner_dmac, smac=inner_smac, payload=payload, tclass=inner_tc)
    vx = struct.pack("!II", vx_flags, (vni << 8) | vni_low) + inner
    udp = struct.pack("!HHHH", 40000, dport, udp_len if udp_len is not None else 8 + len(vx), 0) + vx
    return (fb.mac_bytes(dmac) + fb.mac_bytes("02:ee:00:00:00:02") + b"\x86\xdd"
            + ipv6(outer_src, outer_dst, nexthdr, udp, tclass=outer_tc))


def _with_payload_len(pkt: bytes, n: int) -> bytes:
    return pkt[:18] + struct.pack("!H", n) + pkt[20:]


def _fragment6(offset: int) -> bytes:
    """The peer's datagram behind a fragment header (offset in 8-byte units, more fragments)."""
    full = vxlan_datagram6()
    udp = full[54:]
    frag = struct.pack("!BBHI", 17, 0, (offset << 3) | 1, 7)
    return full[:14] + ipv6(PEER_IP6, OUR_IP6, 44, frag + udp)


def _truncated6(n: int) -> bytes:
    full = vxlan_datagram6()
    body = full[62:62 + n]
    udp = struct.pack("!HHHH", 40000, PORT, 8 + n, 0) + body
    return full[:14] + ipv6(PEER_IP6, OUR_IP6, 17, udp)


def _inner6_len_lies() -> bytes:
    pkt = bytearray(vxlan_datagram6())
    struct.pack_into("!H", pkt, 62 + 8 + 14 + 4, 400)
    return bytes(pkt)


BAD6 = {
    "spoofed-other-peer": (vxlan_datagram6(inner_src="fd10:244:0:3::7"), "spoofed_src"),
    "spoofed-our-subnet": (vxlan_datagram6(inner_src="fd10:244:0:1::9"), "spoofed_src"),
    "spoofed-outside-network": (vxlan_datagram6(inner_src="2001:db8::1"), "spoofed_src"),
    "non-peer": (vxlan_datagram6(outer_src="2001:db8:198:18::66"), "unknown_peer"),
    "our-own-ip": (vxlan_datagram6(outer_src=OUR_IP6, inner_src="fd10:244:0:1::9"), "unknown_peer"),
    "ipv4-peer-ip-as-v6": (vxlan_datagram6(outer_src="::ffff:198.18.0.2"), "unknown_peer"),
    "wrong-vni": (vxlan_datagram6(vni=2), "wrong_vni"),
    "no-i-flag": (vxlan_datagram6(vx_flags=0), "bad_vxlan"),
    "reserved-vni-byte": (vxlan_datagram6(vni_low=1), "bad_vxlan"),
    "inner-dmac-ipv4-vtep-mac": (vxlan_datagram6(inner_dmac=OUR_MAC), "wrong_mac"),  # not our IPv6 VtepMAC
    "inner-smac-ours": (vxlan_datagram6(inner_smac=OUR_MAC6), "wrong_mac"),
    "inner-ipv4": (vxlan_datagram6(inner=frame("10.244.2.7", "10.244.1.2", dmac=OUR_MAC6, smac=PEER6_MAC)),
                   "inner_not_ipv4"),
    "inner-version-4": (vxlan_datagram6(inner=frame6("fd10:244:0:2::7", "fd10:244:0:1::2", dmac=OUR_MAC6,
                                                     smac=PEER6_MAC)[:14] + b"\x45" + frame6(
                                                         "fd10:244:0:2::7", "fd10:244:0:1::2")[15:]),
                        "inner_not_ipv4"),
    "ecn-ce-on-not-ect": (vxlan_datagram6(outer_tc=3, inner_tc=0), "ecn"),
    "first-fragment": (_fragment6(0), "fragment"),
    "payload-len-beyond-frame": (_with_payload_len(vxlan_datagram6(), 2000), "malformed"),
    "udp-len-short": (vxlan_datagram6(udp_len=60), "malformed"),
    "udp-len-below-header": (vxlan_datagram6(udp_len=4), "malformed"),
    "truncated-empty": (_truncated6(0), "truncated"),
    "truncated-no-inner-ip": (_truncated6(8 + 14 + 20), "truncated"),
    "inner-payload-length-lies": (_inner6_len_lies(), "truncated"),
}


def test_from_underlay6_passes_a_peers_datagram(dual):
    pkt = vxlan_datagram6()
    assert run(dual, "weft_from_underlay", pkt) == (sysbpf.TC_ACT_OK, pkt)
    assert run(dual, "weft_from_underlay", vxlan_datagram6(outer_dst=PUBLIC_IP6))[0] == sysbpf.TC_ACT_OK
    # ECT inner with CE outside is fine (RFC 6040: the decapsulator marks CE)
    assert run(dual, "weft_from_underlay", vxlan_datagram6(outer_tc=3, inner_tc=2))[0] == sysbpf.TC_ACT_OK
    assert run(dual, "weft_from_underlay", pkt, skb_ctx(gso_segs=4, gso_size=len(pkt) - 124))[0] == sysbpf.TC_ACT_OK
    b = underlay_buckets(dual)
    assert b["underlay_passed"] == 7 and sum(b.values()) == 7
    # the IPv4 underlay still passes its own peer's datagram
    assert run(dual, "weft_from_underlay", vxlan_datagram())[0] == sysbpf.TC_ACT_OK
    assert underlay_buckets(dual)["underlay_passed"] == 8


@pytest.mark.parametrize("name", sorted(BAD6))
def test_from_underlay6_drops_by_reason(dual, name):
    pkt, reason = BAD6[name]
    rc, _ = run(dual, "weft_from_underlay", pkt)
    b = underlay_buckets(dual)
    assert rc == sysbpf.TC_ACT_SHOT, (name, b)
    assert b[f"drops_{reason}"] == 1 and sum(b.values()) == 1, (name, b)


@pytest.mark.parametrize("name,pkt", [
    ("other-port", vxlan_datagram6(dport=4789)),
    ("later-fragment", _fragment6(100)),
    ("to-a-pod", vxlan_datagram6(outer_dst="fd10:244:0:1::2")),
    ("forwarded", vxlan_datagram6(outer_dst="2001:db8:198:18::99")),
    ("not-for-this-host", vxlan_datagram6(dmac="02:ee:00:00:00:99")),
    ("tcp", vxlan_datagram6(nexthdr=6)),
    ("routing-header", vxlan_datagram6(nexthdr=43)),  # extension headers: the kernel's (and from_overlay's) to judge
])
def test_from_underlay6_leaves_other_traffic_alone(dual, name, pkt):
    assert run(dual, "weft_from_underlay", pkt) == (sysbpf.TC_ACT_OK, pkt), name
    assert sum(underlay_buckets(dual).values()) == 0


def test_from_underlay6_on_a_node_without_ipv6_is_untouched(dual):
    dual.set_config(config(fb.CFG_DEFAULT))
    pkt = vxlan_datagram6()
    assert run(dual, "weft_from_underlay", pkt) == (sysbpf.TC_ACT_OK, pkt)
    assert sum(underlay_buckets(dual).values()) == 0


def gso_batch6(datagrams: list[bytes], outer_src: str = PEER_IP6) -> bytes:
    body = b"".join(d[62:] for d in datagrams)
    udp = struct.pack("!HHHH", 40000, PORT, 8 + len(body), 0) + body
    return (fb.mac_bytes(HOST_MAC) + fb.mac_bytes("02:ee:00:00:00:02") + b"\x86\xdd"
            + ipv6(outer_src, OUR_IP6, 17, udp))


def test_from_underlay6_checks_every_datagram_of_a_gso_batch(dual):
    good = [vxlan_datagram6(inner_src=f"fd10:244:0:2::{i}") for i in range(1, 6)]
    gso = len(good[0]) - 62
    ctx = skb_ctx(gso_segs=5, gso_size=gso)
    assert run(dual, "weft_from_underlay", gso_batch6(good), ctx)[0] == sysbpf.TC_ACT_OK
    assert underlay_buckets(dual)["underlay_passed"] == 5
    bad = good[:2] + [vxlan_datagram6(inner_src="fd10:244:0:3::9")] + good[3:4] + [vxlan_datagram6(vni=9)]
    rc, _ = run(dual, "weft_from_underlay", gso_batch6(bad), ctx)
    b = underlay_buckets(dual)
    assert rc == sysbpf.TC_ACT_SHOT
    assert (b["drops_spoofed_src"], b["drops_wrong_vni"], b["drops_gso_batch"], b["underlay_passed"]) == (1, 1, 3, 5)


def test_from_underlay6_random_mutations_counted_once(dual):
    """2,000 random mutations of IPv6-underlay datagrams: each lands in at most one bucket, and one
    that passes keeps the rule (outer source = the PublicIPv6 holding the inner source)."""
    import random
    rng = random.Random(61)
    seeds = [vxlan_datagram6(), vxlan_datagram6(inner_src="fd10:244:0:3::7"),
             vxlan_datagram6(outer_src=PEER3_IP6, inner_src="fd10:244:0:3::4", inner_smac=PEER3_MAC6)]
    prev = underlay_buckets(dual)
    passed = counted = 0
    for i in range(2000):
        pkt = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.7:
                pkt[rng.randrange(min(len(pkt), 130))] = rng.randrange(256)
            else:
                pkt = pkt[:rng.randint(54, len(pkt))]
        pkt = bytes(pkt)
        rc, _ = run(dual, "weft_from_underlay", pkt)
        now = underlay_buckets(dual)
        delta = sum(now.values()) - sum(prev.values())
        did_pass = now["underlay_passed"] - prev["underlay_passed"]
        prev = now
        assert delta in (0, 1), (i, pkt.hex())
        counted += delta
        assert rc == (sysbpf.TC_ACT_SHOT if delta and not did_pass else sysbpf.TC_ACT_OK), (i, pkt.hex())
        if did_pass:
            passed += 1
            outer = str(ipaddress.IPv6Address(pkt[22:38]))
            inner = ipaddress.IPv6Address(pkt[62 + 8 + 14 + 8:][:16])
            holder = {"fd10:244:0:2::/64": PEER_IP6, "fd10:244:0:3::/64": PEER3_IP6}
            assert any(inner in ipaddress.IPv6Network(n) and outer == ip for n, ip in holder.items()), (i, pkt.hex())
    assert counted > 1000 and passed > 30, (counted, passed, prev)
