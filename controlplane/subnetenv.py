"""subnet.env, exactly as flanneld writes it (``pkg/subnet/subnet.go: WriteSubnetFile``).

FLANNEL_SUBNET is the subnet's first usable address with its length (10.5.52.1/24), not the
network address. A dual-stack node adds, in flannel's order before FLANNEL_MTU,
FLANNEL_IPV6_NETWORK (IPv6Network) and FLANNEL_IPV6_SUBNET (its IPv6 subnet's first address after
the network address, fd10:244:0:34::1/64). An IPv6-only node (EnableIPv4 false) writes only
those two, FLANNEL_MTU and FLANNEL_IPMASQ: no FLANNEL_NETWORK, no FLANNEL_SUBNET (flanneld's file
then). The file is replaced atomically, so a reader never sees half of it.
"""
from __future__ import annotations

import ipaddress
import os
import tempfile

from .lease import NO_IPV4


def render(network: ipaddress.IPv4Network | None, subnet: ipaddress.IPv4Network | None, mtu: int,
           ipmasq: bool, network6: ipaddress.IPv6Network | None = None,
           subnet6: ipaddress.IPv6Network | None = None) -> str:
    """The file's text. ``network`` None (or ``subnet`` None or flannel's empty 0.0.0.0/0): an
    IPv6-only node, no IPv4 lines."""
    ipv4 = network is not None and subnet is not None and subnet != NO_IPV4
    ipv6 = network6 is not None and subnet6 is not None
    if not ipv4 and not ipv6:
        raise ValueError("subnet.env: no IPv4 subnet and no IPv6 subnet to write")
    text = ""
    if ipv4:
        text = (f"FLANNEL_NETWORK={network}\n"
                f"FLANNEL_SUBNET={subnet.network_address + 1}/{subnet.prefixlen}\n")
    if ipv6:
        text += (f"FLANNEL_IPV6_NETWORK={network6}\n"
                 f"FLANNEL_IPV6_SUBNET={subnet6.network_address + 1}/{subnet6.prefixlen}\n")
    return text + (f"FLANNEL_MTU={mtu}\n"
                   f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}\n")


def write(path: str, network, subnet, mtu: int, ipmasq: bool, network6=None, subnet6=None) -> None:
    text = render(network, subnet, mtu, ipmasq, network6, subnet6)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".subnet.env.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read(path: str) -> dict[str, str]:
    """KEY=VALUE pairs (shell-style quotes stripped); {} when the file does not exist."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return {}
    out = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip().strip('"').strip("'")
    return out


def _previous(path: str, key: str, interface: type):
    """The subnet a previous run wrote under ``key`` (an address/len of ``interface``'s family),
    or None if absent or unreadable."""
    text = read(path).get(key)
    if not text:
        return None
    try:
        return interface(text).network
    except ValueError:
        return None


def previous_subnet(path: str) -> ipaddress.IPv4Network | None:
    """The subnet a previous run wrote (FLANNEL_SUBNET), or None if absent or unreadable (an
    IPv6-only node's file has none)."""
    return _previous(path, "FLANNEL_SUBNET", ipaddress.IPv4Interface)


def previous_subnet6(path: str) -> ipaddress.IPv6Network | None:
    """The IPv6 subnet a previous run wrote (FLANNEL_IPV6_SUBNET), or None if absent or unreadable."""
    return _previous(path, "FLANNEL_IPV6_SUBNET", ipaddress.IPv6Interface)
