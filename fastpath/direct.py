"""flannel's vxlan ``DirectRouting``, shared by ``vxlan/kernel`` and ``vxlan/fastpath``.

With ``Backend.DirectRouting`` true, a peer whose PublicIP lies on the underlay interface's own L2
subnet (its address and prefix length, read once at setup) is reached without encapsulation: a
plain route ``<peer subnet> via <PublicIP> dev <underlay iface>`` in the main table (host-gw
style), and nothing in the tunnel for it. Any other peer goes through the tunnel as usual.

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


def underlay_network(ipr, iface: ExternalInterface) -> ipaddress.IPv4Network | None:
    """The underlay interface's own L2 subnet (address + prefix length); None when unknown."""
    if iface.address is None:
        return None
    for msg in ipr.get_addr(family=socket.AF_INET, index=iface.index):
        if msg.get("IFA_ADDRESS") == str(iface.address):
            return ipaddress.IPv4Interface(f"{iface.address}/{msg['prefixlen']}").network
    return None


def is_direct(config: NetworkConfig, l2_net: ipaddress.IPv4Network | None,
              public_ip: ipaddress.IPv4Address) -> bool:
    """Whether a peer at ``public_ip`` gets a direct route under ``config``."""
    return bool(config.backend.direct_routing and l2_net is not None and public_ip in l2_net)


def add_route(ipr, subnet: ipaddress.IPv4Network, public_ip: ipaddress.IPv4Address, oif: int) -> None:
    """``<subnet> via <public_ip> dev <oif>`` (replacing any route for exactly ``subnet``)."""
    ipr.route("replace", dst=str(subnet), gateway=str(public_ip), oif=oif)


def del_route(ipr, subnet: ipaddress.IPv4Network, public_ip: ipaddress.IPv4Address, oif: int) -> None:
    """Remove that route; already gone is fine."""
    ignore_gone(ipr.route, "del", dst=str(subnet), gateway=str(public_ip), oif=oif)


def main_routes(ipr) -> set[tuple]:
    """The main table's IPv4 routes as ``(dst, dst_len, gateway, oif)`` tuples (see ``route_key``)."""
    routes = set()
    for r in ipr.route("dump", family=socket.AF_INET):
        if r.get("RTA_TABLE", r["table"]) != MAIN_TABLE or r.get("RTA_DST") is None:
            continue
        routes.add((r.get("RTA_DST"), r["dst_len"], r.get("RTA_GATEWAY"), r.get("RTA_OIF")))
    return routes


def route_key(subnet: ipaddress.IPv4Network, gateway, oif: int | None) -> tuple:
    """How the route ``subnet via gateway dev oif`` appears in ``main_routes``."""
    return (str(subnet.network_address), subnet.prefixlen, str(gateway), oif)
