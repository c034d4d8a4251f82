"""The engine process's control channel: the protocol, weftd's client, and starting an engine.

A userspace data plane's engine runs in a process of its own (``fastpath.engine.proc``) so that pod
traffic outlives weftd: a SIGTERM restart (an upgrade) or kill -9 of weftd leaves it forwarding
with the routes it has, and the next weftd adopts it. weftd talks to it over a unix stream socket
in the *abstract* namespace, ``\\0weft-engine-<device>``: abstract names belong to the network
namespace, so each node (one namespace each) has its own and there is no file to clean up.
Anyone in the namespace can connect to an abstract socket, so the engine answers only peers whose
uid (SO_PEERCRED) is 0 or its own.

Messages, both ways: a 4-byte big-endian length, then that many bytes of one JSON object (at most
``MAX_MESSAGE``). A request is ``{"op": ..., ...}``; the reply is ``{"ok": true, ...}`` or
``{"ok": false, "error": "<one line>"}``. Per-packet work never crosses the channel.

| op | arguments | reply |
|---|---|---|
| ``hello`` | | ``pid``, ``running``, ``config`` (as started), ``engine`` (class), ``tids`` ([worker, thread id]), ``routes`` (count) |
| ``start`` | ``config``, ``routes`` ({subnet: [ip, mac]}) | as ``hello``; once per process: opens the TUN and the sockets, programs the routes, starts |
| ``set_route`` | ``subnet``, ``ip``, ``mac`` (vxlan; an IPv6 subnet: the peer's PublicIPv6 and v6 VtepMAC) | |
| ``remove_route`` | ``subnet`` | |
| ``replace_routes`` | ``routes`` | sets every given route, then removes the others (a resync: the full table) |
| ``routes`` | | ``routes`` ({subnet: [ip, mac]}) |
| ``stats`` | | ``stats`` (the engine's counters) |
| ``stop`` | | the process stops the engine, closes the TUN (it disappears) and exits 0 |
"""
from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

MAX_MESSAGE = 16 << 20  # a /8 network cut into /24s is 65,536 routes: ~5 MB of JSON
HEADER = struct.Struct(">I")
MAX_WORKERS = 64  # engine workers (TUN queues) one engine process runs; WEFT_ENGINE_WORKERS is held to it
REQUEST_TIMEOUT = 5.0   # seconds weftd waits for one reply
START_TIMEOUT = 20.0    # seconds a new engine process has to accept its first connection
STOP_TIMEOUT = 5.0      # seconds an engine has to exit after "stop" (then SIGKILL)


class EngineError(Exception):
    """The engine process cannot be reached (gone, not answering); str() is one line."""


class EngineRefused(ValueError):
    """The engine answered a request with an error (bad route, bad config): the engine runs on.
    A ValueError, as the in-process Engine raises for the same bad input."""


NAME_PREFIX = "weft-engine-"
LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags


def socket_name(dev: str) -> str:
    """The abstract socket name (without the leading NUL) of the engine that serves ``dev``."""
    return NAME_PREFIX + dev


def encode(msg: dict) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return HEADER.pack(len(data)) + data


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


def read_message(sock: socket.socket) -> dict:
    (n,) = HEADER.unpack(recv_exact(sock, HEADER.size))
    if n > MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes exceeds {MAX_MESSAGE}")
    msg = json.loads(recv_exact(sock, n))
    if not isinstance(msg, dict):
        raise ValueError("a message must be a JSON object")
    return msg


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket, from the kernel."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))


def routes_message(routes) -> dict:
    """{subnet: (ip, mac)} as the protocol carries it: JSON keys are strings, MACs may be None."""
    return {str(subnet): [str(ip), mac or None] for subnet, (ip, mac) in routes.items()}


class EngineClient:
    """One connection to the engine process of a device; the in-process Engine's API
    (``set_route``, ``remove_route``, ``routes``, ``stats``) plus ``hello``, ``replace_routes``,
    ``start`` and ``stop``. Not thread-safe: the backend calls it under its lock."""

    def __init__(self, name: str, timeout: float = REQUEST_TIMEOUT):
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect("\0" + name)
            self.pid = peer_credentials(self.sock)[0]  # the engine process, as the kernel knows it
        except BaseException:
            self.sock.close()
            raise

    @classmethod
    def connect(cls, name: str) -> "EngineClient | None":
        """The engine serving ``name``, or None when there is none (nobody bound the name)."""
        try:
            return cls(name)
        except (ConnectionRefusedError, FileNotFoundError):
            return None

    def close(self) -> None:
        self.sock.close()

    def request(self, op: str, **args) -> dict:
        if self.sock.fileno() < 0:
            raise EngineError(f"engine {self.name}: connection closed")
        frame = encode({"op": op, **args})
        try:
            try:
                self.sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the engine may have refused us at once: its reply, if any, says why
            reply = read_message(self.sock)
        except (OSError, EOFError, ValueError) as exc:  # timeout, reset, EOF, garbage
            self.sock.close()  # the stream may be mid-message: never reuse it
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            raise EngineError(f"engine {self.name} (pid {self.pid}): {op}: {reason}") from None
        if not reply.get("ok"):
            raise EngineRefused(str(reply.get("error") or "refused"))
        return reply

    # -- the Engine's API -------------------------------------------------------------------------
    def set_route(self, subnet, peer_ip, peer_mac=None) -> None:
        self.request("set_route", subnet=str(subnet), ip=str(peer_ip), mac=peer_mac or None)

    def remove_route(self, subnet) -> None:
        self.request("remove_route", subnet=str(subnet))

    def routes(self) -> dict:
        return {s: tuple(v) for s, v in self.request("routes")["routes"].items()}

    def stats(self) -> dict:
        return self.request("stats")["stats"]

    # -- the process's ----------------------------------------------------------------------------
    def hello(self) -> dict:
        return self.request("hello")

    def start(self, config: dict, routes: dict) -> dict:
        return self.request("start", config=config, routes=routes_message(routes))

    def replace_routes(self, routes: dict) -> None:
        self.request("replace_routes", routes=routes_message(routes))

    def stop(self) -> None:
        self.request("stop")


# -- the process ---------------------------------------------------------------------------------

def pidfd_of(pid: int) -> int | None:
    """A pidfd of ``pid`` (readable once it exits; immune to PID reuse), None when it is gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def wait_exit(pidfd: int, timeout: float) -> bool:
    """True once the process exited (within ``timeout`` seconds)."""
    return bool(select.select([pidfd], [], [], max(0.0, timeout))[0])


def kill(pidfd: int, sig: int = signal.SIGKILL) -> None:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass


def running_engines() -> list[str]:
    """The abstract names engine processes listen on in this network namespace (/proc/net/unix
    lists the namespace's own sockets)."""
    names = set()
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if (len(fields) >= 8 and fields[7].startswith("@" + NAME_PREFIX)
                        and int(fields[3], 16) & LISTENING):
                    names.add(fields[7][1:])
    except OSError:
        pass
    return sorted(names)


def stop_engines_but_for(backend) -> list[int]:
    """The registry's ``leftovers`` hook of the userspace data planes: before ``backend`` is set
    up, stop every engine process of this namespace but the one it would adopt."""
    return stop_engines(keep=getattr(backend, "engine_name", None), log=logging.getLogger("weft"))


def stop_engines(keep: str | None = None, log=None) -> list[int]:
    """Stop every engine process of this network namespace but the one listening on ``keep``:
    one left by a userspace data plane this node ran before weftd was restarted with another
    backend would hold its TUN, its routes and its UDP port. The PIDs stopped."""
    stopped = []
    for name in running_engines():
        if name == keep:
            continue
        client = EngineClient.connect(name)
        if client is None:
            continue
        pid, pidfd = client.pid, pidfd_of(client.pid)
        if log is not None:
            log.info("stopping the engine process %d (%s): this node runs another data plane now", pid, name)
        try:
            client.stop()
        except (EngineError, ValueError):
            pass
        client.close()
        if pidfd is not None:
            try:
                if not wait_exit(pidfd, STOP_TIMEOUT):
                    kill(pidfd)
                    wait_exit(pidfd, STOP_TIMEOUT)
            finally:
                os.close(pidfd)
        stopped.append(pid)
    return stopped


def spawn(name: str) -> subprocess.Popen:
    """Start an engine process for abstract name ``name`` in a session of its own (a signal to
    weftd's process group does not reach it). It inherits weftd's stdout/stderr (weftd's log),
    its network namespace and its CPU affinity."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # -S: no site-packages (the engine needs only the standard library and this package): a
    # third of the start-up time, which is pod traffic lost when an engine is restarted
    return subprocess.Popen([sys.executable, "-S", "-m", "fastpath.engine.proc", name],
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True, close_fds=True)


def connect_new(name: str, proc: subprocess.Popen, timeout: float = START_TIMEOUT) -> EngineClient:
    """Connect to the engine process just spawned, once it has bound its name. EngineError when
    it exited first (its stderr, in weftd's log, says why) or did not bind in time."""
    deadline = time.monotonic() + timeout
    while True:
        status = proc.poll()
        if status is not None:
            raise EngineError(f"engine process for {name} exited with status {status} before it"
                              " answered (see the log above)")
        try:
            client = EngineClient(name)
        except (ConnectionRefusedError, FileNotFoundError):
            client = None
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                raise EngineError(f"engine {name}: connect: {exc.strerror}") from None
            client = None
        if client is not None:
            if client.pid == proc.pid:
                return client
            client.close()  # another engine holds the name: the new one exits on its own
        if time.monotonic() >= deadline:
            proc.kill()
            proc.wait()
            raise EngineError(f"engine process for {name} (pid {proc.pid}) did not answer within"
                              f" {timeout:.0f} s; killed")
        time.sleep(0.01)
