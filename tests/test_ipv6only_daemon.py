"""weftd on IPv6-only networks (flannel's ``EnableIPv4: false``), end to end with real processes.

Every lease of such a network has flannel's empty IPv4 part (key ``0.0.0.0-0&<ip6>-<len>``,
``"PublicIP":"0.0.0.0"``), so nothing here may name a lease, a peer or a node by its IPv4 side:
these tests run several nodes at once and fail wherever that happens (every node sharing the
lease, peer or claim of 0.0.0.0).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import time

import pytest

from .daemons import Weftd, run_tool
from .etcd_fixtures import etcd_plain  # noqa: F401  (fixture)

NETWORK6 = ipaddress.IPv6Network("fd10:244::/56")
V6ONLY_ALLOC = ('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/56",'
                '"Backend":{"Type":"alloc"}}')
ENV_KEYS = ["FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ"]
KEY_RE = re.compile(r"^0\.0\.0\.0-0&([0-9a-f:]+)-64$")


@pytest.fixture(params=["sqlite", "etcd"])
def store_args(request, tmp_path):
    prefix = f"/weft-v6only/{request.node.name.replace('[', '-').rstrip(']')}"
    if request.param == "sqlite":
        return ["--store", f"sqlite://{tmp_path}/weft.db", "-etcd-prefix", prefix]
    server = request.getfixturevalue("etcd_plain")
    return ["-etcd-endpoints", server.endpoint, "-etcd-prefix", prefix]


def open_store(store_args):
    from controlplane import flags
    from controlplane.daemon import parse_args
    return flags.open_store_from_args(parse_args(store_args))


def put_config(store_args, text=V6ONLY_ALLOC):
    r = run_tool("controlplane.ctl", *store_args, "config", "put", "-", input=text)
    assert r.returncode == 0, r.stderr


def node(tmp_path, n, store_args, extra=()):
    """An alloc weftd on lo; -public-ip 198.18.0.n (Weftd's) is there to be ignored."""
    return Weftd(str(tmp_path), n, store_args, extra=["-public-ipv6", f"2001:db8:198:18::{n}", *extra])


def env_of(d: Weftd) -> tuple[list[str], dict[str, str]]:
    with open(d.subnet_file) as f:
        lines = f.read().splitlines()
    return [l.split("=", 1)[0] for l in lines], dict(l.split("=", 1) for l in lines)


def lease_rows(store_args) -> dict[str, tuple[str, str]]:
    """{PublicIPv6: (key name, value)} of the leases as stored (flanneld's bytes)."""
    store = open_store(store_args)
    try:
        records, _ = store.list_leases()
    finally:
        store.close()
    from controlplane.lease import subnet_key
    out = {}
    for r in records:
        out[json.loads(r.value)["PublicIPv6"]] = (subnet_key(r.subnet, r.subnet6), r.value)
    return out


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


def test_ipv6only_daemons(store_args, tmp_path):
    """Three weftd on an IPv6-only network: three distinct ``0.0.0.0-0&<v6>-64`` leases with
    flanneld's value, the IPv6-only subnet.env, each sees the two others as peers (metrics, log),
    a deleted lease is followed (the others drop it, its holder stops as revoked), and a restart
    finds its lease again, by PublicIPv6 or, its lease gone, by subnet.env."""
    from controlplane.lease import NO_IPV4
    put_config(store_args)
    nodes = [node(tmp_path, n, store_args) for n in (1, 2, 3)]
    try:
        for d in nodes:
            d.start()
        for d in nodes:
            d.wait_ready(30)
        rows = lease_rows(store_args)
        assert sorted(rows) == [f"2001:db8:198:18::{n}" for n in (1, 2, 3)], rows
        subnets = {}
        for n in (1, 2, 3):
            key, value = rows[f"2001:db8:198:18::{n}"]
            m = KEY_RE.match(key)
            assert m, key
            assert value == ('{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:198:18::%d",'
                             '"BackendType":"alloc"}' % n)
            subnets[n] = ipaddress.IPv6Network(f"{m.group(1)}/64")
            assert subnets[n].subnet_of(NETWORK6)
        assert len(set(subnets.values())) == 3
        for n, d in zip((1, 2, 3), nodes):
            keys, env = env_of(d)
            assert keys == ENV_KEYS, env
            assert env["FLANNEL_IPV6_NETWORK"] == str(NETWORK6)
            assert env["FLANNEL_IPV6_SUBNET"] == f"{subnets[n].network_address + 1}/64"
            assert env["FLANNEL_IPMASQ"] == "false"
        wait_for(lambda: [d.metric("weft_peers") for d in nodes] == [2, 2, 2], 10, "2 peers each")
        assert [d.metric("weft_backend_peers_programmed") for d in nodes] == [2, 2, 2]
        for n, d in zip((1, 2, 3), nodes):
            info = re.findall(r"^weft_lease_info\{(.*)\} 1\.0$", d.metrics_page(), re.M)
            assert len(info) == 1 and f'subnet6="{subnets[n]}"' in info[0] \
                and f'public_ipv6="2001:db8:198:18::{n}"' in info[0], info
            assert "0.0.0.0" not in info[0], info
            log = d.log()
            assert log.count("-public-ip 198.18.0.") == 1, log  # ignored, said once
            for m in (1, 2, 3):
                if m != n:
                    assert f"peer {subnets[m]} (2001:db8:198:18::{m}) added" in log, log
            assert f"lease {subnets[n]} on lo" in log, log

        # A deleted lease: its holder stops (revoked), the others follow.
        store = open_store(store_args)
        try:
            assert store.delete_lease(NO_IPV4, subnets[3])
        finally:
            store.close()
        assert nodes[2].wait(15) == 1
        assert f"lease {subnets[3]} was removed in the store: lease has been revoked" in nodes[2].log()
        wait_for(lambda: [d.metric("weft_peers") for d in nodes[:2]] == [1, 1], 10, "1 peer each")
        for d in nodes[:2]:
            assert f"peer {subnets[3]} (2001:db8:198:18::3) removed" in d.log()

        # kill -9 and restart without its subnet.env: the lease found by its PublicIPv6.
        _, before = env_of(nodes[1])
        nodes[1].signal(signal.SIGKILL)
        nodes[1].wait()
        os.unlink(nodes[1].subnet_file)
        nodes[1].start()
        nodes[1].wait_ready(30)
        assert env_of(nodes[1])[1] == before
        wait_for(lambda: nodes[1].metric("weft_peers") == 1, 10, "node 2 sees node 1 again")

        # Stopped, its lease deleted: a restart takes the IPv6 subnet subnet.env names.
        nodes[0].stop()
        store = open_store(store_args)
        try:
            assert store.delete_lease(NO_IPV4, subnets[1])
        finally:
            store.close()
        nodes[0].start()
        nodes[0].wait_ready(30)
        assert env_of(nodes[0])[1]["FLANNEL_IPV6_SUBNET"] == f"{subnets[1].network_address + 1}/64"
        assert lease_rows(store_args)["2001:db8:198:18::1"][0] == f"0.0.0.0-0&{subnets[1].network_address}-64"
    finally:
        for d in nodes:
            d.stop()


def one_error(r: subprocess.CompletedProcess) -> str:
    errors = [l for l in r.stderr.splitlines() if " ERROR " in l]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_ipv6only_needs_a_global_ipv6_one_line(tmp_path):
    """lo has only ::1 (not global) and no -public-ipv6: flanneld's message, status 1, no lease."""
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    put_config(args)
    r = run_tool("controlplane.daemon", *args, "-iface", "lo", "-subnet-file", f"{tmp_path}/e", timeout=20)
    assert r.returncode == 1
    assert ("failed to find IPv6 address for interface lo (an IPv6-only network (EnableIPv4 false) needs"
            " a global IPv6 address on it, or -public-ipv6)") in one_error(r), r.stderr
    assert lease_rows(args) == {} and not os.path.exists(f"{tmp_path}/e")


def test_claim_refuses_a_second_weftd_with_the_same_public_ipv6(tmp_path):
    """One running weftd per public IPv6 on an IPv6-only network (every node's PublicIP is
    0.0.0.0, so the IPv4 address cannot be what the claim is on)."""
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    put_config(args)
    first = node(tmp_path, 1, args).start()
    try:
        first.wait_ready(30)
        r = run_tool("controlplane.daemon", *args, "-iface", "lo", "-public-ip", "198.18.0.9",
                     "-public-ipv6", "2001:db8:198:18::1", "-subnet-file", f"{tmp_path}/second.env",
                     timeout=20)
        assert r.returncode == 1
        assert "2001:db8:198:18::1 is already in use by a running weftd" in one_error(r), r.stderr
        assert list(lease_rows(args)) == ["2001:db8:198:18::1"]
        assert first.ready()
    finally:
        first.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_ipv6only_in_a_namespace_without_ipv4(tmp_path):
    """An underlay interface with a global IPv6 address and no IPv4 at all, no -iface and no
    -public-ip(v6): weftd takes the interface of the IPv6 default route (there is no IPv4 one),
    the lease carries its address, and -ip-masq installs the IPv6 rules only."""
    ns = f"cpv6only{os.getpid() % 100000}"

    def sh(*argv, check=True):
        r = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=20)
        assert r.returncode == 0 or not check, r.stderr
        return r

    db = f"sqlite://{tmp_path}/weft.db"
    put_config(["--store", db])
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = None
    env_file = f"{tmp_path}/ns.env"
    try:
        sh("ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "under0", "type", "veth", "peer", "name", "under1")
        sh("ip", "-6", "addr", "add", "2001:db8:198:18::7/64", "dev", "under0", "nodad")
        sh("ip", "link", "set", "under1", "up")
        sh("ip", "link", "set", "under0", "up")
        sh("ip", "-6", "route", "add", "default", "via", "2001:db8:198:18::1", "dev", "under0")
        with open(f"{tmp_path}/ns.log", "wb") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, "env", f"PYTHONPATH={os.getcwd()}",
                                     __import__("sys").executable, "-m", "controlplane.daemon",
                                     "--store", db, "-ip-masq",  # no -iface: the IPv6 default route's
                                     "-subnet-file", env_file], stdout=log, stderr=subprocess.STDOUT,
                                    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

        def started():
            if proc.poll() is not None:
                with open(f"{tmp_path}/ns.log") as f:
                    raise AssertionError(f"weftd exited {proc.returncode}: {f.read()[-2000:]}")
            return os.path.exists(env_file)
        wait_for(started, 30, "subnet.env written")
        rows = lease_rows(["--store", db])
        assert list(rows) == ["2001:db8:198:18::7"], rows
        assert json.loads(rows["2001:db8:198:18::7"][1])["PublicIP"] == "0.0.0.0"
        with open(env_file) as f:
            env = dict(l.split("=", 1) for l in f.read().split())
        assert list(env) == ENV_KEYS, env
        subnet6 = ipaddress.IPv6Interface(env["FLANNEL_IPV6_SUBNET"]).network
        assert env["FLANNEL_IPMASQ"] == "true"
        if sh("which", "ip6tables", check=False).returncode == 0:
            rules = [l for l in sh("ip6tables", "-w", "5", "-t", "nat", "-S", "WEFT-POSTRTG").stdout.splitlines()
                     if l.startswith("-A")]
            assert len(rules) == 6 and f"-s {subnet6} -d {NETWORK6}" in rules[1], rules
            assert sh("iptables", "-w", "5", "-t", "nat", "-S", "WEFT-POSTRTG", check=False).returncode != 0
            assert "0.0.0.0/0" not in sh("iptables-save", "-t", "nat").stdout
        else:
            table = sh("nft", "list", "table", "ip6", "weft").stdout
            assert f"ip6 saddr {subnet6} ip6 daddr {NETWORK6} return" in table, table
            assert sh("nft", "list", "table", "ip", "weft", check=False).returncode != 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_ipv6only_peers_are_named_by_their_ipv6_subnet(tmp_path):
    """Every IPv6-only lease has the IPv4 part 0.0.0.0/0: weftd's peers, its own-lease test and
    its revocation go by ``Lease.ident`` (the IPv6 subnet), so two peers are two, one removed
    leaves the other, and only this node's own lease deleted is a revocation."""
    from controlplane.backends import ExternalInterface
    from controlplane.backends.alloc import AllocBackend
    from controlplane.config import parse_config
    from controlplane.daemon import Daemon, parse_args
    from controlplane.lease import NO_IPV4, NO_PUBLIC_IP, Lease, LeaseAttrs
    from controlplane.manager import LeaseEvent, LeaseWatcher
    from controlplane.store.sqlite import SQLiteStore
    config = parse_config(V6ONLY_ALLOC)
    d = Daemon(parse_args(["--store", f"sqlite://{tmp_path}/weft.db"]))
    store = SQLiteStore(str(tmp_path / "weft.db"))
    try:
        d.watcher = LeaseWatcher(store, d.on_lease_event, config=config)
        d.backend = AllocBackend(config, ExternalInterface("lo", 1, None, NO_PUBLIC_IP, 65536))

        def lease(n):
            attrs = LeaseAttrs(NO_PUBLIC_IP, "alloc", public_ipv6=ipaddress.IPv6Address(f"2001:db8::{n}"))
            return Lease(NO_IPV4, attrs, None, n, ipaddress.IPv6Network(f"fd10:244:0:{n}::/64"))
        d.lease = lease(1)
        d.on_lease_event(LeaseEvent("added", lease(2)))
        d.on_lease_event(LeaseEvent("added", lease(3)))
        assert sorted(map(str, d.peers)) == ["fd10:244:0:2::/64", "fd10:244:0:3::/64"]
        assert not d.stop.is_set()
        d.on_lease_event(LeaseEvent("removed", lease(2)))
        assert list(map(str, d.peers)) == ["fd10:244:0:3::/64"] and not d.stop.is_set()
        d.on_lease_event(LeaseEvent("removed", lease(1)))
        assert d.stop.is_set() and d.exit_code == 1  # this node's own lease: revoked
    finally:
        store.close()


def test_ipv6only_paused_past_the_lease_ttl_takes_its_lease_again(store_args, tmp_path):
    """A node paused past its TTL: the other drops it; on resume it takes the same IPv6 subnet
    again (its own lease, by ident: not revoked, not another node's), and is followed again."""
    put_config(store_args)
    a = node(tmp_path, 1, store_args, extra=["--lease-ttl", "3"]).start()
    b = node(tmp_path, 2, store_args, extra=["--lease-ttl", "3"]).start()
    try:
        a.wait_ready()
        b.wait_ready()
        _, before = env_of(a)
        wait_for(lambda: a.metric("weft_peers") == 1 and b.metric("weft_peers") == 1, 10, "peers")
        a.signal(signal.SIGSTOP)
        wait_for(lambda: b.metric("weft_peers") == 0, 15, "b dropped a")
        a.signal(signal.SIGCONT)
        wait_for(lambda: a.metric("weft_lease_reacquired_total") == 1, 10, "a took its lease again")
        wait_for(lambda: b.metric("weft_peers") == 1, 10, "b follows a again")
        assert a.proc.poll() is None and b.proc.poll() is None
        assert env_of(a)[1] == before and a.ready() and a.metric("weft_peers") == 1
        sub6 = ipaddress.IPv6Interface(before["FLANNEL_IPV6_SUBNET"]).network
        assert re.search(rf"WARNING .*lease {re.escape(str(sub6))} expired .*took it again", a.log()), a.log()
        assert "revoked" not in a.log()
    finally:
        a.signal(signal.SIGCONT)
        a.stop()
        b.stop()


def test_ipv6only_subnet_taken_while_paused_exits_naming_the_holder(tmp_path):
    """Paused past its TTL while another node took its IPv6 subnet: on resume weftd takes
    another one and exits 1 in one line naming the holder by its public IPv6 (not 0.0.0.0, and
    not some other IPv6-only lease: they all share the IPv4 part 0.0.0.0/0)."""
    from controlplane.lease import NO_IPV4
    from controlplane.store.base import LeaseExists
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    put_config(args)
    b = node(tmp_path, 2, args)
    a = node(tmp_path, 1, args, extra=["--lease-ttl", "3"])
    # node 2's lease listed first (the lowest IPv6 subnet): a holder found by the IPv4 part alone
    # would be node 2
    for d, sub6 in ((b, "fd10:244::1/64"), (a, "fd10:244:0:ff::1/64")):
        with open(d.subnet_file, "w") as f:
            f.write(f"FLANNEL_IPV6_NETWORK=fd10:244::/56\nFLANNEL_IPV6_SUBNET={sub6}\n")
    try:
        b.start().wait_ready()
        a.start().wait_ready()
        sub6 = ipaddress.IPv6Interface(env_of(a)[1]["FLANNEL_IPV6_SUBNET"]).network
        assert str(sub6) == "fd10:244:0:ff::/64"
        a.signal(signal.SIGSTOP)
        value = '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:198:18::9","BackendType":"alloc"}'

        def taken():
            store = open_store(args)
            try:
                store.create_lease(NO_IPV4, value, 60, sub6)
                return True
            except LeaseExists:  # still a live lease of node 1: not expired yet
                return False
            finally:
                store.close()
        wait_for(taken, 15, "node 1's lease expired and taken by ::9")
        a.signal(signal.SIGCONT)
        assert a.wait(15) == 1
        errors = [l for l in a.log().splitlines() if " ERROR " in l]
        assert len(errors) == 1, a.log()
        assert f"lease {sub6} expired" in errors[0] and "a lease of 2001:db8:198:18::9 holds that subnet" \
            in errors[0], errors[0]
        assert b.proc.poll() is None
    finally:
        a.signal(signal.SIGCONT)
        a.stop()
        b.stop()
