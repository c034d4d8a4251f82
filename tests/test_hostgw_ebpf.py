"""host-gw/ebpf end to end: host-gw's kernel routes, with pod traffic taken past IP forwarding.

Three namespaced nodes (the cluster of tests/test_ebpf_e2e.py, a tests.e2e.Testbed: node ``<p>nN``
has eth0 = 198.18.0.N/24 on one bridge, cni0 10.244.N.1/24, pod 10.244.N.2), each backend in an
agent inside its node's namespace, and an intruder (198.18.0.66, no lease) on the same segment.

Checked with real packets: a transfer between pods of two host-gw/ebpf nodes is byte-identical and
skips what the programs claim to skip (the sender's IP forwarding, the receiver's forwarding and
pod bridge: the kernel's own counters barely move while the programs count every packet); the TTL
comes out as two forwarding hops make it; what the stack must answer (TTL 1, no lease) still gets
its ICMP; a host-gw/kernel node interoperates; a frame on the segment for another host's MAC is not
delivered; a restart forwards through the programs before any lease event; resync puts back
removed filters; teardown, and a later run of another data plane, leave no filter of ours;
``source_guard`` drops spoofed packets inside the same program; EnableIPv6 is refused in one line.

Teardown (the lab's, from the testbed's ledger) deletes exactly the namespaces this run created.
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
import time

import pytest

from controlplane.config import ConfigError, parse_config

from .conftest import needs_bcc, needs_root
from .nsagent import sh
from .test_ebpf_e2e import PY, Cluster, icmp_echo, in_echos, intruder
from .test_hostgw_guard import cluster, net, send_raw  # noqa: F401 (its fixtures: the cluster, the intruder)

pytestmark = [needs_root, needs_bcc]

CONFIG = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw", "Dataplane": "ebpf"}}')
EBPF3 = {1: "host-gw/ebpf", 2: "host-gw/ebpf", 3: "host-gw/ebpf"}
MIXED = {1: "host-gw/ebpf", 2: "host-gw/ebpf", 3: "host-gw/kernel"}


def start(net: Cluster, kinds=EBPF3, options=None) -> None:
    net.start(kinds, config=CONFIG, options=options)
    assert net.ping_failures() == []
    for n, kind in kinds.items():  # what the bridge watcher does every second
        if kind == "host-gw/ebpf":
            net.call(n, "resync")


def snmp(ns: str, proto: str, field: str) -> int:
    """A /proc/net/snmp counter of a namespace (per network namespace)."""
    lines = [l.split() for l in sh("cat", "/proc/net/snmp", ns=ns).splitlines() if l.startswith(proto + ":")]
    return int(lines[1][lines[0].index(field)])


def dev_packets(ns: str, dev: str, way: str) -> int:
    return int(sh("cat", f"/sys/class/net/{dev}/statistics/{way}_packets", ns=ns))


def pod_ports(net: Cluster, n: int) -> list[str]:
    return [link["ifname"] for link in json.loads(sh("ip", "-n", net.node[n], "-j", "link", "show", "master", "cni0"))]


def filters(net: Cluster, n: int, dev: str) -> str:
    return sh("tc", "-n", net.node[n], "filter", "show", "dev", dev, "ingress")


def test_pod_traffic_skips_forwarding_both_ways(net):
    """16 MiB pod 1 -> pod 2: node 1 forwards (the kernel's ForwDatagrams) none of it and its
    bridge is handed none of it (the pod's port program takes it first), node 2 forwards none and
    its bridge transmits none of it to the pod, the programs count it all, and the bytes arrive
    intact."""
    start(net)
    assert all("weft_hostgw_from_pod_port" in filters(net, 1, p) for p in pod_ports(net, 1))
    fwd1, fwd2 = snmp(net.node[1], "Ip", "ForwDatagrams"), snmp(net.node[2], "Ip", "ForwDatagrams")
    bridge1, port2 = dev_packets(net.node[1], "cni0", "rx"), dev_packets(net.node[2], "cni0", "tx")
    s1, s2 = net.call(1, "stats"), net.call(2, "stats")
    sent, got = net.transfer(1, 2, 16)
    assert sent and sent == got
    a1, a2 = net.call(1, "stats"), net.call(2, "stats")
    assert a1["tx_bytes"] - s1["tx_bytes"] > 16 << 20  # every byte out of pod 1 (GSO skbs)
    assert a2["rx_peer"] - s2["rx_peer"] > 10  # delivered into pod 2 by redirect_peer
    assert a2["pods_redirect"] - s2["pods_redirect"] > 10  # the ACKs back
    assert snmp(net.node[1], "Ip", "ForwDatagrams") - fwd1 < 20  # ARP-time stragglers at most
    assert snmp(net.node[2], "Ip", "ForwDatagrams") - fwd2 < 20
    assert dev_packets(net.node[2], "cni0", "tx") - port2 < 20
    assert dev_packets(net.node[1], "cni0", "rx") - bridge1 < 20
    assert a1["endpoints"] == a2["endpoints"] == 1


def test_ttl_as_two_forwarding_hops_and_stack_answers_what_it_must(net):
    start(net)
    out = sh("ping", "-n", "-c", "1", "-W", "2", "10.244.2.2", ns=net.pod[1])
    assert "ttl=62" in out, out  # 64, minus node 2's hop on the way back, minus node 1's
    before = net.call(1, "stats")
    # TTL 1: node 1's stack answers Time to live exceeded, as it would without the programs
    r = subprocess.run(["ip", "netns", "exec", net.pod[1], "ping", "-n", "-c", "1", "-t", "1", "-W", "2",
                        "10.244.2.2"], capture_output=True, text=True, timeout=10)
    assert "Time to live exceeded" in r.stdout, r.stdout
    # no lease holds the destination: the stack (no route: unreachable), counted as a miss
    r = subprocess.run(["ip", "netns", "exec", net.pod[1], "ping", "-n", "-c", "1", "-W", "1", "10.244.99.2"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode != 0
    after = net.call(1, "stats")
    assert after["pods_stack"] - before["pods_stack"] == 2
    assert after["map_miss"] - before["map_miss"] == 1


def test_mixed_with_host_gw_kernel_every_direction(net):
    start(net, MIXED)
    assert net.ping_failures() == []
    for a, b in ((1, 3), (3, 1)):
        sent, got = net.transfer(a, b, 8)
        assert sent and sent == got
    assert net.call(1, "stats")["rx_peer"] > 0 and net.call(1, "stats")["pods_redirect"] > 0


_SEND_FRAME = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
s.send(bytes.fromhex(sys.argv[1]))
"""


def test_frame_for_another_hosts_mac_is_not_delivered(net):
    """On a shared segment a host sees unicast frames for other MACs (flooding): the kernel drops
    them (PACKET_OTHERHOST); the programs must not deliver them into the pod either."""
    start(net)
    x = intruder(net)
    mac = lambda m: bytes(int(v, 16) for v in m.split(":"))  # noqa: E731
    src = sh("cat", "/sys/class/net/eth0/address", ns=x).strip()
    echos, before = in_echos(net.pod[2]), net.call(2, "stats")
    frame = mac("02:de:ad:00:00:01") + mac(src) + struct.pack("!H", 0x0800) + icmp_echo("10.244.3.2", "10.244.2.2", 5)
    sh(PY, "-c", _SEND_FRAME, frame.hex(), ns=x, timeout=30)
    time.sleep(0.5)
    assert in_echos(net.pod[2]) == echos
    assert net.call(2, "stats")["rx_peer"] == before["rx_peer"]


def test_restart_forwards_through_the_programs_before_any_lease_event(net):
    start(net)
    net.agents[1].drop("b")  # the daemon dies (SIGTERM): routes, filters and maps stay
    net.agents[1].backend("b", "host-gw/ebpf", CONFIG, net.iface(1))
    net.agents[1].call("b", "lease_attrs", net.leases[1])
    net.call(1, "setup", net.leases[1])
    for dev in ("cni0", "eth0", *pod_ports(net, 1)):
        assert filters(net, 1, dev).count("direct-action") == 1, dev
    assert net.call(1, "stats")["guard_peers"] == 2  # inherited from the old programs' map
    before = net.call(1, "stats")["pods_redirect"]
    assert net.ping_failures([(1, 2), (1, 3)]) == []
    assert net.call(1, "stats")["pods_redirect"] - before >= 4  # through the new programs
    net.call(1, "add_peer", net.leases[2])  # node 3's lease is gone meanwhile: never re-added
    net.call(1, "resync")
    assert net.call(1, "stats")["guard_peers"] == 1


def test_resync_puts_back_filters_and_teardown_removes_them(net):
    start(net)
    port = pod_ports(net, 1)[0]
    for dev in ("cni0", "eth0", port):
        sh("tc", "filter", "del", "dev", dev, "ingress", ns=net.node[1])
    net.call(1, "resync")
    assert "weft_hostgw_from_pods" in filters(net, 1, "cni0")
    assert "weft_hostgw_from_underlay" in filters(net, 1, "eth0")
    assert "weft_hostgw_from_pod_port" in filters(net, 1, port)
    net.call(1, "teardown")
    net.agents[1].drop("b")
    net.kinds.pop(1)
    for dev in ("cni0", "eth0", port):
        assert "bpf" not in filters(net, 1, dev), dev
    assert "10.244.2.0/24" not in sh("ip", "-n", net.node[1], "route", "show")


_CLEAR_LEFTOVERS = r"""
import ipaddress, socket
from controlplane.backends import ExternalInterface, clear_leftovers, load_backend
from controlplane.config import parse_config
ip = ipaddress.IPv4Address("198.18.0.1")
config = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')
clear_leftovers(load_backend("host-gw/kernel")(config, ExternalInterface("eth0", socket.if_nametoindex("eth0"), ip, ip, 1500)))
"""


def test_another_data_plane_after_a_run_without_teardown_removes_our_filters(net):
    """weftd stopped without --teardown leaves the programs; before host-gw/kernel is set up next
    (weftd calls the registry's leftovers hooks) they go: their maps would no longer follow the
    leases. host-gw/ebpf itself adopts them (the restart test)."""
    start(net)
    net.agents[1].drop("b")
    net.kinds.pop(1)
    devs = ("cni0", "eth0", *pod_ports(net, 1))
    assert all("bpf" in filters(net, 1, dev) for dev in devs)
    sh(PY, "-c", _CLEAR_LEFTOVERS, ns=net.node[1], timeout=30)
    for dev in devs:
        assert "bpf" not in filters(net, 1, dev), dev


def test_source_guard_drops_spoofed_packets_in_the_same_program(net):
    start(net, options={1: {"source_guard": True}})
    assert filters(net, 1, "eth0").count("direct-action") == 1
    x = intruder(net)
    before, echos = net.call(1, "stats"), in_echos(net.pod[1])
    send_raw(x, icmp_echo("10.244.2.2", "10.244.1.2", 7))  # the intruder claims peer 2's subnet
    time.sleep(0.5)
    after = net.call(1, "stats")
    assert in_echos(net.pod[1]) == echos
    assert after["drops_hostgw_spoofed"] - before["drops_hostgw_spoofed"] == 1
    sent, got = net.transfer(2, 1, 4)  # legit traffic passes the check and the shortcut
    assert sent and sent == got
    final = net.call(1, "stats")
    assert final["hostgw_passed"] > after["hostgw_passed"] and final["rx_peer"] > after["rx_peer"]


def test_enable_ipv6_is_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        parse_config('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10::/48",'
                     ' "Backend": {"Type": "host-gw", "Dataplane": "ebpf"}}')
    assert re.fullmatch(r"[^\n]*host-gw/ebpf carries IPv4 only[^\n]*", str(e.value)), str(e.value)
