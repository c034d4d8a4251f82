"""The network config: flannel's JSON document stored at ``<prefix>/config``.

Parsing follows flannel's ``pkg/subnet/config.go`` so that a flannel user's config means the same
thing here: keys are matched case-insensitively (as Go's encoding/json does), unknown keys are
ignored, and SubnetLen/SubnetMin/SubnetMax get flannel's defaults and rules.

Two deliberate differences, both documented in the README:
- no ``Backend`` key means ``vxlan`` (flannel's documentation says so; flanneld's code picks ``udp``);
- ``Backend.Dataplane`` is weft's own key: it picks the implementation behind a wire format.

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
    network: ipaddress.IPv4Network
    subnet_len: int
    subnet_min: ipaddress.IPv4Address
    subnet_max: ipaddress.IPv4Address
    backend: BackendConfig
    raw: str = field(default="", compare=False, repr=False)

    @property
    def subnet_size(self) -> int:
        return 1 << (32 - self.subnet_len)

    @property
    def subnet_count(self) -> int:
        """How many subnets lie between SubnetMin and SubnetMax, inclusive."""
        return (int(self.subnet_max) - int(self.subnet_min)) // self.subnet_size + 1

    def subnet_at(self, index: int) -> ipaddress.IPv4Network:
        addr = ipaddress.IPv4Address(int(self.subnet_min) + index * self.subnet_size)
        return ipaddress.IPv4Network((addr, self.subnet_len))

    def contains_subnet(self, subnet: ipaddress.IPv4Network) -> bool:
        """True when ``subnet`` is one this config could hand out."""
        return (subnet.prefixlen == self.subnet_len
                and int(self.subnet_min) <= int(subnet.network_address) <= int(self.subnet_max))

    def with_dataplane(self, dataplane: str | None) -> "NetworkConfig":
        """The config as seen by a node that overrides the data plane (``weftd --dataplane``)."""
        if not dataplane:
            return self
        _check_dataplane(self.backend.type, dataplane, "--dataplane")
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


def _ipv4(text: str, key: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not an IPv4 address") from None


def _check_dataplane(wire: str, dataplane: str, key: str) -> None:
    known = registry.dataplane_names()
    if dataplane not in known:
        raise ConfigError(f"{key}: unknown data plane {dataplane!r} (known: {', '.join(known)})")
    have = [d.name for d in registry.dataplanes(wire)]
    if dataplane not in have:
        raise ConfigError(f"{key}: {wire} has no {dataplane!r} data plane (it has: {', '.join(have)})")


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

    if _typed(obj, "EnableIPv6", bool, "", False):
        raise ConfigError("EnableIPv6: IPv6 networks are not supported by weft yet")
    if not _typed(obj, "EnableIPv4", bool, "", True):
        raise ConfigError("EnableIPv4: weft needs an IPv4 network (EnableIPv4 false is not supported)")
    net_text = _typed(obj, "Network", str, "", None)
    if net_text is None:
        raise ConfigError("Network: missing (the cluster's IPv4 CIDR, e.g. \"10.244.0.0/16\")")
    try:
        # strict=False: flannel (Go's net.ParseCIDR) accepts host bits and masks them off.
        network = ipaddress.IPv4Network(net_text, strict=False)
    except ValueError:
        raise ConfigError(f"Network: {net_text!r} is not an IPv4 CIDR") from None
    if "/" not in net_text:
        raise ConfigError(f"Network: {net_text!r} has no prefix length")

    subnet_len = _typed(obj, "SubnetLen", int, "", 0)
    if subnet_len:
        if subnet_len > 30:
            raise ConfigError(f"SubnetLen: {subnet_len} is too long (at most 30)")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError(f"SubnetLen: {subnet_len} must be at least Network's length + 2 "
                              f"({network.prefixlen + 2}) so that Network holds four subnets")
    else:
        if network.prefixlen > 28:
            raise ConfigError(f"Network: /{network.prefixlen} is too small (at most /28)")
        subnet_len = 24 if network.prefixlen <= 22 else network.prefixlen + 2
    size = 1 << (32 - subnet_len)

    def bound(key: str, default: int) -> ipaddress.IPv4Address:
        text_value = _typed(obj, key, str, "", None)
        if text_value is None:
            return ipaddress.IPv4Address(default)
        addr = _ipv4(text_value, key)
        if addr not in network:
            raise ConfigError(f"{key}: {addr} is outside Network {network}")
        if int(addr) % size:
            raise ConfigError(f"{key}: {addr} is not on a /{subnet_len} boundary")
        return addr

    # The first subnet is skipped by default, as flannel does (its .0 would be the Network's address).
    subnet_min = bound("SubnetMin", int(network.network_address) + size)
    subnet_max = bound("SubnetMax", int(network.broadcast_address) + 1 - size)
    if subnet_min > subnet_max:
        raise ConfigError(f"SubnetMin: {subnet_min} is above SubnetMax {subnet_max}")

    present, backend_obj = _lookup(obj, "Backend")
    backend = parse_backend(backend_obj if present else None)
    return NetworkConfig(network, subnet_len, subnet_min, subnet_max, backend, text)
