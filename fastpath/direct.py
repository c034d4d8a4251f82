"""flannel's vxlan ``DirectRouting``, shared by ``vxlan/kernel`` and ``vxlan/fastpath``.

With ``Backend.DirectRouting`` true, a peer whose PublicIP lies on the underlay interface's own L2
subnet (its address and prefix length, read once at setup) is reached without encapsulation: a
plain route ``<peer subnet> via <PublicIP> dev <underlay iface>`` in the main table (host-gw
style), and nothing in the tunnel for it. Any other peer goes through the tunnel as usual. The same
holds for a peer's IPv6 side (dual-stack): its PublicIPv6 on the underlay's IPv6 subnet (the
interface's ``address6`` and prefix length) gets ``<peer subnet6> via <PublicIPv6> dev <underlay>``.

These are the netlink pieces both backends use; each backend keeps its own record of which of its
peers are direct and decides the order of operations around a switch (the new path goes in
before the old one is taken out, so a peer is never unroutable in between).
"""
from __future__ import annotations

import ipaddress
import socket

from controlplane.backends.base import ExternalInterface
from controlplane.config import NetworkConfig

from .netlink import ignore_gone

MAIN_TABLE = 254


def underlay_network(ipr, iface: ExternalInterface, v6: bool = False
                     ) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The underlay interface's own L2 subnet (address + prefix length; ``v6``: of its IPv6
    address ``address6``); None when unknown."""
    address = iface.address6 if v6 else iface.address
    if address is None:
        return None
    for msg in ipr.get_addr(family=socket.AF_INET6 if v6 else socket.AF_INET, index=iface.index):
        if ipaddress.ip_address(msg.get("IFA_ADDRESS")) == address:
            return ipaddress.ip_interface(f"{address}/{msg['prefixlen']}").network
    return None


def is_direct(config: NetworkConfig, l2_net: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
              public_ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a peer at ``public_ip`` gets a direct route under ``config`` (``l2_net``: the
    underlay's subnet of ``public_ip``'s family)."""
    return bool(config.backend.direct_routing and l2_net is not None
                and l2_net.version == public_ip.version and public_ip in l2_net)


def add_route(ipr, subnet, public_ip, oif: int) -> None:
    """``<subnet> via <public_ip> dev <oif>`` (replacing any route for exactly ``subnet``)."""
    ipr.route("replace", dst=str(subnet), gateway=str(public_ip), oif=oif)


def del_route(ipr, subnet, public_ip, oif: int) -> None:
    """Remove that route; already gone is fine."""
    ignore_gone(ipr.route, "del", dst=str(subnet), gateway=str(public_ip), oif=oif)


def main_routes(ipr, family: int = socket.AF_INET) -> set[tuple]:
    """The main table's routes of ``family`` (IPv4 unless told) as ``(dst, dst_len, gateway, oif)``
    tuples (see ``route_key``)."""
    routes = set()
    for r in ipr.route("dump", family=family):
        if r.get("RTA_TABLE", r["table"]) != MAIN_TABLE or r.get("RTA_DST") is None:
            continue
        routes.add((r.get("RTA_DST"), r["dst_len"], r.get("RTA_GATEWAY"), r.get("RTA_OIF")))
    return routes


def route_key(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network, gateway, oif: int | None) -> tuple:
    """How the route ``subnet via gateway dev oif`` appears in ``main_routes``."""
    return (str(subnet.network_address), subnet.prefixlen, str(gateway), oif)
