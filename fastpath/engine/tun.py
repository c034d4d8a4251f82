"""Opening TUN devices for the engines (plain Python: runs once, at setup).

``open_tun(name, vnet_hdr=True, queues=1)`` returns one fd per queue. With ``vnet_hdr`` the TUN is
opened IFF_TUN|IFF_NO_PI|IFF_VNET_HDR and told it may hand us unchecksummed TSO/USO
super-packets (TUNSETOFFLOAD CSUM|TSO4|TSO6|USO4|USO6; without USO on kernels older than 6.2).
With ``queues > 1`` it is IFF_MULTI_QUEUE, one fd per queue, for one engine worker each.
The device lives as long as an fd is open (not persistent): a stopped daemon leaves no TUN behind.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6
VNET_HDR_LEN = 10


def open_tun(name: str, *, vnet_hdr: bool = True, queues: int = 1) -> list[int]:
    if not 1 <= len(name.encode()) <= 15:
        raise ValueError(f"TUN name {name!r}: 1..15 bytes")
    flags = IFF_TUN | IFF_NO_PI
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    if queues > 1:
        flags |= IFF_MULTI_QUEUE
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
            if vnet_hdr:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                try:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOADS)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def has_vnet_hdr(fd: int) -> bool:
    """Whether a TUN fd was opened with IFF_VNET_HDR (False when the fd is no TUN)."""
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, b"\0" * 40)
    except OSError:
        return False
    return bool(struct.unpack_from("H", ifr, 16)[0] & IFF_VNET_HDR)
