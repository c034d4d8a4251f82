"""One running weftd per public IP: the node claim.

Two nodes given the same public IP would share one lease (the second reuses the first's and
re-puts it with its own VtepMAC) and neither would notice. So a running weftd keeps a *claim* on
its public IP, outside flanneld's keys (etcd ``<prefix>/weft/claims/<ip>``; SQLite: a table of its
own), with a short TTL (``--claim-ttl``, default 15 s) that it refreshes every third of it. A
newcomer reads the claim before it reads or writes any lease or touches the data plane:

- none (or expired): take it, atomically (of two newcomers at once, one wins; the other then sees
  the winner's claim and judges it as below).
- this kernel (same boot id) and pid namespace: the holder is looked up by pid and process start
  time. Alive: a second weftd here, refuse. Gone (SIGTERM, kill -9, a crash): this node restarting,
  take it at once.
- this machine after a reboot (same machine-id and hostname, another boot id): take it at once.
- anything else (another host, another pid namespace, a value weft cannot read): wait. If its
  holder refreshes it meanwhile, it is alive: refuse. If it expires, its holder is gone: take it.

A refusal is one line (``PublicIPInUse``). A clean stop releases the claim. A store outage never
stops a running daemon: a failed refresh is retried, and a claim that expired meanwhile is taken
again. Only if another weftd took it in that time does this one stop (``on_lost``): the lease of
that public IP is the other node's now.

An IPv6-only node (EnableIPv4 false) has PublicIP 0.0.0.0, as every other such node: its claim is
keyed by its public IPv6 instead (``<prefix>/weft/claims/2001:db8::1``), and a refusal names it.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from .lease import NO_PUBLIC_IP
from .store import StoreError, StoreUnavailable
from .store.base import ClaimChanged, ClaimRecord

log = logging.getLogger("weft.claim")

CLAIM_TTL = 15  # seconds; refreshed every third of it
WAIT_LOG_INTERVAL = 30.0  # seconds between "waiting for the store" lines
MIN_CLAIM_TTL = 3  # etcd grants leases of at least ~2 s; a third of the TTL must leave room

TAKE, REFUSE, WAIT = "take", "refuse", "wait"


class PublicIPInUse(StoreError):
    """Another running weftd uses this public IP; str() is the one line weftd exits with."""


@dataclass(frozen=True)
class Holder:
    """Who holds a claim: the claim's value (JSON with these keys)."""
    instance: str = ""  # random per process start
    hostname: str = ""
    machine_id: str = ""  # /etc/machine-id: this installation, across reboots
    boot_id: str = ""  # this boot of the kernel: shared by every namespace and container on it
    pid_ns: str = ""  # pids can be looked up only in the same pid namespace
    pid: int = 0
    proc_start: int = 0  # /proc/<pid>/stat starttime: a pid reused later has another one
    started: str = ""  # UTC, for people
    subnet_file: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Holder":
        """Whatever the value is: fields of the wrong type (or a value that is not weft's at all)
        stay empty, and an empty identity matches nothing, so such a claim is waited out."""
        try:
            doc = json.loads(text)
        except ValueError:
            return cls()
        if not isinstance(doc, dict):
            return cls()
        fields = {}
        for name, default in asdict(cls()).items():
            value = doc.get(name)
            if type(value) is type(default):
                fields[name] = value
        return cls(**fields)

    def describe(self) -> str:
        if not self.instance:
            return "a claim weft cannot read"
        return f"host {self.hostname or '?'}, pid {self.pid}, since {self.started or '?'}"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, starttime) of a process, or None when there is none. The command name may hold
    spaces and parentheses: the fields that follow start after its last ')'."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    rest = text.rsplit(")", 1)[1].split()
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, proc_start: int) -> bool:
    """Is the process that wrote a claim still running (not dead, not a zombie, not a pid reused)?"""
    if pid <= 0:
        return False
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[1] == proc_start


def this_process(subnet_file: str) -> Holder:
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    stat = _proc_stat(os.getpid())
    return Holder(instance=uuid.uuid4().hex, hostname=socket.gethostname(),
                  machine_id=_read("/etc/machine-id") or _read("/var/lib/dbus/machine-id"),
                  boot_id=_read("/proc/sys/kernel/random/boot_id"), pid_ns=pid_ns,
                  pid=os.getpid(), proc_start=stat[1] if stat else 0,
                  started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  subnet_file=os.path.abspath(subnet_file))


def judge(holder: Holder, me: Holder, alive=process_alive) -> str:
    """TAKE, REFUSE or WAIT for a live claim held by ``holder``, seen by the newcomer ``me``."""
    if holder.boot_id and holder.boot_id == me.boot_id:  # this very kernel
        if holder.pid_ns and holder.pid_ns == me.pid_ns:
            return REFUSE if alive(holder.pid, holder.proc_start) else TAKE
        return WAIT  # another container on this host: its pids are not ours to look up
    if holder.machine_id and holder.machine_id == me.machine_id and holder.hostname == me.hostname:
        return TAKE  # this machine, rebooted since: the holder died with its boot
    return WAIT


def refusal(public_ip, holder: Holder) -> str:
    if ipaddress.ip_address(public_ip).version == 6:
        return (f"public IPv6 {public_ip} is already in use by a running weftd ({holder.describe()}):"
                " two nodes cannot share a public IPv6; give this node its own -public-ipv6")
    return (f"public IP {public_ip} is already in use by a running weftd ({holder.describe()}): "
            "two nodes cannot share a public IP; give this node its own -public-ip")


def claim_address(public_ip, public_ipv6=None) -> str:
    """What a node's claim is keyed by: its public IP, or its public IPv6 when it has none (0.0.0.0
    or None: an IPv6-only node, whose PublicIP is flanneld's empty 0.0.0.0, as every such node's)."""
    # canonical text (an address given as "2001:DB8::1" is the key 2001:db8::1): one key per address
    if public_ip is not None and ipaddress.ip_address(str(public_ip)) != NO_PUBLIC_IP:
        return str(ipaddress.ip_address(str(public_ip)))
    if public_ipv6 is None:
        raise ValueError("no public address to claim: an IPv6-only node (public IP 0.0.0.0) "
                         "claims its public IPv6, and none was given")
    return str(ipaddress.IPv6Address(str(public_ipv6)))


class NodeClaim:
    """This daemon's claim on its public IP: ``acquire`` at start, refreshed by a thread,
    ``release`` on exit. ``public_ip`` 0.0.0.0 (an IPv6-only node): keyed by ``public_ipv6``
    (``claim_address``); an IPv6 address as ``public_ip`` is taken as the public IPv6."""

    def __init__(self, store, public_ip, subnet_file: str, ttl: float = CLAIM_TTL,
                 on_lost=lambda why: None, public_ipv6=None):
        self.store = store
        self.public_ip = claim_address(public_ip, public_ipv6)  # the claim's key
        ipv6 = ipaddress.ip_address(self.public_ip).version == 6
        self.name = f"public IPv6 {self.public_ip}" if ipv6 else f"public IP {self.public_ip}"
        self.ttl = ttl
        self.on_lost = on_lost
        self.me = this_process(subnet_file)
        self.value = self.me.to_json()
        self.record: ClaimRecord | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    # -- start --------------------------------------------------------------------------------
    def acquire(self, stop: threading.Event) -> bool:
        """Take the claim, waiting while the rule says so; then keep it refreshed. False when
        ``stop`` was set while waiting; raises PublicIPInUse on a refusal."""
        watched: ClaimRecord | None = None  # a claim being waited out, as first seen
        logged_at: float | None = None  # when "waiting for the store" was last logged
        poll = min(1.0, self.ttl / 6)
        while not stop.is_set():
            try:
                rec = self.store.get_claim(self.public_ip)
                if rec is None:
                    self.record = self.store.take_claim(self.public_ip, self.value, self.ttl, None)
                    break
                holder = Holder.from_json(rec.value)
                if rec.expiration is None:
                    raise PublicIPInUse(f"{refusal(self.public_ip, holder)} (its claim has no TTL: "
                                        "written by hand? delete it if no node uses that IP)")
                verdict = judge(holder, self.me)
                if verdict == REFUSE:
                    raise PublicIPInUse(refusal(self.public_ip, holder))
                if verdict == TAKE:
                    log.info("%s: taking over the claim of a weftd that is gone (%s)",
                             self.name, holder.describe())
                    self.record = self.store.take_claim(self.public_ip, self.value, self.ttl, rec)
                    break
                if watched is not None and watched.value == rec.value:
                    if rec.revision != watched.revision:  # refreshed while we waited: alive
                        raise PublicIPInUse(refusal(self.public_ip, holder))
                else:
                    watched = rec
                    log.warning("%s is claimed by a weftd this one cannot look up (%s); "
                                "waiting up to %.0f s for its claim to expire (refused if renewed)",
                                self.name, holder.describe(), max(0.0, rec.expiration - time.time()))
            except ClaimChanged:
                stop.wait(0.05)  # another newcomer moved first (or etcd is deleting an expired key)
                continue  # judge the claim as it is now
            except StoreUnavailable as exc:
                now = time.monotonic()
                if logged_at is None or now - logged_at >= WAIT_LOG_INTERVAL:
                    log.warning("waiting for the store at %s: %s (claim of %s)",
                                getattr(self.store, "url", "?"), exc, self.name)
                    logged_at = now
            stop.wait(poll)
        else:
            return False
        self._thread = threading.Thread(target=self._refresh_loop, name="claim-refresh", daemon=True)
        self._thread.start()
        return True

    @property
    def thread(self) -> threading.Thread | None:
        """The refresh thread (None before ``acquire``)."""
        return self._thread

    # -- while running ------------------------------------------------------------------------
    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.refresh()
            except Exception:  # a bug or input nobody foresaw: the claim keeps being refreshed
                log.exception("refreshing the claim of %s failed unexpectedly", self.name)

    def refresh(self) -> None:
        try:
            try:
                self.record = self.store.refresh_claim(self.public_ip, self.record, self.ttl)
            except ClaimChanged as exc:
                self._retake(str(exc))
            if self._failing and not self.lost:
                log.info("claim of %s refreshed again", self.name)
                self._failing = False
        except StoreError as exc:
            if not self._failing:
                log.warning("refreshing the claim of %s failed: %s; retrying every %.0f s",
                            self.name, exc, self.ttl / 3)
                self._failing = True

    def _retake(self, why: str) -> None:
        rec = self.store.get_claim(self.public_ip)
        if rec is not None:
            holder = Holder.from_json(rec.value)
            if holder.instance == self.me.instance:  # ours: a refresh applied whose answer was lost
                self.record = rec
                return
            self.lost = True
            self._stop.set()
            self.on_lost(f"{self.name} was claimed by another weftd ({holder.describe()})"
                         " while this one could not refresh its claim; that node holds its lease now")
            return
        self.record = self.store.take_claim(self.public_ip, self.value, self.ttl, None)
        log.warning("%s (store unreachable, or this process paused, for longer than the claim TTL "
                    "of %g s); claimed it again", why, self.ttl)

    # -- stop ---------------------------------------------------------------------------------
    def release(self) -> None:
        """On exit: stop refreshing and delete the claim (if still ours), so a restart, here or on
        another host, need not wait for it to expire."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self.record is None or self.lost:
            return
        try:
            self.store.release_claim(self.public_ip, self.record)
        except StoreError as exc:
            log.warning("releasing the claim of %s: %s (it expires within %g s)",
                        self.name, exc, self.ttl)
