"""Choosing the external (underlay) interface, as flanneld's -iface / -public-ip do.

- ``-iface NAME`` or ``-iface IP``: that interface (an IP selects the interface holding it);
- no -iface: the interface of the default route; failing that, the one holding -public-ip;
- the public IP is -public-ip when given (it may differ from the interface's address behind NAT),
  else the interface's first IPv4 address.
Looks only at the namespace weftd runs in.
"""
from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute

from .backends.base import ExternalInterface


class IfaceError(Exception):
    pass


def _addresses(ipr, index: int) -> list[ipaddress.IPv4Address]:
    out = []
    for msg in ipr.get_addr(family=2, index=index):
        out.append(ipaddress.IPv4Address(msg.get_attr("IFA_ADDRESS")))
    return out


def _by_name(ipr, name: str):
    idx = ipr.link_lookup(ifname=name)
    return idx[0] if idx else None


def _by_ip(ipr, ip: ipaddress.IPv4Address):
    for msg in ipr.get_addr(family=2):
        if ipaddress.IPv4Address(msg.get_attr("IFA_ADDRESS")) == ip:
            return msg["index"]
    return None


def _default_route(ipr):
    for msg in ipr.get_routes(family=2, table=254):
        if msg["dst_len"] == 0 and msg.get_attr("RTA_OIF"):
            return msg.get_attr("RTA_OIF")
    return None


def resolve(iface: str | None, public_ip: str | None) -> ExternalInterface:
    try:
        pub = ipaddress.IPv4Address(public_ip) if public_ip else None
    except ValueError:
        raise IfaceError(f"-public-ip {public_ip!r}: not an IPv4 address") from None
    with IPRoute() as ipr:
        index = None
        if iface:
            try:
                index = _by_ip(ipr, ipaddress.IPv4Address(iface))
            except ValueError:
                index = _by_name(ipr, iface)
            if index is None:
                raise IfaceError(f"-iface {iface!r}: no such interface or address here")
        else:
            index = _default_route(ipr) or (pub and _by_ip(ipr, pub))
            if not index:
                raise IfaceError("no default route to pick the interface from; pass -iface NAME")
        link = ipr.get_links(index)[0]
        name = link.get_attr("IFLA_IFNAME")
        mtu = link.get_attr("IFLA_MTU")
        addrs = _addresses(ipr, index)
    address = addrs[0] if addrs else None
    if pub is None:
        if address is None:
            raise IfaceError(f"interface {name} has no IPv4 address; pass -public-ip")
        pub = address
    return ExternalInterface(name=name, index=index, address=address, public_ip=pub, mtu=mtu)
