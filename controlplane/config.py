"""The network config: flannel's JSON document stored at ``<prefix>/config``.

Parsing follows flannel's ``pkg/subnet/config.go`` so that a flannel user's config means the same
thing here: keys are matched case-insensitively (as Go's encoding/json does), unknown keys are
ignored, and SubnetLen/SubnetMin/SubnetMax get flannel's defaults and rules.

Two deliberate differences, both documented in the README:
- no ``Backend`` key means ``vxlan`` (flannel's documentation says so; flanneld's code picks ``udp``);
- ``Backend.Dataplane`` is weft's own key: it picks the implementation behind a wire format.

Dual-stack (``EnableIPv6`` with ``IPv6Network`` ...) follows flannel's rules too, and so does
IPv6-only (``EnableIPv4`` false): no IPv4 keys are read, ``network`` is None, and every lease's
key has flannel's empty IPv4 part ``0.0.0.0-0`` (``controlplane.lease.NO_IPV4``). A data plane
declares whether it carries IPv6 (``spec.Dataplane.ipv6``); EnableIPv6 with one that does not is
refused.

Every rule broken raises ``ConfigError`` with one line naming the key and the rule.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

# The wire formats, their data planes, MTU overheads, default ports and own keys come from the
# backend registry (each wire format's folder declares them); only the default is named here.
from . import backends as registry
from .backends.spec import Key
from .lease import NO_IPV4

DEFAULT_WIRE = "vxlan"  # no Backend.Type (README, "Differences from flanneld")
PORT = Key("Port", "port", int, 0, 0, 65535, "UDP port; 0: the wire format's default")
MTU = Key("MTU", "mtu", int, 0, 576, 65535, "MTU of the underlay; 0: the interface's")


class ConfigError(ValueError):
    """A config that breaks a rule. str() is one line naming the key and the rule."""


@dataclass(frozen=True)
class BackendConfig:
    """The ``Backend`` object. The keys of the wire format's own (``spec.Wire.keys``, e.g. vxlan's
    ``VNI`` and ``DirectRouting``) are in ``settings`` and read as attributes (``backend.vni``)."""
    type: str = "vxlan"
    dataplane: str = "kernel"
    port: int = 0  # 0: the wire format's default (see ``effective_port``)
    mtu: int = 0  # 0: the interface's MTU
    settings: tuple[tuple[str, Any], ...] = ()  # (attr, value) of each of the wire format's keys
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_"):
            for attr, value in self.__dict__.get("settings", ()):
                if attr == name:
                    return value
        raise AttributeError(f"{type(self).__name__} of {self.__dict__.get('type')!r} has no {name!r}")

    @property
    def name(self) -> str:
        return f"{self.type}/{self.dataplane}"

    @property
    def effective_port(self) -> int:
        return self.port or registry.wire(self.type).default_port

    @property
    def mtu_overhead(self) -> int:
        return registry.wire(self.type).mtu_overhead


@dataclass(frozen=True)
class NetworkConfig:
    network: ipaddress.IPv4Network | None  # None: EnableIPv4 is false (IPv6-only)
    subnet_len: int  # 0, and subnet_min/subnet_max None, when IPv6-only
    subnet_min: ipaddress.IPv4Address | None
    subnet_max: ipaddress.IPv4Address | None
    backend: BackendConfig
    raw: str = field(default="", compare=False, repr=False)
    # Dual-stack (EnableIPv6): flannel's IPv6Network, IPv6SubnetLen, IPv6SubnetMin, IPv6SubnetMax.
    ipv6_network: ipaddress.IPv6Network | None = None  # None: EnableIPv6 is false
    ipv6_subnet_len: int = 0
    ipv6_subnet_min: ipaddress.IPv6Address | None = None
    ipv6_subnet_max: ipaddress.IPv6Address | None = None

    @property
    def enable_ipv4(self) -> bool:
        return self.network is not None

    @property
    def enable_ipv6(self) -> bool:
        return self.ipv6_network is not None

    @property
    def ipv6_only(self) -> bool:
        return self.network is None

    @property
    def subnet6_size(self) -> int:
        return 1 << (128 - self.ipv6_subnet_len)

    @property
    def subnet6_count(self) -> int:
        """How many IPv6 subnets lie between IPv6SubnetMin and IPv6SubnetMax, inclusive (0
        without EnableIPv6)."""
        if not self.enable_ipv6:
            return 0
        return (int(self.ipv6_subnet_max) - int(self.ipv6_subnet_min)) // self.subnet6_size + 1

    def subnet6_at(self, index: int) -> ipaddress.IPv6Network:
        addr = ipaddress.IPv6Address(int(self.ipv6_subnet_min) + index * self.subnet6_size)
        return ipaddress.IPv6Network((addr, self.ipv6_subnet_len))

    def contains_subnet6(self, subnet6: ipaddress.IPv6Network | None) -> bool:
        """True when ``subnet6`` is an IPv6 subnet this config could hand out (never without
        EnableIPv6, and never None with it)."""
        if not self.enable_ipv6 or subnet6 is None:
            return False
        return (subnet6.prefixlen == self.ipv6_subnet_len
                and int(self.ipv6_subnet_min) <= int(subnet6.network_address) <= int(self.ipv6_subnet_max))

    def fits(self, subnet: ipaddress.IPv4Network, subnet6: ipaddress.IPv6Network | None) -> bool:
        """True when a lease of ``subnet`` (and ``subnet6``) is one this config could hand out:
        both parts inside their ranges with EnableIPv6, and no IPv6 part without it (flannel's
        ``tryAcquireLease``); IPv6-only: the IPv4 part is flannel's empty ``0.0.0.0/0``."""
        if not self.enable_ipv4:
            return subnet == NO_IPV4 and self.contains_subnet6(subnet6)
        if not self.contains_subnet(subnet):
            return False
        return self.contains_subnet6(subnet6) if self.enable_ipv6 else subnet6 is None

    @property
    def subnet_size(self) -> int:
        return 1 << (32 - self.subnet_len)

    @property
    def subnet_count(self) -> int:
        """How many subnets lie between SubnetMin and SubnetMax, inclusive (0 when IPv6-only)."""
        if not self.enable_ipv4:
            return 0
        return (int(self.subnet_max) - int(self.subnet_min)) // self.subnet_size + 1

    def subnet_at(self, index: int) -> ipaddress.IPv4Network:
        addr = ipaddress.IPv4Address(int(self.subnet_min) + index * self.subnet_size)
        return ipaddress.IPv4Network((addr, self.subnet_len))

    def contains_subnet(self, subnet: ipaddress.IPv4Network) -> bool:
        """True when ``subnet`` is one this config could hand out (never when IPv6-only)."""
        if not self.enable_ipv4:
            return False
        return (subnet.prefixlen == self.subnet_len
                and int(self.subnet_min) <= int(subnet.network_address) <= int(self.subnet_max))

    def with_dataplane(self, dataplane: str | None) -> "NetworkConfig":
        """The config as seen by a node that overrides the data plane (``weftd --dataplane``)."""
        if not dataplane:
            return self
        _check_dataplane(self.backend.type, dataplane, "--dataplane")
        if self.enable_ipv6:
            _check_ipv6(self.backend.type, dataplane, "--dataplane")
        return dataclasses.replace(self, backend=dataclasses.replace(self.backend, dataplane=dataplane))


def _lookup(obj: dict, key: str) -> tuple[bool, Any]:
    """Case-insensitive key lookup, as Go's encoding/json matches struct fields."""
    if key in obj:
        return True, obj[key]
    lower = key.lower()
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() == lower:
            return True, v
    return False, None


def _typed(obj: dict, key: str, kind: type, where: str, default: Any) -> Any:
    present, value = _lookup(obj, key)
    if not present or value is None:
        return default
    # bool is an int in Python; JSON true is never a number here, and 1.0 is not an integer.
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        names = {str: "a string", int: "an integer", bool: "true or false", dict: "an object"}
        raise ConfigError(f"{where}{key}: must be {names[kind]}, got {json.dumps(value)}")
    return value


def _check_dataplane(wire: str, dataplane: str, key: str) -> None:
    known = registry.dataplane_names()
    if dataplane not in known:
        raise ConfigError(f"{key}: unknown data plane {dataplane!r} (known: {', '.join(known)})")
    have = [d.name for d in registry.dataplanes(wire)]
    if dataplane not in have:
        raise ConfigError(f"{key}: {wire} has no {dataplane!r} data plane (it has: {', '.join(have)})")


def _check_ipv6(wire: str, dataplane: str, key: str) -> None:
    """EnableIPv6 needs a data plane that carries IPv6 (``spec.Dataplane.ipv6``)."""
    dp = registry.declaration(f"{wire}/{dataplane}")
    if dp is None or dp.ipv6:
        return
    # The wire formats with an IPv6 data plane that carries traffic (bench measures those; alloc
    # only leases), the default one first.
    able = sorted(dict.fromkeys(d.wire for d in registry.dataplanes() if d.ipv6 and d.bench),
                  key=lambda w: w != DEFAULT_WIRE)
    why = f" ({dp.no_ipv6_reason})" if dp.no_ipv6_reason else ""
    where = "" if key == "Backend.Dataplane" else f"{key} {dataplane}: "
    raise ConfigError(f"{where}EnableIPv6: {dp.backend} carries IPv4 only{why}; "
                      f"use {' or '.join(able)}")


def _key(obj: dict, key: Key) -> Any:
    """The value of ``key`` under Backend: its default when absent, ConfigError when it breaks a rule."""
    value = _typed(obj, key.name, key.kind, "Backend.", key.default)
    why = key.rule_broken(value) if value != key.default else None
    if why:
        raise ConfigError(f"Backend.{key.name}: {why}")
    return value


def parse_backend(obj: Any) -> BackendConfig:
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise ConfigError(f"Backend: must be an object, got {json.dumps(obj)}")
    name = _typed(obj, "Type", str, "Backend.", DEFAULT_WIRE)
    wire = registry.wire(name)
    if wire is None:
        raise ConfigError(f"Backend.Type: unknown backend {name!r} "
                          f"(known: {', '.join(registry.wires())})")
    dataplane = _typed(obj, "Dataplane", str, "Backend.", wire.default_dataplane)
    _check_dataplane(wire.name, dataplane, "Backend.Dataplane")
    port = _key(obj, PORT)
    settings = tuple((k.attr, _key(obj, k)) for k in wire.keys)
    mtu = _key(obj, MTU)  # 0 (the interface's MTU) is outside the range but allowed
    if mtu and mtu - wire.mtu_overhead < 68:
        raise ConfigError(f"Backend.MTU: {mtu} leaves no room for {wire.name}'s {wire.mtu_overhead} bytes")
    return BackendConfig(wire.name, dataplane, port, mtu, settings, dict(obj))


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse and validate a network config; raises ConfigError with a one-line reason."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise ConfigError("config: not UTF-8 text") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise ConfigError("config: not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise ConfigError("config: must be a JSON object")

    enable_ipv6 = _typed(obj, "EnableIPv6", bool, "", False)
    enable_ipv4 = _typed(obj, "EnableIPv4", bool, "", True)
    if not enable_ipv4 and not enable_ipv6:
        raise ConfigError("EnableIPv4: false with EnableIPv6 false leaves no network to carry "
                          "(IPv6-only is EnableIPv4 false with EnableIPv6 true and an IPv6Network)")
    # flannel reads the IPv4 keys only with EnableIPv4 (Network, SubnetLen ... are ignored without)
    ipv4 = _parse_range(obj, IPV4) if enable_ipv4 else (None, 0, None, None)

    present, backend_obj = _lookup(obj, "Backend")
    backend = parse_backend(backend_obj if present else None)
    if not enable_ipv6:  # flannel reads the IPv6 keys only with EnableIPv6
        return NetworkConfig(*ipv4, backend, text)
    _check_ipv6(backend.type, backend.dataplane, "Backend.Dataplane")
    return NetworkConfig(*ipv4, backend, text, *_parse_range(obj, IPV6))


@dataclass(frozen=True)
class _Family:
    """One address family's keys and flannel's numbers for them (``pkg/subnet/config.go``)."""
    network_key: str  # "Network", "IPv6Network"
    keys: str  # the prefix of SubnetLen, SubnetMin, SubnetMax: "", "IPv6"
    name: str  # "IPv4", "IPv6"
    bits: int
    longest_subnet: int  # SubnetLen at most (a subnet needs four addresses)
    default_len: int  # SubnetLen when the network is wide enough
    example: str
    network_type: type
    address_type: type


IPV4 = _Family("Network", "", "IPv4", 32, 30, 24, "10.244.0.0/16", ipaddress.IPv4Network,
               ipaddress.IPv4Address)
IPV6 = _Family("IPv6Network", "IPv6", "IPv6", 128, 126, 64, "fd10:244::/56", ipaddress.IPv6Network,
               ipaddress.IPv6Address)


def _parse_range(obj: dict, fam: _Family) -> tuple:
    """The family's network, SubnetLen, SubnetMin and SubnetMax, with flannel's defaults and rules
    (the IPv6 keys are read only with EnableIPv6, as flannel does)."""
    nkey = fam.network_key
    net_text = _typed(obj, nkey, str, "", None)
    if net_text is None:
        need = "EnableIPv6 needs " if fam is IPV6 else ""
        raise ConfigError(f"{nkey}: missing ({need}the cluster's {fam.name} CIDR, e.g. \"{fam.example}\")")
    try:
        # strict=False: flannel (Go's net.ParseCIDR) accepts host bits and masks them off.
        network = fam.network_type(net_text, strict=False)
    except ValueError:
        network = None
    if network is None or getattr(network.network_address, "scope_id", None):  # Go takes no %zone
        raise ConfigError(f"{nkey}: {net_text!r} is not an {fam.name} CIDR")
    if "/" not in net_text:
        raise ConfigError(f"{nkey}: {net_text!r} has no prefix length")

    len_key = f"{fam.keys}SubnetLen"
    subnet_len = _typed(obj, len_key, int, "", 0)
    if subnet_len:
        if subnet_len > fam.longest_subnet:
            raise ConfigError(f"{len_key}: {subnet_len} is too long (at most {fam.longest_subnet})")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError(f"{len_key}: {subnet_len} must be at least {nkey}'s length + 2 "
                              f"({network.prefixlen + 2}) so that {nkey} holds four subnets")
    else:
        if network.prefixlen > fam.longest_subnet - 2:
            raise ConfigError(f"{nkey}: /{network.prefixlen} is too small (at most /{fam.longest_subnet - 2})")
        wide = network.prefixlen <= fam.default_len - 2
        subnet_len = fam.default_len if wide else network.prefixlen + 2
    size = 1 << (fam.bits - subnet_len)

    def bound(key: str, default: int):
        text_value = _typed(obj, key, str, "", None)
        if text_value is None:
            return fam.address_type(default)
        try:
            addr = fam.address_type(text_value)
        except ValueError:
            addr = None
        if addr is None or getattr(addr, "scope_id", None):  # Go's ParseIP takes no %zone
            raise ConfigError(f"{key}: {text_value!r} is not an {fam.name} address")
        if addr not in network:
            raise ConfigError(f"{key}: {addr} is outside {nkey} {network}")
        if int(addr) % size:
            raise ConfigError(f"{key}: {addr} is not on a /{subnet_len} boundary")
        return addr

    # The first subnet is skipped by default, as flannel does (its first address would be the
    # network's own).
    min_key, max_key = f"{fam.keys}SubnetMin", f"{fam.keys}SubnetMax"
    subnet_min = bound(min_key, int(network.network_address) + size)
    subnet_max = bound(max_key, int(network.broadcast_address) + 1 - size)
    if subnet_min > subnet_max:
        raise ConfigError(f"{min_key}: {subnet_min} is above {max_key} {subnet_max}")
    return network, subnet_len, subnet_min, subnet_max
