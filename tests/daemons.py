"""Run real weftd processes for tests: start, wait for /readyz, read /metrics, stop by PID."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from bench.scale import by_label, parse_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tool(module: str, *args: str, env: dict | None = None, input: str | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` (weftctl, bench) and capture its output."""
    full_env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=full_env, input=input, timeout=timeout, cwd=REPO)


class Weftd:
    def __init__(self, workdir: str, n: int, store_args: list[str], extra: list[str] = (),
                 env: dict | None = None):
        self.n = n
        self.port = free_port()
        self.subnet_file = os.path.join(workdir, f"node{n}.env")
        self.log_path = os.path.join(workdir, f"node{n}.log")
        self.argv = [sys.executable, "-m", "controlplane.daemon", *store_args, "-iface", "lo",
                     "-public-ip", f"198.18.0.{n}", "-subnet-file", self.subnet_file,
                     "-healthz-ip", "127.0.0.1", "-healthz-port", str(self.port), *extra]
        self.env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Weftd":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        log.close()
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def ready(self) -> bool:
        try:
            return self.get("/readyz")[0] == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float = 20) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return time.monotonic()
            if self.proc.poll() is not None:
                raise AssertionError(f"weftd {self.n} exited {self.proc.returncode}: {self.log()[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"weftd {self.n} not ready in {timeout} s: {self.log()[-2000:]}")

    def metrics_page(self) -> str:
        """/metrics as text. A daemon that is not running or does not answer raises: that is no
        missing metric."""
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise AssertionError(f"weftd {self.n} is not running (exit status {code}), so it has no "
                                 f"metrics: {self.log()[-1000:]}")
        try:
            status, text = self.get("/metrics")
        except (OSError, urllib.error.URLError) as exc:
            raise AssertionError(f"weftd {self.n} (pid {self.proc.pid}) does not answer /metrics: {exc}") from None
        if status != 200:
            raise AssertionError(f"weftd {self.n} (pid {self.proc.pid}): /metrics answered {status}")
        return text

    def metric(self, name: str) -> float | None:
        """``name``'s value on /metrics (a sample name: a counter's ends in ``_total``; label sets
        summed); None when the page lacks it."""
        return parse_metrics(self.metrics_page()).get(name)

    def labelled(self, name: str, label: str) -> dict[str, float]:
        """The samples ``name{label="x"} v`` of /metrics as {x: v}."""
        return by_label(self.metrics_page(), name, label)

    def subnet(self) -> str:
        with open(self.subnet_file) as f:
            return dict(l.split("=", 1) for l in f.read().split())["FLANNEL_SUBNET"]

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
