"""IPv6-only leases (EnableIPv4 false) in flanneld's exact etcd layout, read and written with etcdctl.

flanneld (pkg/subnet/subnet.go MakeSubnetKey, lease.go) writes an IPv6-only lease with the empty
IPv4 part of its key and the empty ip.IP4 as PublicIP:
  key   <prefix>/subnets/0.0.0.0-0&fd10:244:0:5::-64
  value {"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:198:18::1","BackendType":"vxlan",
         "BackendV6Data":{"VNI":1,"VtepMAC":"..."}}
(no BackendData: its vxlan backend makes no IPv4 device; host-gw writes no backend data at all).
What weft writes must be those bytes, and what flanneld writes weft must follow. Unlike flanneld,
weft places many IPv6-only nodes: each lease is named by its IPv6 subnet (``Lease.ident``).
"""
from __future__ import annotations

import ipaddress
import json
import threading
import time

import pytest

from controlplane.config import parse_config
from controlplane.lease import NO_IPV4, NO_PUBLIC_IP, LeaseAttrs
from controlplane.manager import LeaseManager, LeaseWatcher
from controlplane.store.etcd import EtcdStore

from .daemons import run_tool
from .etcd_fixtures import etcd_plain, needs_etcd, plain_options  # noqa: F401  (fixtures)
from .test_dualstack_formats import FLANNEL_KEY_RE, etcd_get_all, lease_ttl

pytestmark = needs_etcd

PREFIX = "/weft-ipv6only"
SIX = ('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10:244::/56",'
       '"Backend":{"Type":"vxlan"}}')
MAC6 = "8a:3c:01:9d:e2:10"


def flanneld_value(n: int, mac: str = MAC6) -> str:
    """flanneld's value for IPv6-only vxlan node ``n``, byte for byte (Go's json.Marshal)."""
    return ('{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:198:18::%d","BackendType":"vxlan",'
            '"BackendV6Data":{"VNI":1,"VtepMAC":"%s"}}' % (n, mac))


def six_attrs(n: int, backend: str = "vxlan") -> LeaseAttrs:
    """What an IPv6-only node's backend puts in its lease (the contract's lease_attrs)."""
    v6data = {"VNI": 1, "VtepMAC": MAC6} if backend == "vxlan" else None
    return LeaseAttrs(NO_PUBLIC_IP, backend, None, ipaddress.IPv6Address(f"2001:db8:198:18::{n}"), v6data)


@pytest.fixture
def store(etcd_plain):
    etcd_plain.etcdctl("del", "--prefix", PREFIX + "/")
    s = EtcdStore(plain_options(etcd_plain), prefix=PREFIX)
    yield s
    s.close()


def test_weft_writes_flanneld_ipv6_only_bytes(store, etcd_plain):
    """LeaseManager on an IPv6-only network on etcd: etcdctl reads flanneld's key (empty IPv4 part)
    and value (PublicIP 0.0.0.0, no BackendData), byte for byte, for each of several nodes; a
    renewal re-puts the same bytes with a fresh etcd lease; host-gw's value has no backend data."""
    config = parse_config(SIX)
    m = LeaseManager(store, ttl=86400)
    leases = {n: m.acquire(config, six_attrs(n)) for n in (1, 2, 3)}
    keys = etcd_get_all(etcd_plain, PREFIX + "/subnets/")
    assert len(keys) == 3 and len({l.subnet6 for l in leases.values()}) == 3
    for n, lease in leases.items():
        name = f"0.0.0.0-0&{lease.subnet6.network_address}-64"
        value, lease_id = keys[f"{PREFIX}/subnets/{name}"]
        match = FLANNEL_KEY_RE.match(name)
        assert match and match.group(1, 2) == ("0.0.0.0", "0"), name
        assert ipaddress.IPv6Network(f"{match.group(3)}/{match.group(4)}") == lease.subnet6
        assert config.contains_subnet6(lease.subnet6)
        assert value == flanneld_value(n).encode()
        assert lease_ttl(etcd_plain, lease_id) == 86400
    key = f"{PREFIX}/subnets/0.0.0.0-0&{leases[2].subnet6.network_address}-64"
    m.renew(leases[2])
    again = etcd_get_all(etcd_plain, PREFIX + "/subnets/")
    assert again[key][0] == keys[key][0] and again[key][1] != keys[key][1]
    assert {k: v[0] for k, v in again.items()} == {k: v[0] for k, v in keys.items()}

    etcd_plain.etcdctl("del", "--prefix", PREFIX + "/")
    hg = m.acquire(parse_config(SIX.replace('"vxlan"', '"host-gw"')), six_attrs(4, "host-gw"))
    (key, (value, _)), = etcd_get_all(etcd_plain, PREFIX + "/subnets/").items()
    assert key == f"{PREFIX}/subnets/0.0.0.0-0&{hg.subnet6.network_address}-64"
    assert value == b'{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:198:18::4","BackendType":"host-gw"}'


HOSTILE = {  # key name under subnets/ -> (value, the reason an IPv6-only node counts it under)
    "0.0.0.0-0": (flanneld_value(10), "bad_key"),  # the empty IPv4 part alone names no lease
    "0.0.0.0-0&fd10:244:0:b::1-64": (flanneld_value(11), "bad_key"),  # host bits
    "0.0.0.0-00&fd10:244:0:c::-64": (flanneld_value(12), "bad_key"),
    "10.5.13.0-24&fd10:244:0:d::-64": (flanneld_value(13), "outside_network"),  # an IPv4 part
    "0.0.0.0-0&fd99::-64": (flanneld_value(14), "outside_network"),
    "0.0.0.0-0&fd10:244:0:f::-96": (flanneld_value(15), "wrong_length"),
    "0.0.0.0-0&fd10:244:0:10::-64": (flanneld_value(16).replace('"2001:db8:198:18::16"', "null"),
                                     "bad_public_ip"),  # an IPv6-only node without PublicIPv6
    "0.0.0.0-0&fd10:244:0:11::-64": (flanneld_value(17).replace('"2001:db8:198:18::17"', '"fe80::17"'),
                                     "bad_public_ip"),
    "0.0.0.0-0&fd10:244:0:12::-64": (flanneld_value(18, "ff:ff:ff:ff:ff:ff"), "bad_backend_data"),
    "0.0.0.0-0&fd10:244:0:13::-64": ('{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8:198:18::19",'
                                     '"BackendType":"vxlan"}', "bad_backend_data"),  # no BackendV6Data
}


def test_weft_follows_flanneld_ipv6_only_leases(store, etcd_plain):
    """flanneld-shaped IPv6-only leases written with etcdctl are followed (each its own peer,
    listed and watched), judged valid, and the acquisition works around them: a new node takes
    another IPv6 subnet, the node with a lease's PublicIPv6 takes that lease back. Hostile ones
    are counted by reason; an IPv4 network refuses every IPv6-only lease; weftctl shows them."""
    config = parse_config(SIX)
    store.put_config(SIX)
    etcd_plain.etcdctl("put", f"{PREFIX}/subnets/0.0.0.0-0&fd10:244:0:1::-64", "--", flanneld_value(1))
    events, stop = [], threading.Event()
    watcher = LeaseWatcher(store, events.append, poll_timeout=0.2, config=config)
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        assert watcher.synced.wait(10)
        etcd_plain.etcdctl("put", f"{PREFIX}/subnets/0.0.0.0-0&fd10:244:0:2::-64", "--", flanneld_value(2))
        for name, (value, _) in HOSTILE.items():
            etcd_plain.etcdctl("put", f"{PREFIX}/subnets/{name}", "--", value)
        deadline = time.monotonic() + 10
        while (len(events) < 2 or sum(watcher.invalid.snapshot().values()) < len(HOSTILE)) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert [(e.kind, e.lease.key) for e in events] == [("added", "0.0.0.0-0&fd10:244:0:1::-64"),
                                                       ("added", "0.0.0.0-0&fd10:244:0:2::-64")]
    lease = events[0].lease
    assert not lease.has_ipv4 and lease.ident == ipaddress.IPv6Network("fd10:244:0:1::/64")
    assert lease.attrs.public_ip == NO_PUBLIC_IP and lease.attrs.backend_data is None
    assert lease.attrs.public_ipv6 == ipaddress.IPv6Address("2001:db8:198:18::1")
    assert lease.attrs.backend_v6_data == {"VNI": 1, "VtepMAC": MAC6}
    assert lease.attrs.to_json() == flanneld_value(1)  # read back, written back: the same bytes
    assert set(watcher.known) == {ipaddress.IPv6Network("fd10:244:0:1::/64"),
                                  ipaddress.IPv6Network("fd10:244:0:2::/64")}
    want: dict[str, int] = {}
    for _, reason in HOSTILE.values():
        want[reason] = want.get(reason, 0) + 1
    assert {k: v for k, v in watcher.invalid.snapshot().items() if v} == want
    assert watcher.stats["errors"] == 0 and watcher.stats["handler_errors"] == 0

    # the acquisition: a new node avoids every live IPv6 part; node 2 takes its lease back
    m = LeaseManager(store, ttl=86400)
    taken = {r.subnet6 for r in store.list_leases()[0]}
    new = m.acquire(config, six_attrs(5), previous_subnet6=ipaddress.IPv6Network("fd10:244:0:1::/64"))
    assert new.subnet == NO_IPV4 and new.subnet6 not in taken and config.contains_subnet6(new.subnet6)
    back = m.acquire(config, LeaseAttrs.from_json(flanneld_value(2)))
    assert back.key == "0.0.0.0-0&fd10:244:0:2::-64"
    assert etcd_get_all(etcd_plain, f"{PREFIX}/subnets/0.0.0.0-0&fd10:244:0:2::-64")[
        f"{PREFIX}/subnets/0.0.0.0-0&fd10:244:0:2::-64"][0] == flanneld_value(2).encode()

    # a network with IPv4 refuses every IPv6-only lease (they have no IPv4 subnet), in one line
    v4 = LeaseWatcher(store, lambda e: None,
                      config=parse_config('{"Network":"10.5.0.0/16","EnableIPv6":true,'
                                          '"IPv6Network":"fd10:244::/56"}'))
    v4.resync()
    assert v4.known == {}
    # the 3 valid ones and the 6 other 0.0.0.0-0&... keys; 10.5.13.0-24&... fits it but carries PublicIP 0.0.0.0
    assert {k: v for k, v in v4.invalid.snapshot().items() if v} == {
        "outside_network": 3 + 6, "bad_key": 3, "bad_public_ip": 1}

    ctl = run_tool("controlplane.ctl", "-etcd-endpoints", etcd_plain.endpoint, "-etcd-prefix", PREFIX,
                   "leases", "--json")
    assert ctl.returncode == 0, ctl.stderr
    rows = {r["subnet6"]: r for r in json.loads(ctl.stdout)}
    assert set(rows) == {"fd10:244:0:1::/64", "fd10:244:0:2::/64", str(new.subnet6)}
    assert rows["fd10:244:0:1::/64"]["subnet"] is None and rows["fd10:244:0:1::/64"]["public_ip"] is None
    assert rows["fd10:244:0:1::/64"]["public_ipv6"] == "2001:db8:198:18::1"
    assert len([line for line in ctl.stderr.splitlines() if "invalid lease" in line]) == len(HOSTILE)
    table = run_tool("controlplane.ctl", "-etcd-endpoints", etcd_plain.endpoint, "-etcd-prefix", PREFIX,
                     "leases")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["SUBNET", "SUBNET6", "PUBLIC", "IP", "PUBLIC", "IPV6", "BACKEND", "EXPIRES"]
    assert ["-", "fd10:244:0:1::/64", "-", "2001:db8:198:18::1", "vxlan"] in [l.split()[:5] for l in lines[1:]]
