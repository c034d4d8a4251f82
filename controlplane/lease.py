"""Leases: a node's claim on one subnet, in flannel's key and value formats.

Key:   ``<prefix>/subnets/10.5.52.0-24`` (flannel's ``MakeSubnetKey``).
Value: the JSON of flannel's ``lease.LeaseAttrs``, fields in Go's struct order, no spaces::

    {"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,...}}

BackendType and BackendData are omitted when empty (flanneld's udp backend writes neither). The
store never looks inside BackendData: each backend encodes and decodes its own.

Values written by someone else are checked field by field; a bad one raises ``LeaseFormatError``
with one line, so a watcher can skip and count it instead of crashing.
"""
from __future__ import annotations

import ipaddress
import json
import re
import time
from dataclasses import dataclass
from typing import Any

_KEY_RE = re.compile(r"^([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)-([0-9]+)$")


class LeaseFormatError(ValueError):
    """A lease key or value that is not in flannel's format. ``reason`` is one word of the fixed
    vocabulary ``controlplane.leasecheck.REASONS`` (the label of ``weft_leases_invalid_total``)."""

    def __init__(self, message: str, reason: str = "bad_field"):
        super().__init__(message)
        self.reason = reason


def _cut(text: str, limit: int = 64) -> str:
    """Text someone else wrote, cut short for a one-line message."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short(value: Any) -> str:
    """A JSON value for a one-line message, cut short: the value came from someone else."""
    return _cut(json.dumps(value))


def subnet_key(subnet: ipaddress.IPv4Network) -> str:
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str) -> ipaddress.IPv4Network:
    """``10.5.52.0-24`` -> IPv4Network; also accepts a full ``.../subnets/<key>`` path."""
    name = key.rsplit("/", 1)[-1]
    m = _KEY_RE.match(name)
    if not m:
        if "&" in name:  # flanneld's dual-stack key, <ip>-<len>&<ip6>-<len6>
            raise LeaseFormatError(f"lease key {_cut(key)!r}: a dual-stack key (weft is IPv4 only)",
                                   "bad_key")
        raise LeaseFormatError(f"lease key {_cut(key)!r}: not of the form <ip>-<prefixlen>", "bad_key")
    try:
        subnet = ipaddress.IPv4Network(f"{m.group(1)}/{m.group(2)}")
    except ValueError:
        raise LeaseFormatError(f"lease key {_cut(key)!r}: not an IPv4 subnet with no host bits",
                               "bad_key") from None
    if subnet_key(subnet) != name:  # e.g. 10.5.1.0-024: a second key for one subnet
        raise LeaseFormatError(f"lease key {_cut(key)!r}: not written as {subnet_key(subnet)}", "bad_key")
    return subnet


def subnet_of_name(name: str) -> ipaddress.IPv4Network | None:
    """The subnet of a key's name directly under ``subnets/`` (``10.5.52.0-24``); None for any
    other name there (nested, not ``<ip>-<len>``): the stores report those apart, as foreign."""
    if "/" in name:
        return None
    try:
        return parse_subnet_key(name)
    except LeaseFormatError:
        return None


@dataclass(frozen=True)
class LeaseAttrs:
    public_ip: ipaddress.IPv4Address
    backend_type: str = ""
    backend_data: Any = None  # decoded JSON, opaque to the store
    public_ipv6: str | None = None

    def to_json(self) -> str:
        doc: dict[str, Any] = {"PublicIP": str(self.public_ip), "PublicIPv6": self.public_ipv6}
        if self.backend_type:
            doc["BackendType"] = self.backend_type
        if self.backend_data is not None:
            doc["BackendData"] = self.backend_data
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "LeaseAttrs":
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LeaseFormatError(f"lease value is not JSON ({exc})", "not_json") from None
        except RecursionError:
            raise LeaseFormatError("lease value is not JSON (nested too deeply)", "not_json") from None
        if not isinstance(doc, dict):
            raise LeaseFormatError("lease value is not a JSON object", "not_json")
        if "PublicIP" not in doc:
            raise LeaseFormatError("lease value: no PublicIP", "bad_public_ip")
        pub = doc["PublicIP"]
        if not isinstance(pub, str):
            raise LeaseFormatError(f"lease value: PublicIP must be a string, got {_short(pub)}",
                                   "bad_public_ip")
        try:
            public_ip = ipaddress.IPv4Address(pub)
        except ValueError:
            raise LeaseFormatError(f"lease value: PublicIP {_cut(pub)!r} is not an IPv4 address",
                                   "bad_public_ip") from None
        btype = doc.get("BackendType", "") or ""
        if not isinstance(btype, str):
            raise LeaseFormatError(f"lease value: BackendType must be a string, got {_short(btype)}")
        v6 = doc.get("PublicIPv6")
        if v6 is not None and not isinstance(v6, str):
            raise LeaseFormatError("lease value: PublicIPv6 must be a string or null")
        return cls(public_ip, btype, doc.get("BackendData"), v6)

    @property
    def wire_type(self) -> str:
        """The wire format a peer speaks: flanneld's udp leases carry no BackendType."""
        return self.backend_type or "udp"


@dataclass(frozen=True)
class Lease:
    subnet: ipaddress.IPv4Network
    attrs: LeaseAttrs
    expiration: float | None  # epoch seconds; None: a reservation, which never expires
    revision: int = 0

    @property
    def key(self) -> str:
        return subnet_key(self.subnet)

    @property
    def is_reservation(self) -> bool:
        return self.expiration is None

    def remaining(self, now: float | None = None) -> float:
        if self.expiration is None:
            return float("inf")
        return self.expiration - (time.time() if now is None else now)

    def to_dict(self) -> dict:
        """The form ``weftctl leases --json`` prints."""
        return {
            "subnet": str(self.subnet),
            "public_ip": str(self.attrs.public_ip),
            "backend_type": self.attrs.backend_type,
            "backend_data": self.attrs.backend_data,
            "expiration": self.expiration,
            "reservation": self.is_reservation,
        }
