"""Reaching into named network namespaces from this process, without moving any of its threads
for longer than it takes to make a socket.
"""
from __future__ import annotations

import ctypes
import os
import socket
import threading

from .errors import LabError
from .procs import proc_start_time

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(os.path.join(NETNS_DIR, name)).st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(inode: int) -> list[tuple[int, int | None]]:
    """Every process whose network namespace is ``inode`` (what ``ip netns pids`` does)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                out.append((int(entry), proc_start_time(int(entry))))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def netns_socket(name: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
                 proto: int = 0) -> socket.socket:
    """A socket that lives in network namespace ``name``.

    A short-lived thread enters the namespace, makes the socket and ends; the socket stays in
    that namespace wherever it is used from, and no other thread of ours changes namespace.
    """
    result: dict = {}

    def enter():
        try:
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            result["sock"] = socket.socket(family, type, proto)
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    t = threading.Thread(target=enter, name=f"netns-{name}")
    t.start()
    t.join()
    if "error" in result:
        raise LabError(f"cannot open a socket in namespace {name}: {result['error']}")
    return result["sock"]


def http_get(name: str, host: str, port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes] | None:
    """GET ``path`` from inside namespace ``name``: (status, body), or None if unreachable."""
    try:
        sock = netns_socket(name)
    except LabError:
        return None
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1]), body


def http_status(name: str, host: str, port: int, path: str, timeout: float = 1.0) -> int | None:
    """The HTTP status of GET ``path`` from inside namespace ``name``; None if unreachable."""
    got = http_get(name, host, port, path, timeout)
    return got[0] if got else None
