"""One running weftd per public IP: the node claim, with real weftd processes on SQLite and etcd.

A second daemon given a running node's public IP is refused (exit 1, one line) and touches
nothing; a restart of the same node (SIGTERM, kill -9, a reboot) keeps its lease at once; a claim
of another host is taken over only once it expired, and one its holder keeps refreshing is refused.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from controlplane.store import open_store

from .daemons import Weftd, run_tool
from .etcd_fixtures import etcd_plain, needs_etcd  # noqa: F401  (fixtures)

ALLOC = '{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}'
IP = "198.18.0.1"
SHORT_TTL = 3  # --claim-ttl of the tests that wait for a claim to expire


class Net:
    """A fresh network on one store: weftd's flags, and store clients for the test itself."""

    def __init__(self, kind: str, args: list[str], url: str, prefix: str, etcd=None):
        self.kind, self.args, self.url, self.prefix, self.etcd = kind, args, url, prefix, etcd

    def open(self):
        return open_store(self.url, prefix=self.prefix)


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=needs_etcd)])
def net(request, tmp_path):
    prefix = f"/weft-claim/{request.node.name.replace('[', '-').rstrip(']')}"
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path}/weft.db"
        n = Net("sqlite", ["--store", url, "-etcd-prefix", prefix], url, prefix)
    else:
        server = request.getfixturevalue("etcd_plain")
        server.etcdctl("del", "--prefix", prefix + "/")
        n = Net("etcd", ["-etcd-endpoints", server.endpoint, "-etcd-prefix", prefix],
                f"etcd://127.0.0.1:{server.client_port}", prefix, server)
    r = run_tool("controlplane.ctl", *n.args, "config", "put", "-", input=ALLOC)
    assert r.returncode == 0, r.stderr
    return n


def node(tmp_path, n: int, net: Net, ip: str = IP, extra=()) -> Weftd:
    """weftd number ``n`` (own subnet file, log and health port) with public IP ``ip``."""
    d = Weftd(str(tmp_path), n, net.args, extra=list(extra))
    d.argv[d.argv.index("-public-ip") + 1] = ip
    return d


def refusal_lines(d: Weftd) -> list[str]:
    return [l for l in d.log().splitlines() if l.strip()]


def lease_of(store, ip: str = IP):
    records, _ = store.list_leases()
    return [r for r in records if json.loads(r.value)["PublicIP"] == ip]


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def other_host(**over) -> str:
    """A claim value as a weftd on another machine writes it."""
    doc = {"instance": "0123456789abcdef", "hostname": "elsewhere", "machine_id": "f" * 32,
           "boot_id": "00000000-0000-0000-0000-000000000000", "pid_ns": "pid:[1]", "pid": 4242,
           "proc_start": 1, "started": "2026-01-01T00:00:00Z", "subnet_file": "/run/flannel/subnet.env"}
    doc.update(over)
    return json.dumps(doc, separators=(",", ":"))


def test_second_daemon_with_a_running_nodes_ip_is_refused(net, tmp_path):
    first, second = node(tmp_path, 1, net), node(tmp_path, 2, net)
    try:
        first.start().wait_ready()
        with net.open() as store:
            before = lease_of(store)
        assert len(before) == 1
        second.start()
        assert second.wait(20) == 1
        lines = refusal_lines(second)
        assert len(lines) == 1, lines
        assert f"public IP {IP} is already in use by a running weftd" in lines[0]
        assert f"pid {first.proc.pid}" in lines[0] and "-public-ip" in lines[0]
        assert not os.path.exists(second.subnet_file)
        with net.open() as store:
            after = lease_of(store)
        # Not re-put: same bytes, same revision (a renewal or reuse would bump it), same expiry.
        assert [(r.subnet, r.value, r.revision) for r in after] == \
            [(r.subnet, r.value, r.revision) for r in before]
        assert after[0].expiration == pytest.approx(before[0].expiration, abs=1.5)
        assert first.proc.poll() is None and first.ready()
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_restart_of_the_same_node_is_immediate(net, tmp_path, sig):
    """A claim TTL far longer than the restart: coming back must not wait for it."""
    d = node(tmp_path, 1, net, extra=["--claim-ttl", "120"])
    d.start()
    try:
        d.wait_ready()
        subnet = d.subnet()
        d.signal(sig)
        d.wait()
        with net.open() as store:
            claim = store.get_claim(IP)
        if sig == signal.SIGTERM:
            assert claim is None  # a clean stop releases it
        else:
            assert claim is not None and json.loads(claim.value)["pid"] == d.proc.pid
        d.start()
        d.wait_ready(15)
        assert d.subnet() == subnet
        with net.open() as store:
            assert json.loads(store.get_claim(IP).value)["pid"] == d.proc.pid
    finally:
        d.stop()


def test_claim_of_another_host_is_taken_once_it_expired(net, tmp_path):
    with net.open() as store:
        held = store.take_claim(IP, other_host(), SHORT_TTL, None)
    d = node(tmp_path, 1, net, extra=["--claim-ttl", str(SHORT_TTL)]).start()
    try:
        d.wait_ready(20)
        ready_at = time.time()
        assert ready_at >= held.expiration - 0.5, "ready before the other host's claim expired"
        assert "elsewhere" in d.log() and "waiting" in d.log()
        with net.open() as store:
            doc = json.loads(store.get_claim(IP).value)
        assert doc["pid"] == d.proc.pid and doc["hostname"] == socket.gethostname()
    finally:
        d.stop()


def test_claim_refreshed_by_a_live_holder_is_refused(net, tmp_path):
    stop = threading.Event()
    with net.open() as store:
        held = store.take_claim(IP, other_host(), SHORT_TTL, None)

        def keep_alive():
            rec = held
            while not stop.wait(SHORT_TTL / 3):
                rec = store.refresh_claim(IP, rec, SHORT_TTL)
        holder = threading.Thread(target=keep_alive, daemon=True)
        holder.start()
        d = node(tmp_path, 1, net, extra=["--claim-ttl", str(SHORT_TTL)]).start()
        try:
            assert d.wait(30) == 1
        finally:
            stop.set()
            holder.join()
            d.stop()
        lines = [l for l in refusal_lines(d) if " ERROR " in l]
        assert len(lines) == 1 and "already in use by a running weftd" in lines[0], d.log()
        assert "host elsewhere, pid 4242" in lines[0]
        assert lease_of(store) == []
        assert json.loads(store.get_claim(IP).value)["instance"] == "0123456789abcdef"


def test_reboot_of_this_machine_takes_the_claim_at_once(net, tmp_path):
    """Same machine-id and hostname, another boot: the holder died with the old boot."""
    machine_id = read_text("/etc/machine-id") or read_text("/var/lib/dbus/machine-id")
    if not machine_id:
        pytest.skip("no machine-id on this machine")
    with net.open() as store:
        store.take_claim(IP, other_host(hostname=socket.gethostname(), machine_id=machine_id), 120, None)
    d = node(tmp_path, 1, net, extra=["--claim-ttl", "120"]).start()
    try:
        d.wait_ready(15)
        with net.open() as store:
            assert json.loads(store.get_claim(IP).value)["pid"] == d.proc.pid
    finally:
        d.stop()


def test_two_newcomers_at_once_exactly_one_runs(net, tmp_path):
    a, b = node(tmp_path, 1, net), node(tmp_path, 2, net)
    try:
        a.start()
        b.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                (a.ready() or a.proc.poll() is not None) and (b.ready() or b.proc.poll() is not None)):
            time.sleep(0.05)
        states = sorted([("ready" if d.ready() else d.proc.poll()) for d in (a, b)], key=str)
        assert states == [1, "ready"], (states, a.log(), b.log())
        loser = a if a.proc.poll() is not None else b
        lines = refusal_lines(loser)
        assert len(lines) == 1 and "already in use by a running weftd" in lines[0], lines
        with net.open() as store:
            assert len(lease_of(store)) == 1
    finally:
        a.stop()
        b.stop()


def test_refresh_is_no_lease_event(net, tmp_path):
    """Claim refreshes (every second here) are invisible to lease watchers."""
    d = node(tmp_path, 1, net, extra=["--claim-ttl", str(SHORT_TTL)]).start()
    try:
        d.wait_ready()
        with net.open() as store:
            first = store.get_claim(IP)
            _, rev = store.list_leases()
            watch = store.watch(rev)
            try:
                events = watch.get(timeout=2.5)
            finally:
                watch.close()
            later = store.get_claim(IP)
        assert events == []
        assert later.revision != first.revision and later.expiration > first.expiration
        assert d.metric("weft_watch_resyncs_total") in (None, 0)
    finally:
        d.stop()


@needs_etcd
def test_flanneld_sees_only_its_keys(etcd_plain, tmp_path):
    """The lease JSON is flanneld's, byte for byte; the claim sits outside <prefix>/subnets
    (flanneld lists and watches that prefix without a trailing slash)."""
    prefix = "/weft-claim/flanneld"
    etcd_plain.etcdctl("del", "--prefix", prefix + "/")
    net = Net("etcd", ["-etcd-endpoints", etcd_plain.endpoint, "-etcd-prefix", prefix], "", prefix)
    assert run_tool("controlplane.ctl", *net.args, "config", "put", "-", input=ALLOC).returncode == 0
    d = node(tmp_path, 1, net).start()
    try:
        d.wait_ready()
        subnets = etcd_plain.etcdctl("get", "--prefix", f"{prefix}/subnets").splitlines()
        assert len(subnets) == 2 and subnets[0].startswith(f"{prefix}/subnets/10.5.")
        assert subnets[1] == '{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"alloc"}'
        keys = etcd_plain.etcdctl("get", "--prefix", prefix, "--keys-only").split()
        assert sorted(keys) == sorted([f"{prefix}/config", subnets[0], f"{prefix}/weft/claims/{IP}"])
        claim = json.loads(etcd_plain.etcdctl("get", f"{prefix}/weft/claims/{IP}", "--print-value-only"))
        assert claim["pid"] == d.proc.pid
    finally:
        d.stop()


def test_claim_lost_while_paused(net, tmp_path):
    """A daemon that could not refresh for longer than the TTL (paused here; a store outage is the
    same) takes its expired claim again; if another weftd took it meanwhile, it stops."""
    d = node(tmp_path, 1, net, extra=["--claim-ttl", str(SHORT_TTL)]).start()
    try:
        d.wait_ready()

        def pause_until_expired():
            d.signal(signal.SIGSTOP)
            deadline = time.monotonic() + 10
            with net.open() as store:
                while store.get_claim(IP) is not None and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert store.get_claim(IP) is None

        pause_until_expired()
        d.signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        with net.open() as store:
            while store.get_claim(IP) is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert json.loads(store.get_claim(IP).value)["pid"] == d.proc.pid
        assert d.ready() and "claimed it again" in d.log()

        pause_until_expired()
        with net.open() as store:
            store.take_claim(IP, other_host(), 30, None)
        d.signal(signal.SIGCONT)
        assert d.wait(15) == 1
        errors = [l for l in d.log().splitlines() if " ERROR " in l]
        assert len(errors) == 1 and "was claimed by another weftd (host elsewhere, pid 4242" in errors[0]
    finally:
        d.signal(signal.SIGCONT)
        d.stop()


# -- the rule itself, on real processes ------------------------------------------------------------
def test_judge():
    from dataclasses import replace

    from controlplane.claim import REFUSE, TAKE, WAIT, Holder, _proc_stat, judge, this_process
    me = this_process("/run/flannel/subnet.env")
    parent = replace(me, instance="x", pid=os.getppid(), proc_start=_proc_stat(os.getppid())[1])
    assert judge(parent, me) == REFUSE  # a live process of this kernel and pid namespace
    assert judge(replace(parent, proc_start=parent.proc_start + 1), me) == TAKE  # pid reused
    assert judge(replace(parent, pid_ns="pid:[1]"), me) == WAIT  # another container here
    rebooted = replace(parent, boot_id="another-boot")
    if me.machine_id:
        assert judge(rebooted, me) == TAKE
    assert judge(replace(rebooted, hostname="a-clone"), me) == WAIT  # a cloned machine-id
    assert judge(replace(rebooted, machine_id=""), me) == WAIT
    assert judge(Holder.from_json("not json"), me) == WAIT
    assert judge(Holder.from_json('{"boot_id": 5, "pid": "1"}'), me) == WAIT
    assert Holder.from_json(me.to_json()) == me


def test_a_zombie_or_reused_pid_is_not_alive():
    from controlplane.claim import _proc_stat, process_alive
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = _proc_stat(child.pid)[1]
    deadline = time.monotonic() + 10
    while _proc_stat(child.pid)[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _proc_stat(child.pid)[0] == "Z"  # exited, not yet reaped
    assert not process_alive(child.pid, start)
    child.wait()
    assert not process_alive(child.pid, start)
    assert process_alive(os.getpid(), _proc_stat(os.getpid())[1])
    assert not process_alive(os.getpid(), _proc_stat(os.getpid())[1] + 1)


def test_claim_ttl_too_short_is_one_line(tmp_path):
    r = run_tool("controlplane.daemon", "--store", f"sqlite://{tmp_path}/weft.db", "-iface", "lo",
                 "-subnet-file", f"{tmp_path}/e", "--claim-ttl", "2", timeout=20)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and lines == ["weftd: --claim-ttl 2: must be at least 3 seconds"], r.stderr


# -- IPv6-only nodes: every one has PublicIP 0.0.0.0, so the claim is keyed by the public IPv6 ------
def test_ipv6_only_claims_are_keyed_by_the_public_ipv6(net, tmp_path):
    """NodeClaim as weftd makes it on an IPv6-only network (public IP 0.0.0.0, the public IPv6
    beside it): two nodes with their own public IPv6 both run; a second claimant of one public
    IPv6 is refused in one line naming it; 0.0.0.0 is never a claim's key."""
    import ipaddress

    from controlplane.claim import NodeClaim, PublicIPInUse
    from controlplane.lease import NO_PUBLIC_IP
    a6, b6 = ipaddress.IPv6Address("2001:db8:198:18::1"), ipaddress.IPv6Address("2001:db8:198:18::2")
    store, stop = net.open(), threading.Event()
    env = str(tmp_path / "subnet.env")
    held = []
    try:
        for six in (a6, b6):
            claim = NodeClaim(store, NO_PUBLIC_IP, env, 30, public_ipv6=six)
            assert claim.acquire(stop)
            held.append(claim)
        assert store.get_claim("2001:db8:198:18::1") is not None
        assert store.get_claim("2001:db8:198:18::2") is not None
        assert store.get_claim("0.0.0.0") is None
        for second in (NodeClaim(store, NO_PUBLIC_IP, env, 30, public_ipv6=a6),
                       NodeClaim(store, a6, env, 30),  # the public IPv6 given as the address
                       NodeClaim(store, None, env, 30, public_ipv6="2001:DB8:198:18:0::1")):  # as text
            with pytest.raises(PublicIPInUse) as exc:
                second.acquire(stop)
            line = str(exc.value)
            assert "\n" not in line and line.startswith("public IPv6 2001:db8:198:18::1 is already in use")
            assert line.endswith("give this node its own -public-ipv6")
        with pytest.raises(ValueError, match="^no public address to claim: an IPv6-only node"):
            NodeClaim(store, NO_PUBLIC_IP, env, 30)
    finally:
        for claim in held:
            claim.release()
        store.close()
    check = net.open()
    try:
        assert check.get_claim("2001:db8:198:18::1") is None and check.get_claim("2001:db8:198:18::2") is None
    finally:
        check.close()


def test_dual_stack_claim_stays_keyed_by_the_public_ip(net, tmp_path):
    """With a PublicIP (IPv4 or dual-stack network) the public IPv6 beside it changes nothing."""
    import ipaddress

    from controlplane.claim import NodeClaim
    store, stop = net.open(), threading.Event()
    claim = NodeClaim(store, ipaddress.IPv4Address(IP), str(tmp_path / "e"), 30,
                      public_ipv6=ipaddress.IPv6Address("2001:db8:198:18::1"))
    try:
        assert claim.acquire(stop) and claim.public_ip == IP
        assert store.get_claim(IP) is not None and store.get_claim("2001:db8:198:18::1") is None
    finally:
        claim.release()
        store.close()
