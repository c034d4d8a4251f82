"""Network config parsing: flannel's defaults, and one clear line for every rule broken."""
from __future__ import annotations

import ipaddress

import pytest

from controlplane.config import ConfigError, parse_config


def test_flannel_defaults():
    c = parse_config('{"Network": "10.5.0.0/16"}')
    assert c.network == ipaddress.IPv4Network("10.5.0.0/16")
    assert c.subnet_len == 24
    assert str(c.subnet_min) == "10.5.1.0"  # the first subnet is skipped
    assert str(c.subnet_max) == "10.5.255.0"
    assert c.backend.type == "vxlan" and c.backend.dataplane == "kernel"  # no Backend: vxlan
    assert c.backend.effective_port == 8472 and c.backend.vni == 1 and c.backend.mtu_overhead == 50
    assert c.subnet_count == 255


@pytest.mark.parametrize("network,subnet_len", [("10.0.0.0/8", 24), ("10.0.0.0/22", 24),
                                                ("10.0.0.0/23", 25), ("10.0.0.0/28", 30)])
def test_subnet_len_default(network, subnet_len):
    assert parse_config(f'{{"Network": "{network}"}}').subnet_len == subnet_len


def test_keys_are_case_insensitive_like_go():
    c = parse_config('{"network": "10.5.0.0/16", "subnetlen": 26, "backend": {"type": "udp", "port": 9000}}')
    assert c.subnet_len == 26 and c.backend.type == "udp" and c.backend.effective_port == 9000
    assert c.backend.dataplane == "fastpath" and c.backend.mtu_overhead == 28


def test_seed_config_and_dataplane_override():
    c = parse_config('{"Network":"172.30.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}')
    assert c.with_dataplane("ebpf").backend.name == "vxlan/ebpf"
    with pytest.raises(ConfigError, match="--dataplane: vxlan has no 'python' data plane"):
        c.with_dataplane("python")
    hg = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw","DirectRouting":true}}')
    assert hg.backend.name == "host-gw/kernel" and hg.backend.mtu_overhead == 0


def test_unknown_keys_are_ignored_as_flannel_does():
    # none of the known values is a default, so the known keys beside the unknown ones were read
    c = parse_config('{"Network": "10.5.0.0/16", "SubnetLen": 26, "Foo": 1, '
                     '"Backend": {"Type": "udp", "GBP": true, "Port": 9000}}')
    assert c.subnet_len == 26 and c.backend.type == "udp" and c.backend.effective_port == 9000


def test_subnet_min_max():
    c = parse_config('{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.12.0"}')
    assert c.subnet_count == 3
    assert [str(c.subnet_at(i)) for i in range(3)] == ["10.5.10.0/24", "10.5.11.0/24", "10.5.12.0/24"]
    assert c.contains_subnet(ipaddress.IPv4Network("10.5.11.0/24"))
    assert not c.contains_subnet(ipaddress.IPv4Network("10.5.13.0/24"))
    assert not c.contains_subnet(ipaddress.IPv4Network("10.5.10.0/25"))


BAD = [
    ("not json", "config: not valid JSON"),
    ('["Network"]', "config: must be a JSON object"),
    ("{}", "Network: missing"),
    ('{"Network": 10}', "Network: must be a string, got 10"),
    ('{"Network": "10.5.0.0"}', "Network: '10.5.0.0' has no prefix length"),
    ('{"Network": "10.5.0.300/16"}', "Network: '10.5.0.300/16' is not an IPv4 CIDR"),
    ('{"Network": "fd00::/64"}', "Network: 'fd00::/64' is not an IPv4 CIDR"),
    ('{"Network": "10.5.0.0/29"}', "Network: /29 is too small"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": 31}', "SubnetLen: 31 is too long"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": 17}', "SubnetLen: 17 must be at least Network's length + 2"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": "24"}', 'SubnetLen: must be an integer, got "24"'),
    ('{"Network": "10.5.0.0/16", "SubnetLen": 24.0}', "SubnetLen: must be an integer, got 24.0"),
    ('{"Network": "10.5.0.0/16", "SubnetMin": "10.6.0.0"}', "SubnetMin: 10.6.0.0 is outside Network"),
    ('{"Network": "10.5.0.0/16", "SubnetMax": "10.9.0.0"}', "SubnetMax: 10.9.0.0 is outside Network"),
    ('{"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.128"}', "SubnetMin: 10.5.1.128 is not on a /24 boundary"),
    ('{"Network": "10.5.0.0/16", "SubnetMax": "10.5.7.1"}', "SubnetMax: 10.5.7.1 is not on a /24 boundary"),
    ('{"Network": "10.5.0.0/16", "SubnetMin": "banana"}', "SubnetMin: 'banana' is not an IPv4 address"),
    ('{"Network": "10.5.0.0/16", "SubnetMin": "10.5.9.0", "SubnetMax": "10.5.2.0"}', "SubnetMin: 10.5.9.0 is above SubnetMax"),
    ('{"Network": "10.5.0.0/16", "Backend": "vxlan"}', 'Backend: must be an object, got "vxlan"'),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "gre"}}', "Backend.Type: unknown backend 'gre'"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": 1}}', "Backend.Type: must be a string, got 1"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Dataplane": "dpdk"}}', "Backend.Dataplane: unknown data plane 'dpdk'"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw", "Dataplane": "ebpf"}}', "Backend.Dataplane: host-gw has no 'ebpf' data plane"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "Dataplane": "kernel"}}', "Backend.Dataplane: udp has no 'kernel' data plane"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Port": 70000}}', "Backend.Port: 70000 is outside 0..65535"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Port": "8472"}}', 'Backend.Port: must be an integer, got "8472"'),
    ('{"Network": "10.5.0.0/16", "Backend": {"VNI": -1}}', "Backend.VNI: -1 is outside 0..16777215"),
    ('{"Network": "10.5.0.0/16", "Backend": {"DirectRouting": "yes"}}', 'Backend.DirectRouting: must be true or false, got "yes"'),
    ('{"Network": "10.5.0.0/16", "Backend": {"MTU": 100}}', "Backend.MTU: 100 is outside 576..65535"),
    ('{"Network": "10.5.0.0/16", "Backend": {"MTU": true}}', "Backend.MTU: must be an integer, got true"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": true}', "EnableIPv6: IPv6 networks are not supported"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m.split(":")[0] + "-" + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_config_one_line(text, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)
