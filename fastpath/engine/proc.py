"""The engine process: ``python -m fastpath.engine.proc <name>`` (started by weftd, see control.py).

It binds the abstract unix socket ``\\0<name>`` (a second engine for the same device in the same
network namespace fails here, so two never share a TUN), then serves control requests on it. The
first ``start`` request opens the TUN queues and the UDP socket(s), builds the engine (the compiled
one, or the reference engine for ``udp/python``), programs the routes it was given and starts the
engine's threads; from then on packets flow whether or not anyone is connected. A closed
connection (weftd exited, or was killed) changes nothing.

It exits on ``stop`` or SIGTERM/SIGINT (the TUN disappears with its fds, and its address and
routes with it), when ``start`` fails (the reply says why), and when no ``start`` came within
``START_WAIT`` seconds of its launch (the weftd that started it died before configuring it). A
malformed request gets an error reply naming what is wrong; it never stops the engine.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import re
import selectors
import signal
import socket
import sys
import threading
import time

from .control import HEADER, MAX_MESSAGE, MAX_WORKERS, encode, peer_credentials
from .spread import attach_spread, bind_senders

log = logging.getLogger("weft.engine")

START_WAIT = 60.0
SEND_TIMEOUT = 2.0  # a client that does not read its replies is dropped, never waited for
_ENGINE_THREAD = re.compile(r"^weft-engine-[a-z]+(\d+)$")  # the compiled engine's thread names

# What ``start`` needs, and the type of each (the Engine checks the values themselves).
CONFIG_KEYS = {"dev": str, "engine": str, "mode": str, "network": str, "subnet_len": int,
               "local_subnet": str, "local": str, "port": int, "workers": int, "mtu": int,
               "vnet_hdr": bool, "busy_poll_us": int, "kwargs": dict}
# Dual-stack only (absent from an IPv4-only config, so that an engine started before IPv6 existed
# is still adopted): the IPv6 underlay address the second socket binds to.
OPTIONAL_KEYS = {"local6": str}
# IPv6-only (flannel's EnableIPv4 false): these are null and the engine has no IPv4 socket.
IPV4_KEYS = ("network", "local_subnet", "local")
ENGINE_KWARGS = {"vni": int, "vtep_mac": (str, type(None)), "network6": str, "subnet6_len": int,
                 "local_subnet6": str, "vtep_mac6": (str, type(None))}
V6_KWARGS = ("network6", "subnet6_len", "local_subnet6", "vtep_mac6")


class RequestError(Exception):
    """A request that cannot be served; str() is the one-line error reply."""


def _check_config(config) -> dict:
    if not isinstance(config, dict):
        raise RequestError("config must be an object")
    missing = sorted(set(CONFIG_KEYS) - set(config))
    unknown = sorted(set(config) - set(CONFIG_KEYS) - set(OPTIONAL_KEYS))
    if missing or unknown:
        raise RequestError(f"config: missing {missing}, unknown {unknown}" if missing and unknown
                           else f"config: missing {missing}" if missing else f"config: unknown {unknown}")
    v6_only = config["network"] is None
    if v6_only and (config["local_subnet"] is not None or config["local"] is not None):
        raise RequestError("config: network null (IPv6-only) takes no local_subnet or local")
    for key, kind in {**CONFIG_KEYS, **OPTIONAL_KEYS}.items():
        if key not in config or (v6_only and key in IPV4_KEYS):
            continue
        if not isinstance(config[key], kind) or (kind is int and isinstance(config[key], bool)):
            raise RequestError(f"config: {key} must be {kind.__name__}, not {type(config[key]).__name__}")
    for key, value in config["kwargs"].items():
        if key not in ENGINE_KWARGS or not isinstance(value, ENGINE_KWARGS[key]) or isinstance(value, bool):
            raise RequestError(f"config: kwargs.{key} is not an engine option of the right type")
    v6 = {k for k in V6_KWARGS if k in config["kwargs"]} | ({"local6"} & set(config))
    if v6 and v6 != {*V6_KWARGS, "local6"}:
        raise RequestError("config: IPv6 needs local6 and kwargs " + ", ".join(V6_KWARGS) + " together")
    if v6_only and not v6:
        raise RequestError("config: network null (IPv6-only) needs local6 and kwargs " + ", ".join(V6_KWARGS))
    if config["engine"] not in ("compiled", "reference"):
        raise RequestError(f"config: engine {config['engine']!r}: must be 'compiled' or 'reference'")
    if not 1 <= config["workers"] <= MAX_WORKERS:
        raise RequestError(f"config: workers {config['workers']}: 1..{MAX_WORKERS}")
    return config


def _routes_arg(routes) -> dict[str, tuple[str, str | None]]:
    if not isinstance(routes, dict):
        raise RequestError("routes must be an object {subnet: [ip, mac]}")
    out = {}
    for subnet, value in routes.items():
        if (not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], str)
                or not isinstance(value[1], (str, type(None)))):
            raise RequestError(f"route {subnet}: must be [ip, mac or null]")
        out[subnet] = (value[0], value[1])
    return out


def _str_arg(msg: dict, key: str, optional: bool = False) -> str | None:
    value = msg.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise RequestError(f"{msg.get('op')}: {key} must be a string")
    return value


class EngineProcess:
    def __init__(self, listener: socket.socket):
        self.listener = listener
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, None)
        self.buffers: dict[socket.socket, bytearray] = {}
        self.engine = None
        self.config: dict | None = None
        self.tun_fds: list[int] = []
        self.socks: list[socket.socket] = []
        self.tids: list[tuple[int, int]] = []
        self.started_at: float | None = None
        self.stopping = False
        self.exit_code = 0
        self.errors = 0  # requests answered with an error
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")

    # -- serving ----------------------------------------------------------------------------------
    def run(self) -> int:
        launched = time.monotonic()
        while not self.stopping:
            for key, _ in self.sel.select(timeout=1.0):
                if key.data == "wake":
                    try:
                        self.wake_r.recv(64)
                    except OSError:
                        pass
                elif key.fileobj is self.listener:
                    self._accept()
                else:
                    self._readable(key.fileobj)
                if self.stopping:
                    break
            if self.engine is None and not self.stopping and time.monotonic() - launched > START_WAIT:
                log.error("no start request within %.0f s of launch; exiting", START_WAIT)
                self.exit_code = 1
                self.stopping = True
        self._shutdown()
        return self.exit_code

    def signal_stop(self, signum, _frame) -> None:
        self.stopping = True
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            _, uid, _ = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        if uid not in (0, os.geteuid()):
            self._reply(conn, {"ok": False, "error": f"uid {uid} may not control this engine"})
            conn.close()
            return
        conn.settimeout(SEND_TIMEOUT)
        self.buffers[conn] = bytearray()
        self.sel.register(conn, selectors.EVENT_READ, "conn")

    def _drop(self, conn: socket.socket) -> None:
        self.buffers.pop(conn, None)
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _reply(self, conn: socket.socket, reply: dict) -> bool:
        try:
            conn.sendall(encode(reply))
            return True
        except (OSError, ValueError):
            return False

    def _readable(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)  # the client went (weftd exited or was killed): forwarding goes on
            return
        buf = self.buffers[conn]
        buf += data
        while len(buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(buf)
            if n > MAX_MESSAGE:  # the framing is lost: say why, then drop the connection
                self.errors += 1
                self._reply(conn, {"ok": False, "error": f"message of {n} bytes exceeds {MAX_MESSAGE}"})
                self._drop(conn)
                return
            if len(buf) < HEADER.size + n:
                return
            body = bytes(buf[HEADER.size:HEADER.size + n])
            del buf[:HEADER.size + n]
            reply = self._handle(body)
            if not self._reply(conn, reply):
                self._drop(conn)
                return
            if self.stopping:
                return

    def _handle(self, body: bytes) -> dict:
        try:
            try:
                msg = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise RequestError(f"not JSON: {exc}") from None
            if not isinstance(msg, dict):
                raise RequestError("a request must be a JSON object")
            op = msg.get("op")
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) and op.isidentifier() else None
            if handler is None:
                raise RequestError(f"unknown op {op!r}")
            if self.engine is None and op not in ("hello", "start", "stop"):
                raise RequestError(f"{op}: the engine is not started")
            return {"ok": True, **(handler(msg) or {})}
        except (RequestError, ValueError, TypeError) as exc:
            self.errors += 1
            return {"ok": False, "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
        except Exception as exc:  # a bug must not stop the engine: say so and go on
            self.errors += 1
            log.exception("request failed")
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    # -- requests -----------------------------------------------------------------------------------
    def op_hello(self, msg) -> dict:
        return {"pid": os.getpid(), "running": self.engine is not None, "config": self.config,
                "engine": type(self.engine).__name__ if self.engine is not None else None,
                "tids": self.tids, "started_at": self.started_at,
                "routes": len(self.engine.routes()) if self.engine is not None else 0}

    def op_start(self, msg) -> dict:
        if self.engine is not None:
            raise RequestError("start: the engine already runs")
        try:
            config = _check_config(msg.get("config"))
            routes = _routes_arg(msg.get("routes", {}))
            self._open(config, routes)
        except Exception as exc:
            self._close_all()
            # the process exists to run this engine: the one who asked gets the reason, then we go
            log.error("start failed: %s; exiting", exc)
            self.exit_code = 1
            self.stopping = True
            raise RequestError(str(exc) if isinstance(exc, RequestError) else f"start: {exc}") from None
        log.info("engine of %s started (%s, %d worker(s), %d route(s))", config["dev"],
                 type(self.engine).__name__, config["workers"], len(routes))
        return self.op_hello(msg)

    def op_set_route(self, msg) -> None:
        self.engine.set_route(_str_arg(msg, "subnet"), _str_arg(msg, "ip"), _str_arg(msg, "mac", True))

    def op_remove_route(self, msg) -> None:
        self.engine.remove_route(_str_arg(msg, "subnet"))

    def op_replace_routes(self, msg) -> dict:
        routes = _routes_arg(msg.get("routes"))
        kwargs = self.config["kwargs"]
        net = ipaddress.IPv4Network(self.config["network"]) if self.config["network"] is not None else None
        net6 = ipaddress.IPv6Network(kwargs["network6"]) if "network6" in kwargs else None
        wanted = set()
        for subnet, (ip, _) in routes.items():  # refuse the whole table before changing anything
            sub = ipaddress.ip_network(subnet)
            size, within = (self.config["subnet_len"], net) if sub.version == 4 else (kwargs.get("subnet6_len"), net6)
            if within is None:
                raise RequestError(f"replace_routes: {subnet}: this engine carries IPv"
                                   f"{6 if sub.version == 4 else 4} only")
            if sub.prefixlen != size or not sub.subnet_of(within):
                raise RequestError(f"replace_routes: {subnet} is not a /{size} of {within}")
            if ipaddress.ip_address(ip).version != sub.version:
                raise RequestError(f"replace_routes: {subnet} via {ip}: not of one address family")
            wanted.add(str(sub))
        for subnet, (ip, mac) in routes.items():  # set first: a route kept is never missing
            self.engine.set_route(subnet, ip, mac)
        removed = [s for s in self.engine.routes() if s not in wanted]
        for subnet in removed:
            self.engine.remove_route(subnet)
        return {"removed": removed}

    def op_routes(self, msg) -> dict:
        return {"routes": {s: list(v) for s, v in self.engine.routes().items()}}

    def op_stats(self, msg) -> dict:
        stats = {k: v for k, v in self.engine.stats().items()}
        stats["control_errors"] = self.errors
        return {"stats": stats}

    def op_stop(self, msg) -> None:
        log.info("stop requested")
        self.stopping = True

    # -- the data plane -----------------------------------------------------------------------------
    def _open(self, config: dict, routes: dict) -> None:
        from .tun import open_tun
        if config["engine"] == "reference":
            from .reference import ReferenceEngine as cls
        else:
            from . import load_engine
            cls = load_engine()
        workers = config["workers"]
        try:
            self.tun_fds = open_tun(config["dev"], vnet_hdr=config["vnet_hdr"], queues=workers)
        except OSError as exc:
            raise RequestError(f"cannot open TUN {config['dev']}: {exc.strerror} (needs CAP_NET_ADMIN"
                               " and /dev/net/tun)") from None
        # IPv6-only: no IPv4 socket at all (nothing would ever be sent from it, and bound it would
        # hold the IPv4 VXLAN port of an address the overlay does not use)
        socks = self._bind(socket.AF_INET, config["local"], config["port"], workers) if config["local"] else []
        extra = {}
        if workers > 1 and socks:  # each worker sends from a port of its own (spread.py)
            extra["send_fd"] = [s.fileno() for s in self._senders(socket.AF_INET, config["local"], workers)]
        if "local6" in config:  # dual-stack: the IPv6 underlay's socket(s), IPv6 only, same port
            socks6 = self._bind(socket.AF_INET6, config["local6"], config["port"], workers)
            extra["sock6_fd"] = [s.fileno() for s in socks6] if workers > 1 else socks6[0].fileno()
            if workers > 1:
                extra["send6_fd"] = [s.fileno() for s in self._senders(socket.AF_INET6, config["local6"], workers)]
        tun = self.tun_fds if workers > 1 else self.tun_fds[0]
        sock = None if not socks else [s.fileno() for s in socks] if workers > 1 else socks[0].fileno()
        if config["network"] is not None:
            extra.update(network=config["network"], subnet_len=config["subnet_len"],
                         local_subnet=config["local_subnet"])
        engine = cls(tun, sock, mode=config["mode"], port=config["port"], mtu=config["mtu"],
                     vnet_hdr=config["vnet_hdr"], busy_poll_us=config["busy_poll_us"],
                     **config["kwargs"], **extra)
        self.engine = engine
        for subnet, (ip, mac) in routes.items():
            engine.set_route(subnet, ip, mac)
        before = set(threading.enumerate())
        engine.start()
        self.tids = sorted((int(m.group(1)), t.native_id) for t in threading.enumerate()
                           if t not in before and t.native_id and (m := _ENGINE_THREAD.match(t.name)))
        self.config = config
        self.started_at = time.time()

    def _senders(self, family: int, address: str, workers: int) -> list[socket.socket]:
        """The workers' send sockets, worker i's on an ephemeral port that is i modulo ``workers``."""
        try:
            made = bind_senders(family, address, workers)
        except OSError as exc:
            raise RequestError(f"cannot bind the workers' send sockets on {address}: "
                               f"{exc.strerror or exc}") from None
        self.socks.extend(made)
        return made

    def _bind(self, family: int, address: str, port: int, workers: int) -> list[socket.socket]:
        """One UDP socket per worker (SO_REUSEPORT when several) bound to ``address``:``port``;
        an IPv6 one IPV6_V6ONLY (the IPv4 socket holds the same port). Several: the group takes
        a datagram into the socket of index source port % workers (spread.py)."""
        made = []
        try:
            for _ in range(workers):
                s = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self.socks.append(s)
                made.append(s)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if workers > 1:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind((address, port))
            if workers > 1:
                attach_spread(made[0], workers)
        except OSError as exc:
            where = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"
            raise RequestError(f"cannot bind UDP {where}: {exc.strerror}") from None
        return made

    def _close_all(self) -> None:
        if self.engine is not None:
            try:
                self.engine.stop()
                close = getattr(self.engine, "close", None)
                if close is not None:
                    close()
            finally:
                self.engine = None
        for fd in self.tun_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.tun_fds = []
        for s in self.socks:
            s.close()
        self.socks = []

    def _shutdown(self) -> None:
        if self.engine is not None:
            log.info("stopping the engine of %s; its TUN goes with it", self.config["dev"])
        self._close_all()
        for conn in list(self.buffers):
            self._drop(conn)
        self.listener.close()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s weft.engine[%(process)d]: %(message)s")
    if len(argv) != 1 or not argv[0] or "\0" in argv[0]:
        print("usage: python -m fastpath.engine.proc NAME (the abstract socket name weftd gives)",
              file=sys.stderr)
        return 2
    name = argv[0]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind("\0" + name)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            log.error("another engine already serves %s in this network namespace; exiting", name)
            return 1
        raise
    listener.listen(16)
    listener.setblocking(False)
    proc = EngineProcess(listener)
    signal.signal(signal.SIGTERM, proc.signal_stop)
    signal.signal(signal.SIGINT, proc.signal_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # weftd's terminal going away is not a stop
    return proc.run()


if __name__ == "__main__":
    sys.exit(main())
