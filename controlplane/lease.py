"""Leases: a node's claim on one subnet, in flannel's key and value formats.

Key:   ``<prefix>/subnets/10.5.52.0-24`` (flannel's ``MakeSubnetKey``); a dual-stack lease's key
       adds its IPv6 subnet: ``10.5.52.0-24&fd10:244:0:34::-64``; an IPv6-only lease's IPv4 part
       is flannel's empty one, ``0.0.0.0-0&fd10:244:0:34::-64`` (``NO_IPV4``).
Value: the JSON of flannel's ``lease.LeaseAttrs``, fields in Go's struct order, no spaces::

    {"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,...}}

(dual-stack: ``"PublicIPv6":"2001:db8::1"`` and ``"BackendV6Data":{...}`` after BackendData;
IPv6-only: ``"PublicIP":"0.0.0.0"``, as flanneld's empty ``ip.IP4`` prints, and no BackendData).

A lease's identity is ``Lease.ident``: its IPv4 subnet, or its IPv6 subnet when it has no IPv4
part. Within one network the identities of valid leases never collide (every lease of an
IPv6-only network has the same IPv4 part, so the IPv4 subnet alone cannot be the identity).
BackendType, BackendData and BackendV6Data are omitted when empty (flanneld's udp backend writes neither). The
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

# flannel's empty ``ip.IP4Net``: the IPv4 part of an IPv6-only lease's key (``0.0.0.0-0``), and the
# empty ``ip.IP4`` that such a lease carries as its PublicIP.
NO_IPV4 = ipaddress.IPv4Network("0.0.0.0/0")
NO_PUBLIC_IP = ipaddress.IPv4Address("0.0.0.0")

Ident = ipaddress.IPv4Network | ipaddress.IPv6Network  # what ``lease_ident`` returns

# flannel's ParseSubnetKey, anchored at both ends (digits in ASCII only).
_KEY_RE = re.compile(r"^([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)-([0-9]+)(?:&([0-9a-f:]+)-([0-9]+))?$")


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


def subnet_key(subnet: ipaddress.IPv4Network, subnet6: ipaddress.IPv6Network | None = None) -> str:
    """flannel's ``MakeSubnetKey``: ``10.5.52.0-24``, or ``10.5.52.0-24&fd10:244:0:3::-64`` for a
    dual-stack lease (the IPv6 address as Go prints it, which is RFC 5952's form, as Python's)."""
    v4 = f"{subnet.network_address}-{subnet.prefixlen}"
    return v4 if subnet6 is None else f"{v4}&{subnet6.network_address}-{subnet6.prefixlen}"


def shown(subnet: ipaddress.IPv4Network, subnet6: ipaddress.IPv6Network | None = None) -> str:
    """A lease's subnets for a log line: ``10.5.52.0/24``, or ``10.5.52.0/24+fd10:244:0:34::/64``,
    or ``fd10:244:0:34::/64`` for an IPv6-only lease."""
    if subnet6 is None:
        return str(subnet)
    return str(subnet6) if subnet == NO_IPV4 else f"{subnet}+{subnet6}"


def lease_ident(subnet: ipaddress.IPv4Network, subnet6: ipaddress.IPv6Network | None = None) -> Ident:
    """What names a lease among the others (``Lease.ident``): its IPv4 subnet, or its IPv6 subnet
    when its IPv4 part is flannel's empty one (an IPv6-only lease)."""
    return subnet6 if subnet == NO_IPV4 and subnet6 is not None else subnet


def parse_lease_key(key: str) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network | None]:
    """``10.5.52.0-24`` -> (IPv4Network, None); ``10.5.52.0-24&fd10:244:0:3::-64`` -> (IPv4Network,
    IPv6Network) (flannel's ``ParseSubnetKey``); also accepts a full ``.../subnets/<key>`` path.
    Only the form flannel writes is a key: no host bits, no leading zeros, the IPv6 address in
    RFC 5952's form (as Go prints it), so that one lease never has two keys."""
    name = key.rsplit("/", 1)[-1]
    m = _KEY_RE.match(name)
    if not m:
        raise LeaseFormatError(f"lease key {_cut(key)!r}: not of the form <ip>-<prefixlen>"
                               " or <ip>-<prefixlen>&<ip6>-<prefixlen6>", "bad_key")
    try:
        subnet = ipaddress.IPv4Network(f"{m.group(1)}/{m.group(2)}")
    except ValueError:
        raise LeaseFormatError(f"lease key {_cut(key)!r}: not an IPv4 subnet with no host bits",
                               "bad_key") from None
    subnet6 = None
    if m.group(3) is not None:
        try:
            subnet6 = ipaddress.IPv6Network(f"{m.group(3)}/{m.group(4)}")
        except ValueError:
            raise LeaseFormatError(f"lease key {_cut(key)!r}: the part after '&' is not an IPv6 "
                                   "subnet with no host bits", "bad_key") from None
    canonical = subnet_key(subnet, subnet6)
    if canonical != name:  # e.g. 10.5.1.0-024, fd10:0244::-64: a second key for one lease
        raise LeaseFormatError(f"lease key {_cut(key)!r}: not written as {_cut(canonical)}", "bad_key")
    if subnet == NO_IPV4 and subnet6 is None:
        raise LeaseFormatError(f"lease key {_cut(key)!r}: the empty IPv4 subnet names a lease only "
                               "with an IPv6 part (0.0.0.0-0&<ip6>-<prefixlen6>)", "bad_key")
    return subnet, subnet6


def lease_key_of_name(name: str) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network | None] | None:
    """The (subnet, subnet6) of a key's name directly under ``subnets/`` (``10.5.52.0-24``, or
    with ``&<ip6>-<len6>``); None for any other name there (nested, not a lease key): the stores
    report those apart, as foreign."""
    if "/" in name:
        return None
    try:
        return parse_lease_key(name)
    except LeaseFormatError:
        return None


@dataclass(frozen=True)
class LeaseAttrs:
    public_ip: ipaddress.IPv4Address
    backend_type: str = ""
    backend_data: Any = None  # decoded JSON, opaque to the store
    public_ipv6: ipaddress.IPv6Address | None = None  # JSON null when the node has no IPv6
    backend_v6_data: Any = None  # the IPv6 side's BackendData (vxlan: flannel-v6.<VNI>'s VtepMAC)

    def to_json(self) -> str:
        v6 = None if self.public_ipv6 is None else str(self.public_ipv6)
        doc: dict[str, Any] = {"PublicIP": str(self.public_ip), "PublicIPv6": v6}
        if self.backend_type:
            doc["BackendType"] = self.backend_type
        if self.backend_data is not None:
            doc["BackendData"] = self.backend_data
        if self.backend_v6_data is not None:
            doc["BackendV6Data"] = self.backend_v6_data
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
        public_ipv6 = None
        if v6 is not None:
            try:
                public_ipv6 = ipaddress.IPv6Address(v6)
            except ValueError:
                public_ipv6 = None
            if public_ipv6 is None or public_ipv6.scope_id:  # flanneld (Go's ParseIP) takes no %zone
                raise LeaseFormatError(f"lease value: PublicIPv6 {_cut(v6)!r} is not an IPv6 address",
                                       "bad_public_ip")
        return cls(public_ip, btype, doc.get("BackendData"), public_ipv6, doc.get("BackendV6Data"))

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
    subnet6: ipaddress.IPv6Network | None = None  # the IPv6 subnet of a dual-stack or IPv6-only lease

    @property
    def key(self) -> str:
        return subnet_key(self.subnet, self.subnet6)

    @property
    def has_ipv4(self) -> bool:
        """False for an IPv6-only lease (IPv4 part ``0.0.0.0-0``): it has no IPv4 side at all."""
        return self.subnet != NO_IPV4

    @property
    def ident(self) -> Ident:
        """What names this lease among the others: its IPv4 subnet, or its IPv6 subnet when it
        is IPv6-only. Key dicts of leases by this, never by ``subnet`` alone."""
        return lease_ident(self.subnet, self.subnet6)

    @property
    def shown(self) -> str:
        """Its subnets for a log line (``10.5.52.0/24``, ``10.5.52.0/24+fd10:244:0:34::/64``)."""
        return shown(self.subnet, self.subnet6)

    @property
    def is_reservation(self) -> bool:
        return self.expiration is None

    def remaining(self, now: float | None = None) -> float:
        if self.expiration is None:
            return float("inf")
        return self.expiration - (time.time() if now is None else now)

    def to_dict(self) -> dict:
        """The form ``weftctl leases --json`` prints. The IPv6 fields are there when the lease
        has an IPv6 part (an IPv4-only lease prints as it always did)."""
        v4 = self.has_ipv4  # an IPv6-only lease prints null for its empty IPv4 parts
        out = {
            "subnet": str(self.subnet) if v4 else None,
            "public_ip": str(self.attrs.public_ip) if v4 or self.attrs.public_ip != NO_PUBLIC_IP else None,
            "backend_type": self.attrs.backend_type,
            "backend_data": self.attrs.backend_data,
            "expiration": self.expiration,
            "reservation": self.is_reservation,
        }
        if self.subnet6 is not None or self.attrs.public_ipv6 is not None:
            out["subnet6"] = None if self.subnet6 is None else str(self.subnet6)
            out["public_ipv6"] = None if self.attrs.public_ipv6 is None else str(self.attrs.public_ipv6)
            out["backend_v6_data"] = self.attrs.backend_v6_data
        return out
