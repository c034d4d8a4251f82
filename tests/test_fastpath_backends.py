"""The userspace backends on their own (no daemon): setup, peers, resync, stats, teardown.

Each case runs in a child process inside a namespace made for it (exact name, deleted by name),
because TUN devices, netlink and sockets belong to the namespace of the thread that opens them.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap

import pytest

from .conftest import needs_root

pytestmark = needs_root
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = os.path.join(REPO, ".venv", "bin", "python")
PY = PY if os.path.exists(PY) else sys.executable

SCRIPT = r'''
import ipaddress, json, socket, subprocess, time, sys
from controlplane.backends import load_backend, ExternalInterface, BackendOptions
from controlplane.config import parse_config
from controlplane.lease import Lease, LeaseAttrs
name = sys.argv[1]
wire = name.split("/")[0]
cfg = parse_config(json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": wire}})).with_dataplane(name.split("/")[1])
iface = ExternalInterface("eth0", socket.if_nametoindex("eth0"), ipaddress.IPv4Address("198.18.0.1"),
                          ipaddress.IPv4Address("198.18.0.1"), 1500)
b = load_backend(name)(cfg, iface, BackendOptions())
out = {}
prev = Lease(ipaddress.IPv4Network("10.244.1.0/24"),
             LeaseAttrs(ipaddress.IPv4Address("198.18.0.1"), "vxlan", {"VNI": 1, "VtepMAC": "0a:11:22:33:44:55"}), None)
attrs = b.lease_attrs(prev)
out["attrs"] = json.loads(attrs.to_json())
me = Lease(ipaddress.IPv4Network("10.244.1.0/24"), attrs, None)
b.setup(me)
dev = b.dev_name
out["dev"] = dev
out["link"] = subprocess.run(["ip", "-d", "addr", "show", dev], capture_output=True, text=True).stdout
import os
out["queues"] = len(os.listdir(f"/sys/class/net/{dev}/queues"))
out["route"] = subprocess.run(["ip", "-4", "route", "show", "exact", "10.244.0.0/16"], capture_output=True, text=True).stdout
peer_attrs = LeaseAttrs(ipaddress.IPv4Address("198.18.0.2"), "vxlan" if wire == "vxlan" else "",
                        {"VNI": 1, "VtepMAC": "0a:00:00:00:00:02"} if wire == "vxlan" else None)
peer = Lease(ipaddress.IPv4Network("10.244.2.0/24"), peer_attrs, time.time() + 60)
b.add_peer(peer)
b.add_peer(peer)
b.add_peer(me)                       # our own lease: ignored
out["routes_after_add"] = b.stats()["routes"]
subprocess.run(["ip", "route", "del", "10.244.0.0/16", "dev", dev], check=True)
b.resync()
out["route_restored"] = bool(subprocess.run(["ip", "-4", "route", "show", "exact", "10.244.0.0/16"],
                                            capture_output=True, text=True).stdout.strip())
out["stats"] = b.stats()
b.remove_peer(peer)
out["routes_after_remove"] = b.stats()["routes"]
subprocess.run(["ip", "link", "del", dev], check=True)
b.resync()                           # the device itself vanished: reopened
out["recreated"] = b.stats()["device_recreated"]
out["dev_back"] = subprocess.run(["ip", "link", "show", dev], capture_output=True).returncode == 0
b.teardown()
out["dev_after_teardown"] = subprocess.run(["ip", "link", "show", dev], capture_output=True).returncode == 0
print(json.dumps(out))
'''


@pytest.fixture
def ns():
    name = f"wftb{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"],
                    ["link", "set", "eth0p", "up"],
                    ["addr", "add", "198.18.0.1/24", "dev", "eth0"],
                    ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.mark.parametrize("backend,workers", [("udp/fastpath", 1), ("udp/python", 1), ("vxlan/fastpath", 1),
                                             ("udp/fastpath", 2)])
def test_backend_lifecycle(ns, backend, workers):
    env = dict(os.environ, PYTHONPATH=REPO, WEFT_ENGINE_WORKERS=str(workers))
    res = subprocess.run(["ip", "netns", "exec", ns, PY, "-c", textwrap.dedent(SCRIPT), backend],
                         capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    wire = backend.split("/")[0]
    if wire == "udp":
        assert out["attrs"] == {"PublicIP": "198.18.0.1", "PublicIPv6": None}   # flanneld's udp lease
        assert out["dev"] == "flannel0" and "mtu 1472" in out["link"]
    else:
        assert out["attrs"]["BackendType"] == "vxlan"
        assert out["attrs"]["BackendData"] == {"VNI": 1, "VtepMAC": "0a:11:22:33:44:55"}  # kept
        assert out["dev"] == "flannel.1" and "mtu 1450" in out["link"]
    assert "inet 10.244.1.0/32" in out["link"] and "qlen 10000" in out["link"]
    assert f"dev {out['dev']}" in out["route"]
    assert out["routes_after_add"] == 1 and out["routes_after_remove"] == 0
    assert out["route_restored"] and out["stats"]["entries_restored"] >= 1
    assert out["recreated"] == 1 and out["dev_back"]
    assert not out["dev_after_teardown"]
    assert all(isinstance(v, float) for v in out["stats"].values())
    assert out["stats"]["workers"] == (1 if backend == "udp/python" else workers)
    if workers > 1 and backend != "udp/python":
        assert "multi_queue" in out["link"] or out["queues"] == 2 * workers
