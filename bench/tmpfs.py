"""A small tmpfs for a lab's SQLite store (``lab.store_tmpfs_mib``): a disk that can be filled.

The mount point lives under the lab's own directory and the mount is recorded in the ledger
(``{"kind": "mount", "path", "source"}``) before it is made, so teardown unmounts exactly it: a
mount at that path whose source is the name this run gave it, never anything else there.
"""
from __future__ import annotations

import os
import re
import subprocess

from .errors import LabError


def _unescape(field: str) -> str:
    """/proc/self/mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted(path: str, source: str) -> bool:
    """True when ``path`` is a mount point whose source is ``source`` (in this mount namespace)."""
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 2 and _unescape(fields[4]) == path and _unescape(tail[1]) == source:
            return True
    return False


def mount_tmpfs(ledger, path: str, size_mib: int, source: str) -> str:
    """Make ``path`` (a new directory) and mount a ``size_mib`` MiB tmpfs named ``source`` on it;
    both recorded in ``ledger`` first. Returns the path."""
    ledger.add("file", path=path)          # the mount point: removed once unmounted
    os.makedirs(path, 0o755)
    ledger.add("mount", path=path, source=source)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", source, path],
                         capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise LabError(f"mount a {size_mib} MiB tmpfs on {path}: {res.stderr.strip() or res.returncode}")
    return path


def unmount_recorded(entries: list[dict]) -> list[str]:
    """Unmount every recorded mount still there (newest first); returns problems. A mount still
    busy (a process of another mount namespace holding a file) is detached lazily."""
    problems = []
    for e in reversed(entries):
        path, source = e["path"], e.get("source", "")
        for _ in range(4):                 # the same source mounted over itself: each layer
            if not mounted(path, source):
                break
            res = subprocess.run(["umount", path], capture_output=True, text=True, timeout=15,
                                 stdin=subprocess.DEVNULL)
            if res.returncode != 0:
                lazy = subprocess.run(["umount", "-l", path], capture_output=True, text=True, timeout=15,
                                      stdin=subprocess.DEVNULL)
                if lazy.returncode != 0:
                    problems.append(f"umount {path}: {res.stderr.strip() or lazy.stderr.strip()}")
                    break
        if mounted(path, source) and not any(p.startswith(f"umount {path}:") for p in problems):
            problems.append(f"umount {path}: still mounted")
    return problems
