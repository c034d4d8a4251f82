"""Tell the daemon at once when its underlay interface comes back up.

When a link goes down the kernel flushes every route whose next hop is on it: host-gw's peer
routes and DirectRouting's routes vanish, and without this they would come back only at the next
periodic resync (up to ``RESYNC_INTERVAL``, 10 s, as flannel's route check). A link-state
notification (``RTM_NEWLINK`` on ``RTMGRP_LINK``) that turns the interface from unusable to usable
(``IFF_UP`` and ``IFF_LOWER_UP``) makes the daemon resync right away.

A raw NETLINK_ROUTE socket with a timeout rather than pyroute2: one fixed-size header to read, a
thread that can stop within a second, and nothing shared with the backend's netlink socket (which
pyroute2 does not let two threads use). The socket belongs to the network namespace the daemon
runs in, so in the lab each node hears only its own links.
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
from typing import Callable

log = logging.getLogger("weft.linkwatch")

RTMGRP_LINK = 0x1
RTM_NEWLINK = 16
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
_NLMSGHDR = struct.Struct("=IHHII")     # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")   # family, type, index, flags, change


def link_usable(flags: int) -> bool:
    return bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP)


def link_changes(data: bytes) -> list[tuple[int, int]]:
    """(ifindex, flags) of every RTM_NEWLINK in one netlink datagram; malformed tails are ignored."""
    out = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        body = off + _NLMSGHDR.size
        if kind == RTM_NEWLINK and length >= _NLMSGHDR.size + _IFINFOMSG.size:
            _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, body)
            out.append((index, flags))
        off += (length + 3) & ~3
    return out


class LinkWatch:
    """Calls ``on_up()`` each time interface ``ifindex`` turns usable; a daemon thread."""

    def __init__(self, ifindex: int, on_up: Callable[[], None], usable: bool = True):
        self.ifindex = ifindex
        self.on_up = on_up
        self.usable = usable   # its state when we start: an up link is not news
        self.ups = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_LINK))
        self.sock.settimeout(1.0)
        self.thread = threading.Thread(target=self._run, name="link-watch", daemon=True)

    def start(self, stop: threading.Event) -> threading.Thread:
        self._stop = stop
        self.thread.start()
        return self.thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    continue
                except OSError as exc:  # ENOBUFS: notifications were lost; ask for a resync
                    log.warning("link notifications: %s; resyncing", exc)
                    self.on_up()
                    continue
                for index, flags in link_changes(data):
                    if index != self.ifindex:
                        continue
                    now = link_usable(flags)
                    if now and not self.usable:
                        self.ups += 1
                        log.info("underlay interface (index %d) is up again: resyncing the data plane",
                                 index)
                        self.on_up()
                    elif self.usable and not now:
                        log.warning("underlay interface (index %d) is down", index)
                    self.usable = now
        finally:
            self.sock.close()


def link_is_usable(name: str) -> bool:
    """Whether interface ``name`` is up with carrier now (sysfs); unknown counts as usable."""
    try:
        with open(f"/sys/class/net/{name}/flags") as f:
            flags = int(f.read(), 16)
    except (OSError, ValueError):
        return True
    if not flags & IFF_UP:
        return False
    try:
        with open(f"/sys/class/net/{name}/carrier") as f:
            return f.read().strip() == "1"
    except OSError:
        return True
