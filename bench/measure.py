"""One measurement each: TCP/UDP throughput (iperf3), ping RTT, pinned request/response (sockperf),
small-packet rate, and the CPU they cost. Every load is bounded in time and runs inside the lab's
namespaces (``ip netns exec``); nothing here touches the root namespace's network.

Each function returns a flat dict of numbers, so a run is a row and a backend's result is the
median of its rows.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass

from .netns import netns_inode
from .procs import CLK_TCK, stat_fields
from .stats import quantile

IPERF_PORT = 5201

# TCP probes write 131,000 bytes at a time, not iperf3's 128 KiB. The kernel copies a write into
# the socket with `rep movsb`, and on AMD Zen 4 (this lab's EPYC) that runs slower when the
# destination sits a few bytes past the source modulo 4096 (first seen as 3.5 vs 50 GB/s for
# 1-15 bytes; remeasured 1.3-1.6x for 1-63, docs/measurement-notes.md). With
# writes a multiple of 4096 from one buffer, that relative offset is fixed for a whole connection,
# so a run either always or never pays it: a 2x swing in the sender's CPU on one CPU per node,
# unrelated to the backend (vxlan/fastpath 6.4-7.2 vs 8.2-8.4 Gbit/s, the same in every round).
# A size that is not a multiple of 4096 walks the offset through the page, so every run pays the
# same small average.
TCP_WRITE_BYTES = 131000


class MeasureError(Exception):
    """A probe failed; str() is one line with the tool's own complaint."""


def netns(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _run(argv, timeout: float) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"{argv[3] if argv[:3] == ['ip', 'netns', 'exec'] else argv[0]}: "
                           f"timed out after {timeout:.0f} s") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise MeasureError(f"{' '.join(argv[4:6]) if argv[0] == 'ip' else argv[0]}: exit "
                           f"{r.returncode}: {tail[0][:200]}")
    return r.stdout


# -- CPU accounting ----------------------------------------------------------------------------
def machine_busy() -> float:
    """Busy CPU seconds of the whole machine, as a reading whose differences count: the online
    CPUs' time on the monotonic clock less their idle and iowait.

    Not the sum of /proc/stat's user, system, irq and softirq fields: those are sampled at each
    timer tick, and on a partly idle CPU of this VM they disagree with the idle time, which a
    tickless kernel accounts exactly (nohz idle_sleeptime), in either direction: a receiving
    node's CPU read 0.74-0.77 busy on one data plane and 0.42-0.45 on another, where the idle
    time said 0.59-0.62 for both, and a spinner at idle priority lost the same share on both
    (notes of 2026-11-29, docs/measurement-notes.md)."""
    idle = 0
    cpus = 0
    with open("/proc/stat") as f:
        now = time.monotonic()
        for line in f:
            if not line.startswith("cpu"):
                break
            if line.startswith("cpu "):
                fields = [int(x) for x in line.split()[1:]]
                idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
            else:
                cpus += 1
    return cpus * now - idle / CLK_TCK


def _netns_inode_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return None


class Guard:
    """Counts the CPU that processes outside the benchmark burn while a probe runs.

    Ours: every process in one of the lab's namespaces, and this process. Kernel threads are
    left out (softirq work for our packets runs there). A run whose foreign CPU exceeds the
    threshold is retried by the caller, so a noisy neighbour does not become a slow backend.

    A foreign process that starts and exits within the probe (a test suite starting Python: a
    core for half a second) is gone from /proc at the end, but its time is not: the kernel adds
    it to the children's time (cutime, cstime) of the process that reaped it, so each process
    counts with its reaped children. What a child reaped during the probe had burnt before it
    (its count at the start) is taken off its parent again.
    """

    def __init__(self, lab_namespaces, threshold_cores: float = 0.15):
        self.ours = {i for i in map(netns_inode, lab_namespaces) if i is not None}
        self.threshold = threshold_cores
        self.me = os.getpid()

    def _foreign(self) -> dict[int, tuple[float, int]]:
        """pid -> (CPU seconds with its reaped children, parent pid), for every foreign process."""
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid == self.me:
                continue
            rest = stat_fields(pid)
            if rest is None:
                continue
            if int(rest[1]) == 2 or pid == 2:  # kernel thread (child of kthreadd)
                continue
            if _netns_inode_of(pid) in self.ours:
                continue
            # fields 14-17: utime, stime, cutime, cstime
            out[pid] = (sum(int(f) for f in rest[11:15]) / CLK_TCK, int(rest[1]))
        return out

    def __enter__(self):
        self._start = self._foreign()
        self._t0 = time.monotonic()
        self._busy0 = machine_busy()
        return self

    def __exit__(self, *exc):
        end = self._foreign()
        self.seconds = time.monotonic() - self._t0
        self.machine_busy_s = machine_busy() - self._busy0
        by_pid = {p: cpu - self._start.get(p, (0.0, 0))[0] for p, (cpu, _) in end.items()}
        for p, (cpu, parent) in self._start.items():
            if p not in end and parent in end:  # reaped during the probe by a foreign parent
                by_pid[parent] -= cpu
        self.foreign_by_pid = {p: cpu for p, cpu in by_pid.items() if cpu > 0}
        self.foreign_cpu_s = sum(self.foreign_by_pid.values())
        return False

    @property
    def disturbed(self) -> bool:
        return self.foreign_cpu_s > self.threshold * self.seconds


# -- probes ------------------------------------------------------------------------------------
@dataclass
class Endpoint:
    ns: str
    ip: str


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


class Iperf3Server:
    """``iperf3 -s -1`` in the destination namespace: serves exactly one test, then exits."""

    def __init__(self, dst: Endpoint, port: int = IPERF_PORT, cpu: int | None = None):
        self.dst, self.port, self.cpu = dst, port, cpu

    def __enter__(self):
        self.proc = subprocess.Popen(netns(self.dst.ns, pinned(["iperf3", "-s", "-1", "-B", self.dst.ip,
                                                                "-p", str(self.port)], self.cpu)),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # wait until it listens
            out = subprocess.run(netns(self.dst.ns, ["ss", "-Htln", f"sport = :{self.port}"]),
                                 capture_output=True, text=True).stdout
            if out.strip():
                break
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def iperf3(src: Endpoint, dst: Endpoint, seconds: int, streams: int = 1, udp_rate: str = "",
           length: int = 0, cpus: tuple[int, int] | None = None) -> dict:
    """One iperf3 test; TCP by default, UDP at ``udp_rate`` (e.g. "500M", "0" = unlimited).
    ``cpus``: pin the client and the server to these CPUs."""
    if seconds < 1 or seconds != int(seconds):  # iperf3 parses -t with atoi: "1.5" runs 1 s
        raise ValueError(f"iperf3 runs whole seconds, not {seconds!r}")
    argv = ["iperf3", "-c", dst.ip, "-p", str(IPERF_PORT), "-t", str(int(seconds)), "-J", "-P", str(streams)]
    if ":" in dst.ip:
        argv.append("-6")
    if udp_rate:
        argv += ["-u", "-b", udp_rate]
    length = length or (0 if udp_rate else TCP_WRITE_BYTES)
    if length:
        argv += ["-l", str(length)]
    client_cpu, server_cpu = cpus or (None, None)
    with Iperf3Server(dst, cpu=server_cpu):
        out = _run(netns(src.ns, pinned(argv, client_cpu)), timeout=seconds + 15)
    try:
        doc = json.loads(out)
    except json.JSONDecodeError:
        raise MeasureError("iperf3: output is not JSON") from None
    if "error" in doc:
        raise MeasureError(f"iperf3: {doc['error']}")
    return parse_iperf3(doc, udp=bool(udp_rate), seconds=seconds)


def parse_iperf3(doc: dict, udp: bool, seconds: float) -> dict:
    """The numbers of one iperf3 -J document. A field iperf3 left out is None (never 0 % loss,
    0 ms jitter or 0 retransmits); a document without its sums is a MeasureError."""
    end = doc.get("end") or {}
    cpu = end.get("cpu_utilization_percent") or {}
    want = ("sum",) if udp else ("sum_received", "sum_sent")
    for key in want:
        if not isinstance(end.get(key), dict) or (key != "sum_sent" and "bits_per_second" not in end[key]):
            raise MeasureError(f"iperf3: no end.{key} in its output")
    if udp:
        summ = end["sum"]
        received = end.get("sum_received") or summ
        packets, lost = summ.get("packets"), summ.get("lost_packets")
        took = summ.get("seconds") or seconds
        return {"gbps": received["bits_per_second"] / 1e9, "loss_pct": summ.get("lost_percent"),
                "jitter_ms": summ.get("jitter_ms"),
                "pps": (packets - lost) / took if packets is not None and lost is not None else None,
                "seconds": summ.get("seconds"), "cpu_host_pct": cpu.get("host_total")}
    recv, sent = end["sum_received"], end["sum_sent"]
    return {"gbps": recv["bits_per_second"] / 1e9, "retransmits": sent.get("retransmits"),
            "bytes": recv.get("bytes"), "seconds": recv.get("seconds"), "cpu_host_pct": cpu.get("host_total"),
            "write_bytes": doc.get("start", {}).get("test_start", {}).get("blksize")}


_PING_RE = re.compile(r"time=([\d.]+) ms")


def ping(src: Endpoint, dst_ip: str, count: int = 200, interval: float = 0.005, cpu: int | None = None) -> dict:
    """Round-trip times of ``count`` echoes at a short interval: p50, p99, loss."""
    out = _run(netns(src.ns, pinned(["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", "1", dst_ip],
                                    cpu)),
               timeout=count * interval + 15)
    rtts = [float(x) * 1000 for x in _PING_RE.findall(out)]
    if not rtts:
        raise MeasureError(f"ping {dst_ip}: no replies")
    return {"rtt_p50_us": quantile(rtts, 0.5), "rtt_p99_us": quantile(rtts, 0.99),
            "ping_loss_pct": 100.0 * (count - len(rtts)) / count}


def reachable(src: Endpoint, dst_ip: str, count: int = 2) -> bool:
    r = subprocess.run(netns(src.ns, ["ping", "-n", "-c", str(count), "-i", "0.05", "-W", "1", dst_ip]),
                       capture_output=True, timeout=count + 5)
    return r.returncode == 0


_SOCKPERF_P50 = re.compile(r"percentile 50\.000 =\s*([\d.]+)")


def have_sockperf() -> bool:
    return shutil.which("sockperf") is not None


def _ping_pong(server_ns: str, server: list[str], client_ns: str, client: list[str], cpu: int,
               timeout: float) -> str:
    """Run ``server`` in the background and ``client`` to its end, both pinned to ``cpu``; the
    client's output. The server is stopped in any case."""
    proc = subprocess.Popen(netns(server_ns, pinned(server, cpu)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        return _run(netns(client_ns, pinned(client, cpu)), timeout=timeout)
    finally:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def request_response(src: Endpoint, dst: Endpoint, seconds: float = 1.0, cpu: int = 0) -> dict:
    """UDP ping-pong with both ends pinned to one CPU: round trip p50 in µs (sockperf --full-rtt).

    Pinned, because unpinned probes on a small VM mostly measure cross-CPU wake-ups.
    """
    port = "11111"
    out = _ping_pong(dst.ns, ["sockperf", "sr", "-i", dst.ip, "-p", port],
                     src.ns, ["sockperf", "pp", "-i", dst.ip, "-p", port,
                              "-t", f"{max(1, round(seconds))}", "-m", "64", "--full-rtt"],
                     cpu, timeout=seconds + 15)
    m = _SOCKPERF_P50.search(out)
    if not m:
        raise MeasureError("sockperf: no percentile in its output")
    return {"rr_p50_us": float(m.group(1))}


def have_rr6() -> bool:
    """Whether the IPv6 request/response probe can be built here (bench.rr_tool needs gcc)."""
    return bool(shutil.which("gcc") or shutil.which("cc"))


def request_response6(src: Endpoint, dst: Endpoint, seconds: float = 1.0, cpu: int = 0) -> float:
    """IPv6 UDP ping-pong with both ends pinned to one CPU: round trip p50 in µs. sockperf 3.7
    has no IPv6, so this is bench.rr_tool's probe, built to do what ``request_response`` does."""
    from .rr_tool import ToolError, build
    try:
        tool = build()
    except ToolError as exc:
        raise MeasureError(str(exc)) from None
    port, run_s = "11112", max(1, round(seconds))
    out = _ping_pong(dst.ns, [tool, "server", dst.ip, port, str(run_s + 3)],
                     src.ns, [tool, "client", dst.ip, port, str(run_s)], cpu, timeout=run_s + 15)
    try:
        return float(out.split()[0])
    except (IndexError, ValueError):
        raise MeasureError(f"rr6: unreadable output {out.strip()[:80]!r}") from None


def set_offloads(ns: str, dev: str, on: bool) -> None:
    """Segmentation offloads of a pod's interface (off shows the per-packet cost)."""
    state = "on" if on else "off"
    _run(netns(ns, ["ethtool", "-K", dev, "tso", state, "gso", state]), timeout=10)


def throttle(ns: str, dev: str, rate: str | None) -> None:
    """A tbf rate limit on a pod's interface (the gate's self-test); None removes it."""
    if rate is None:
        subprocess.run(netns(ns, ["tc", "qdisc", "del", "dev", dev, "root"]), capture_output=True)
        return
    _run(netns(ns, ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", "256kb", "latency", "50ms"]), timeout=10)
