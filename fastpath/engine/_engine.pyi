"""The Python API of the compiled engine (fastpath/engine/_engine.pyx), for editors and readers.

tests/test_engine.py checks that every method and parameter named here is the compiled one's.
"""
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

from fastpath.engine.api import COUNTER_NAMES as COUNTER_NAMES
from fastpath.engine.api import RX_OUTCOMES as RX_OUTCOMES
from fastpath.engine.api import TX_OUTCOMES as TX_OUTCOMES

_Fds = int | Iterable[int]
_Subnet = str | IPv4Network | IPv6Network   # an IPv6 one: dual-stack engines only
_Subnet6 = str | IPv6Network
_Address = str | IPv4Address | IPv6Address
_Mac = bytes | str | None

class Engine:
    """TUN <-> UDP forwarding for one node: one worker (a thread, or two with ``split_threads``)
    per TUN queue fd; ``sock_fd`` one UDP socket per queue, or one for all. The fds stay the
    caller's. Raises ValueError naming the argument that does not fit."""

    mode: Literal["udp", "vxlan"]
    subnet_len: int
    split_threads: bool

    def __init__(self, tun_fd: _Fds, sock_fd: _Fds | None, *, mode: Literal["udp", "vxlan"] = "udp",
                 network: _Subnet | None = None, subnet_len: int | None = None,
                 local_subnet: _Subnet | None = None, vni: int = 1,
                 vtep_mac: _Mac = b"", port: int | None = None, mtu: int = 0,
                 vnet_hdr: bool | None = None, split_threads: bool = False,
                 busy_poll_us: int = 0, network6: _Subnet6 | None = None,
                 subnet6_len: int | None = None, local_subnet6: _Subnet6 | None = None,
                 vtep_mac6: _Mac = b"", sock6_fd: _Fds | None = None,
                 send_fd: _Fds | None = None, send6_fd: _Fds | None = None) -> None:
        """Dual-stack (vxlan): ``network6``/``subnet6_len``/``local_subnet6`` (IPv6Network,
        IPv6SubnetLen, ours), ``vtep_mac6`` (our flannel-v6 MAC), ``sock6_fd`` (IPV6_V6ONLY UDP
        sockets on the IPv6 underlay, as ``sock_fd``). IPv6-only: ``network``, ``subnet_len``,
        ``local_subnet``, ``sock_fd`` (and ``vtep_mac``) None; no IPv4 socket or route."""

    # routes (constant time, safe while the packet threads run)
    def set_route(self, subnet: _Subnet, peer_ip: _Address, peer_mac: _Mac = None) -> None:
        """Send packets for ``subnet`` to ``peer_ip`` (VXLAN: inner destination MAC ``peer_mac``);
        an IPv6 subnet: the peer's public IPv6 and flannel-v6 VTEP MAC."""
    def remove_route(self, subnet: _Subnet) -> None: ...
    def routes(self) -> dict[str, tuple[str, str]]:
        """{subnet: (peer_ip, peer_mac)} as programmed."""
    def lookup(self, addr: _Address) -> tuple[str, str] | None:
        """(peer_ip, peer_mac) a packet to ``addr`` goes to, from the packet path's table."""

    # running
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None:
        """Stop; the fds stay the caller's."""
    @property
    def running(self) -> bool: ...
    def stats(self) -> dict[str, int]:
        """COUNTER_NAMES summed over the workers, ``rx_socket_drops`` (absent when a socket
        cannot tell), ``routes`` and ``workers``."""

    # test and benchmark hooks (engine not started)
    def _inject_rx(self, datagram: bytes, src_ip: _Address, gro: int = 0) -> None: ...
    def _inject_tx(self, read: bytes) -> None: ...
    def _is_peer(self, ip: _Address) -> bool: ...
    def _bench_encap(self, packet: bytes, count: int) -> int: ...
    def _bench_decap(self, datagram: bytes, src_ip: _Address, count: int, gro: int = 0) -> int: ...
    def _bench_lookup(self, dst_ip: _Address, count: int) -> int: ...
