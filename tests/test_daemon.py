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
