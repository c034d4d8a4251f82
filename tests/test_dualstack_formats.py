"""Dual-stack leases in flanneld's exact etcd layout, read and written with etcdctl.

flanneld (pkg/subnet/subnet.go, lease.go) writes a dual-stack lease as
  key   <prefix>/subnets/10.5.3.0-24&fd10:244:0:3::-64
  value {"PublicIP":"...","PublicIPv6":"...","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"..."},
         "BackendV6Data":{"VNI":1,"VtepMAC":"..."}}
(LeaseAttrs in Go's field order, no spaces). What weft writes must be those bytes, and what
flanneld writes weft must follow; what someone else writes wrong is counted with its reason.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from bench.etcdserver import EtcdServer
from controlplane.config import parse_config
from controlplane.lease import LeaseAttrs
from controlplane.manager import LeaseManager, LeaseWatcher
from controlplane.store.etcd import EtcdStore

from .conftest import needs_root
from .daemons import REPO, run_tool
from .etcd_fixtures import etcd_plain, needs_etcd, plain_options  # noqa: F401  (fixtures)

pytestmark = needs_etcd

PREFIX = "/weft-dualstack"
DUAL = ('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56",'
        '"Backend":{"Type":"vxlan"}}')
MAC4, MAC6 = "5e:bb:b4:14:2b:45", "8a:3c:01:9d:e2:10"
# flanneld's value for a dual-stack vxlan node, byte for byte (Go's json.Marshal of LeaseAttrs)
FLANNELD_VALUE = ('{"PublicIP":"198.18.0.2","PublicIPv6":"2001:db8:198:18::2","BackendType":"vxlan",'
                  '"BackendData":{"VNI":1,"VtepMAC":"' + MAC4 + '"},'
                  '"BackendV6Data":{"VNI":1,"VtepMAC":"' + MAC6 + '"}}')
# flannel's ParseSubnetKey regex, anchored
FLANNEL_KEY_RE = re.compile(r"^(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")


def etcd_get_all(server: EtcdServer, prefix: str) -> dict[str, tuple[bytes, int]]:
    """Every key under ``prefix`` as etcdctl sees it: name -> (value bytes, etcd lease id)."""
    doc = json.loads(server.etcdctl("get", "--prefix", prefix, "-w", "json"))
    return {base64.b64decode(kv["key"]).decode(): (base64.b64decode(kv["value"]), int(kv.get("lease", 0)))
            for kv in doc.get("kvs", [])}


def lease_ttl(server: EtcdServer, lease_id: int) -> int:
    out = server.etcdctl("lease", "timetolive", format(lease_id, "x"))
    return int(re.search(r"granted with TTL\((\d+)s\)", out).group(1))


@pytest.fixture
def store(etcd_plain):
    etcd_plain.etcdctl("del", "--prefix", PREFIX + "/")
    s = EtcdStore(plain_options(etcd_plain), prefix=PREFIX)
    yield s
    s.close()


def test_weft_writes_flanneld_bytes(store, etcd_plain):
    """LeaseManager with EnableIPv6 on etcd: etcdctl reads flanneld's key and value, byte for byte;
    an IPv4-only network's lease is exactly what it always was."""
    config = parse_config(DUAL)
    attrs = LeaseAttrs(ipaddress.IPv4Address("198.18.0.1"), "vxlan", {"VNI": 1, "VtepMAC": MAC4},
                       ipaddress.IPv6Address("2001:db8:198:18::1"), {"VNI": 1, "VtepMAC": MAC6})
    lease = LeaseManager(store, ttl=86400).acquire(config, attrs)
    keys = etcd_get_all(etcd_plain, PREFIX + "/subnets/")
    assert len(keys) == 1
    (key, (value, lease_id)), = keys.items()
    name = key[len(PREFIX + "/subnets/"):]
    m = FLANNEL_KEY_RE.match(name)
    assert m, name
    assert name == (f"{lease.subnet.network_address}-24&{lease.subnet6.network_address}-64")
    assert ipaddress.IPv6Network(f"{m.group(3)}/{m.group(4)}") == lease.subnet6
    assert config.contains_subnet6(lease.subnet6) and lease.subnet6.network_address.compressed == m.group(3)
    assert value == (b'{"PublicIP":"198.18.0.1","PublicIPv6":"2001:db8:198:18::1","BackendType":"vxlan",'
                     b'"BackendData":{"VNI":1,"VtepMAC":"' + MAC4.encode() + b'"},'
                     b'"BackendV6Data":{"VNI":1,"VtepMAC":"' + MAC6.encode() + b'"}}')
    assert lease_ttl(etcd_plain, lease_id) == 86400
    # renewal re-puts the same key and bytes with a fresh etcd lease (flanneld's way)
    LeaseManager(store, ttl=86400).renew(lease)
    again = etcd_get_all(etcd_plain, PREFIX + "/subnets/")
    assert list(again) == [key] and again[key][0] == value and again[key][1] != lease_id

    # IPv4 only: no '&' part, "PublicIPv6":null, no BackendV6Data (unchanged from before)
    etcd_plain.etcdctl("del", "--prefix", PREFIX + "/")
    v4 = LeaseManager(store, ttl=86400).acquire(
        parse_config('{"Network":"10.5.0.0/16"}'),
        LeaseAttrs(ipaddress.IPv4Address("198.18.0.1"), "vxlan", {"VNI": 1, "VtepMAC": MAC4}))
    (key, (value, _)), = etcd_get_all(etcd_plain, PREFIX + "/subnets/").items()
    assert key == f"{PREFIX}/subnets/{v4.subnet.network_address}-24"
    assert value == (b'{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan",'
                     b'"BackendData":{"VNI":1,"VtepMAC":"' + MAC4.encode() + b'"}}')


HOSTILE = {  # key name under subnets/ -> (value, the reason a dual-stack node counts it under)
    "10.5.10.0-24&fd10:244:0:a::1-64": (FLANNELD_VALUE, "bad_key"),  # host bits
    "10.5.11.0-24&FD10:244:0:B::-64": (FLANNELD_VALUE, "bad_key"),  # not as Go prints it
    "10.5.12.0-24&fd10:244:0:c::-": (FLANNELD_VALUE, "bad_key"),
    "10.5.13.0-24&fd10:244:0:d::-64&x": (FLANNELD_VALUE, "bad_key"),
    "10.5.14.0-24&fd10:244:0:e::-64": (FLANNELD_VALUE.replace('"2001:db8:198:18::2"', '"banana"'),
                                       "bad_public_ip"),
    "10.5.15.0-24&fd10:244:0:f::-64": (FLANNELD_VALUE.replace('"2001:db8:198:18::2"', '"fe80::2"'),
                                       "bad_public_ip"),
    "10.5.16.0-24&fd10:244:0:10::-64": (FLANNELD_VALUE.replace('"2001:db8:198:18::2"', "7"), "bad_field"),
    "10.5.21.0-24&fd10:244:0:15::-64": (FLANNELD_VALUE.replace('"2001:db8:198:18::2"', '"2001:db8::2%eth0"'),
                                        "bad_public_ip"),  # a zone: Go's ParseIP refuses it
    "10.5.22.0-24&fd10:244:0:16::-64": (FLANNELD_VALUE.replace('"2001:db8:198:18::2"', '"::ffff:198.18.0.2"'),
                                        "bad_public_ip"),
    "10.5.17.0-24&fd10:244:0:11::-64": (FLANNELD_VALUE.replace(
        '"BackendV6Data":{"VNI":1,"VtepMAC":"' + MAC6 + '"}', '"BackendV6Data":[1,2]'), "bad_backend_data"),
    "10.5.18.0-24&fd10:244:0:12::-64": (FLANNELD_VALUE.replace(
        '"VtepMAC":"' + MAC6 + '"', '"VtepMAC":"ff:ff:ff:ff:ff:ff"'), "bad_backend_data"),
    "10.5.19.0-24&fd99::-64": (FLANNELD_VALUE, "outside_network"),
    "10.5.20.0-24&fd10:244:0:14::-96": (FLANNELD_VALUE, "wrong_length"),
}


def test_weft_follows_flanneld_dual_stack_leases_and_counts_hostile_ones(store, etcd_plain):
    """A flanneld-shaped dual-stack lease written with etcdctl becomes a Lease with subnet6,
    PublicIPv6 and BackendV6Data, listed and watched; hostile ones are counted by reason, never
    a crash, never an event; weftctl shows the IPv6 part."""
    config = parse_config(DUAL)
    store.put_config(DUAL)
    events, stop = [], threading.Event()
    watcher = LeaseWatcher(store, events.append, poll_timeout=0.2, config=config)
    key = f"{PREFIX}/subnets/10.5.2.0-24&fd10:244:0:2::-64"
    etcd_plain.etcdctl("put", key, "--", FLANNELD_VALUE)  # listed at start
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        assert watcher.synced.wait(10)
        for name, (value, _) in HOSTILE.items():  # then watched
            etcd_plain.etcdctl("put", f"{PREFIX}/subnets/{name}", "--", value)
        etcd_plain.etcdctl("put", f"{PREFIX}/subnets/10.5.3.0-24&fd10:244:0:3::-64", "--",
                           FLANNELD_VALUE.replace("198.18.0.2", "198.18.0.3").replace("18::2", "18::3"))
        deadline = time.monotonic() + 10
        while (len(events) < 2 or sum(watcher.invalid.snapshot().values()) < len(HOSTILE)) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert [(e.kind, str(e.lease.subnet), str(e.lease.subnet6)) for e in events] == [
        ("added", "10.5.2.0/24", "fd10:244:0:2::/64"), ("added", "10.5.3.0/24", "fd10:244:0:3::/64")]
    lease = events[0].lease
    assert lease.attrs.public_ipv6 == ipaddress.IPv6Address("2001:db8:198:18::2")
    assert lease.attrs.backend_data == {"VNI": 1, "VtepMAC": MAC4}
    assert lease.attrs.backend_v6_data == {"VNI": 1, "VtepMAC": MAC6}
    assert lease.attrs.to_json() == FLANNELD_VALUE  # read back, written back: the same bytes
    want: dict[str, int] = {}
    for _, reason in HOSTILE.values():
        want[reason] = want.get(reason, 0) + 1
    assert {k: v for k, v in watcher.invalid.snapshot().items() if v} == want
    assert watcher.stats["errors"] == 0 and watcher.stats["handler_errors"] == 0

    ctl = run_tool("controlplane.ctl", "-etcd-endpoints", etcd_plain.endpoint, "-etcd-prefix", PREFIX,
                   "leases", "--json")
    assert ctl.returncode == 0, ctl.stderr
    rows = {r["subnet"]: r for r in json.loads(ctl.stdout)}
    assert sorted(rows) == ["10.5.2.0/24", "10.5.3.0/24"]
    assert rows["10.5.2.0/24"]["subnet6"] == "fd10:244:0:2::/64"
    assert rows["10.5.2.0/24"]["public_ipv6"] == "2001:db8:198:18::2"
    assert rows["10.5.2.0/24"]["backend_v6_data"] == {"VNI": 1, "VtepMAC": MAC6}
    assert len([line for line in ctl.stderr.splitlines() if "invalid lease" in line]) == len(HOSTILE)
    table = run_tool("controlplane.ctl", "-etcd-endpoints", etcd_plain.endpoint, "-etcd-prefix", PREFIX,
                     "leases")
    head, first = table.stdout.splitlines()[:2]
    assert head.split() == ["SUBNET", "SUBNET6", "PUBLIC", "IP", "PUBLIC", "IPV6", "BACKEND", "EXPIRES"]
    assert first.split()[:5] == ["10.5.2.0/24", "fd10:244:0:2::/64", "198.18.0.2", "2001:db8:198:18::2", "vxlan"]


# -- weftd itself, in a network namespace of its own (vxlan/kernel builds devices there) ----------
def _sh(*args: str, ns: str | None = None, check: bool = True) -> str:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res.stdout


@pytest.fixture
def node_ns():
    """A namespace with eth0 (a veth whose peer is in it too) at 198.18.0.1/24 and 2001:db8:198:18::1/64, and an etcd
    inside it on 127.0.0.1 (weftd must not reach out of its namespace)."""
    name = f"cpds{os.getpid() % 100000}"
    _sh("ip", "netns", "add", name)
    server = None
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"],  # both ends here
                    ["addr", "add", "198.18.0.1/24", "dev", "eth0"],
                    ["addr", "add", "2001:db8:198:18::1/64", "dev", "eth0", "nodad"],
                    ["link", "set", "eth0p", "up"], ["link", "set", "eth0", "up"]):
            _sh("ip", "-n", name, *cmd)
        server = EtcdServer(name="weft-test-dualstack", netns=name, die_with_parent=True)
        yield name, server
    finally:
        if server is not None:
            server.stop()
        _sh("ip", "netns", "del", name, check=False)


class NsWeftd:
    """weftd in ``ns`` (its own process, stopped by its PID)."""

    def __init__(self, ns: str, server: EtcdServer, workdir: str, extra=()):
        self.ns, self.subnet_file = ns, os.path.join(workdir, "subnet.env")
        self.log = os.path.join(workdir, "weftd.log")
        self.argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "controlplane.daemon",
                     "-etcd-endpoints", server.endpoint, "-etcd-prefix", PREFIX, "-iface", "eth0",
                     "-subnet-file", self.subnet_file, "-healthz-ip", "127.0.0.1", "-healthz-port", "9899",
                     *extra]
        self.proc = None

    def start(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         env=dict(os.environ, PYTHONPATH=REPO))
        return self

    def invalid_leases(self) -> dict[str, float]:
        """weft_leases_invalid_total by reason, from /metrics (a daemon that does not answer fails)."""
        from bench.netns import http_get
        from bench.scale import by_label
        got = http_get(self.ns, "127.0.0.1", 9899, "/metrics", timeout=2)
        assert got is not None and got[0] == 200, f"/metrics: {got}: {self.tail()}"
        return by_label(got[1].decode(), "weft_leases_invalid_total", "reason")

    def ready(self) -> bool:
        from bench.netns import http_status
        return http_status(self.ns, "127.0.0.1", 9899, "/readyz") == 200

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"weftd exited {self.proc.returncode}: {self.tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        raise AssertionError(f"weftd not ready in {timeout} s: {self.tail()}")

    def tail(self) -> str:
        with open(self.log) as f:
            return f.read()[-3000:]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _mac(ns: str, dev: str) -> str:
    return json.loads(_sh("ip", "-j", "link", "show", dev, ns=ns))[0]["address"]


@needs_root
def test_weftd_dual_stack_lease_subnet_env_and_a_flanneld_peer(node_ns, tmp_path):
    """weftd (vxlan/kernel, EnableIPv6, -ip-masq) on etcd: its lease is flanneld's bytes with its
    devices' MACs, subnet.env has the IPv6 lines in flannel's order, masquerading covers both
    families, the MACs survive a restart, a
    flanneld-shaped peer lease is programmed on flannel-v6.1, and hostile writes are counted."""
    ns, server = node_ns
    server.etcdctl("put", f"{PREFIX}/config", DUAL)
    d = NsWeftd(ns, server, str(tmp_path), extra=["-ip-masq"]).start()
    try:
        d.wait_ready()
        (key, (value, _)), = etcd_get_all(server, f"{PREFIX}/subnets/").items()
        name = key[len(PREFIX + "/subnets/"):]
        m = FLANNEL_KEY_RE.match(name)
        assert m and m.group(3) is not None, name
        subnet, subnet6 = (ipaddress.IPv4Network(f"{m.group(1)}/{m.group(2)}"),
                           ipaddress.IPv6Network(f"{m.group(3)}/{m.group(4)}"))
        mac4, mac6 = _mac(ns, "flannel.1"), _mac(ns, "flannel-v6.1")
        assert mac4 != mac6
        assert value.decode() == ('{"PublicIP":"198.18.0.1","PublicIPv6":"2001:db8:198:18::1",'
                                  '"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"' + mac4 + '"},'
                                  '"BackendV6Data":{"VNI":1,"VtepMAC":"' + mac6 + '"}}')
        with open(d.subnet_file) as f:
            assert f.read() == (f"FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET={subnet.network_address + 1}/24\n"
                                f"FLANNEL_IPV6_NETWORK=fd10:244::/56\n"
                                f"FLANNEL_IPV6_SUBNET={subnet6.network_address + 1}/64\n"
                                f"FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
        # -ip-masq: flannel's rules for both families (ip6tables for IPv6Network)
        rules6 = [line for line in _sh("ip6tables", "-w", "5", "-t", "nat", "-S", "WEFT-POSTRTG", ns=ns)
                  .splitlines() if line.startswith("-A ")]
        assert len(rules6) == 6, rules6
        assert f"-s {subnet6} -d fd10:244::/56" in rules6[1]
        assert "-s fd10:244::/56 ! -d ff00::/8" in rules6[4] and "MASQUERADE" in rules6[4]
        rules4 = _sh("iptables", "-w", "5", "-t", "nat", "-S", "WEFT-POSTRTG", ns=ns)
        assert f"-s {subnet} -d 10.5.0.0/16" in rules4

        # a flanneld node's dual-stack lease, written with etcdctl
        peer6 = "fd10:244:0:c8::/64"
        server.etcdctl("put", f"{PREFIX}/subnets/10.5.200.0-24&fd10:244:0:c8::-64", "--", FLANNELD_VALUE)
        for hostile, (text, _) in HOSTILE.items():
            server.etcdctl("put", f"{PREFIX}/subnets/{hostile}", "--", text)
        deadline = time.monotonic() + 10
        routes = ""
        while time.monotonic() < deadline:
            routes = _sh("ip", "-6", "route", "show", "dev", "flannel-v6.1", ns=ns)
            if peer6 in routes:
                break
            time.sleep(0.1)
        assert f"{peer6} via fd10:244:0:c8:: " in routes and "onlink" in routes, routes
        fdb = _sh("bridge", "fdb", "show", "dev", "flannel-v6.1", ns=ns)
        assert f"{MAC6} dst 2001:db8:198:18::2" in fdb, fdb
        want: dict[str, int] = {}
        for _, reason in HOSTILE.values():
            want[reason] = want.get(reason, 0) + 1
        deadline = time.monotonic() + 5
        got = d.invalid_leases()
        while {k: v for k, v in got.items() if v} != want and time.monotonic() < deadline:
            time.sleep(0.2)
            got = d.invalid_leases()
        assert {k: v for k, v in got.items() if v} == want
        assert d.ready()  # nothing hostile stopped it

        # restart: the same key, and the same MACs in both BackendData parts (peers' entries stay)
        d.stop()
        d.start()
        d.wait_ready()
        after = etcd_get_all(server, f"{PREFIX}/subnets/")
        assert after[key][0] == value
    finally:
        d.stop()
        _sh("ip", "link", "del", "flannel.1", ns=ns, check=False)
        _sh("ip", "link", "del", "flannel-v6.1", ns=ns, check=False)
