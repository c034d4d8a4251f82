"""Traffic that ``bench faults`` keeps flowing while a fault is injected and healed.

- ``Streams``: a paced UDP stream with sequence numbers between the first pods of every ordered
  pair of nodes (both directions of every pair), made by ``bench flood``'s compiled tool
  (bench.flood_tool: ``send`` stamps each datagram with its CLOCK_MONOTONIC send time, ``recv``
  with a TRACE file writes seq, sent and received time of every unique datagram). Losses are
  attributed to phases by send time (a lost datagram's send time is interpolated between the
  received ones around it), gaps are the longest time with nothing delivered.
- ``TcpStream``: one TCP connection pod 1x1 -> pod 2x1 at a bounded rate, written and read by
  two threads of this process, every byte checked; it must not reset.

CLOCK_MONOTONIC is one clock for every network namespace, so the tool's times and this process's
``time.monotonic()`` compare directly.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field

from .lab import Lab, LabError
from .procs import proc_state, read_text

PORT_BASE = 7100
TCP_PORT = 7199
TRACE = struct.Struct("<Qdd")


def _json_tail(path: str) -> dict | None:
    for line in reversed(read_text(path).splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise LabError(what)
        time.sleep(0.02)


@dataclass
class Stream:
    src: int                  # node index of the sending pod
    dst: int
    port: int
    sender: subprocess.Popen | None = None
    receiver: subprocess.Popen | None = None
    send_log: str = ""
    recv_log: str = ""
    trace: str = ""
    records: list = field(default_factory=list)   # (seq, sent, received), by seq
    sent: int | None = None

    @property
    def name(self) -> str:
        return f"{self.src}->{self.dst}"


class Streams:
    """Every ordered node pair's stream; ``start``, then ``stop``, then ``analyse``."""

    def __init__(self, lab: Lab, tool: str, tag: str, rate: float = 1000.0, size: int = 64,
                 bound_s: float = 300.0):
        self.lab, self.tool, self.tag, self.rate, self.size, self.bound_s = lab, tool, tag, rate, size, bound_s
        self.pods = {}
        for pod in lab.pods:
            self.pods.setdefault(pod.node, pod)
        nodes = sorted(self.pods)
        self.streams = [Stream(a, b, PORT_BASE + a) for a in nodes for b in nodes if a != b]
        self.t_start: float | None = None

    def start(self) -> None:
        lab = self.lab
        maxseq = int(self.rate * self.bound_s) + 16
        for s in self.streams:
            base = os.path.join(lab.dir, f"faults-{self.tag}-{s.src}to{s.dst}")
            s.recv_log, s.send_log, s.trace = base + "-recv.log", base + "-send.log", base + ".trace"
            dst = self.pods[s.dst]
            s.receiver = lab.spawn(dst.namespace, [self.tool, "recv", dst.ip, str(s.port), str(self.bound_s + 30),
                                                   str(maxseq), s.trace],
                                   log=s.recv_log, role=f"faults: stream {s.name} receiver")
        for s in self.streams:
            _wait(lambda s=s: "ready" in read_text(s.recv_log) or s.receiver.poll() is not None, 10,
                  f"stream {s.name}: the receiver did not get ready ({read_text(s.recv_log).strip()[-200:]})")
            if s.receiver.poll() is not None:
                raise LabError(f"stream {s.name}: the receiver exited: {read_text(s.recv_log).strip()[-200:]}")
        for s in self.streams:
            src, dst = self.pods[s.src], self.pods[s.dst]
            s.sender = lab.spawn(src.namespace, [self.tool, "send", dst.ip, str(s.port), str(self.rate),
                                                 str(max(self.size, 24)), str(self.bound_s)],
                                 log=s.send_log, role=f"faults: stream {s.name} sender")
        for s in self.streams:   # each sender stops itself (SIGSTOP) once its socket is ready
            _wait(lambda s=s: proc_state(s.sender.pid) in ("T", "t") or s.sender.poll() is not None, 10,
                  f"stream {s.name}: the sender did not get ready")
            if s.sender.poll() is not None:
                raise LabError(f"stream {s.name}: the sender exited: {read_text(s.send_log).strip()[-200:]}")
        self.t_start = time.monotonic()
        for s in self.streams:
            os.kill(s.sender.pid, signal.SIGCONT)

    def stop(self, drain_s: float = 0.5) -> None:
        """Stop the senders, let what is in flight arrive, stop the receivers, read the traces."""
        for s in self.streams:
            if s.sender is not None and s.sender.poll() is None:
                os.kill(s.sender.pid, signal.SIGCONT)
                os.kill(s.sender.pid, signal.SIGTERM)
        for s in self.streams:
            _reap(s.sender)
        time.sleep(drain_s)
        for s in self.streams:
            if s.receiver is not None and s.receiver.poll() is None:
                s.receiver.terminate()
        for s in self.streams:
            _reap(s.receiver)
            got = _json_tail(s.send_log)
            s.sent = got.get("sent") if got else None
            try:
                with open(s.trace, "rb") as f:
                    data = f.read()
            except OSError:
                data = b""
            data = data[:len(data) - len(data) % TRACE.size]
            s.records = sorted(TRACE.iter_unpack(data))

    def analyse(self, phases: list[tuple[str, float, float]], heal: float | None) -> dict:
        """Per stream and in total: lost per phase, the longest gap, when traffic resumed after heal."""
        out = {"streams": {}, "rate_pps": self.rate}
        for s in self.streams:
            out["streams"][s.name] = analyse_stream(s.records, s.sent, self.t_start, self.rate, phases, heal)
        rows = list(out["streams"].values())
        known = [r for r in rows if r["sent"] is not None]
        out["sent"] = sum(r["sent"] for r in known) if known and len(known) == len(rows) else None
        out["lost"] = sum(r["lost"] for r in known) if out["sent"] is not None else None
        out["lost_by_phase"] = {name: sum(r["lost_by_phase"].get(name, 0) for r in rows) for name, _, _ in phases}
        gaps = [r["longest_gap_ms"] for r in rows if r["longest_gap_ms"] is not None]
        out["longest_gap_ms"] = max(gaps) if gaps else None
        worst = max(rows, key=lambda r: r["longest_gap_ms"] or 0, default=None)
        out["longest_gap_stream"] = next((k for k, v in out["streams"].items() if v is worst), None)
        resumed = [r["resumed_after_heal_s"] for r in rows]
        out["resumed_after_heal_s"] = (None if heal is None or any(x is None for x in resumed)
                                       else round(max(resumed), 3))
        return out


def analyse_stream(records, sent, t_start, rate, phases, heal) -> dict:
    """One stream's trace: records are (seq, sent time, received time) of unique datagrams by seq."""
    if sent is None:
        return {"sent": None, "received": len(records), "lost": None, "lost_by_phase": {},
                "longest_gap_ms": None, "gap_phase": None, "resumed_after_heal_s": None,
                "error": "the sender printed no count"}
    recs = [r for r in records if r[0] < sent]
    lost_by_phase = {name: 0 for name, _, _ in phases}

    def phase_of(t: float) -> str:
        for name, t0, t1 in phases:
            if t0 <= t < t1:
                return name
        return phases[-1][0] if t >= phases[-1][2] else phases[0][0]

    # a lost datagram's send time, interpolated between the received datagrams around it
    prev = (-1, t_start - 1.0 / rate)
    for seq, st, _ in recs + [(sent, None, None)]:
        if st is None:   # after the last received: paced from the last one
            st = prev[1] + (seq - prev[0]) / rate
        for k in range(prev[0] + 1, seq):
            est = prev[1] + (st - prev[1]) * (k - prev[0]) / (seq - prev[0])
            lost_by_phase[phase_of(est)] += 1
        prev = (seq, st)
    # the longest time with nothing delivered, while the sender was sending
    arrivals = sorted(r[2] for r in recs)
    edges = [t_start] + arrivals
    if not recs or recs[-1][0] < sent - 1:   # the last datagrams were lost: silent until the sender stopped
        edges.append(max(prev[1], edges[-1]))
    longest, at = 0.0, t_start
    for a, b in zip(edges, edges[1:]):
        if b - a > longest:
            longest, at = b - a, a
    resumed = None
    if heal is not None:
        after = [r[2] for r in recs if r[1] >= heal]
        resumed = round(min(after) - heal, 3) if after else None
    return {"sent": sent, "received": len(recs), "lost": sent - len(recs), "lost_by_phase": lost_by_phase,
            "longest_gap_ms": round(longest * 1000, 1), "gap_phase": phase_of(at),
            "resumed_after_heal_s": resumed}


def _reap(proc) -> None:
    if proc is None:
        return
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class TcpStream:
    """One TCP connection between two pods at ``rate`` bytes/s; every byte checked on arrival."""

    PATTERN = bytes(i % 251 for i in range(251 + 65536))

    def __init__(self, lab: Lab, src, dst, rate: int = 1_000_000, chunk: int = 4096, port: int = TCP_PORT):
        self.lab, self.src, self.dst, self.rate, self.chunk, self.port = lab, src, dst, rate, chunk, port
        self.sent = self.received = 0
        self.error: str | None = None
        self.corrupt = False
        self.longest_stall_s = 0.0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        server = self.lab.socket(self.dst.namespace)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((self.dst.ip, self.port))
        server.listen(1)
        server.settimeout(10)
        client = self.lab.socket(self.src.namespace)
        client.settimeout(10)
        try:
            client.connect((self.dst.ip, self.port))
            conn, _ = server.accept()
        except OSError as exc:
            client.close()
            raise LabError(f"TCP stream {self.src.ip} -> {self.dst.ip}: cannot connect ({exc})") from None
        finally:
            server.close()
        self.client, self.conn = client, conn
        self._threads = [threading.Thread(target=self._write, daemon=True, name="faults-tcp-w"),
                         threading.Thread(target=self._read, daemon=True, name="faults-tcp-r")]
        for t in self._threads:
            t.start()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            name = errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)
            self.error = f"{name}: {exc}"

    def _write(self) -> None:
        self.client.settimeout(1.0)
        t0 = time.monotonic()
        try:
            while not self._stop.is_set():
                due = t0 + self.sent / self.rate
                now = time.monotonic()
                if due > now:
                    time.sleep(min(due - now, 0.05))
                    continue
                off = self.sent % 251
                try:
                    n = self.client.send(self.PATTERN[off:off + self.chunk])
                except socket.timeout:
                    continue      # the send buffer is full: the path is stalled, not broken
                self.sent += n
            self.client.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fail(exc)

    def _read(self) -> None:
        self.conn.settimeout(1.0)
        last = time.monotonic()
        try:
            while True:
                try:
                    data = self.conn.recv(65536)
                except socket.timeout:
                    if self._stop.is_set() and time.monotonic() - last > 30:
                        self._fail(TimeoutError("no data for 30 s after the writer stopped"))
                        return
                    continue
                now = time.monotonic()
                if not data:
                    return
                if not self._stop.is_set():
                    self.longest_stall_s = max(self.longest_stall_s, now - last)
                last = now
                off = self.received % 251
                if data != self.PATTERN[off:off + len(data)]:     # recv returns at most 65536 bytes
                    self.corrupt = True
                self.received += len(data)
        except OSError as exc:
            self._fail(exc)

    def stop(self) -> dict:
        self._stop.set()
        for t in self._threads:
            t.join(45)
        for s in (getattr(self, "client", None), getattr(self, "conn", None)):
            if s is not None:
                s.close()
        return {"from": self.src.ip, "to": self.dst.ip, "sent_bytes": self.sent, "received_bytes": self.received,
                "intact": not self.corrupt and self.sent == self.received, "error": self.error,
                "reset": bool(self.error and ("ECONNRESET" in self.error or "EPIPE" in self.error)),
                "longest_stall_s": round(self.longest_stall_s, 3)}
