"""weftd end to end on real stores: many daemons at once, restarts, revocation, flags, bad config."""
from __future__ import annotations

import signal
import time

import pytest

from .daemons import Weftd, run_tool
from .etcd_fixtures import etcd_pki, etcd_plain, etcd_tls  # noqa: F401  (fixtures)

ALLOC = '{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}'
STORES = ["sqlite", "etcd", "etcd-tls"]


@pytest.fixture(params=STORES)
def store_args(request, tmp_path):
    """weftd/weftctl flags for a fresh network on each kind of store."""
    prefix = f"/weft-daemon/{request.node.name.replace('[', '-').rstrip(']')}"
    if request.param == "sqlite":
        return ["--store", f"sqlite://{tmp_path}/weft.db", "-etcd-prefix", prefix]
    server = request.getfixturevalue("etcd_tls" if request.param == "etcd-tls" else "etcd_plain")
    args = ["-etcd-endpoints", server.endpoint, "-etcd-prefix", prefix]
    if server.tls:
        args += ["-etcd-cafile", server.pki["ca"], "-etcd-certfile", server.pki["client"],
                 "-etcd-keyfile", server.pki["client_key"]]
    return args


def put_config(store_args, text=ALLOC):
    r = run_tool("controlplane.ctl", *store_args, "config", "put", "-", input=text)
    assert r.returncode == 0, r.stderr


def test_ten_daemons_at_once(store_args, tmp_path):
    put_config(store_args)
    nodes = [Weftd(str(tmp_path), n, store_args) for n in range(1, 11)]
    try:
        for d in nodes:  # all started within a few ms of each other
            d.start()
        last_ready = max(d.wait_ready(30) for d in nodes)
        deadline = last_ready + 2.0
        while time.monotonic() < deadline:
            if all(d.metric("weft_peers") == 9 for d in nodes):
                break
            time.sleep(0.05)
        peers = [d.metric("weft_peers") for d in nodes]
        assert peers == [9] * 10, f"weft_peers 2 s after the last daemon was ready: {peers}"
        subnets = [d.subnet() for d in nodes]
        assert len(set(subnets)) == 10

        # SIGKILL one and restart it: same subnet, and the others still count 9 peers.
        victim = nodes[3]
        victim.signal(signal.SIGKILL)
        victim.wait()
        victim.start()
        victim.wait_ready(20)
        assert victim.subnet() == subnets[3]
        time.sleep(0.5)
        assert victim.metric("weft_peers") == 9
        assert all(d.metric("weft_peers") == 9 for d in nodes)
    finally:
        for d in nodes:
            d.stop()


def test_sigterm_keeps_lease_and_revocation_stops_daemon(store_args, tmp_path):
    put_config(store_args)
    d = Weftd(str(tmp_path), 1, store_args).start()
    try:
        d.wait_ready()
        subnet = d.subnet()
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        leases = run_tool("controlplane.ctl", *store_args, "leases").stdout
        assert subnet.replace(".1/", ".0/") in leases and "198.18.0.1" in leases

        d.start()
        d.wait_ready()
        assert d.subnet() == subnet
        r = run_tool("controlplane.ctl", *store_args, "release", subnet.replace(".1/", ".0/"))
        assert r.returncode == 0, r.stderr
        assert d.wait(10) == 1  # noticed by the watch, well before any renewal
        assert "lease has been revoked" in d.log()
    finally:
        d.stop()


def test_short_ttl_is_renewed(tmp_path):
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    put_config(args)
    d = Weftd(str(tmp_path), 1, args, extra=["--lease-ttl", "3"]).start()
    try:
        d.wait_ready()
        time.sleep(4)
        assert d.metric("weft_lease_renewals_total") >= 1
        assert d.metric("weft_lease_expiration_timestamp_seconds") > time.time()
        assert d.ready()
    finally:
        d.stop()


def test_flanneld_env_and_single_dash_flags(tmp_path):
    """FLANNELD_* variables and Go-style flags, as a flanneld unit file would pass them. Every value
    differs from the default, so each one shows that it was read: the config exists only under
    the variable's prefix, and the lease lives 600 s instead of a day."""
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    put_config(args + ["-etcd-prefix", "/weft-env/network"], '{"Network":"10.7.0.0/16","Backend":{"Type":"alloc"}}')
    d = Weftd(str(tmp_path), 2, args, env={"FLANNELD_ETCD_PREFIX": "/weft-env/network",
                                           "FLANNELD_LEASE_TTL": "600",
                                           "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "5"})
    d.argv = [a.replace("-subnet-file", "-subnet-file=" + d.subnet_file) if a == "-subnet-file" else a
              for a in d.argv]
    d.argv.remove(d.subnet_file)
    d.start()
    try:
        d.wait_ready()
        with open(d.subnet_file) as f:
            env = f.read()
        assert env.startswith("FLANNEL_NETWORK=10.7.0.0/16\nFLANNEL_SUBNET=10.7.")
        assert env.endswith("FLANNEL_MTU=65536\nFLANNEL_IPMASQ=false\n")
        expires = d.metric("weft_lease_expiration_timestamp_seconds")
        assert time.time() < expires <= time.time() + 600, expires - time.time()
        assert d.metric("weft_lease_renewals_total") == 0  # 5 min margin of a 10 min lease: not yet
    finally:
        d.stop()


@pytest.mark.parametrize("env,message", [
    ({"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "0"}, "-subnet-lease-renew-margin 0: must be 1..1439"),
    ({"FLANNELD_IP_MASQ": "maybe"}, "FLANNELD_IP_MASQ='maybe': not a boolean"),
    ({"FLANNELD_LEASE_TTL": "x"}, "FLANNELD_LEASE_TTL='x': not a valid int"),
])
def test_bad_flanneld_env_one_line(tmp_path, env, message):
    """A variable is read, not ignored: a bad value is refused in one line naming it."""
    r = run_tool("controlplane.daemon", "--store", f"sqlite://{tmp_path}/weft.db", "-iface", "lo",
                 "-subnet-file", f"{tmp_path}/e", env=env, timeout=20)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_metric_of_a_dead_daemon_is_an_error_not_a_missing_metric(tmp_path):
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    put_config(args)
    d = Weftd(str(tmp_path), 1, args).start()
    try:
        d.wait_ready()
        assert d.metric("weft_ready") == 1
        assert d.metric("weft_no_such_metric") is None  # answered, and the page lacks it
        d.signal(signal.SIGKILL)
        d.wait()
        with pytest.raises(AssertionError, match="weftd 1 is not running"):
            d.metric("weft_ready")
    finally:
        d.stop()


@pytest.mark.parametrize("argv,message", [
    (["-subnet-lease-renew-margin", "0"], "-subnet-lease-renew-margin 0: must be 1..1439"),
    (["-ip-masq=maybe"], "'maybe' is not a boolean"),
    (["--healthz-port", "x"], "invalid int value: 'x'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--store", "mysql://x"], "unknown store"),
    (["--dataplane", "python"], "--dataplane: vxlan has no 'python' data plane"),
])
def test_bad_flags_one_line(tmp_path, argv, message):
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    put_config(args, '{"Network":"10.5.0.0/16"}')
    if "--store" in argv:
        args = []
    r = run_tool("controlplane.daemon", *args, "-iface", "lo", "-subnet-file", f"{tmp_path}/e", *argv,
                 timeout=20)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_bad_config_in_store_is_fatal_one_line(tmp_path):
    from controlplane.store.sqlite import SQLiteStore
    SQLiteStore(str(tmp_path / "weft.db")).put_config('{"Network":"10.5.0.0/16","SubnetLen":40}')
    r = run_tool("controlplane.daemon", "--store", f"sqlite://{tmp_path}/weft.db", "-iface", "lo",
                 "-subnet-file", f"{tmp_path}/e", timeout=20)
    assert r.returncode == 1
    errors = [l for l in r.stderr.splitlines() if " ERROR " in l]
    assert len(errors) == 1 and "SubnetLen: 40 is too long" in errors[0]


def test_notifies_systemd_when_ready(tmp_path):
    """Type=notify units (flanneld's, and weft's shipped one) wait for READY=1."""
    import socket as so
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    put_config(args)
    path = str(tmp_path / "notify.sock")
    sock = so.socket(so.AF_UNIX, so.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    d = Weftd(str(tmp_path), 1, args, env={"NOTIFY_SOCKET": path}).start()
    try:
        assert sock.recv(100) == b"READY=1"
        assert d.ready()
    finally:
        d.stop()
        sock.close()


def test_source_guard_is_refused_where_it_cannot_work(tmp_path):
    """--source-guard is vxlan/kernel's and host-gw/kernel's opt-in: on a backend that has no
    guard (alloc) weftd refuses it in one line instead of running unguarded."""
    store_args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    put_config(store_args, '{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}')
    d = Weftd(str(tmp_path), 1, store_args, extra=["--source-guard"]).start()
    assert d.wait(20) == 1
    errors = [l for l in d.log().splitlines() if " ERROR " in l]
    assert len(errors) == 1 and "--source-guard: not available on alloc/kernel" in errors[0], d.log()


# -- dual-stack (EnableIPv6) ---------------------------------------------------------------------
DUAL_ALLOC = ('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56",'
              '"Backend":{"Type":"alloc"}}')


def test_dual_stack_daemons(store_args, tmp_path):
    """Three weftd with EnableIPv6 (alloc: leases only, so -iface lo serves): each gets both an
    IPv4 and an IPv6 subnet, subnet.env has flannel's IPv6 lines in flannel's order, each follows
    the others, and a restart keeps both subnets."""
    import ipaddress
    put_config(store_args, DUAL_ALLOC)
    nodes = [Weftd(str(tmp_path), n, store_args, extra=["-public-ipv6", f"2001:db8:198:18::{n}"])
             for n in (1, 2, 3)]
    try:
        for d in nodes:
            d.start()
        for d in nodes:
            d.wait_ready(30)
        envs = []
        for d in nodes:
            with open(d.subnet_file) as f:
                text = f.read()
            keys = [line.split("=", 1)[0] for line in text.splitlines()]
            assert keys == ["FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET",
                            "FLANNEL_MTU", "FLANNEL_IPMASQ"], text
            env = dict(line.split("=", 1) for line in text.splitlines())
            assert env["FLANNEL_IPV6_NETWORK"] == "fd10:244::/56"
            sub6 = ipaddress.IPv6Interface(env["FLANNEL_IPV6_SUBNET"])
            assert sub6.network.prefixlen == 64 and sub6.ip == sub6.network.network_address + 1
            assert sub6.network.subnet_of(ipaddress.IPv6Network("fd10:244::/56"))
            envs.append(env)
        assert len({e["FLANNEL_IPV6_SUBNET"] for e in envs}) == 3
        assert len({e["FLANNEL_SUBNET"] for e in envs}) == 3
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(d.metric("weft_peers") == 2 for d in nodes):
            time.sleep(0.1)
        assert [d.metric("weft_peers") for d in nodes] == [2, 2, 2]
        nodes[1].signal(signal.SIGKILL)
        nodes[1].wait()
        nodes[1].start()
        nodes[1].wait_ready(30)
        with open(nodes[1].subnet_file) as f:
            again = dict(line.split("=", 1) for line in f.read().splitlines())
        assert again == envs[1]
        ctl = run_tool("controlplane.ctl", *store_args, "leases", "--json")
        rows = {r["public_ip"]: r for r in __import__("json").loads(ctl.stdout)}
        assert rows["198.18.0.2"]["subnet6"] == str(ipaddress.IPv6Interface(envs[1]["FLANNEL_IPV6_SUBNET"]).network)
        assert rows["198.18.0.2"]["public_ipv6"] == "2001:db8:198:18::2"
    finally:
        for d in nodes:
            d.stop()


@pytest.mark.parametrize("extra,env,message", [
    ([], {}, "failed to find IPv6 address for interface lo (EnableIPv6 needs a global IPv6 address on it,"
             " or -public-ipv6)"),
    (["-public-ipv6", "banana"], {}, "-public-ipv6 'banana': not an IPv6 address"),
    (["-public-ipv6", "198.18.0.1"], {}, "-public-ipv6 '198.18.0.1': not an IPv6 address"),
    (["-public-ipv6", "2001:db8::1%lo"], {}, "-public-ipv6 '2001:db8::1%lo': not an IPv6 address"),
    ([], {"FLANNELD_PUBLIC_IPV6": "fe80::1"}, "-public-ipv6 fe80::1: a link-local address cannot be"),
    (["--public-ipv6=ff02::1"], {}, "-public-ipv6 ff02::1: a multicast address cannot be"),
])
def test_dual_stack_needs_a_public_ipv6_one_line(tmp_path, extra, env, message):
    """flanneld's "failed to find IPv6 address for interface": lo has only ::1 (not global)."""
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    put_config(args, DUAL_ALLOC)
    r = run_tool("controlplane.daemon", *args, "-iface", "lo", "-public-ip", "198.18.0.1",
                 "-subnet-file", f"{tmp_path}/e", *extra, env=env, timeout=20)
    assert r.returncode == 1
    errors = [l for l in r.stderr.splitlines() if " ERROR " in l]
    assert len(errors) == 1 and message in errors[0], r.stderr


def test_public_ipv6_is_ignored_without_enable_ipv6(tmp_path):
    """As flanneld: -public-ipv6 on an IPv4-only network changes nothing (no PublicIPv6 in the
    lease, subnet.env and the lease value exactly as before)."""
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    put_config(args)
    d = Weftd(str(tmp_path), 1, args, extra=["-public-ipv6", "2001:db8:198:18::1"]).start()
    try:
        d.wait_ready()
        with open(d.subnet_file) as f:
            assert "IPV6" not in f.read()
        from controlplane.store.sqlite import SQLiteStore
        (rec,), _ = SQLiteStore(str(tmp_path / "weft.db")).list_leases()
        assert rec.subnet6 is None and rec.value == '{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"alloc"}'
    finally:
        d.stop()


def test_udp_with_enable_ipv6_is_fatal_one_line(tmp_path):
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    from controlplane.store.sqlite import SQLiteStore
    SQLiteStore(str(tmp_path / "weft.db")).put_config(
        '{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56","Backend":{"Type":"udp"}}')
    r = run_tool("controlplane.daemon", *args, "-iface", "lo", "-subnet-file", f"{tmp_path}/e", timeout=20)
    assert r.returncode == 1
    errors = [l for l in r.stderr.splitlines() if " ERROR " in l]
    assert len(errors) == 1 and ("EnableIPv6: udp/fastpath carries IPv4 only (flannel's udp wire format has"
                                 " no IPv6); use vxlan or host-gw") in errors[0], r.stderr


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="needs root (network namespaces)")
@pytest.mark.parametrize("tool", ["iptables", "nft"])
def test_ipv6_masquerade_rules(tool):
    """-ip-masq on a dual-stack network: flannel's six rules for IPv6Network (multicast ff00::/8),
    with ip6tables or in the nft table ``ip6 weft``; put back when flushed, removed whole, and
    the IPv4 rules beside them untouched."""
    import os
    import subprocess
    from .nsagent import Agent
    ns = f"cpmasq{os.getpid() % 100000}{tool[0]}"

    def sh(*argv):
        r = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def saved(cmd):  # iptables-save without its timestamped comments and packet counters
        return "\n".join(l.split(" [")[0] for l in sh(cmd, "-t", "nat").splitlines() if not l.startswith("#"))

    def ruleset():
        return saved("ip6tables-save") if tool == "iptables" else sh("nft", "list", "ruleset")

    subprocess.run(["ip", "netns", "add", ns], check=True)
    agent = Agent(ns)
    try:
        agent.masq("m4", tool, 4)
        agent.masq("m6", tool, 6)
        agent.call("m4", "setup", "10.244.0.0/16", "10.244.1.0/24")
        four = saved("iptables-save") if tool == "iptables" else sh("nft", "list", "table", "ip", "weft")
        agent.call("m6", "setup", "fd10:244::/56", "fd10:244:0:1::/64")
        once = ruleset()
        agent.call("m6", "setup", "fd10:244::/56", "fd10:244:0:1::/64")
        assert ruleset() == once  # rewritten whole, not appended
        if tool == "iptables":
            rules = [l for l in sh("ip6tables", "-w", "5", "-t", "nat", "-S", "WEFT-POSTRTG").splitlines()
                     if l.startswith("-A")]
            assert len(rules) == 6
            assert "--mark 0x4000/0x4000" in rules[0]
            assert "-s fd10:244:0:1::/64 -d fd10:244::/56" in rules[1]
            assert "! -s fd10:244::/56 -d fd10:244:0:1::/64" in rules[3]
            assert "-s fd10:244::/56 ! -d ff00::/8" in rules[4] and "MASQUERADE" in rules[4]
            assert "-j WEFT-POSTRTG" in sh("ip6tables", "-w", "5", "-t", "nat", "-S", "POSTROUTING")
            sh("ip6tables", "-w", "5", "-t", "nat", "-D", "WEFT-POSTRTG", "3")
        else:
            table = sh("nft", "list", "table", "ip6", "weft")
            assert "ip6 saddr != fd10:244::/56 ip6 daddr fd10:244:0:1::/64 return" in table
            assert "ip6 daddr != ff00::/8 masquerade" in table and "jump WEFT-POSTRTG" in table
            sh("nft", "flush", "chain", "ip6", "weft", "WEFT-POSTRTG")
        assert agent.call("m6", "ensure") is True
        assert ruleset() == once
        assert agent.call("m6", "ensure") is False
        agent.call("m6", "teardown")
        assert "fd10:244" not in ruleset()
        assert (saved("iptables-save") if tool == "iptables"
                else sh("nft", "list", "table", "ip", "weft")) == four  # the IPv4 rules stay
    finally:
        agent.stop()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_a_peer_lease_with_this_nodes_ipv6_subnet_is_never_a_peer(tmp_path):
    """The race the watch cannot settle (another key named this node's IPv6 subnet before this
    node's lease was known): weftd counts it as own_subnet and programs no peer for it."""
    import ipaddress
    from controlplane.backends import ExternalInterface
    from controlplane.backends.alloc import AllocBackend
    from controlplane.config import parse_config
    from controlplane.daemon import Daemon, parse_args
    from controlplane.lease import Lease, LeaseAttrs
    from controlplane.manager import LeaseEvent, LeaseWatcher
    from controlplane.store.sqlite import SQLiteStore
    config = parse_config(DUAL_ALLOC)
    d = Daemon(parse_args(["--store", f"sqlite://{tmp_path}/weft.db"]))
    store = SQLiteStore(str(tmp_path / "weft.db"))
    try:
        d.watcher = LeaseWatcher(store, d.on_lease_event, config=config)
        d.backend = AllocBackend(config, ExternalInterface("lo", 1, None, ipaddress.IPv4Address("198.18.0.1"), 65536))
        six = ipaddress.IPv6Network("fd10:244:0:7::/64")
        attrs = lambda n: LeaseAttrs(ipaddress.IPv4Address(f"198.18.0.{n}"), "alloc",
                                     public_ipv6=ipaddress.IPv6Address(f"2001:db8::{n}"))
        d.lease = Lease(ipaddress.IPv4Network("10.5.1.0/24"), attrs(1), None, 1, six)
        d.on_lease_event(LeaseEvent("added", Lease(ipaddress.IPv4Network("10.5.2.0/24"), attrs(2), None, 2, six)))
        assert d.peers == {} and d.backend.peers == {}
        assert d.watcher.invalid.snapshot()["own_subnet"] == 1
        other = Lease(ipaddress.IPv4Network("10.5.3.0/24"), attrs(3), None, 3, ipaddress.IPv6Network("fd10:244:0:8::/64"))
        d.on_lease_event(LeaseEvent("added", other))
        assert list(d.peers) == [other.subnet]  # a peer with an IPv6 subnet of its own is one
    finally:
        store.close()
