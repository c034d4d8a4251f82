"""Scenario files: a pure description of a lab, loaded from TOML and checked before anything is built.

A scenario says what to build, never how: ``bench.lab.Lab`` turns it into namespaces and processes.
Every key has a default, so ``name = "x"`` alone is a valid three-node SQLite/vxlan lab::

    name = "default"

    [lab]
    nodes = 3                     # node N is <prefix>nN with the underlay's Nth address
    pods_per_node = 1             # pod K of node N is <prefix>pNxK with .K+1 of the node's subnet
    underlay = "198.18.0.0/15"    # must lie inside 198.18.0.0/15 (RFC 2544 benchmarking space)
    underlay6 = "2001:db8:198:18::/64"  # dual-stack and IPv6-only: must lie inside 2001:db8::/32 (documentation space)
    mtu = 1500                    # the nodes' eth0 MTU
    store = "sqlite"              # or "etcd" (an etcd in namespace <prefix>st)
    etcd_tls = false              # etcd only: client TLS with a PKI made for the run
    etcd_members = 1              # etcd only: 1, or 3 (a cluster in <prefix>st, client ports 2379, 12379, 22379)
    store_tmpfs_mib = 0           # sqlite only: N puts the store file on an N MiB tmpfs the lab mounts (disk-full faults)
    prefix = "/coreos.com/network"
    pod_offloads = true           # false: ethtool -K eth0 tso off gso off in every pod
    node_cpus = true              # one CPU per node: its weftd and its receive path (see Lab)

    [network]
    config = {Network = "10.244.0.0/16", Backend = {Type = "vxlan"}}   # or a JSON string
    # "EnableIPv6": true with "IPv6Network" makes the lab dual-stack: nodes get underlay6 addresses
    # too, pods get both families through CNI, bench run measures IPv6 beside IPv4.
    # "EnableIPv4": false with those makes it IPv6-only: the nodes keep their IPv4 underlay (the
    # store and the harness use it), weftd and the overlay use underlay6, pods get IPv6 only,
    # bench run measures IPv6 alone.

    [nodes.2]
    dataplane = "fastpath"        # weftd --dataplane for this node only

    [weftd]
    flags = ["-ip-masq"]          # appended to every node's command line
    exec_start = "weftd ..."      # optional: the command as a systemd ExecStart line (see below)
    [weftd.env]                   # sysconfig-style variables (EnvironmentFile=), also exported
    FLANNEL_OPTIONS = "..."

``[weftd].env`` values may use the lab's own variables, which exist only once a run is built:
``${LAB_STORE_IP}``, ``${LAB_STORE_ENDPOINT}``, ``${LAB_PKI}`` (directory with ca.pem, client.pem,
client-key.pem), ``${LAB_DIR}``, ``${LAB_PREFIX}`` (the etcd prefix), ``${LAB_NODE}`` (N) and
``${LAB_NODE_IP}``. ``exec_start`` is then expanded as systemd does: ``${VAR}`` inside a word is
replaced in place, a word that is exactly ``$VAR`` splits into the value's words.

Every broken rule raises ``ScenarioError`` whose text is one line: ``FILE: KEY: rule``.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from typing import Any

from controlplane.config import ConfigError, NetworkConfig, parse_config

SAFE_UNDERLAY = ipaddress.IPv4Network("198.18.0.0/15")
SAFE_UNDERLAY6 = ipaddress.IPv6Network("2001:db8::/32")  # documentation space (RFC 3849), never routed
DEFAULT_UNDERLAY6 = ipaddress.IPv6Network("2001:db8:198:18::/64")
DEFAULT_NETWORK = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}
DEFAULT_PREFIX = "/coreos.com/network"
STORES = ("sqlite", "etcd")
MAX_NODES = 500  # 2 vCPUs: well beyond what one machine runs usefully, far below naming limits
MAX_PODS_PER_NODE = 64
DAEMON_NAMES = ("weftd", "flanneld")  # first word of exec_start; both mean weft's daemon
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SCENARIO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

TOP_KEYS = ("name", "description", "lab", "network", "nodes", "weftd")
LAB_KEYS = ("nodes", "pods_per_node", "underlay", "underlay6", "mtu", "store", "etcd_tls", "etcd_members", "prefix",
            "pod_offloads", "node_cpus", "store_address", "store_tmpfs_mib", "peer_leases")
MAX_PEER_LEASES = 20000
MAX_STORE_TMPFS_MIB = 1024
ETCD_MEMBERS = (1, 3)
NODE_KEYS = ("dataplane",)
WEFTD_KEYS = ("flags", "env", "exec_start")


class ScenarioError(ValueError):
    """A scenario that breaks a rule; str() is one line naming the file, the key and the rule."""


@dataclass(frozen=True)
class NodeSpec:
    index: int
    dataplane: str  # "" = the config's own (weftd gets no --dataplane)


@dataclass(frozen=True)
class WeftdSpec:
    flags: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    exec_start: str = ""


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    nodes: int = 3
    pods_per_node: int = 1
    underlay: ipaddress.IPv4Network = ipaddress.IPv4Network("198.18.0.0/15")
    underlay6: ipaddress.IPv6Network = DEFAULT_UNDERLAY6  # used when the config enables IPv6
    mtu: int = 1500
    store: str = "sqlite"
    etcd_tls: bool = False
    etcd_members: int = 1
    store_tmpfs_mib: int = 0  # sqlite: >0 puts the store file on a tmpfs of this size (bench.lab)
    prefix: str = DEFAULT_PREFIX
    pod_offloads: bool = True
    node_cpus: bool = True
    store_address: ipaddress.IPv4Address | None = None
    # >0: ``bench run`` measures how fast each data plane programs this many peer leases
    # (bench/scale_peers.py) instead of pod traffic.
    peer_leases: int = 0
    config_text: str = json.dumps(DEFAULT_NETWORK)
    network: NetworkConfig | None = None
    node_overrides: dict[int, NodeSpec] = field(default_factory=dict)
    weftd: WeftdSpec = field(default_factory=WeftdSpec)
    description: str = ""

    # -- derived, so the builder and the tests agree on every name and address --------------
    def node_ip(self, n: int) -> ipaddress.IPv4Address:
        return self.underlay.network_address + n

    def node_ip6(self, n: int) -> ipaddress.IPv6Address:
        return self.underlay6.network_address + n

    @property
    def has_ipv6(self) -> bool:
        """Whether the network config enables IPv6 (dual-stack or IPv6-only): the lab then builds
        the IPv6 underlay, weftd gets -public-ipv6 and pods get an IPv6 address."""
        return bool(self.network is not None and self.network.enable_ipv6)

    @property
    def ipv6_only(self) -> bool:
        """Whether the network has no IPv4 side (EnableIPv4 false): pods get IPv6 only."""
        return bool(self.network is not None and not self.network.enable_ipv4)

    @property
    def dual_stack(self) -> bool:
        """Whether the network carries both families: the lab builds both, pods get both."""
        return self.has_ipv6 and not self.ipv6_only

    @property
    def families(self) -> tuple[int, ...]:
        """The IP versions the overlay carries, IPv4 first: (4,), (4, 6) or (6,)."""
        return (4, 6) if self.dual_stack else (6,) if self.ipv6_only else (4,)

    @property
    def store_ip(self) -> ipaddress.IPv4Address:
        """The store's underlay address: ``store_address``, else the underlay's last usable one."""
        return self.store_address or (self.underlay.broadcast_address - 1)

    def node(self, n: int) -> NodeSpec:
        return self.node_overrides.get(n, NodeSpec(n, ""))

    def dataplane(self, n: int) -> str:
        """The data plane node ``n`` runs: its override, else the config's."""
        return self.node(n).dataplane or self.network.backend.dataplane

    @property
    def wire(self) -> str:
        return self.network.backend.type


def _fail(path: str, key: str, rule: str) -> ScenarioError:
    return ScenarioError(f"{path}: {key}: {rule}")


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", str: "a string", float: "a float",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _get(path: str, table: dict, key: str, where: str, kind: type, default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        want = {bool: "true or false", int: "an integer", str: "a string",
                list: "an array", dict: "a table"}[kind]
        raise _fail(path, f"{where}{key}", f"must be {want}, got {_type_name(value)}")
    return value


def _no_unknown(path: str, table: dict, known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            raise _fail(path, f"{where}{key}", f"unknown key (known: {', '.join(known)})")


def _table(path: str, doc: dict, key: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        hint = " (the node count is [lab] nodes)" if key == "nodes" else ""
        raise _fail(path, key, f"must be a table, got {_type_name(value)}{hint}")
    return value


def load(path: str) -> Scenario:
    """Read and validate a scenario file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    return loads(data, path)


def loads(data: bytes | str, path: str = "<scenario>") -> Scenario:
    """Validate scenario text; ``path`` names it in errors."""
    if isinstance(data, bytes):
        try:
            data = data.decode()
        except UnicodeDecodeError:
            raise ScenarioError(f"{path}: not UTF-8 text") from None
    try:
        doc = tomllib.loads(data)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML ({str(exc).splitlines()[0]})") from None
    return from_dict(doc, path)


def from_dict(doc: dict, path: str = "<scenario>") -> Scenario:
    """Validate an already-parsed scenario (e.g. built in Python by a benchmark).

    One reader per table, in file order; each returns what it checked, and the checks that join
    two tables (do the nodes and pods fit the network?) come after both are read.
    """
    _no_unknown(path, doc, TOP_KEYS, "")
    name, description = _read_name(path, doc)
    lab = _read_lab(path, _table(path, doc, "lab"))
    config_text, network = _read_network(path, _table(path, doc, "network"))
    _check_fit(path, lab, network)
    overrides = _read_node_overrides(path, _table(path, doc, "nodes"), lab["nodes"], network)
    weftd = _read_weftd(path, _table(path, doc, "weftd"))
    if network.ipv6_only:
        _check_ipv6_only(path, lab, weftd)
    return Scenario(name=name, path=path, **lab, config_text=config_text, network=network,
                    node_overrides=overrides, weftd=weftd, description=description)


def _read_name(path: str, doc: dict) -> tuple[str, str]:
    if "name" not in doc:
        raise _fail(path, "name", "missing (a short name for the scenario, e.g. \"default\")")
    name = _get(path, doc, "name", "", str, "")
    if not _SCENARIO_NAME.match(name):
        raise _fail(path, "name", f"{name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return name, _get(path, doc, "description", "", str, "")


def _read_lab(path: str, lab: dict) -> dict[str, Any]:
    """``[lab]`` as the Scenario fields it sets."""
    _no_unknown(path, lab, LAB_KEYS, "lab.")
    nodes = _get(path, lab, "nodes", "lab.", int, 3)
    if not 1 <= nodes <= MAX_NODES:
        raise _fail(path, "lab.nodes", f"{nodes} is outside 1..{MAX_NODES}")
    pods = _get(path, lab, "pods_per_node", "lab.", int, 1)
    if not 0 <= pods <= MAX_PODS_PER_NODE:
        raise _fail(path, "lab.pods_per_node", f"{pods} is outside 0..{MAX_PODS_PER_NODE}")
    underlay = _read_underlay(path, lab)
    underlay6 = _read_underlay6(path, lab)
    mtu = _get(path, lab, "mtu", "lab.", int, 1500)
    if not 576 <= mtu <= 65535:
        raise _fail(path, "lab.mtu", f"{mtu} is outside 576..65535")
    store = _read_store(path, lab)
    prefix = _read_prefix(path, lab)
    pod_offloads = _get(path, lab, "pod_offloads", "lab.", bool, True)
    node_cpus = _get(path, lab, "node_cpus", "lab.", bool, True)
    store_address = _read_store_address(path, lab, underlay, nodes)
    peer_leases = _get(path, lab, "peer_leases", "lab.", int, 0)
    if not 0 <= peer_leases <= MAX_PEER_LEASES:
        raise _fail(path, "lab.peer_leases", f"{peer_leases} is outside 0..{MAX_PEER_LEASES}")
    usable = underlay.num_addresses - 2
    if nodes + 1 > usable:
        raise _fail(path, "lab.nodes", f"{nodes} nodes and the store do not fit in {underlay} "
                    f"({usable} host addresses)")
    if nodes + 1 >= underlay6.num_addresses:
        raise _fail(path, "lab.nodes", f"{nodes} nodes and the store do not fit in {underlay6}")
    return dict(nodes=nodes, pods_per_node=pods, underlay=underlay, underlay6=underlay6, mtu=mtu, **store, prefix=prefix,
                pod_offloads=pod_offloads, node_cpus=node_cpus, store_address=store_address,
                peer_leases=peer_leases)


def _read_safe_net(path: str, lab: dict, key: str, kind: type, safe, space: str):
    """``[lab] <key>``: a CIDR of ``kind`` with no host bits inside ``safe`` (an address space
    that is never routed: the lab's traffic cannot leave it)."""
    text = _get(path, lab, key, "lab.", str, str(safe if kind is ipaddress.IPv4Network else DEFAULT_UNDERLAY6))
    family = "IPv4" if kind is ipaddress.IPv4Network else "IPv6"
    try:
        net = kind(text)
    except ValueError:
        raise _fail(path, f"lab.{key}", f"{text!r} is not an {family} CIDR with no host bits") from None
    if not net.subnet_of(safe):
        raise _fail(path, f"lab.{key}", f"{net} must lie inside {safe} ({space} space, never routed)")
    return net


def _read_underlay(path: str, lab: dict) -> ipaddress.IPv4Network:
    return _read_safe_net(path, lab, "underlay", ipaddress.IPv4Network, SAFE_UNDERLAY, "benchmarking")


def _read_underlay6(path: str, lab: dict) -> ipaddress.IPv6Network:
    return _read_safe_net(path, lab, "underlay6", ipaddress.IPv6Network, SAFE_UNDERLAY6, "documentation")


def _read_store(path: str, lab: dict) -> dict[str, Any]:
    """``store`` and the keys that need a certain store (``etcd_*``, ``store_tmpfs_mib``)."""
    store = _get(path, lab, "store", "lab.", str, "sqlite")
    if store not in STORES:
        raise _fail(path, "lab.store", f"unknown store {store!r} (known: {', '.join(STORES)})")
    etcd_tls = _get(path, lab, "etcd_tls", "lab.", bool, False)
    if etcd_tls and store != "etcd":
        raise _fail(path, "lab.etcd_tls", "needs store = \"etcd\"")
    etcd_members = _get(path, lab, "etcd_members", "lab.", int, 1)
    if etcd_members not in ETCD_MEMBERS:
        raise _fail(path, "lab.etcd_members", f"{etcd_members} is not one of {', '.join(map(str, ETCD_MEMBERS))}")
    if etcd_members > 1 and store != "etcd":
        raise _fail(path, "lab.etcd_members", "needs store = \"etcd\"")
    store_tmpfs_mib = _get(path, lab, "store_tmpfs_mib", "lab.", int, 0)
    if not 0 <= store_tmpfs_mib <= MAX_STORE_TMPFS_MIB:
        raise _fail(path, "lab.store_tmpfs_mib", f"{store_tmpfs_mib} is outside 0..{MAX_STORE_TMPFS_MIB}")
    if store_tmpfs_mib and store != "sqlite":
        raise _fail(path, "lab.store_tmpfs_mib", "needs store = \"sqlite\"")
    return dict(store=store, etcd_tls=etcd_tls, etcd_members=etcd_members, store_tmpfs_mib=store_tmpfs_mib)


def _read_prefix(path: str, lab: dict) -> str:
    prefix = _get(path, lab, "prefix", "lab.", str, DEFAULT_PREFIX)
    if not prefix.startswith("/") or prefix.rstrip("/") == "" or any(c.isspace() for c in prefix):
        raise _fail(path, "lab.prefix", f"{prefix!r} must be an absolute key path like \"/coreos.com/network\"")
    return prefix.rstrip("/")


def _read_store_address(path: str, lab: dict, underlay: ipaddress.IPv4Network,
                        nodes: int) -> ipaddress.IPv4Address | None:
    """A host address of the underlay that is no node's; None: the underlay's last (see store_ip)."""
    if "store_address" not in lab:
        return None
    text = _get(path, lab, "store_address", "lab.", str, "")
    try:
        store_address = ipaddress.IPv4Address(text)
    except ValueError:
        raise _fail(path, "lab.store_address", f"{text!r} is not an IPv4 address") from None
    if store_address not in underlay or store_address in (underlay.network_address,
                                                          underlay.broadcast_address):
        raise _fail(path, "lab.store_address", f"{store_address} is not a host address of {underlay}")
    if 1 <= int(store_address) - int(underlay.network_address) <= nodes:
        raise _fail(path, "lab.store_address", f"{store_address} is node "
                    f"{int(store_address) - int(underlay.network_address)}'s address")
    return store_address


def _read_network(path: str, table: dict) -> tuple[str, NetworkConfig]:
    """``[network] config``: the text weftd reads from the store, and what it parses to."""
    _no_unknown(path, table, ("config",), "network.")
    raw = table.get("config", DEFAULT_NETWORK)
    if isinstance(raw, dict):
        config_text = json.dumps(raw)
    elif isinstance(raw, str):
        config_text = raw
    else:
        raise _fail(path, "network.config", f"must be a table or a JSON string, got {_type_name(raw)}")
    try:
        return config_text, parse_config(config_text)
    except ConfigError as exc:
        raise _fail(path, "network.config", str(exc)) from None


def _check_fit(path: str, lab: dict, network: NetworkConfig) -> None:
    """Enough subnets for the nodes, enough addresses for the pods, room in the MTU for the wire."""
    nodes, pods, mtu = lab["nodes"], lab["pods_per_node"], lab["mtu"]
    if network.enable_ipv4 and network.subnet_count < nodes:
        raise _fail(path, "network.config", f"Network {network.network} holds "
                    f"{network.subnet_count} subnets of /{network.subnet_len}, fewer than {nodes} nodes")
    if network.enable_ipv6:
        size6 = 1 << (128 - network.ipv6_subnet_len)
        count6 = (int(network.ipv6_subnet_max) - int(network.ipv6_subnet_min)) // size6 + 1
        if count6 < nodes:
            raise _fail(path, "network.config", f"IPv6Network {network.ipv6_network} holds {count6} "
                        f"subnets of /{network.ipv6_subnet_len} between IPv6SubnetMin and IPv6SubnetMax, "
                        f"fewer than {nodes} nodes")
    # (an IPv6-only network's pods live in IPv6 subnets of at least 4 addresses: >= MAX_PODS_PER_NODE)
    if pods and network.enable_ipv4 and pods > network.subnet_size - 3:
        raise _fail(path, "lab.pods_per_node", f"{pods} pods do not fit in a /{network.subnet_len} "
                    f"subnet ({network.subnet_size - 3} pod addresses after .0, .1 and broadcast)")
    if network.backend.mtu == 0 and mtu - network.backend.mtu_overhead < 68:
        raise _fail(path, "lab.mtu", f"{mtu} leaves no room for {network.backend.type}'s "
                    f"{network.backend.mtu_overhead} bytes")


def _check_ipv6_only(path: str, lab: dict, weftd: WeftdSpec) -> None:
    """What an IPv6-only network (EnableIPv4 false) cannot do, refused before anything is built."""
    why = "the network is IPv6-only (EnableIPv4 false)"
    if lab["peer_leases"]:
        raise _fail(path, "lab.peer_leases", f"the peer-lease scale run writes IPv4 leases; {why}")
    for flag in weftd.flags:
        name, _, value = flag.lstrip("-").partition("=")
        if flag.startswith("-") and name == "source-guard" and value.lower() not in ("false", "0"):
            raise _fail(path, "weftd.flags", f"--source-guard is an IPv4 guard; {why}")
    if weftd.env.get("FLANNELD_SOURCE_GUARD", "").lower() in ("true", "1"):
        raise _fail(path, "weftd.env.FLANNELD_SOURCE_GUARD", f"--source-guard is an IPv4 guard; {why}")


def _read_node_overrides(path: str, table: dict, nodes: int, network: NetworkConfig) -> dict[int, NodeSpec]:
    """``[nodes.N]``: per-node data planes, each one the network's wire offers."""
    overrides: dict[int, NodeSpec] = {}
    for key, value in table.items():
        where = f"nodes.{key}"
        if not key.isdigit() or not 1 <= int(key) <= nodes:
            raise _fail(path, where, f"node {key!r} is not a node number in 1..{nodes}")
        if not isinstance(value, dict):
            raise _fail(path, where, f"must be a table, got {_type_name(value)}")
        _no_unknown(path, value, NODE_KEYS, where + ".")
        dataplane = _get(path, value, "dataplane", where + ".", str, "")
        if dataplane:
            try:
                network.with_dataplane(dataplane)
            except ConfigError as exc:
                rule = str(exc).split(": ", 1)[-1]
                raise _fail(path, where + ".dataplane", rule) from None
        overrides[int(key)] = NodeSpec(int(key), dataplane)
    return overrides


def _read_weftd(path: str, table: dict) -> WeftdSpec:
    """``[weftd]``: extra flags, sysconfig-style variables, an optional ExecStart line."""
    _no_unknown(path, table, WEFTD_KEYS, "weftd.")
    flags = _get(path, table, "flags", "weftd.", list, [])
    for i, flag in enumerate(flags):
        if not isinstance(flag, str):
            raise _fail(path, f"weftd.flags[{i}]", f"must be a string, got {_type_name(flag)}")
    env = _get(path, table, "env", "weftd.", dict, {})
    for key, value in env.items():
        if not _ENV_NAME.match(key):
            raise _fail(path, f"weftd.env.{key}", "not a valid environment variable name")
        if key.startswith("LAB_"):
            raise _fail(path, f"weftd.env.{key}", "LAB_* names are the lab's own variables")
        if not isinstance(value, str):
            raise _fail(path, f"weftd.env.{key}", f"must be a string, got {_type_name(value)}")
    exec_start = _get(path, table, "exec_start", "weftd.", str, "")
    if exec_start:
        try:
            words = shlex.split(exec_start)
        except ValueError as exc:
            raise _fail(path, "weftd.exec_start", f"cannot split into words ({exc})") from None
        if not words or os.path.basename(words[0]) not in DAEMON_NAMES:
            raise _fail(path, "weftd.exec_start", f"must start with {' or '.join(DAEMON_NAMES)}")
    return WeftdSpec(tuple(flags), dict(env), exec_start)


def to_dict(s: Scenario) -> dict:
    """The scenario as a dict that ``from_dict`` reads back (a lab's state keeps it, for attach).
    ``[lab]`` is every LAB_KEYS field, so a new lab key needs no edit here."""
    lab = {}
    for key in LAB_KEYS:
        value = getattr(s, key)
        if value is not None:
            lab[key] = str(value) if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv4Address,
                                                        ipaddress.IPv6Network)) else value
    weftd = {"flags": list(s.weftd.flags), "env": dict(s.weftd.env)}
    if s.weftd.exec_start:
        weftd["exec_start"] = s.weftd.exec_start
    doc = {"name": s.name, "lab": lab, "network": {"config": s.config_text}, "weftd": weftd,
           "nodes": {str(k): {"dataplane": v.dataplane} for k, v in s.node_overrides.items() if v.dataplane}}
    if s.description:
        doc["description"] = s.description
    return doc


# -- systemd-style expansion, used by the lab for [weftd] exec_start ------------------------------
_BRACED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BARE = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")


def substitute(text: str, variables: dict[str, str]) -> str:
    """Replace every ``${NAME}`` with its value ('' when unset), as systemd does inside a word."""
    return _BRACED.sub(lambda m: variables.get(m.group(1), ""), text)


def expand_exec_start(line: str, variables: dict[str, str]) -> list[str]:
    """A systemd ExecStart= line as argv: ``$VAR`` alone splits into words, ``${VAR}`` does not."""
    argv: list[str] = []
    for word in shlex.split(line):
        bare = _BARE.match(word)
        if bare:
            argv.extend(variables.get(bare.group(1), "").split())
        else:
            argv.append(substitute(word, variables))
    return argv
