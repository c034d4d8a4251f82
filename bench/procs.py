"""Processes by PID *and* start time: a recorded PID is signalled only while it is still the very
process that was started (a PID reused by something else is left alone). Never by name.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Sequence

STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_text(path: str) -> str:
    """A small text file (a log, subnet.env, a /proc entry); "" when it is not there (yet)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat after the command name: [0] is field 3 (state), [19] field 22 (start time)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rfind(b")") + 2:].split()


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), None when there is no such process."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def proc_state(pid: int) -> str | None:
    fields = stat_fields(pid)
    return fields[0].decode() if fields else None


def alive(pid: int, start: int | None) -> bool:
    """True while PID is the very process recorded (same start time) and not a zombie."""
    st = proc_start_time(pid)
    if st is None or (start is not None and st != start):
        return False
    return proc_state(pid) not in ("Z", "X", None)


def _signal(pid: int, start: int | None, sig: int) -> bool:
    if not alive(pid, start):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _reap(pid: int) -> None:
    """Collect a zombie child of ours (a no-op for processes that are not our children)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _wait_gone(live: list[tuple[int, int | None]], timeout: float) -> list[tuple[int, int | None]]:
    """Reap and poll until every (pid, start time) is gone or ``timeout`` passes; the ones left."""
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        for pid, _ in live:
            _reap(pid)
        live = [(pid, start) for pid, start in live if alive(pid, start)]
        if live:
            time.sleep(0.05)
    return live


def stop_processes(procs: Sequence[tuple[int, int | None]], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM each (pid, start time) that is still that process, SIGKILL after ``timeout``.
    SIGCONT follows the SIGTERM: a paused lab's daemons (``Lab.pause``) must run to exit."""
    live = [(pid, start) for pid, start in procs if _signal(pid, start, signal.SIGTERM)]
    for pid, start in live:
        _signal(pid, start, signal.SIGCONT)
    live = _wait_gone(live, timeout)
    for pid, start in live:
        _signal(pid, start, signal.SIGKILL)
    _wait_gone(live, timeout)


def process_cpu(pid: int) -> float | None:
    """utime + stime of one process, in seconds (None when it is gone)."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else None


def peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None
