"""Running a backend inside one network namespace, from a test: the ``Agent``.

An agent is a forked child that entered the namespace (pyroute2 ``netns.setns``) and executes
calls sent over a pipe, so a backend programs its own namespace exactly as weftd would on a real
node, while the test process stays in the root namespace and touches nothing there.
"""
from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import time

from controlplane.backends import BackendError, BackendOptions, ExternalInterface, load_backend

CALL_TIMEOUT = 30


def sh(*args: str, ns: str | None = None, check: bool = True, timeout: float = 10, input=None) -> str:
    """Run a command (inside namespace ``ns`` when given); its stdout."""
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip() or res.returncode}")
    return res.stdout


def ipj(ns: str, *args: str, tool: str = "ip") -> list:
    """``ip -n NS -j ...`` (or ``bridge``) parsed."""
    out = sh(tool, "-n", ns, "-j", *args)
    return json.loads(out) if out.strip() else []


def _agent_main(ns: str, conn) -> None:
    from pyroute2 import netns
    netns.setns(ns, flags=0)  # flags=0: never create it
    objs: dict = {}
    while True:
        msg = conn.recv()
        if msg is None:
            break
        op, key, args = msg
        try:
            if op == "backend":
                name, config, fields, options = args
                fields = dict(fields, index=socket.if_nametoindex(fields["name"]))
                objs[key] = load_backend(name)(config, ExternalInterface(**fields), BackendOptions(**options))
                result = None
            elif op == "masq":
                from controlplane.masq import Masquerade
                objs[key] = Masquerade(*args)
                result = None
            elif op == "timed":  # call a method once per argument tuple; return the seconds taken
                method, arg_list = args
                fn = getattr(objs[key], method)
                t0 = time.perf_counter()
                for call_args in arg_list:
                    fn(*call_args)
                result = time.perf_counter() - t0
            elif op == "drop":  # forget the object, as a killed daemon would; the data plane stays
                obj = objs.pop(key)
                if hasattr(obj, "close"):
                    obj.close()
                result = None
            else:
                method, call_args = args
                result = getattr(objs[key], method)(*call_args)
            conn.send((True, result))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            conn.send((False, (type(exc).__name__, str(exc))))


class Agent:
    def __init__(self, ns: str, call_timeout: float = CALL_TIMEOUT):
        ctx = multiprocessing.get_context("fork")
        self.ns = ns
        self.call_timeout = call_timeout
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_agent_main, args=(ns, child), daemon=True)
        self.proc.start()
        child.close()

    def _send(self, op: str, key: str, args) -> object:
        self.conn.send((op, key, args))
        if not self.conn.poll(self.call_timeout):
            raise TimeoutError(f"agent in {self.ns}: {op} {key} took over {self.call_timeout} s")
        ok, value = self.conn.recv()
        if ok:
            return value
        name, text = value
        if name == "BackendError":
            raise BackendError(text)
        raise RuntimeError(f"in {self.ns}: {name}: {text}")

    def backend(self, key, name, config, fields, options=None):
        return self._send("backend", key, (name, config, fields, options or {}))

    def masq(self, key, *args):
        return self._send("masq", key, args)

    def call(self, key, method, *args):
        return self._send("call", key, (method, args))

    def timed(self, key, method, arg_list):
        return self._send("timed", key, (method, arg_list))

    def drop(self, key):
        return self._send("drop", key, None)

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
