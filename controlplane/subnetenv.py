"""subnet.env, exactly as flanneld writes it (``pkg/subnet/subnet.go: WriteSubnetFile``).

FLANNEL_SUBNET is the subnet's first usable address with its length (10.5.52.1/24), not the
network address. The file is replaced atomically, so a reader never sees half of it.
"""
from __future__ import annotations

import ipaddress
import os
import tempfile


def render(network: ipaddress.IPv4Network, subnet: ipaddress.IPv4Network, mtu: int, ipmasq: bool) -> str:
    first = subnet.network_address + 1
    return (f"FLANNEL_NETWORK={network}\n"
            f"FLANNEL_SUBNET={first}/{subnet.prefixlen}\n"
            f"FLANNEL_MTU={mtu}\n"
            f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}\n")


def write(path: str, network, subnet, mtu: int, ipmasq: bool) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".subnet.env.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(render(network, subnet, mtu, ipmasq))
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


def previous_subnet(path: str) -> ipaddress.IPv4Network | None:
    """The subnet a previous run wrote (FLANNEL_SUBNET), or None if absent or unreadable."""
    text = read(path).get("FLANNEL_SUBNET")
    if not text:
        return None
    try:
        return ipaddress.IPv4Interface(text).network
    except ValueError:
        return None
