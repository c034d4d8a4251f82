"""weftctl: config, leases, reservations and docker-opts, as an operator uses them."""
from __future__ import annotations

import ipaddress
import json
import os

import pytest

from controlplane.lease import LeaseAttrs
from controlplane.store.sqlite import SQLiteStore

from .daemons import run_tool


@pytest.fixture
def args(tmp_path):
    return ["--store", f"sqlite://{tmp_path}/weft.db", "-etcd-prefix", "/test/net"]


def ctl(args, *more, input=None):
    return run_tool("controlplane.ctl", *args, *more, input=input)


def test_config_put_get(args, tmp_path):
    f = tmp_path / "net.json"
    f.write_text('{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}\n')
    assert ctl(args, "config", "put", str(f)).returncode == 0
    r = ctl(args, "config", "get")
    assert r.returncode == 0 and json.loads(r.stdout)["Backend"]["Type"] == "host-gw"


def test_config_put_rejects_bad_config(args):
    r = ctl(args, "config", "put", "-", input='{"Network":"10.5.0.0/16","SubnetMin":"10.9.0.0"}')
    assert r.returncode == 1
    assert r.stderr.strip() == "weftctl: SubnetMin: 10.9.0.0 is outside Network 10.5.0.0/16"
    r = ctl(args, "config", "get")
    assert r.returncode == 1 and "no config at /test/net/config" in r.stderr


def test_leases_reserve_release(args, tmp_path):
    ctl(args, "config", "put", "-", input='{"Network":"10.5.0.0/16"}')
    store = SQLiteStore(str(tmp_path / "weft.db"), prefix="/test/net")
    store.create_lease(ipaddress.IPv4Network("10.5.9.0/24"),
                       LeaseAttrs(ipaddress.IPv4Address("198.18.0.9"), "vxlan",
                                  {"VNI": 1, "VtepMAC": "5e:bb:b4:14:2b:45"}).to_json(), ttl=3600)
    store.close()
    r = ctl(args, "reserve", "10.5.3.0/24", "--public-ip", "198.18.0.3")
    assert r.returncode == 0 and "reserved 10.5.3.0/24 for 198.18.0.3" in r.stdout
    table = ctl(args, "leases").stdout.splitlines()
    assert table[0].split() == ["SUBNET", "PUBLIC", "IP", "BACKEND", "EXPIRES"]
    assert "never (reservation)" in table[1] and table[1].startswith("10.5.3.0/24")
    assert table[2].startswith("10.5.9.0/24") and "vxlan" in table[2] and "(in 0h59m)" in table[2]
    leases = json.loads(ctl(args, "leases", "--json").stdout)
    assert [l["subnet"] for l in leases] == ["10.5.3.0/24", "10.5.9.0/24"]
    assert leases[1]["backend_data"] == {"VNI": 1, "VtepMAC": "5e:bb:b4:14:2b:45"}
    assert leases[0]["reservation"] is True and leases[1]["reservation"] is False

    # A node's own lease becomes a reservation; someone else's cannot be reserved.
    r = ctl(args, "reserve", "10.5.9.0/24", "--public-ip", "198.18.0.7")
    assert r.returncode == 1 and "is held by 198.18.0.9" in r.stderr
    assert ctl(args, "reserve", "10.5.9.0/24", "--public-ip", "198.18.0.9").returncode == 0
    assert json.loads(ctl(args, "leases", "--json").stdout)[1]["reservation"] is True
    r = ctl(args, "reserve", "10.6.0.0/24", "--public-ip", "198.18.0.9")
    assert r.returncode == 1 and "not a subnet of the configured network" in r.stderr
    r = ctl(args, "reserve", "10.5.3.1/24", "--public-ip", "198.18.0.9")
    assert r.returncode == 2 and "not an IPv4 subnet" in r.stderr

    assert ctl(args, "release", "10.5.3.0/24").returncode == 0
    r = ctl(args, "release", "10.5.3.0/24")
    assert r.returncode == 1 and "no lease or reservation for 10.5.3.0/24" in r.stderr


def test_docker_opts(tmp_path):
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\nFLANNEL_MTU=1450\n"
                   "FLANNEL_IPMASQ=true\n")
    out = tmp_path / "docker_opts.env"
    r = run_tool("controlplane.ctl", "docker-opts", "-f", str(env), "-d", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_text() == ('DOCKER_OPT_BIP="--bip=10.5.52.1/24"\n'
                               'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
                               'DOCKER_OPT_MTU="--mtu=1450"\n'
                               'DOCKER_OPTS="--bip=10.5.52.1/24 --ip-masq=false --mtu=1450"\n')
    r = run_tool("controlplane.ctl", "docker-opts", "-f", str(env), "-d", "-", "-c", "-m", "-k", "OPTS")
    assert r.stdout == 'OPTS="--bip=10.5.52.1/24 --mtu=1450"\n'
    r = run_tool("controlplane.ctl", "docker-opts", "-f", str(tmp_path / "none.env"), "-d", "-")
    assert r.returncode == 1 and "missing or empty" in r.stderr


@pytest.mark.parametrize("command", [["leases"], ["leases", "--json"], ["config", "get"],
                                     ["release", "10.5.3.0/24"]])
@pytest.mark.parametrize("where", ["no/such/dir/x.db", "x.db"])
def test_commands_that_read_refuse_a_missing_store(tmp_path, command, where):
    """A typo in --store must not read as "no leases", nor leave files or directories behind."""
    url = f"sqlite://{tmp_path}/{where}"
    r = ctl(["--store", url], *command)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [f"weftctl: store {url}: no such file (nothing to read; check --store)"]
    assert os.listdir(tmp_path) == []


def test_commands_that_write_create_the_file_only_in_an_existing_directory(tmp_path):
    url = f"sqlite://{tmp_path}/no/such/dir/x.db"
    r = ctl(["--store", url], "config", "put", "-", input='{"Network":"10.5.0.0/16"}')
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"weftctl: store {url}: directory {tmp_path}/no/such/dir does not"
                                     " exist (check --store)"]
    assert os.listdir(tmp_path) == []
    r = ctl(["--store", url], "reserve", "10.5.3.0/24", "--public-ip", "198.18.0.3")
    assert r.returncode == 1 and "does not exist" in r.stderr and os.listdir(tmp_path) == []
    url = f"sqlite://{tmp_path}/x.db"
    assert ctl(["--store", url], "config", "put", "-", input='{"Network":"10.5.0.0/16"}').returncode == 0
    assert ctl(["--store", url], "config", "get").stdout.strip() == '{"Network":"10.5.0.0/16"}'


def test_leases_names_the_ones_daemons_ignore(args, tmp_path):
    """``weftctl leases`` shows what weftd follows; every lease it would refuse is named on stderr
    with the reason weftd counts it under."""
    ctl(args, "config", "put", "-", input='{"Network":"10.5.0.0/16"}')
    store = SQLiteStore(str(tmp_path / "weft.db"), prefix="/test/net")
    good = LeaseAttrs(ipaddress.IPv4Address("198.18.0.9"), "udp").to_json()
    store.create_lease(ipaddress.IPv4Network("10.5.9.0/24"), good, ttl=3600)
    store.create_lease(ipaddress.IPv4Network("10.99.0.0/24"), good, ttl=3600)
    store.create_lease(ipaddress.IPv4Network("10.5.10.0/24"), "nope", ttl=3600)
    store.close()
    r = ctl(args, "leases")
    assert r.returncode == 0
    assert [l.split()[0] for l in r.stdout.splitlines()[1:]] == ["10.5.9.0/24"]
    assert r.stderr.splitlines() == [
        "weftctl: invalid lease subnets/10.5.10.0-24 (not_json): lease value is not JSON"
        " (Expecting value: line 1 column 1 (char 0)); weftd ignores it",
        "weftctl: invalid lease subnets/10.99.0.0-24 (outside_network): 10.99.0.0/24 is outside"
        " Network 10.5.0.0/16; weftd ignores it"]


def test_dual_stack_reserve_release_and_leases(args, tmp_path):
    """On a dual-stack network a reservation holds both subnets (one key); the acquisition of its
    public IP then reuses it. release takes the IPv4 subnet, whatever IPv6 part the key has."""
    dual = '{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd10:244::/56","Backend":{"Type":"alloc"}}'
    assert ctl(args, "config", "put", "-", input=dual).returncode == 0
    r = ctl(args, "reserve", "10.5.3.0/24", "--public-ip", "198.18.0.3")
    assert r.returncode == 1 and "the network is dual-stack (EnableIPv6): give its IPv6 subnet too" in r.stderr
    r = ctl(args, "reserve", "10.5.3.0/24", "--public-ip", "198.18.0.3", "--subnet6", "fd99::/64")
    assert r.returncode == 1 and "--subnet6 fd99::/64 is not a subnet of the configured IPv6Network" in r.stderr
    r = ctl(args, "reserve", "10.5.3.0/24", "--public-ip", "198.18.0.3", "--subnet6", "fd10:244:0:3::1/64")
    assert r.returncode == 2 and "not an IPv6 subnet" in r.stderr
    r = ctl(args, "reserve", "10.5.3.0/24", "--public-ip", "198.18.0.3", "--subnet6", "fd10:244:0:3::/64")
    assert r.returncode == 0, r.stderr
    assert "reserved 10.5.3.0/24 and fd10:244:0:3::/64 for 198.18.0.3" in r.stdout
    store = SQLiteStore(str(tmp_path / "weft.db"), prefix="/test/net")
    try:
        rec = store.get_lease(ipaddress.IPv4Network("10.5.3.0/24"), ipaddress.IPv6Network("fd10:244:0:3::/64"))
        assert rec is not None and rec.expiration is None
        # another IPv6 part for a reserved IPv4 subnet: taken
        r = ctl(args, "reserve", "10.5.3.0/24", "--public-ip", "198.18.0.4", "--subnet6", "fd10:244:0:4::/64")
        assert r.returncode == 1 and "10.5.3.0/24 is held by 198.18.0.3" in r.stderr
        from controlplane.config import parse_config
        from controlplane.manager import LeaseManager
        lease = LeaseManager(store).acquire(parse_config(dual), LeaseAttrs(
            ipaddress.IPv4Address("198.18.0.3"), "alloc", public_ipv6=ipaddress.IPv6Address("2001:db8::3")))
        assert (str(lease.subnet), str(lease.subnet6), lease.expiration) == (
            "10.5.3.0/24", "fd10:244:0:3::/64", None)  # the reservation, still one
    finally:
        store.close()
    r = ctl(args, "leases")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["SUBNET", "SUBNET6", "PUBLIC", "IP", "PUBLIC", "IPV6", "BACKEND", "EXPIRES"]
    assert lines[1].split()[:5] == ["10.5.3.0/24", "fd10:244:0:3::/64", "198.18.0.3", "2001:db8::3", "alloc"]
    assert ctl(args, "release", "10.5.3.0/24").returncode == 0
    assert json.loads(ctl(args, "leases", "--json").stdout) == []
    r = ctl(args, "release", "10.5.3.0/24")
    assert r.returncode == 1 and "no lease or reservation for 10.5.3.0/24" in r.stderr


def test_ipv4_only_leases_output_is_unchanged(args, tmp_path):
    store = SQLiteStore(str(tmp_path / "weft.db"), prefix="/test/net")
    store.create_lease(ipaddress.IPv4Network("10.5.9.0/24"),
                       LeaseAttrs(ipaddress.IPv4Address("198.18.0.9"), "host-gw").to_json(), ttl=None)
    store.close()
    r = ctl(args, "leases")
    assert r.stdout.splitlines()[0].split() == ["SUBNET", "PUBLIC", "IP", "BACKEND", "EXPIRES"]
    assert set(json.loads(ctl(args, "leases", "--json").stdout)[0]) == {
        "subnet", "public_ip", "backend_type", "backend_data", "expiration", "reservation"}


SIX_ONLY = ('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/56",'
            '"Backend":{"Type":"alloc"}}')


def test_ipv6_only_reserve_release_and_leases(args, tmp_path):
    """On an IPv6-only network a reservation is an IPv6 subnet for a public IPv6, written as
    flanneld's key 0.0.0.0-0&<ip6>-<len6> with PublicIP 0.0.0.0; the acquisition of that public
    IPv6 reuses it; the table shows "-" for the empty IPv4 parts; release takes the IPv6 subnet."""
    assert ctl(args, "config", "put", "-", input=SIX_ONLY).returncode == 0
    r = ctl(args, "reserve", "10.5.3.0/24", "--public-ipv6", "2001:db8::3", "--subnet6", "fd10:244:0:3::/64")
    assert r.returncode == 1 and r.stderr.strip() == (
        "weftctl: 10.5.3.0/24: the network is IPv6-only (EnableIPv4 false): it has no IPv4 subnets;"
        " reserve with --subnet6 alone")
    r = ctl(args, "reserve", "--subnet6", "fd10:244:0:3::/64", "--public-ip", "198.18.0.3")
    assert r.returncode == 1 and r.stderr.strip() == (
        "weftctl: --public-ip 198.18.0.3: the network is IPv6-only (EnableIPv4 false): an IPv6-only"
        " node is named by its public IPv6 (--public-ipv6)")
    r = ctl(args, "reserve", "--subnet6", "fd10:244:0:3::/64")
    assert r.returncode == 1 and r.stderr.strip() == (
        "weftctl: fd10:244:0:3::/64: the network is IPv6-only (EnableIPv4 false): give the node's"
        " --public-ipv6")
    r = ctl(args, "reserve", "--subnet6", "fd99::/64", "--public-ipv6", "2001:db8::3")
    assert r.returncode == 1 and "--subnet6 fd99::/64 is not a subnet of the configured IPv6Network" in r.stderr
    r = ctl(args, "reserve", "--subnet6", "fd10:244:0:3::/64", "--public-ipv6", "fe80::3")
    assert r.returncode == 2 and "--public-ipv6 'fe80::3': not an address a node can have (a link-local address)" in r.stderr
    r = ctl(args, "reserve", "--subnet6", "fd10:244:0:3::/64", "--public-ipv6", "2001:db8::3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reserved fd10:244:0:3::/64 for 2001:db8::3"
    store = SQLiteStore(str(tmp_path / "weft.db"), prefix="/test/net")
    try:
        from controlplane.lease import NO_IPV4, NO_PUBLIC_IP
        (rec,) = store.list_leases()[0]
        assert (rec.subnet, str(rec.subnet6), rec.expiration) == (NO_IPV4, "fd10:244:0:3::/64", None)
        assert rec.value == '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::3"}'
        r = ctl(args, "reserve", "--subnet6", "fd10:244:0:3::/64", "--public-ipv6", "2001:db8::4")
        assert r.returncode == 1 and r.stderr.strip() == (
            "weftctl: fd10:244:0:3::/64 is held by 2001:db8::3; release it first")
        from controlplane.config import parse_config
        from controlplane.manager import LeaseManager
        m = LeaseManager(store)
        lease = m.acquire(parse_config(SIX_ONLY), LeaseAttrs(NO_PUBLIC_IP, "alloc",
                                                             public_ipv6=ipaddress.IPv6Address("2001:db8::3")))
        assert (lease.subnet, str(lease.subnet6), lease.expiration) == (NO_IPV4, "fd10:244:0:3::/64", None)
        other = m.acquire(parse_config(SIX_ONLY), LeaseAttrs(NO_PUBLIC_IP, "alloc",
                                                             public_ipv6=ipaddress.IPv6Address("2001:db8::5")))
        # that node's lease becomes a reservation when reserved for its own public IPv6
        r = ctl(args, "reserve", "--subnet6", str(other.subnet6), "--public-ipv6", "2001:db8::5")
        assert r.returncode == 0 and store.get_lease(NO_IPV4, other.subnet6).expiration is None
    finally:
        store.close()
    lines = ctl(args, "leases").stdout.splitlines()
    assert lines[0].split() == ["SUBNET", "SUBNET6", "PUBLIC", "IP", "PUBLIC", "IPV6", "BACKEND", "EXPIRES"]
    rows = sorted(l.split()[:5] for l in lines[1:])
    assert rows == sorted([["-", "fd10:244:0:3::/64", "-", "2001:db8::3", "alloc"],
                           ["-", str(other.subnet6), "-", "2001:db8::5", "alloc"]])
    leases = json.loads(ctl(args, "leases", "--json").stdout)
    assert {(l["subnet"], l["public_ip"], l["subnet6"], l["public_ipv6"]) for l in leases} == {
        (None, None, "fd10:244:0:3::/64", "2001:db8::3"), (None, None, str(other.subnet6), "2001:db8::5")}
    r = ctl(args, "release", "10.5.3.0/24")
    assert r.returncode == 1 and "no lease or reservation for 10.5.3.0/24" in r.stderr
    r = ctl(args, "release", "fd10:244:0:3::/64")
    assert r.returncode == 0 and r.stdout.strip() == "released fd10:244:0:3::/64"
    assert [l["subnet6"] for l in json.loads(ctl(args, "leases", "--json").stdout)] == [str(other.subnet6)]


def test_subnet6_alone_on_a_network_with_ipv4_is_refused(args):
    assert ctl(args, "config", "put", "-", input='{"Network":"10.5.0.0/16","EnableIPv6":true,'
                                                 '"IPv6Network":"fd10:244::/56"}').returncode == 0
    r = ctl(args, "reserve", "--subnet6", "fd10:244:0:3::/64", "--public-ipv6", "2001:db8::3")
    assert r.returncode == 1 and r.stderr.strip() == (
        "weftctl: --subnet6 fd10:244:0:3::/64 alone: the network has IPv4 (Network 10.5.0.0/16):"
        " give its IPv4 SUBNET too")
    r = ctl(args, "reserve", "--public-ip", "198.18.0.3")
    assert r.returncode == 2 and r.stderr.strip() == "weftctl: reserve: give a SUBNET (or --subnet6 on an IPv6-only network)"
