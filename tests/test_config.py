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


V6 = '{"Network": "10.5.0.0/16", "EnableIPv6": true, %s}'  # a dual-stack config's IPv6 keys in %s

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
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw", "Dataplane": "fastpath"}}', "Backend.Dataplane: host-gw has no 'fastpath' data plane"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "Dataplane": "kernel"}}', "Backend.Dataplane: udp has no 'kernel' data plane"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Port": 70000}}', "Backend.Port: 70000 is outside 0..65535"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Port": "8472"}}', 'Backend.Port: must be an integer, got "8472"'),
    ('{"Network": "10.5.0.0/16", "Backend": {"VNI": -1}}', "Backend.VNI: -1 is outside 0..16777215"),
    ('{"Network": "10.5.0.0/16", "Backend": {"DirectRouting": "yes"}}', 'Backend.DirectRouting: must be true or false, got "yes"'),
    ('{"Network": "10.5.0.0/16", "Backend": {"MTU": 100}}', "Backend.MTU: 100 is outside 576..65535"),
    ('{"Network": "10.5.0.0/16", "Backend": {"MTU": true}}', "Backend.MTU: must be an integer, got true"),
    # Dual-stack (flannel's pkg/subnet/config.go rules for the IPv6 keys)
    ('{"Network": "10.5.0.0/16", "EnableIPv6": true}', "IPv6Network: missing"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": "true"}', 'EnableIPv6: must be true or false, got "true"'),
    # IPv6-only (EnableIPv4 false) needs EnableIPv6 and its keys, and a data plane that carries IPv6
    ('{"Network": "10.5.0.0/16", "EnableIPv4": false}',
     "EnableIPv4: false with EnableIPv6 false leaves no network to carry"),
    ('{"EnableIPv4": false, "EnableIPv6": false, "IPv6Network": "fd00::/56"}',
     "EnableIPv4: false with EnableIPv6 false leaves no network to carry"),
    ('{"EnableIPv4": "false", "EnableIPv6": true, "IPv6Network": "fd00::/56"}',
     'EnableIPv4: must be true or false, got "false"'),
    ('{"EnableIPv4": false, "EnableIPv6": true}', "IPv6Network: missing"),
    ('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "10.5.0.0/16"}',
     "IPv6Network: '10.5.0.0/16' is not an IPv6 CIDR"),
    ('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/56", "Backend": {"Type": "udp"}}',
     "EnableIPv6: udp/fastpath carries IPv4 only"),
    (V6 % '"IPv6Network": 6', "IPv6Network: must be a string, got 6"),
    (V6 % '"IPv6Network": "10.6.0.0/16"', "IPv6Network: '10.6.0.0/16' is not an IPv6 CIDR"),
    (V6 % '"IPv6Network": "fd00::"', "IPv6Network: 'fd00::' has no prefix length"),
    (V6 % '"IPv6Network": "fd00::%eth0/56"', "IPv6Network: 'fd00::%eth0/56' is not an IPv6 CIDR"),
    (V6 % '"IPv6Network": "fd00::/56", "IPv6SubnetMin": "fd00:0:0:1::%1"',
     "IPv6SubnetMin: 'fd00:0:0:1::%1' is not an IPv6 address"),
    (V6 % '"IPv6Network": "fd00::/125"', "IPv6Network: /125 is too small (at most /124)"),
    (V6 % '"IPv6Network": "fd00::/56", "IPv6SubnetLen": 127', "IPv6SubnetLen: 127 is too long (at most 126)"),
    (V6 % '"IPv6Network": "fd00::/56", "IPv6SubnetLen": 57',
     "IPv6SubnetLen: 57 must be at least IPv6Network's length + 2 (58)"),
    (V6 % '"IPv6Network": "fd00::/56", "IPv6SubnetLen": "64"', 'IPv6SubnetLen: must be an integer, got "64"'),
    (V6 % '"IPv6Network": "fd00::/56", "IPv6SubnetMin": "fd01::"', "IPv6SubnetMin: fd01:: is outside IPv6Network fd00::/56"),
    (V6 % '"IPv6Network": "fd00::/56", "IPv6SubnetMax": "fe80::"', "IPv6SubnetMax: fe80:: is outside IPv6Network"),
    (V6 % '"IPv6Network": "fd00::/56", "IPv6SubnetMin": "fd00:0:0:1::1"',
     "IPv6SubnetMin: fd00:0:0:1::1 is not on a /64 boundary"),
    (V6 % '"IPv6Network": "fd00::/56", "IPv6SubnetMin": "10.5.0.0"', "IPv6SubnetMin: '10.5.0.0' is not an IPv6 address"),
    (V6 % '"IPv6Network": "fd00::/56", "IPv6SubnetMin": "fd00:0:0:9::", "IPv6SubnetMax": "fd00:0:0:2::"',
     "IPv6SubnetMin: fd00:0:0:9:: is above IPv6SubnetMax fd00:0:0:2::"),
    (V6 % '"IPv6Network": "fd00::/56", "Backend": {"Type": "udp"}',
     "EnableIPv6: udp/fastpath carries IPv4 only (flannel's udp wire format has no IPv6); use vxlan or host-gw"),
    (V6 % '"IPv6Network": "fd00::/56", "Backend": {"Type": "udp", "Dataplane": "python"}',
     "EnableIPv6: udp/python carries IPv4 only"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m.split(":")[0] + "-" + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_config_one_line(text, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


# -- dual-stack: EnableIPv6 and the IPv6 keys, with flannel's defaults ------------------------------
def test_ipv6_defaults_like_flannel():
    c = parse_config('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd10:244::/56"}')
    assert c.enable_ipv6
    assert c.ipv6_network == ipaddress.IPv6Network("fd10:244::/56")
    assert c.ipv6_subnet_len == 64  # IPv6Network /62 or wider: /64 subnets
    assert str(c.ipv6_subnet_min) == "fd10:244:0:1::"  # the first subnet is skipped, as for IPv4
    assert str(c.ipv6_subnet_max) == "fd10:244:0:ff::"
    assert c.subnet6_count == 255
    assert c.subnet6_at(0) == ipaddress.IPv6Network("fd10:244:0:1::/64")
    assert c.subnet6_at(254) == ipaddress.IPv6Network("fd10:244:0:ff::/64")
    # the IPv4 side is unchanged
    assert c.subnet_len == 24 and str(c.subnet_min) == "10.244.1.0"


@pytest.mark.parametrize("network,subnet_len", [("fd00::/48", 64), ("fd00::/62", 64), ("fd00::/63", 65),
                                                ("fd00::/100", 102), ("fd00::/124", 126)])
def test_ipv6_subnet_len_default(network, subnet_len):
    c = parse_config(f'{{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "{network}"}}')
    assert c.ipv6_subnet_len == subnet_len
    assert c.subnet6_count == (1 << (subnet_len - c.ipv6_network.prefixlen)) - 1


def test_ipv6_explicit_keys_and_case_insensitive():
    c = parse_config('{"network": "10.5.0.0/16", "enableipv6": true, "ipv6network": "fd00:1::/48",'
                     ' "ipv6subnetlen": 80, "IPV6SUBNETMIN": "fd00:1:0:0:5::", "Ipv6SubnetMax": "fd00:1:0:0:9::"}')
    assert c.ipv6_subnet_len == 80
    assert str(c.ipv6_subnet_min) == "fd00:1:0:0:5::" and str(c.ipv6_subnet_max) == "fd00:1:0:0:9::"
    assert c.subnet6_count == 5
    assert c.contains_subnet6(ipaddress.IPv6Network("fd00:1:0:0:7::/80"))
    assert not c.contains_subnet6(ipaddress.IPv6Network("fd00:1:0:0:4::/80"))  # below IPv6SubnetMin
    assert not c.contains_subnet6(ipaddress.IPv6Network("fd00:1:0:0:7::/96"))  # another length
    assert not c.contains_subnet6(None)


def test_ipv6_network_host_bits_are_masked_like_go():
    c = parse_config('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::1/56"}')
    assert c.ipv6_network == ipaddress.IPv6Network("fd00::/56")


def test_ipv6_keys_are_ignored_without_enable_ipv6():
    """flannel reads the IPv6 keys only with EnableIPv6: a config carrying them (even broken ones)
    with EnableIPv6 false is IPv4 only, and an IPv4-only config parses as before."""
    for text in ('{"Network": "10.5.0.0/16", "IPv6Network": "fd00::/56"}',
                 '{"Network": "10.5.0.0/16", "EnableIPv6": false, "IPv6Network": "nonsense", "IPv6SubnetLen": 3}',
                 '{"Network": "10.5.0.0/16", "EnableIPv4": true, "Backend": {"Type": "udp"}}'):
        c = parse_config(text)
        assert not c.enable_ipv6 and c.ipv6_network is None and c.subnet6_count == 0
    plain = parse_config('{"Network": "10.5.0.0/16"}')
    assert plain == parse_config('{"Network": "10.5.0.0/16", "EnableIPv4": true, "EnableIPv6": false}')


def test_fits_needs_both_parts_with_ipv6_and_none_without():
    """flannel's reuse rule (tryAcquireLease): a lease fits when both parts do; without
    EnableIPv6 only a lease with no IPv6 part fits."""
    dual = parse_config('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/56"}')
    v4only = parse_config('{"Network": "10.5.0.0/16"}')
    n4, n6 = ipaddress.IPv4Network("10.5.3.0/24"), ipaddress.IPv6Network("fd00:0:0:3::/64")
    assert dual.fits(n4, n6)
    assert not dual.fits(n4, None)
    assert not dual.fits(n4, ipaddress.IPv6Network("fd01::/64"))
    assert not dual.fits(ipaddress.IPv4Network("10.6.3.0/24"), n6)
    assert v4only.fits(n4, None)
    assert not v4only.fits(n4, n6)


@pytest.mark.parametrize("wire,dataplane", [("vxlan", "kernel"), ("vxlan", "ebpf"), ("vxlan", "fastpath"),
                                            ("host-gw", "kernel")])
def test_ipv6_data_planes(wire, dataplane):
    c = parse_config(f'{{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/56",'
                     f' "Backend": {{"Type": "{wire}", "Dataplane": "{dataplane}"}}}}')
    assert c.backend.name == f"{wire}/{dataplane}" and c.enable_ipv6


def test_ipv6_refused_on_udp_also_through_dataplane_override():
    """The seed config may name an IPv6 data plane and a node override it with one that has none."""
    c = parse_config('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/56",'
                     ' "Backend": {"Type": "vxlan"}}')
    assert c.with_dataplane("fastpath").backend.name == "vxlan/fastpath"
    from controlplane.backends import declaration
    assert declaration("udp/python").ipv6 is False and declaration("vxlan/kernel").ipv6 is True
    udp = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}')
    assert udp.with_dataplane("python").backend.name == "udp/python"  # IPv4 only: fine


def test_dataplane_override_without_ipv6_is_refused_on_a_dual_stack_network():
    """``weftd --dataplane`` picks among one wire format's data planes; one without IPv6 (today
    only udp's, whose wire format is refused with EnableIPv6 anyway) is refused there too."""
    import dataclasses
    dual = parse_config('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/56"}')
    as_udp = dataclasses.replace(dual, backend=dataclasses.replace(dual.backend, type="udp", dataplane="fastpath"))
    with pytest.raises(ConfigError) as exc:
        as_udp.with_dataplane("python")
    assert str(exc.value) == ("--dataplane python: EnableIPv6: udp/python carries IPv4 only (flannel's udp "
                              "wire format has no IPv6); use vxlan or host-gw")


# -- subnet.env (flannel's WriteSubnetFile), IPv4 and dual-stack ---------------------------------
def test_subnet_env_ipv4_only_is_unchanged(tmp_path):
    from controlplane import subnetenv
    path = str(tmp_path / "subnet.env")
    subnetenv.write(path, ipaddress.IPv4Network("10.5.0.0/16"), ipaddress.IPv4Network("10.5.52.0/24"), 1450, False)
    with open(path) as f:
        assert f.read() == ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\n"
                            "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    assert subnetenv.previous_subnet6(path) is None


def test_subnet_env_dual_stack_in_flannels_order(tmp_path):
    from controlplane import subnetenv
    path = str(tmp_path / "subnet.env")
    subnetenv.write(path, ipaddress.IPv4Network("10.244.0.0/16"), ipaddress.IPv4Network("10.244.3.0/24"), 1450,
                    True, ipaddress.IPv6Network("fd10:244::/56"), ipaddress.IPv6Network("fd10:244:0:3::/64"))
    with open(path) as f:
        assert f.read() == ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n"
                            "FLANNEL_IPV6_NETWORK=fd10:244::/56\nFLANNEL_IPV6_SUBNET=fd10:244:0:3::1/64\n"
                            "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    assert subnetenv.previous_subnet(path) == ipaddress.IPv4Network("10.244.3.0/24")
    assert subnetenv.previous_subnet6(path) == ipaddress.IPv6Network("fd10:244:0:3::/64")
    with open(path, "a") as f:
        f.write("FLANNEL_IPV6_SUBNET=banana\n")  # an unreadable line: no previous subnet, no error
    assert subnetenv.previous_subnet6(path) is None


# -- IPv6-only: EnableIPv4 false (flannel reads no IPv4 key then) ---------------------------------
SIX_ONLY = '{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd10:244::/56"%s}'


def test_ipv6_only_config_like_flannel():
    c = parse_config(SIX_ONLY % ', "Backend": {"Type": "vxlan"}')
    assert c.ipv6_only and not c.enable_ipv4 and c.enable_ipv6
    assert c.network is None and c.subnet_len == 0 and c.subnet_min is None and c.subnet_max is None
    assert c.subnet_count == 0
    assert c.ipv6_network == ipaddress.IPv6Network("fd10:244::/56") and c.ipv6_subnet_len == 64
    assert c.subnet6_count == 255 and str(c.ipv6_subnet_min) == "fd10:244:0:1::"
    assert c.backend.name == "vxlan/kernel"
    dual = parse_config('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd10:244::/56"}')
    assert dual.enable_ipv4 and not dual.ipv6_only


@pytest.mark.parametrize("ipv4_keys", [
    ', "Network": "10.5.0.0/16", "SubnetLen": 26',
    ', "Network": "nonsense", "SubnetLen": 3, "SubnetMin": "banana", "SubnetMax": 7',  # broken: not read
    ', "network": 10'])
def test_ipv6_only_ignores_every_ipv4_key_as_flannel_does(ipv4_keys):
    c = parse_config(SIX_ONLY % ipv4_keys)
    assert c.network is None and c.subnet_len == 0 and c.subnet_min is None
    assert c.ipv6_network == ipaddress.IPv6Network("fd10:244::/56")


def test_ipv6_only_fits_only_the_empty_ipv4_part():
    """An IPv6-only lease is ``0.0.0.0-0&<ip6>-<len6>`` (flannel's empty IP4Net): nothing else fits
    an IPv6-only config, and such a lease fits no config with IPv4."""
    from controlplane.lease import NO_IPV4
    six = parse_config(SIX_ONLY % "")
    dual = parse_config('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd10:244::/56"}')
    v4only = parse_config('{"Network": "10.5.0.0/16"}')
    n6 = ipaddress.IPv6Network("fd10:244:0:3::/64")
    assert six.fits(NO_IPV4, n6)
    assert not six.fits(NO_IPV4, None)
    assert not six.fits(NO_IPV4, ipaddress.IPv6Network("fd10:245:0:3::/64"))  # outside IPv6Network
    assert not six.fits(NO_IPV4, ipaddress.IPv6Network("fd10:244::/64"))  # below IPv6SubnetMin
    assert not six.fits(ipaddress.IPv4Network("10.5.3.0/24"), n6)  # a dual-stack lease
    assert not six.contains_subnet(NO_IPV4) and not six.contains_subnet(ipaddress.IPv4Network("10.5.3.0/24"))
    assert not dual.fits(NO_IPV4, n6) and not v4only.fits(NO_IPV4, None)


def test_ipv6_only_dataplane_override():
    c = parse_config(SIX_ONLY % ', "Backend": {"Type": "vxlan"}')
    assert c.with_dataplane("ebpf").backend.name == "vxlan/ebpf"
    assert c.with_dataplane("fastpath").ipv6_only
    hg = parse_config(SIX_ONLY % ', "Backend": {"Type": "host-gw"}')
    assert hg.backend.name == "host-gw/kernel" and hg.ipv6_only


def test_subnet_env_ipv6_only_as_flanneld_writes_it(tmp_path):
    """flanneld's WriteSubnetFile with EnableIPv4 false: no FLANNEL_NETWORK/FLANNEL_SUBNET lines.
    weftd passes what it has on such a network (Network None, the lease's empty IPv4 part)."""
    from controlplane import subnetenv
    from controlplane.lease import NO_IPV4
    path = str(tmp_path / "subnet.env")
    subnetenv.write(path, None, NO_IPV4, 1430, True, ipaddress.IPv6Network("fd10:244::/56"),
                    ipaddress.IPv6Network("fd10:244:0:5::/64"))
    with open(path) as f:
        assert f.read() == ("FLANNEL_IPV6_NETWORK=fd10:244::/56\nFLANNEL_IPV6_SUBNET=fd10:244:0:5::1/64\n"
                            "FLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n")
    assert subnetenv.previous_subnet(path) is None
    assert subnetenv.previous_subnet6(path) == ipaddress.IPv6Network("fd10:244:0:5::/64")
    assert subnetenv.read(path) == {"FLANNEL_IPV6_NETWORK": "fd10:244::/56",
                                    "FLANNEL_IPV6_SUBNET": "fd10:244:0:5::1/64",
                                    "FLANNEL_MTU": "1430", "FLANNEL_IPMASQ": "true"}
    # the same written with subnet None, and a file of nothing at all is refused (one line)
    subnetenv.write(path, None, None, 1430, True, ipaddress.IPv6Network("fd10:244::/56"),
                    ipaddress.IPv6Network("fd10:244:0:5::/64"))
    with open(path) as f:
        assert f.read().startswith("FLANNEL_IPV6_NETWORK=fd10:244::/56\n")
    with pytest.raises(ValueError, match="^subnet.env: no IPv4 subnet and no IPv6 subnet to write$"):
        subnetenv.render(None, NO_IPV4, 1430, True)
