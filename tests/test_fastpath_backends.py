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
import threading

import pytest

from bench.procs import proc_start_time, stop_processes

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


def _stop_all_in(ns: str) -> None:
    """Stop what runs in namespace ``ns`` (made by this test), by PID."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    stop_processes([(int(p), proc_start_time(int(p))) for p in pids])


def run_script(ns: str, script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    """Run a Python script in namespace ``ns``. The backend's engine process inherits the script's
    stdout and stderr; one left running (the script failed before its teardown) is stopped once
    the script exits, so the script's output (its traceback) comes back at once."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", textwrap.dedent(script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)

    def reap():
        proc.wait()
        _stop_all_in(ns)
    threading.Thread(target=reap, daemon=True).start()
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


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
        _stop_all_in(name)  # the backend's engine process, if a case left it running
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.mark.parametrize("backend,workers", [("udp/fastpath", 1), ("udp/python", 1), ("vxlan/fastpath", 1),
                                             ("udp/fastpath", 2)])
def test_backend_lifecycle(ns, backend, workers):
    env = dict(os.environ, PYTHONPATH=REPO, WEFT_ENGINE_WORKERS=str(workers))
    res = run_script(ns, SCRIPT, backend, env=env)
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
    if backend != "udp/python":  # per-worker accounting of the compiled engine's threads
        assert {k for k in out["stats"] if k[6:7].isdigit() and k.startswith("worker")} == {
            f"worker{i}_{k}" for i in range(workers) for k in ("tun_read_bytes", "tun_write_bytes", "cpu_seconds")}


DIRECT_SCRIPT = r'''
import ipaddress, json, socket, subprocess, time, sys
from controlplane.backends import load_backend, ExternalInterface, BackendOptions
from controlplane.config import parse_config
from controlplane.lease import Lease, LeaseAttrs
cfg = parse_config(json.dumps({"Network": "10.244.0.0/16",
                               "Backend": {"Type": "vxlan", "Dataplane": "fastpath", "DirectRouting": True}}))
iface = ExternalInterface("eth0", socket.if_nametoindex("eth0"), ipaddress.IPv4Address("198.18.0.1"),
                          ipaddress.IPv4Address("198.18.0.1"), 1500)
b = load_backend("vxlan/fastpath")(cfg, iface, BackendOptions())
me = Lease(ipaddress.IPv4Network("10.244.1.0/24"), b.lease_attrs(None), None)
b.setup(me)

def lease(n, ip, mac="0a:00:00:00:00:%02x"):
    return Lease(ipaddress.IPv4Network(f"10.244.{n}.0/24"),
                 LeaseAttrs(ipaddress.IPv4Address(ip), "vxlan", {"VNI": 1, "VtepMAC": mac % n}),
                 time.time() + 60)

def route(n):
    return subprocess.run(["ip", "-4", "route", "show", "exact", f"10.244.{n}.0/24"],
                          capture_output=True, text=True).stdout.strip()

def snap(tag):
    s = b.stats()
    out[tag] = {"r2": route(2), "r3": route(3), "engine": sorted(b.engine.routes()),
                "routes": s["routes"], "direct": s["peers_direct"], "programmed": s["peers_programmed"]}

out = {}
near, far = lease(2, "198.18.0.2"), lease(3, "198.19.0.3")    # on eth0's /24, and beyond it
b.add_peer(near); b.add_peer(far); b.add_peer(near)
snap("added")
b.add_peer(lease(2, "198.19.0.2"))           # peer 2 moves off our L2 subnet: tunnel
snap("to_tunnel")
b.add_peer(lease(3, "198.18.0.3"))           # peer 3 moves onto it: direct
snap("to_direct")
b.add_peer(lease(3, "198.18.0.33"))          # still direct, new address: the route follows
snap("readdressed")
subprocess.run(["ip", "route", "del", "10.244.3.0/24"], check=True)
before = b.stats()["entries_restored"]
b.resync()
out["restored"] = b.stats()["entries_restored"] - before
snap("resynced")
b.remove_peer(lease(3, "198.18.0.33"))
b.remove_peer(lease(2, "198.19.0.2"))
snap("removed")
# a direct route left by a previous run (weftd stopped without --teardown) for a peer we never saw
subprocess.run(["ip", "route", "add", "10.244.4.0/24", "via", "198.18.0.4", "dev", "eth0"], check=True)
b.remove_peer(lease(4, "198.18.0.4"))
out["stale_removed"] = not route(4)
b.add_peer(near)
b.add_peer(lease(5, "198.18.0.5"))
b.teardown()
out["after_teardown"] = [route(2), route(5)]
print(json.dumps(out))
'''


def test_vxlan_fastpath_direct_routing(ns):
    """DirectRouting: a peer on eth0's L2 subnet gets a kernel route and no engine route; moves
    between the two modes switch cleanly; resync restores, remove_peer and teardown remove."""
    env = dict(os.environ, PYTHONPATH=REPO)
    res = run_script(ns, DIRECT_SCRIPT, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    direct2 = "10.244.2.0/24 via 198.18.0.2 dev eth0"
    a = out["added"]
    assert a["r2"].startswith(direct2) and a["r3"] == ""
    assert a["engine"] == ["10.244.3.0/24"] and a["routes"] == 1
    assert a["direct"] == 1 and a["programmed"] == 2
    t = out["to_tunnel"]
    assert t["r2"] == "" and t["engine"] == ["10.244.2.0/24", "10.244.3.0/24"] and t["direct"] == 0
    d = out["to_direct"]
    assert d["r3"].startswith("10.244.3.0/24 via 198.18.0.3 dev eth0")
    assert d["engine"] == ["10.244.2.0/24"] and d["direct"] == 1 and d["programmed"] == 2
    assert out["readdressed"]["r3"].startswith("10.244.3.0/24 via 198.18.0.33 dev eth0")
    assert out["readdressed"]["r3"].count("\n") == 0          # replaced, not added next to it
    assert out["restored"] == 1
    assert out["resynced"]["r3"].startswith("10.244.3.0/24 via 198.18.0.33 dev eth0")
    r = out["removed"]
    assert r["r2"] == r["r3"] == "" and r["engine"] == [] and r["direct"] == 0 and r["programmed"] == 0
    assert out["stale_removed"]
    assert out["after_teardown"] == ["", ""]
