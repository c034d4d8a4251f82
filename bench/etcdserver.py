"""Run a real single-member etcd 3.4 for tests and the lab.

    with EtcdServer(tls=True) as etcd:          # mTLS: server cert + client-cert-auth
        etcd.endpoint                           # "https://127.0.0.1:40123"
        etcd.pki["client"], etcd.pki["client_key"], etcd.pki["ca"]
        etcd.etcdctl("get", "/coreos.com/network/config", "--print-value-only")

- The server listens on 127.0.0.1 (or on ``client_host`` inside network namespace ``netns``, run
  as ``ip netns exec NAME etcd ...``), on ports picked free at start unless given.
- Its data dir and log live in a temp dir it creates (on /dev/shm when there is one: no fsync
  cost) and removes on ``stop()``.
- ``stop()`` signals exactly its own process, by PID: SIGTERM, then SIGKILL after a timeout. It is
  also registered with atexit (a caller that wants etcd to outlive it unregisters that). With
  ``die_with_parent=True`` (the tests) etcd also gets SIGTERM when the *thread* that started it
  dies (PR_SET_PDEATHSIG), so even a test run killed by a signal leaves no etcd behind.
- ``enable_auth(password)`` adds user ``root`` with that password and turns auth on; ``etcdctl``
  then authenticates as root.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Sequence

HEALTH_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
ETCD = "etcd"
ETCDCTL = "etcdctl"


class EtcdServerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started us exits (PR_SET_PDEATHSIG),
    so a test run killed by a signal (no atexit) does not leave etcd behind."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _tmp_base() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class EtcdServer:
    def __init__(self, *, tls: bool = False, pki: dict | None = None, netns: str | None = None,
                 client_host: str = "127.0.0.1", client_port: int | None = None,
                 peer_port: int | None = None, name: str = "weft-etcd",
                 auth_password: str | None = None, health_timeout: float = HEALTH_TIMEOUT,
                 extra_args: Sequence[str] = (), die_with_parent: bool = False,
                 start: bool = True, initial_cluster: str | None = None, cluster_token: str | None = None,
                 wait_healthy: bool = True):
        self.tls = tls
        self.pki = pki
        self.netns = netns
        self.client_host = client_host
        self.client_port = client_port
        self.peer_port = peer_port
        self.name = name
        self.health_timeout = health_timeout
        self.extra_args = list(extra_args)
        self.die_with_parent = die_with_parent
        # a member of a cluster: every member's name=peer URL, one token; the first members cannot be
        # healthy before a quorum runs, so the caller waits (``wait_healthy=False``, then ``_wait_healthy``)
        self.initial_cluster = initial_cluster
        self.cluster_token = cluster_token
        self.wait_healthy = wait_healthy
        self.user: str | None = None
        self.password: str | None = None
        self.proc: subprocess.Popen | None = None
        self.tmpdir: str | None = None
        self._log = None
        self._auth_password = auth_password
        self._own_pki = False  # pki made in tmpdir (gone after stop; remade at the next start)
        if start:
            self.start()

    # -- paths and URLs ---------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.client_host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.client_host}:{self.peer_port}"

    @property
    def data_dir(self) -> str:
        assert self.tmpdir
        return os.path.join(self.tmpdir, "data")

    @property
    def log_path(self) -> str:
        assert self.tmpdir
        return os.path.join(self.tmpdir, "etcd.log")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "EtcdServer":
        """Start and wait until healthy; ports picked here are re-picked if another process
        took one in between (bind: address already in use)."""
        if self.proc is not None:
            return self
        auto_client, auto_peer = self.client_port is None, self.peer_port is None
        for attempt in range(3):
            try:
                return self._start()
            except EtcdServerError as exc:
                if not ((auto_client or auto_peer) and "address already in use" in str(exc)
                        and attempt < 2):
                    raise
                self.client_port = None if auto_client else self.client_port
                self.peer_port = None if auto_peer else self.peer_port
        raise AssertionError("unreachable")

    def _start(self) -> "EtcdServer":
        for tool in (ETCD, ETCDCTL):
            if shutil.which(tool) is None:
                raise EtcdServerError(f"{tool} not found in PATH (Debian: etcd-server, etcd-client)")
        self.tmpdir = tempfile.mkdtemp(prefix="weft-etcd-", dir=_tmp_base())
        try:
            if self.tls and (self.pki is None or self._own_pki):
                from .pki import make_pki
                self.pki = make_pki(os.path.join(self.tmpdir, "pki"), [self.client_host])
                self._own_pki = True
            if self.client_port is None:
                self.client_port = free_port()
            if self.peer_port is None:
                self.peer_port = free_port()
                while self.peer_port == self.client_port:
                    self.peer_port = free_port()
            argv = [
                ETCD, "--name", self.name, "--data-dir", self.data_dir,
                "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
                "--initial-cluster-state", "new",
                "--initial-cluster-token", self.cluster_token or f"{self.name}-{os.getpid()}",
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
                "--quota-backend-bytes", str(128 * 1024 * 1024), "--snapshot-count", "10000",
                "--enable-v2=false",
            ]
            if self.tls:
                argv += ["--cert-file", self.pki["server"], "--key-file", self.pki["server_key"],
                         "--trusted-ca-file", self.pki["ca"], "--client-cert-auth"]
            argv += self.extra_args
            self._argv = argv
            self._log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(self._wrap(argv), stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent if self.die_with_parent else None)
            atexit.register(self.stop)
            if self.wait_healthy:
                self._wait_healthy()
            if self._auth_password is not None:
                self.enable_auth(self._auth_password)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()[-16384:]
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.health_timeout
        last = ""
        while True:
            if self.proc.poll() is not None:
                raise EtcdServerError(f"etcd exited with status {self.proc.returncode} at start;"
                                      f" log tail:\n{self.log_tail()}")
            res = self._run_etcdctl(["endpoint", "health"], timeout=5, check=False,
                                    command_timeout="2s")
            if res.returncode == 0:
                return
            last = (res.stderr or res.stdout).strip()
            if time.monotonic() > deadline:
                raise EtcdServerError(f"etcd at {self.endpoint} not healthy after"
                                      f" {self.health_timeout:.0f}s ({last}); log tail:\n"
                                      f"{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    try:
                        os.kill(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=STOP_TIMEOUT)
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        self.user = self.password = None  # the data (users included) went with the data dir

    def kill(self) -> None:
        """SIGKILL the server and keep its data dir (a crash); ``restart`` starts it again on it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> None:
        """Start the killed server again: same data dir, ports, certificates and flags; wait until healthy."""
        if self.proc is None or self.tmpdir is None:
            raise EtcdServerError("restart: the server was never started or was stopped (data dir gone)")
        if self.proc.poll() is None:
            raise EtcdServerError(f"restart: etcd (pid {self.proc.pid}) is still running")
        self.proc = subprocess.Popen(self._wrap(self._argv), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent if self.die_with_parent else None)
        self._wait_healthy()

    def __enter__(self) -> "EtcdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- etcdctl ------------------------------------------------------------------------------
    def etcdctl_flags(self, auth: bool = True) -> list[str]:
        flags = [f"--endpoints={self.endpoint}"]
        if self.tls:
            flags += [f"--cacert={self.pki['ca']}", f"--cert={self.pki['client']}",
                      f"--key={self.pki['client_key']}"]
        if auth and self.user is not None:
            flags += [f"--user={self.user}:{self.password}"]
        return flags

    def _run_etcdctl(self, args: Sequence[str], timeout: float = 15, check: bool = True,
                     command_timeout: str = "5s", auth: bool = True):
        env = dict(os.environ, ETCDCTL_API="3")
        argv = self._wrap([ETCDCTL, *self.etcdctl_flags(auth), "--dial-timeout=2s",
                           f"--command-timeout={command_timeout}", *args])
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise EtcdServerError(f"etcdctl {' '.join(args)}: exit {res.returncode}:"
                                  f" {(res.stderr or res.stdout).strip()}")
        return res

    def etcdctl(self, *args: str, timeout: float = 15) -> str:
        """Run ``etcdctl ARGS`` against this server (right endpoint, TLS and auth); stdout."""
        return self._run_etcdctl(args, timeout=timeout).stdout

    # -- auth ---------------------------------------------------------------------------------
    def enable_auth(self, password: str) -> None:
        """Add user root with ``password`` (role root) and enable auth."""
        if self.user is not None:
            return
        self.etcdctl("user", "add", "root", f"--new-user-password={password}", "--interactive=false")
        self.etcdctl("role", "add", "root")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("auth", "enable")
        self.user, self.password = "root", password

    def add_user(self, name: str, password: str, prefix: str | None = None) -> None:
        """A non-root user with read-write on keys under ``prefix`` (none when None)."""
        self.etcdctl("user", "add", name, f"--new-user-password={password}", "--interactive=false")
        if prefix is not None:
            role = f"{name}-rw"
            self.etcdctl("role", "add", role)
            self.etcdctl("role", "grant-permission", role, "--prefix=true", "readwrite", prefix)
            self.etcdctl("user", "grant-role", name, role)
