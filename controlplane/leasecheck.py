"""Judging leases someone else wrote, before a daemon acts on them.

Anyone who can write to the store can write under ``<prefix>/subnets/``. weftd follows a lease
only when every check below passes; the first that fails names the reason, one word of
``REASONS``, which is the label of ``weft_leases_invalid_total``:

  bad_key           the key is not ``<ip>-<len>`` or ``<ip>-<len>&<ip6>-<len6>`` as flannel writes
                    it (no host bits, no leading zeros, the IPv6 address in RFC 5952's form,
                    nothing nested under it): ``garbage``, ``10.244.1.5-24``, ``10.244.1.0-24/x``,
                    ``10.244.1.0-24&FD00::-64``, ``10.244.1.0-24&fd00::1-64``
  outside_network   the subnet is not inside the config's Network (its IPv6 part: IPv6Network);
                    on an IPv6-only network, an IPv4 part other than ``0.0.0.0-0``; on a network
                    with IPv4, an IPv6-only lease (``0.0.0.0-0&...``)
  wrong_length      the subnet is not a SubnetLen subnet (its IPv6 part: IPv6SubnetLen)
  not_json          the value is not a JSON object
  bad_public_ip     PublicIP is missing, not an IPv4 address, or not one a node can have
                    (0.0.0.0/8, loopback, multicast, 240.0.0.0/4 and the broadcast address);
                    PublicIPv6 not an IPv6 address, or not one a node can have (::, loopback,
                    multicast, link-local, IPv4-mapped)
  bad_field         another field has the wrong type (BackendType, PublicIPv6)
  bad_backend_data  BackendData (or BackendV6Data) does not fit BackendType, by the wire format's
                    own rule (``spec.Wire.check_backend_data``): vxlan needs an object with a
                    unicast ``VtepMAC`` and, when present, an integer ``VNI`` 0..16777215 (flannel's
                    older leases carry no VNI); wire formats without a rule carry none to judge
  own_subnet        this node's own key, written by someone else with another value (judged by the
                    daemon, which alone knows its lease)
  overlap           its IPv6 subnet is already another lease's (a key of another identity,
                    ``Lease.ident``): the lease known first keeps it (judged by the watcher, which
                    knows every lease); the refused one is followed once the other lets go of it

IPv4 overlap needs no reason of its own: canonical keys of SubnetLen subnets are equal or disjoint, so
of two overlapping leases at least one is not a SubnetLen subnet and is refused as
``wrong_length`` (``10.244.204.0-23`` next to ``10.244.205.0-24``: the /23). A lease inside
Network but outside SubnetMin..SubnetMax is followed: those bound allocation, and an operator may
reserve a subnet there with etcdctl.

Dual-stack: the IPv6 part of a lease (key part, PublicIPv6, BackendV6Data) is judged only on a
node whose config has EnableIPv6; a node without it follows the IPv4 part of a dual-stack lease
and ignores the rest, and a dual-stack node follows a lease without IPv6 part on IPv4 only.

IPv6-only (EnableIPv4 false): a lease's key is ``0.0.0.0-0&<ip6>-<len6>`` (anything else is
``outside_network``), its IPv6 part is judged as above, and PublicIPv6 is required; PublicIP
(flanneld writes 0.0.0.0) and BackendData are not judged, since nothing reads them.
"""
from __future__ import annotations

import functools
import importlib
import ipaddress
import logging
import threading
from collections import Counter

from . import backends as registry
from .config import NetworkConfig
from .lease import NO_IPV4, Lease, LeaseAttrs, LeaseFormatError, parse_lease_key
from .store import LeaseRecord

REASONS = ("bad_key", "outside_network", "wrong_length", "not_json", "bad_public_ip", "bad_field",
           "bad_backend_data", "own_subnet", "overlap")

_NOT_A_NODE = [(ipaddress.IPv4Network("0.0.0.0/8"), "a 'this network' address (0.0.0.0/8)"),
               (ipaddress.IPv4Network("127.0.0.0/8"), "a loopback address"),
               (ipaddress.IPv4Network("224.0.0.0/4"), "a multicast address"),
               (ipaddress.IPv4Network("240.0.0.0/4"), "a reserved address (240.0.0.0/4)")]
NOT_A_NODE6 = [(ipaddress.IPv6Network("::/128"), "the unspecified address"),
                (ipaddress.IPv6Network("::1/128"), "a loopback address"),
                (ipaddress.IPv6Network("ff00::/8"), "a multicast address"),
                (ipaddress.IPv6Network("fe80::/10"), "a link-local address"),
                (ipaddress.IPv6Network("::ffff:0:0/96"), "an IPv4-mapped address")]


def not_a_node(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What ``addr`` is when no node can have it as its public address (peers refuse such a
    lease: bad_public_ip), e.g. "a loopback address"; None for an address a node can have."""
    for net, what in (_NOT_A_NODE if addr.version == 4 else NOT_A_NODE6):
        if addr in net:
            return what
    return None


def shown(name: str, limit: int = 120) -> str:
    """A key name someone else wrote, safe for one log line: escaped, cut short."""
    text = name if name.isprintable() else repr(name)[1:-1]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def key_problem(name: str) -> str:
    """Why ``name`` (under ``<prefix>/subnets/``) is not a lease key."""
    if "/" in name:
        return f"lease key {shown(name, 64)!r}: a nested key, not <ip>-<prefixlen>"
    try:
        parse_lease_key(name)
    except LeaseFormatError as exc:
        return str(exc)
    return f"lease key {shown(name, 64)!r}: not a lease key"


def check_subnet(subnet: ipaddress.IPv4Network, config: NetworkConfig) -> None:
    if config.ipv6_only:
        if subnet != NO_IPV4:
            raise LeaseFormatError(f"{subnet} on an IPv6-only network (EnableIPv4 false): a lease's IPv4 "
                                   "part must be flannel's empty 0.0.0.0-0", "outside_network")
        return
    if subnet == NO_IPV4:
        raise LeaseFormatError(f"an IPv6-only lease (IPv4 part 0.0.0.0-0) on a network with IPv4 "
                               f"(Network {config.network}): it has no IPv4 subnet", "outside_network")
    if not subnet.subnet_of(config.network):
        raise LeaseFormatError(f"{subnet} is outside Network {config.network}", "outside_network")
    if subnet.prefixlen != config.subnet_len:
        raise LeaseFormatError(f"{subnet} is not a /{config.subnet_len} (SubnetLen)", "wrong_length")


def check_subnet6(subnet6: ipaddress.IPv6Network, config: NetworkConfig) -> None:
    if not subnet6.subnet_of(config.ipv6_network):
        raise LeaseFormatError(f"{subnet6} is outside IPv6Network {config.ipv6_network}", "outside_network")
    if subnet6.prefixlen != config.ipv6_subnet_len:
        raise LeaseFormatError(f"{subnet6} is not a /{config.ipv6_subnet_len} (IPv6SubnetLen)",
                               "wrong_length")


@functools.lru_cache(maxsize=None)
def _backend_data_rule(wire_type: str):
    """The wire format's declared BackendData rule (imported once: a node judges every lease)."""
    wire = registry.wire(wire_type)
    if wire is None or wire.check_backend_data is None:
        return None
    module, _, fn = wire.check_backend_data.partition(":")
    return getattr(importlib.import_module(module), fn)


def _backend_data_problem(wire_type: str, data) -> str | None:
    """Why ``data`` does not fit the wire format ``wire_type``, by its declared rule; None when
    it fits or the wire format declares none (an unknown BackendType: not ours to judge)."""
    rule = _backend_data_rule(wire_type)
    return None if rule is None else rule(data)


def check_attrs(attrs: LeaseAttrs, ipv6: bool = False, ipv4: bool = True) -> None:
    """The value's fields; with ``ipv6`` (a dual-stack lease on a dual-stack node, or an IPv6-only
    lease) also PublicIPv6 and BackendV6Data. Without ``ipv4`` (an IPv6-only lease) PublicIP and
    BackendData are not judged: nothing reads them (flanneld writes PublicIP 0.0.0.0, its empty
    ip.IP4, and no BackendData), and PublicIPv6 is required: it is how the node is reached."""
    if ipv4:
        what = not_a_node(attrs.public_ip)
        if what:
            raise LeaseFormatError(f"lease value: PublicIP {attrs.public_ip} is {what}", "bad_public_ip")
        why = _backend_data_problem(attrs.backend_type, attrs.backend_data)
        if why:
            raise LeaseFormatError(f"lease value: {attrs.backend_type} BackendData: {why}", "bad_backend_data")
    elif attrs.public_ipv6 is None:
        raise LeaseFormatError("lease value: an IPv6-only lease (0.0.0.0-0&...) needs a PublicIPv6",
                               "bad_public_ip")
    if not ipv6:
        return
    what = None if attrs.public_ipv6 is None else not_a_node(attrs.public_ipv6)
    if what:
        raise LeaseFormatError(f"lease value: PublicIPv6 {attrs.public_ipv6} is {what}", "bad_public_ip")
    if attrs.backend_v6_data is not None or attrs.public_ipv6 is not None:
        why = _backend_data_problem(attrs.backend_type, attrs.backend_v6_data)
        if why:
            raise LeaseFormatError(f"lease value: {attrs.backend_type} BackendV6Data: {why}",
                                   "bad_backend_data")


def judge(record: LeaseRecord, config: NetworkConfig | None = None) -> Lease:
    """The lease in ``record`` when weftd may follow it; else LeaseFormatError with the reason.
    Without a config only the key and value are judged (what weftctl does with no config), the
    IPv6 part included. With a config without EnableIPv6 the IPv6 part is not judged: such a
    node follows the lease's IPv4 part only (its data planes never read the rest)."""
    ipv6 = record.subnet6 is not None and (config is None or config.enable_ipv6)
    if config is not None:
        check_subnet(record.subnet, config)
        if ipv6:
            check_subnet6(record.subnet6, config)
    attrs = LeaseAttrs.from_json(record.value)
    check_attrs(attrs, ipv6, ipv4=record.subnet != NO_IPV4)
    return Lease(record.subnet, attrs, record.expiration, record.revision, record.subnet6)


class InvalidLeases:
    """Logs and counts each distinct bad write once: a key seen again at the same revision (a
    re-list after a reconnect or a compaction) is quiet; a new write to it is a new bad write."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self.counts: Counter[str] = Counter()
        self._seen: dict[str, int] = {}  # key name under subnets/ -> revision last reported
        self._lock = threading.Lock()

    def report(self, name: str, revision: int, reason: str, message: str) -> bool:
        """True when this (name, revision) is new, and so was logged and counted."""
        with self._lock:
            if self._seen.get(name) == revision:
                return False
            self._seen[name] = revision
            self.counts[reason] += 1
        self.log.warning("invalid lease subnets/%s (%s): %s; ignored", shown(name), reason, message)
        return True

    def forget(self, name: str) -> None:
        with self._lock:
            self._seen.pop(name, None)

    def keep_only(self, names: set[str]) -> None:
        """After a full listing: forget keys that are gone (the memory stays the store's size)."""
        with self._lock:
            self._seen = {k: v for k, v in self._seen.items() if k in names}

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {reason: self.counts.get(reason, 0) for reason in REASONS}
