"""Judging leases someone else wrote, before a daemon acts on them.

Anyone who can write to the store can write under ``<prefix>/subnets/``. weftd follows a lease
only when every check below passes; the first that fails names the reason, one word of
``REASONS``, which is the label of ``weft_leases_invalid_total``:

  bad_key           the key is not ``<ip>-<len>`` as flannel writes it (no host bits, no leading
                    zeros, nothing nested under it): ``garbage``, ``10.244.1.5-24``,
                    ``10.244.1.0-24/x``, a dual-stack ``<ip>-<len>&<ip6>-<len6>`` key
  outside_network   the subnet is not inside the config's Network
  wrong_length      the subnet is not a SubnetLen subnet
  not_json          the value is not a JSON object
  bad_public_ip     PublicIP is missing, not an IPv4 address, or not one a node can have
                    (0.0.0.0/8, loopback, multicast, 240.0.0.0/4 and the broadcast address)
  bad_field         another field has the wrong type (BackendType, PublicIPv6)
  bad_backend_data  BackendData does not fit BackendType: vxlan needs an object with a unicast
                    ``VtepMAC`` and, when present, an integer ``VNI`` 0..16777215 (flannel's older
                    leases carry no VNI); other types' BackendData is theirs and not judged here
  own_subnet        this node's own key, written by someone else with another value (judged by the
                    daemon, which alone knows its lease)

Overlap needs no reason of its own: canonical keys of SubnetLen subnets are equal or disjoint, so
of two overlapping leases at least one is not a SubnetLen subnet and is refused as
``wrong_length`` (``10.244.204.0-23`` next to ``10.244.205.0-24``: the /23). A lease inside
Network but outside SubnetMin..SubnetMax is followed: those bound allocation, and an operator may
reserve a subnet there with etcdctl.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
from collections import Counter

from fastpath.vxlan.vtep import parse_unicast_mac  # the rule every vxlan data plane applies

from .config import NetworkConfig
from .lease import Lease, LeaseAttrs, LeaseFormatError, parse_subnet_key
from .store import LeaseRecord

REASONS = ("bad_key", "outside_network", "wrong_length", "not_json", "bad_public_ip", "bad_field",
           "bad_backend_data", "own_subnet")
VNI_MAX = (1 << 24) - 1

_NOT_A_NODE = [(ipaddress.IPv4Network("0.0.0.0/8"), "a 'this network' address (0.0.0.0/8)"),
               (ipaddress.IPv4Network("127.0.0.0/8"), "a loopback address"),
               (ipaddress.IPv4Network("224.0.0.0/4"), "a multicast address"),
               (ipaddress.IPv4Network("240.0.0.0/4"), "a reserved address (240.0.0.0/4)")]


def shown(name: str, limit: int = 120) -> str:
    """A key name someone else wrote, safe for one log line: escaped, cut short."""
    text = name if name.isprintable() else repr(name)[1:-1]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def key_problem(name: str) -> str:
    """Why ``name`` (under ``<prefix>/subnets/``) is not a lease key."""
    if "/" in name:
        return f"lease key {shown(name, 64)!r}: a nested key, not <ip>-<prefixlen>"
    try:
        parse_subnet_key(name)
    except LeaseFormatError as exc:
        return str(exc)
    return f"lease key {shown(name, 64)!r}: not a lease key"


def check_subnet(subnet: ipaddress.IPv4Network, config: NetworkConfig) -> None:
    if not subnet.subnet_of(config.network):
        raise LeaseFormatError(f"{subnet} is outside Network {config.network}", "outside_network")
    if subnet.prefixlen != config.subnet_len:
        raise LeaseFormatError(f"{subnet} is not a /{config.subnet_len} (SubnetLen)", "wrong_length")


def check_attrs(attrs: LeaseAttrs) -> None:
    for net, what in _NOT_A_NODE:
        if attrs.public_ip in net:
            raise LeaseFormatError(f"lease value: PublicIP {attrs.public_ip} is {what}", "bad_public_ip")
    if attrs.backend_type == "vxlan":
        data = attrs.backend_data
        if not isinstance(data, dict):
            raise LeaseFormatError("lease value: vxlan BackendData must be an object with VtepMAC",
                                   "bad_backend_data")
        mac = data.get("VtepMAC")
        if parse_unicast_mac(mac) is None:
            what = "missing" if mac is None else f"{str(mac)[:40]!r} is not a unicast MAC"
            raise LeaseFormatError(f"lease value: vxlan VtepMAC {what}", "bad_backend_data")
        vni = data.get("VNI")
        if vni is not None and (not isinstance(vni, int) or isinstance(vni, bool)
                                or not 0 <= vni <= VNI_MAX):
            raise LeaseFormatError(f"lease value: vxlan VNI {str(vni)[:40]} is not an integer"
                                   f" 0..{VNI_MAX}", "bad_backend_data")


def judge(record: LeaseRecord, config: NetworkConfig | None = None) -> Lease:
    """The lease in ``record`` when weftd may follow it; else LeaseFormatError with the reason.
    Without a config only the key and value are judged (what weftctl does with no config)."""
    if config is not None:
        check_subnet(record.subnet, config)
    attrs = LeaseAttrs.from_json(record.value)
    check_attrs(attrs)
    return Lease(record.subnet, attrs, record.expiration, record.revision)


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
