"""The lab's processes: a weftd per node, what ``spawn`` starts in a namespace, and commands run
there with ``exec``. Every background process is recorded in the ledger before it starts and by
PID and start time once it runs, so teardown stops exactly it (bench.ledger); signals go only to a
PID that is still the process started (bench.procs).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Sequence

from .errors import LabError
from .ledger import Ledger
from .lab_weftd import HEALTHZ_PORT, REPO, log_tail, read_subnet
from .netns import http_status
from .procs import STOP_TIMEOUT, _signal, alive, proc_start_time, stat_fields


def run_in(ns: str, argv: Sequence[str], timeout: float = 10.0, check: bool = False,
           input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` inside namespace ``ns``, bounded by ``timeout`` (killed after)."""
    try:
        res = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                             timeout=timeout, input=input,
                             stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LabError(f"{ns}: {' '.join(argv)}: still running after {timeout:.0f}s (killed)") from None
    if check and res.returncode != 0:
        raise LabError(f"{ns}: {' '.join(argv)}: exit {res.returncode}: "
                       f"{(res.stderr or res.stdout).strip().splitlines()[-1:] or ''}")
    return res


class Processes:
    """Starts, watches and signals the lab's processes. ``children`` are the ones this process
    started (Popen objects, reaped at teardown); ``ledger`` is set once the lab has one."""

    def __init__(self, ledger: Ledger | None = None):
        self.ledger = ledger
        self.children: dict[int, subprocess.Popen] = {}

    # -- anything ---------------------------------------------------------------------------
    def spawn(self, ns: str, argv: Sequence[str], log: str | None = None, role: str = "") -> subprocess.Popen:
        """Start a background process in namespace ``ns``, recorded in the ledger."""
        entry = self.ledger.add("process", pid=None, start=None, role=role or argv[0], ns=ns)
        out = open(self.ledger.add_file(log), "ab") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                    start_new_session=True)
        finally:
            if log:
                out.close()
        self.children[proc.pid] = proc
        self.ledger.update(entry, pid=proc.pid, start=proc_start_time(proc.pid))
        return proc

    # -- weftd ------------------------------------------------------------------------------
    def start_weftd(self, node, argv: list[str], env: dict[str, str], cpu: int | None) -> None:
        """Start node's weftd in its namespace (pinned to ``cpu`` when given), logging to node.log."""
        node.argv = argv
        entry = self.ledger.add("process", pid=None, start=None, role=f"weftd n{node.index}",
                                ns=node.namespace)
        if not os.path.exists(node.log):
            self.ledger.add_file(node.log)
        with open(node.log, "ab") as log:  # the child keeps its own descriptor
            log.write(f"--- {time.strftime('%H:%M:%S')} lab: starting {' '.join(argv)}\n".encode())
            log.flush()
            pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
            proc = subprocess.Popen(["ip", "netns", "exec", node.namespace, *pin, *argv],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=REPO, start_new_session=True)
        self.children[proc.pid] = proc
        node.pid, node.start = proc.pid, proc_start_time(proc.pid)
        self.ledger.update(entry, pid=proc.pid, start=node.start)

    def exit_status(self, node) -> int | None:
        """The exit code once node's weftd is gone (-1 when not our child), None while it runs."""
        proc = self.children.get(node.pid or -1)
        if proc is not None:
            return proc.poll()
        return None if node.pid and alive(node.pid, node.start) else -1

    def wait_ready(self, nodes: list, timeout: float) -> None:
        """Until every node has its subnet.env and answers /readyz 200 (then read its subnet);
        a weftd that exits, or the timeout, is a LabError with the end of its log."""
        deadline = time.monotonic() + timeout
        waiting = {n.index: n for n in nodes}
        while waiting:
            for n, node in list(waiting.items()):
                code = self.exit_status(node)
                if code is not None:
                    raise LabError(f"node {n} ({node.namespace}): weftd exited with status {code} "
                                   f"before it was ready; log {node.log}: {log_tail(node.log)}")
                if os.path.exists(node.subnet_file) and \
                        http_status(node.namespace, "127.0.0.1", HEALTHZ_PORT, "/readyz") == 200:
                    read_subnet(node)
                    del waiting[n]
            if not waiting:
                break
            if time.monotonic() > deadline:
                n, node = next(iter(waiting.items()))
                why = "no subnet.env" if not os.path.exists(node.subnet_file) else "/readyz is not 200"
                raise LabError(f"node {n} ({node.namespace}) not ready after {timeout:.0f}s ({why}, "
                               f"{len(waiting)} node(s) waiting); log {node.log}: {log_tail(node.log)}")
            time.sleep(0.1)

    def signal_weftd(self, node, sig: int, wait: float = STOP_TIMEOUT) -> None:
        """Signal node's weftd (only if its PID is still the process started); for SIGTERM, SIGINT
        and SIGKILL also wait (bounded) until it is gone, SIGKILL after ``wait`` seconds."""
        if not node.pid or not _signal(node.pid, node.start, sig):
            return
        if sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
            deadline = time.monotonic() + wait
            while self.exit_status(node) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.exit_status(node) is None:
                _signal(node.pid, node.start, signal.SIGKILL)
                deadline = time.monotonic() + wait
                while self.exit_status(node) is None and time.monotonic() < deadline:
                    time.sleep(0.05)
            self.children.pop(node.pid, None)

    @staticmethod
    def pause(nodes: list) -> None:
        """SIGSTOP every node's weftd and wait (bounded) until all have stopped."""
        stopping = [n for n in nodes if n.pid and _signal(n.pid, n.start, signal.SIGSTOP)]
        deadline = time.monotonic() + 2.0  # the signal is asynchronous: wait until all have stopped
        while stopping and time.monotonic() < deadline:
            stopping = [n for n in stopping if (stat_fields(n.pid) or [b"X"])[0] not in (b"T", b"t", b"X", b"Z")]
            if stopping:
                time.sleep(0.005)

    @staticmethod
    def resume(nodes: list) -> None:
        for node in nodes:
            if node.pid:
                _signal(node.pid, node.start, signal.SIGCONT)

    @staticmethod
    def log_note(node, text: str) -> None:
        with open(node.log, "ab") as f:
            f.write(f"--- {time.strftime('%H:%M:%S')} lab: {text}\n".encode())
