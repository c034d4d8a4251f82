"""The underlay link coming back up makes weftd resync at once (controlplane/linkwatch.py).

A link going down makes the kernel flush the routes through it: host-gw's peer routes vanish. Before
the link watch they came back only at the periodic resync (10 s): ``bench faults`` measured 4-8 s
of lost traffic after the link was back on host-gw/kernel.
"""
from __future__ import annotations

import ipaddress
import struct
import time

import pytest

from bench import scenario as sc
from bench.lab import Lab
from controlplane.linkwatch import IFF_LOWER_UP, IFF_UP, RTM_NEWLINK, link_changes, link_usable

from .conftest import needs_root
from .e2e import metrics, kernel_route

HOSTGW3 = """
name = "hostgw3"
[lab]
nodes = 3
pods_per_node = 1
[network]
config = {Network = "10.244.0.0/16", Backend = {Type = "host-gw"}}
"""


def _newlink(index: int, flags: int, kind: int = RTM_NEWLINK) -> bytes:
    body = struct.pack("=BxHiII", 0, 1, index, flags, 0)
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_link_changes_reads_every_newlink_and_stops_at_a_torn_message():
    data = _newlink(3, IFF_UP | IFF_LOWER_UP) + _newlink(4, IFF_UP, kind=17) + _newlink(5, 0)
    assert link_changes(data) == [(3, IFF_UP | IFF_LOWER_UP), (5, 0)]
    assert link_changes(data[:-3]) == [(3, IFF_UP | IFF_LOWER_UP)]   # the last one cut short
    assert link_changes(struct.pack("=IHHII", 8, RTM_NEWLINK, 0, 0, 0)) == []  # length < header
    assert link_usable(IFF_UP | IFF_LOWER_UP) and not link_usable(IFF_UP) and not link_usable(IFF_LOWER_UP)


@needs_root
def test_hostgw_routes_are_back_within_a_second_of_link_up():
    with Lab(sc.loads(HOSTGW3, "hostgw3.toml")) as lab:
        victim = lab.node(2)
        others = [lab.node(1).subnet, lab.node(3).subnet]
        assert all(kernel_route(lab, 2, str(s)) for s in others)
        assert metrics(lab, 2)["weft_link_up_resyncs_total"] == 0
        lab.exec(victim.namespace, ["ip", "link", "set", "eth0", "down"], check=True)
        time.sleep(0.5)
        # the kernel flushed node 2's routes through eth0 (what the link watch is for)
        assert not any(kernel_route(lab, 2, str(s)) for s in others)
        lab.exec(victim.namespace, ["ip", "link", "set", "eth0", "up"], check=True)
        up = time.monotonic()
        while not all(kernel_route(lab, 2, str(s)) for s in others):
            assert time.monotonic() - up < 3.0, "host-gw routes not back 3 s after link up"
            time.sleep(0.05)
        assert metrics(lab, 2)["weft_link_up_resyncs_total"] == 1
        out = lab.exec(victim.namespace, ["ping", "-c", "1", "-W", "1",
                                          str(ipaddress.ip_network(lab.node(1).subnet)[1])])
        assert out.returncode == 0, out.stdout + out.stderr
