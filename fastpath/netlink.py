"""What every backend that programs the kernel over netlink shares.

One netlink socket per backend, opened on first use in the namespace the daemon runs in, and one
re-entrant lock: the daemon calls ``add_peer`` from its watch thread while its main loop calls
``resync``. Errors that only say "already gone" are not errors when removing things.
"""
from __future__ import annotations

import errno
import socket
import threading

from controlplane.backends.base import Backend, BackendOptions, ExternalInterface
from controlplane.config import NetworkConfig

GONE = {errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL, errno.ENXIO}


def nl_errno(exc: BaseException) -> int | None:
    """The errno of a pyroute2 NetlinkError (None for anything else)."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def ignore_gone(fn, *args, **kwargs) -> None:
    """Call a netlink removal; "no such entry" means it is already done."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # pyroute2's NetlinkError
        if nl_errno(exc) not in GONE:
            raise


IFA_F_NODAD = 0x02
RT_SCOPE_LINK = 253


def only_address(ipr, index: int, address: str, prefixlen: int = 32, family: int = socket.AF_INET) -> bool:
    """Leave exactly ``address/prefixlen`` as the device's address of ``family`` (flannel removes
    any other). IPv6: the kernel's link-local address stays, and ours skips duplicate address
    detection (it is unique by its lease; tentative, it could not be used for a second or so).
    True when it had to be added."""
    have = False
    for msg in ipr.get_addr(family=family, index=index):
        if family == socket.AF_INET6 and msg["scope"] == RT_SCOPE_LINK:
            continue
        if msg.get_attr("IFA_ADDRESS") == address and msg["prefixlen"] == prefixlen:
            have = True
        else:
            ignore_gone(ipr.addr, "del", index=index, address=msg.get_attr("IFA_ADDRESS"),
                        prefixlen=msg["prefixlen"])
    if not have:
        extra = {"flags": IFA_F_NODAD} if family == socket.AF_INET6 else {}
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen, **extra)
    return not have


def remove_addresses(ipr, index: int, family: int = socket.AF_INET) -> int:
    """Take every address of ``family`` off the device (IPv6: but the kernel's link-local one);
    how many went. An IPv6-only node's device of an IPv4-capable kind holds no IPv4 address."""
    gone = 0
    for msg in ipr.get_addr(family=family, index=index):
        if family == socket.AF_INET6 and msg["scope"] == RT_SCOPE_LINK:
            continue
        ignore_gone(ipr.addr, "del", index=index, address=msg.get_attr("IFA_ADDRESS"),
                    prefixlen=msg["prefixlen"])
        gone += 1
    return gone


def set_mac_and_mtu(ipr, index: int, link, mac: str, mtu: int) -> None:
    """Give the device ``mac`` and ``mtu`` where it differs (``link``: its current RTM_NEWLINK).
    Some devices refuse a MAC change while up (EBUSY): then down, change, and the caller brings it up."""
    if (link.get("IFLA_ADDRESS") or "").lower() != mac:
        try:
            ipr.link("set", index=index, address=mac)
        except Exception as exc:
            if nl_errno(exc) != errno.EBUSY:
                raise
            ipr.link("set", index=index, state="down")
            ipr.link("set", index=index, address=mac)
    if link.get("IFLA_MTU") != mtu:
        ipr.link("set", index=index, mtu=mtu)


class NetlinkBackend(Backend):
    def __init__(self, config: NetworkConfig, iface: ExternalInterface,
                 options: BackendOptions = BackendOptions()):
        super().__init__(config, iface, options)
        self._lock = threading.RLock()
        self._ipr = None
        self._batch = None

    @property
    def ipr(self):
        if self._ipr is None:
            from pyroute2 import IPRoute
            self._ipr = IPRoute()
        return self._ipr

    @property
    def nl(self):
        """The per-peer entry writer (``fastpath.nlbatch.Batch``): neighbour, FDB and route
        entries in one system call per peer, where pyroute2 costs ~1 ms per entry."""
        if self._batch is None:
            from .nlbatch import Batch
            self._batch = Batch()
        return self._batch

    def link_index(self, name: str) -> int | None:
        """The index of device ``name`` in this namespace; None when there is none."""
        found = self.ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def close(self) -> None:
        """Release the netlink socket; what was programmed stays."""
        with self._lock:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None
            if self._batch is not None:
                self._batch.close()
                self._batch = None
