"""The pods behind the pod bridge (cni0), as the programs' weft_endpoints(6) want them.

vxlan/ebpf and host-gw/ebpf deliver a received packet for a local pod straight into its namespace
(bpf_redirect_peer) when they know the pod: its IP, the host side of its veth and its MAC. The
bridge tells: the pod IP -> MAC from the bridge's neighbour table (the node talked to the pod),
the MAC -> port from its FDB (the pod sent a frame). A pod in neither is simply not a shortcut.
"""
from __future__ import annotations

import ipaddress
import logging
import socket

log = logging.getLogger("weft.bpf.pods")

POD_BRIDGE = "cni0"
NUD_PERMANENT = 0x80
NUD_VALID = 0x80 | 0x40 | 0x02 | 0x10 | 0x04 | 0x08  # PERMANENT NOARP REACHABLE PROBE STALE DELAY


def learn_endpoints(ipr, bidx: int, subnets: dict) -> dict:
    """{pod IP: (host veth ifindex, pod MAC, bridge MAC)} for the pods behind bridge ``bidx`` whose
    address lies in ``subnets`` ({socket family: our subnet of that family})."""
    from fastpath.vxlan.vtep import parse_unicast_mac
    bmac = parse_unicast_mac(ipr.link("get", index=bidx)[0].get("IFLA_ADDRESS"))
    if not bmac:
        return {}
    ports = set()
    for link in ipr.get_links():
        info = link.get("IFLA_LINKINFO")
        if link.get("IFLA_MASTER") == bidx and info is not None and info.get("IFLA_INFO_KIND") == "veth":
            ports.add(link["index"])
    port_of = {}
    for f in ipr.neigh("dump", family=socket.AF_BRIDGE):
        mac = parse_unicast_mac(f.get("NDA_LLADDR"))
        if f["ifindex"] in ports and mac and not f["state"] & NUD_PERMANENT:
            port_of[mac] = f["ifindex"]
    want = {}
    for family, subnet in subnets.items():
        for n in ipr.neigh("dump", family=family, ifindex=bidx):
            dst, mac = n.get("NDA_DST"), parse_unicast_mac(n.get("NDA_LLADDR"))
            if n["ifindex"] != bidx or not dst or not mac or not n["state"] & NUD_VALID:
                continue
            ip = ipaddress.ip_address(dst)
            if ip in subnet and mac in port_of:
                want[ip] = (port_of[mac], mac, bmac)
    return want


def attach_pod_ports(ipr, fn, ports: set[int], have: set[int], reattach: bool = False) -> set[int]:
    """Program ``fn`` on the ingress of each pod port (host veth ifindex) in ``ports``; one already
    in ``have`` again only when ``reattach``. The ports that carry it now (a port that went away
    meanwhile is left out: the next look retries). A pod's veth takes its filter with it."""
    from .guard import CLSACT_INGRESS, attach_filter
    attached = set()
    for idx in ports:
        if idx in have and not reattach:
            attached.add(idx)
            continue
        try:
            attach_filter(ipr, idx, CLSACT_INGRESS, fn)
            attached.add(idx)
        except Exception as exc:
            log.debug("attaching %s to port %d failed: %s", fn.name, idx, exc)
    return attached


def detach_pod_ports(ipr, ports: set[int]) -> None:
    """Our filter off each of ``ports`` (teardown); a port already gone is fine."""
    from .guard import CLSACT_INGRESS, detach_filter
    for idx in ports:
        try:
            detach_filter(ipr, idx, CLSACT_INGRESS)
        except Exception as exc:  # the pod's veth is gone, or going
            log.debug("removing our filter from port %d failed: %s", idx, exc)
