"""Choosing the external (underlay) interface, as flanneld's -iface / -public-ip do.

- ``-iface NAME`` or ``-iface IP``: that interface (an IP selects the interface holding it);
- no -iface: the interface of the default route; failing that, the one holding -public-ip;
- the public IP is -public-ip when given (it may differ from the interface's address behind NAT),
  else the interface's first IPv4 address;
- dual-stack (EnableIPv6): the interface's first global IPv6 address (``-iface`` may also name it),
  and the public IPv6 is -public-ipv6 when given, else that address; neither is an error, as
  flanneld's "failed to find IPv6 address for interface";
- IPv6-only (EnableIPv4 false): the IPv6 side as above, required; the interface needs no IPv4
  address, -public-ip is ignored (said once) and the public IP is flannel's empty 0.0.0.0
  (``NO_PUBLIC_IP``, what every IPv6-only lease carries); without -iface, the interface of the
  IPv6 default route, failing that the IPv4 one, failing that the one holding -public-ipv6.
Looks only at the namespace weftd runs in.
"""
from __future__ import annotations

import ipaddress
import logging

from pyroute2 import IPRoute

from .backends.base import ExternalInterface
from .lease import NO_PUBLIC_IP
from .leasecheck import not_a_node

log = logging.getLogger("weft.iface")

IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40


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


def _addresses6(ipr, index: int) -> list[ipaddress.IPv6Address]:
    """The interface's global IPv6 addresses (scope universe: not link-local, not loopback), not
    tentative or failed duplicate address detection, in the kernel's order."""
    out = []
    for msg in ipr.get_addr(family=10, index=index):
        flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
        if msg["scope"] != 0 or flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
            continue
        addr = ipaddress.IPv6Address(msg.get_attr("IFA_ADDRESS"))
        if not (addr.is_link_local or addr.is_loopback or addr.is_multicast):
            out.append(addr)
    return out


def _by_ip(ipr, ip: ipaddress.IPv4Address | ipaddress.IPv6Address):
    for msg in ipr.get_addr(family=2 if ip.version == 4 else 10):
        if ipaddress.ip_address(msg.get_attr("IFA_ADDRESS")) == ip:
            return msg["index"]
    return None


def _default_route(ipr, family: int = 2):
    for msg in ipr.get_routes(family=family, table=254):
        if msg["dst_len"] == 0 and msg.get_attr("RTA_OIF"):
            return msg.get_attr("RTA_OIF")
    return None


def _public_ipv6(text: str) -> ipaddress.IPv6Address:
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        addr = None
    if addr is None or addr.scope_id:  # a %zone is no address peers can reach
        raise IfaceError(f"-public-ipv6 {text!r}: not an IPv6 address")
    what = not_a_node(addr)  # peers would refuse the lease (bad_public_ip)
    if what:
        raise IfaceError(f"-public-ipv6 {addr}: {what} cannot be a node's public IPv6 address")
    return addr


def resolve(iface: str | None, public_ip: str | None, public_ipv6: str | None = None,
            ipv6: bool = False, ipv4: bool = True) -> ExternalInterface:
    """The underlay interface; with ``ipv6`` (the config's EnableIPv6) its IPv6 side too.
    ``public_ipv6`` is ignored without ``ipv6``, as flanneld ignores -public-ipv6 then. With
    ``ipv4`` false (EnableIPv4 false: IPv6-only) the IPv6 side is all there is: ``public_ip`` is
    ignored and the interface's IPv4 address, if any, is not needed."""
    ipv6 = ipv6 or not ipv4
    pub = None
    if not ipv4:
        if public_ip:
            log.warning("-public-ip %s ignored: the network is IPv6-only (EnableIPv4 false); peers"
                        " reach this node at its public IPv6 address", public_ip)
    else:
        try:
            pub = ipaddress.IPv4Address(public_ip) if public_ip else None
        except ValueError:
            raise IfaceError(f"-public-ip {public_ip!r}: not an IPv4 address") from None
    pub6 = _public_ipv6(public_ipv6) if ipv6 and public_ipv6 else None
    with IPRoute() as ipr:
        index = None
        if iface:
            try:
                index = _by_ip(ipr, ipaddress.ip_address(iface))
            except ValueError:
                index = _by_name(ipr, iface)
            if index is None:
                raise IfaceError(f"-iface {iface!r}: no such interface or address here")
        elif ipv4:
            index = _default_route(ipr) or (pub and _by_ip(ipr, pub))
        else:
            index = _default_route(ipr, 10) or _default_route(ipr) or (pub6 and _by_ip(ipr, pub6))
        if not index:
            raise IfaceError("no default route to pick the interface from; pass -iface NAME")
        link = ipr.get_links(index)[0]
        name = link.get_attr("IFLA_IFNAME")
        mtu = link.get_attr("IFLA_MTU")
        addrs = _addresses(ipr, index)
        addrs6 = _addresses6(ipr, index) if ipv6 else []
    address = addrs[0] if addrs else None
    if not ipv4:
        pub = NO_PUBLIC_IP  # flannel's empty PublicIP: an IPv6-only lease has no IPv4 side
    elif pub is None:
        if address is None:
            raise IfaceError(f"interface {name} has no IPv4 address; pass -public-ip")
        pub = address
    if not ipv6:
        return ExternalInterface(name=name, index=index, address=address, public_ip=pub, mtu=mtu)
    address6 = addrs6[0] if addrs6 else None
    if iface and address6 is not None:  # -iface named by one of its IPv6 addresses: that one
        try:
            named = ipaddress.ip_address(iface)
            if named.version == 6 and named in addrs6:
                address6 = named
        except ValueError:
            pass
    if pub6 is None:
        if address6 is None:
            need = "EnableIPv6" if ipv4 else "an IPv6-only network (EnableIPv4 false)"
            raise IfaceError(f"failed to find IPv6 address for interface {name} ({need} needs a"
                             " global IPv6 address on it, or -public-ipv6)")
        pub6 = address6
    return ExternalInterface(name=name, index=index, address=address, public_ip=pub, mtu=mtu,
                             address6=address6, public_ipv6=pub6)
