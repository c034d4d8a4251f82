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

_KEY_RE = re.compile(r"^(\d+\.\d+\.\d+\.\d+)-(\d+)$")


class LeaseFormatError(ValueError):
    """A lease key or value that is not in flannel's format."""


def subnet_key(subnet: ipaddress.IPv4Network) -> str:
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str) -> ipaddress.IPv4Network:
    """``10.5.52.0-24`` -> IPv4Network; also accepts a full ``.../subnets/<key>`` path."""
    name = key.rsplit("/", 1)[-1]
    m = _KEY_RE.match(name)
    if not m:
        raise LeaseFormatError(f"lease key {key!r}: not of the form <ip>-<prefixlen>")
    try:
        return ipaddress.IPv4Network(f"{m.group(1)}/{m.group(2)}")
    except ValueError:
        raise LeaseFormatError(f"lease key {key!r}: not an IPv4 subnet with no host bits") from None


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
            raise LeaseFormatError(f"lease value is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise LeaseFormatError("lease value is not a JSON object")
        pub = doc.get("PublicIP")
        if not isinstance(pub, str):
            raise LeaseFormatError(f"lease value: PublicIP must be a string, got {json.dumps(pub)}")
        try:
            public_ip = ipaddress.IPv4Address(pub)
        except ValueError:
            raise LeaseFormatError(f"lease value: PublicIP {pub!r} is not an IPv4 address") from None
        btype = doc.get("BackendType", "") or ""
        if not isinstance(btype, str):
            raise LeaseFormatError(f"lease value: BackendType must be a string, got {json.dumps(btype)}")
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
