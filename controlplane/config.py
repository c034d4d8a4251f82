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

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

# Wire format (flannel's Backend.Type) -> the data planes that implement it; the first is the default.
WIRE_DATAPLANES: dict[str, tuple[str, ...]] = {
    "vxlan": ("kernel", "ebpf", "fastpath"),
    "host-gw": ("kernel",),
    "udp": ("fastpath", "python"),
    "alloc": ("kernel",),
}
DATAPLANES = ("kernel", "ebpf", "fastpath", "python")

# Bytes of encapsulation each wire format adds (flannel's values): FLANNEL_MTU = iface MTU - overhead.
MTU_OVERHEAD = {"vxlan": 50, "udp": 28, "host-gw": 0, "alloc": 0}
DEFAULT_PORT = {"vxlan": 8472, "udp": 8285}
DEFAULT_VNI = 1


class ConfigError(ValueError):
    """A config that breaks a rule. str() is one line naming the key and the rule."""


@dataclass(frozen=True)
class BackendConfig:
    type: str = "vxlan"
    dataplane: str = "kernel"
    port: int = 0  # 0: the wire format's default (see ``effective_port``)
    vni: int = DEFAULT_VNI
    direct_routing: bool = False
    mtu: int = 0  # 0: the interface's MTU
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.type}/{self.dataplane}"

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORT.get(self.type, 0)

    @property
    def mtu_overhead(self) -> int:
        return MTU_OVERHEAD[self.type]


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
        b = self.backend
        backend = BackendConfig(b.type, dataplane, b.port, b.vni, b.direct_routing, b.mtu, b.raw)
        return NetworkConfig(self.network, self.subnet_len, self.subnet_min, self.subnet_max,
                             backend, self.raw)


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
    if dataplane not in DATAPLANES:
        raise ConfigError(f"{key}: unknown data plane {dataplane!r} (known: {', '.join(DATAPLANES)})")
    if dataplane not in WIRE_DATAPLANES[wire]:
        raise ConfigError(f"{key}: {wire} has no {dataplane!r} data plane "
                          f"(it has: {', '.join(WIRE_DATAPLANES[wire])})")


def parse_backend(obj: Any) -> BackendConfig:
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise ConfigError(f"Backend: must be an object, got {json.dumps(obj)}")
    wire = _typed(obj, "Type", str, "Backend.", "vxlan")
    if wire not in WIRE_DATAPLANES:
        raise ConfigError(f"Backend.Type: unknown backend {wire!r} "
                          f"(known: {', '.join(WIRE_DATAPLANES)})")
    dataplane = _typed(obj, "Dataplane", str, "Backend.", WIRE_DATAPLANES[wire][0])
    _check_dataplane(wire, dataplane, "Backend.Dataplane")
    port = _typed(obj, "Port", int, "Backend.", 0)
    if not 0 <= port <= 65535:
        raise ConfigError(f"Backend.Port: {port} is outside 0..65535")
    vni = _typed(obj, "VNI", int, "Backend.", DEFAULT_VNI)
    if not 0 <= vni < 1 << 24:
        raise ConfigError(f"Backend.VNI: {vni} is outside 0..16777215")
    direct = _typed(obj, "DirectRouting", bool, "Backend.", False)
    mtu = _typed(obj, "MTU", int, "Backend.", 0)
    if mtu and not 576 <= mtu <= 65535:
        raise ConfigError(f"Backend.MTU: {mtu} is outside 576..65535")
    if mtu and mtu - MTU_OVERHEAD[wire] < 68:
        raise ConfigError(f"Backend.MTU: {mtu} leaves no room for {wire}'s {MTU_OVERHEAD[wire]} bytes")
    return BackendConfig(wire, dataplane, port, vni, direct, mtu, dict(obj))


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
