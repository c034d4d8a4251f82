"""weftd: the node daemon. flanneld's flags, files and lease behaviour, on weft's stores and backends.

Life of a node:
  wait for the network config -> pick the interface -> recall our previous lease (same public IP)
  -> backend.lease_attrs -> acquire -> backend.setup -> ip-masq -> write subnet.env (now ready)
  -> follow the other leases (peers) and renew ours until told to stop.

SIGTERM/SIGINT stop cleanly and leave the lease and the data plane in place, so a restart (even
after kill -9) finds its lease by public IP and keeps the same subnet without disturbing traffic.

``--teardown`` instead removes the data plane on exit (the lease stays until it expires).

IPv6-only networks (EnableIPv4 false): every lease's IPv4 part is flannel's empty 0.0.0.0/0 and its
PublicIP 0.0.0.0, so leases and peers are named by ``Lease.ident`` (the IPv6 subnet then), the
node by its public IPv6 (lease lookup, claim), and nothing IPv4 is written or masqueraded.

A lease deleted by an operator is noticed (by the watch at once, or by the next renewal): weftd
logs "lease has been revoked", and exits with status 1, as flanneld does; a supervisor that
restarts it (the shipped systemd unit does) makes it acquire a lease again. A lease that *expired*
(this node paused, or the store away, past the TTL: the watch reports it expired, or the renewal
finds it gone after its expiration time) is no revocation: weftd takes it again through the
usual acquisition order, keeps its data plane and counts ``weft_lease_reacquired_total``. If
another node holds that subnet by then, weftd takes another one and exits 1 with one line: its
pods have addresses of the old subnet, so the node needs a restart (the supervisor's) to set up
the data plane and subnet.env for the new one.

The store may go away at any time (see ``controlplane.store.monitor``): at start, opening it,
reading the config, taking the claim and acquiring the lease wait for it (``controlplane.storewait``:
"waiting for the store at URL: reason"), until it answers or SIGTERM; configuration
errors (bad flags or config, a missing directory or TLS file, a corrupt SQLite file) stay fatal.
While running, nothing the store does stops weftd: its lease and data plane stay, every failure
is counted and the outage is logged once when it starts and once when it ends.

Input from others (see ``controlplane.leasecheck``): a lease that is not valid for the network is
logged once, counted by reason and never programmed; a peer rewritten into one is removed. This
node's own key overwritten by someone else (garbage, or another node's value) is not a revocation:
it is logged, counted, and written back a few seconds later (``OWN_LEASE_RESTORE_DELAY``; the
delay bounds how often two writers that both claim the key could alternate). The config is read
once: a config changed while weftd runs is logged and counted (``weft_config_*``), never applied;
it takes a restart, as with flanneld.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections import Counter

from . import leanimport

leanimport.install()  # before anything imports pyroute2: 6 MB less RSS (controlplane/leanimport.py)

from . import backends, flags, subnetenv  # noqa: E402
from .backends import BackendError, BackendOptions, load_backend
from .claim import CLAIM_TTL, MIN_CLAIM_TTL, NodeClaim
from .config import ConfigError, NetworkConfig, parse_config
from .health import HealthServer
from .iface import IfaceError, resolve
from .linkwatch import LinkWatch, link_is_usable
from .lease import NO_PUBLIC_IP, Ident, Lease, LeaseAttrs, LeaseFormatError
from .masq import MasqError
from .manager import DEFAULT_TTL, LeaseEvent, LeaseManager, LeaseRevoked, LeaseWatcher
from .store import StoreError
from .status import (WATCH_EVENT_KINDS, ConfigStatus, DaemonStatus, LeaseStatus, StoreStatus,
                     WatchStatus)
from .store.monitor import StoreHealth
from .storewait import STOPPED, StoreWaiter

log = logging.getLogger("weft.daemon")

RESYNC_INTERVAL = 10.0  # seconds between backend.resync() calls (flannel's route check)
RENEW_RETRY = 60.0  # seconds between renewal retries after an error (flannel)
OWN_LEASE_RESTORE_DELAY = 3.0  # seconds before this node's overwritten lease is written back
EXPIRY_SLACK = 1.0  # seconds: etcd may expire a lease this much before the time computed here


def build_parser() -> flags.Parser:
    p = flags.Parser(prog="weftd", description="weft node daemon (flanneld-compatible flags)")
    flags.add_store_flags(p)
    flags.add_flag(p, "iface", help="interface (name or IP) for inter-node traffic")
    flags.add_flag(p, "public-ip", help="IP this node is reached at (default: the interface's;"
                                         " ignored on an IPv6-only network)")
    flags.add_flag(p, "public-ipv6", help="IPv6 address this node is reached at, with EnableIPv6 or"
                                           " IPv6-only (default: the interface's global IPv6 address)")
    flags.add_flag(p, "subnet-file", default="/run/flannel/subnet.env", help="subnet.env to write")
    flags.add_flag(p, "subnet-lease-renew-margin", kind=int, default=60,
                   help="minutes before expiry to renew the lease (1..1439)")
    flags.add_flag(p, "ip-masq", kind=bool, default=False, help="masquerade traffic leaving the network")
    flags.add_flag(p, "healthz-ip", default="0.0.0.0", help="address of /healthz, /readyz, /metrics")
    flags.add_flag(p, "healthz-port", kind=int, default=0, help="port of /healthz (0: off)")
    flags.add_flag(p, "dataplane", help=f"override Backend.Dataplane ({backends.dataplane_help()})")
    flags.add_flag(p, "lease-ttl", kind=int, default=DEFAULT_TTL, help="lease TTL in seconds (weft)")
    flags.add_flag(p, "claim-ttl", kind=int, default=CLAIM_TTL,
                   help="seconds this node's claim on its public IP outlives it (weft)")
    for flag, owners in backends.flag_owners().items():  # each data plane's own flags
        flags.add_flag(p, flag.name, kind=flag.kind, default=flag.default,
                       help=f"{', '.join(owners)}: {flag.help}")
    flags.add_flag(p, "source-guard", kind=bool, default=False, help=backends.source_guard_help())
    flags.add_flag(p, "teardown", kind=bool, default=False, help="remove the data plane on exit")
    flags.add_flag(p, "v", kind=int, default=0, help="log verbosity (0: info, 1+: debug)")
    return p


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(flags.normalize(list(argv), flags.long_flags_of(parser)))
    if not 1 <= args.subnet_lease_renew_margin <= 1439:
        raise flags.UsageError(f"-subnet-lease-renew-margin {args.subnet_lease_renew_margin}: "
                               "must be 1..1439 minutes")
    if not 0 <= args.healthz_port <= 65535:
        raise flags.UsageError(f"-healthz-port {args.healthz_port}: must be 0..65535")
    if args.lease_ttl < 2:
        raise flags.UsageError(f"--lease-ttl {args.lease_ttl}: must be at least 2 seconds")
    if args.claim_ttl < MIN_CLAIM_TTL:
        raise flags.UsageError(f"--claim-ttl {args.claim_ttl}: must be at least {MIN_CLAIM_TTL} seconds")
    return args


class Daemon:
    def __init__(self, args):
        self.args = args
        self.stop = threading.Event()
        self.exit_code = 0
        self.ready = False
        self.lease: Lease | None = None
        self.backend = None
        self.watcher: LeaseWatcher | None = None
        self.peers: dict[Ident, Lease] = {}  # by Lease.ident
        self.incompatible: set[Ident] = set()
        self.counters: Counter[str] = Counter()
        self.store = None
        self.masq = None
        self.masq6 = None  # dual-stack: the IPv6 rules (ip6tables)
        self.peers_changed_at = 0.0  # when the set of programmed peers last changed
        self._peer_lock = threading.Lock()
        self.config: NetworkConfig | None = None  # as stored at start, before --dataplane
        self.config_stale = False  # the stored config is no longer the one this daemon runs with
        self.restore_own_lease = threading.Event()  # set by the watch: our key was overwritten
        self.lease_gone = threading.Event()  # set by the watch: our lease expired in the store
        self.run_config: NetworkConfig | None = None  # the config with --dataplane applied
        self.store_health = StoreHealth(flags.describe_store(args))
        self.waiter = StoreWaiter(self.store_health, self.stop)  # the start's waits for the store
        self.threads: dict[str, threading.Thread] = {}  # must stay alive while running

    # -- peers ------------------------------------------------------------------------------
    def on_lease_event(self, event: LeaseEvent) -> None:
        lease = event.lease
        ident = lease.ident
        self.counters[f"watch_{event.kind}"] += 1
        if self.lease is not None and ident == self.lease.ident:
            self._own_lease_event(event)
            return
        if self.lease is not None and lease.subnet6 is not None and lease.subnet6 == self.lease.subnet6 \
                and event.kind not in ("removed", "expired"):
            # Another key claims this node's IPv6 subnet (the watch keeps a subnet with the lease
            # known first; this is the race where that was not ours): never a route to it.
            self.watcher.invalid.report(lease.key, lease.revision, "own_subnet",
                                        f"this node's IPv6 subnet {lease.subnet6}, in the lease of "
                                        f"{lease.shown} (node {node_address(lease)}); ignored")
            event = LeaseEvent("removed", lease, "own_subnet")
        with self._peer_lock:
            if event.kind in ("removed", "expired"):
                self.incompatible.discard(ident)
                if self.peers.pop(ident, None) is not None:
                    log.info("peer %s (%s) %s", lease.shown, node_address(lease), event.kind)
                    self.backend.remove_peer(lease)
                    self.peers_changed_at = time.time()  # once the data plane has it
                return
            if not self.backend.accepts(lease):
                if ident not in self.incompatible:
                    log.warning("peer %s (%s) speaks %s, not %s: not programmed", lease.shown,
                                node_address(lease), lease.attrs.wire_type, self.backend.wire_type)
                    self.incompatible.add(ident)
                old = self.peers.pop(ident, None)
                if old is not None:
                    self.backend.remove_peer(old)
                return
            self.incompatible.discard(ident)
            new = ident not in self.peers
            if new:
                log.info("peer %s (%s) added", lease.shown, node_address(lease))
            self.peers[ident] = lease
            self.backend.add_peer(lease)
            if new:
                self.peers_changed_at = time.time()  # once the data plane has it

    def _own_lease_event(self, event: LeaseEvent) -> None:
        lease = event.lease
        if event.kind == "expired" and not event.reason:
            # Not an operator's doing: this node could not renew in time. The renewal loop takes
            # the lease again (or stops, if the subnet went to another node meanwhile).
            self.lease_gone.set()
            return
        if event.kind in ("removed", "expired"):
            if not event.reason:
                self.revoked(f"lease {lease.shown} was {event.kind} in the store")
                return
            # Overwritten with something invalid (already logged and counted): not a deletion.
            log.warning("this node's lease %s was overwritten with an invalid value (%s); writing"
                        " it back", lease.shown, event.reason)
            self.restore_own_lease.set()
        elif lease.attrs != self.lease.attrs or lease.key != self.lease.key:
            self.watcher.invalid.report(
                lease.key, lease.revision, "own_subnet",
                f"this node's subnet, rewritten by someone else (node {node_address(lease)},"
                f" {lease.attrs.wire_type}); writing this node's lease back")
            self.restore_own_lease.set()

    def on_config(self, text: str | None) -> None:
        """The stored config changed (the watch thread calls this once per new text)."""
        where = self.store.config_key()
        try:
            stored = parse_config(text) if text is not None else None
            problem = "" if text is not None else "was deleted"
        except ConfigError as exc:
            stored, problem = None, f"is invalid ({exc})"
        if stored is not None and stored == self.config:
            if self.config_stale:
                log.info("the network config at %s is again the one weftd runs with", where)
            self.config_stale = False
            return
        self.config_stale = True
        self.counters["config_changes"] += 1
        if stored is not None:
            log.warning("the network config at %s changed; weftd keeps running with the"
                        " config it started with: restart weftd to apply it", where)
            return
        if text is not None:
            self.counters["config_invalid"] += 1
        log.warning("the network config at %s %s; weftd keeps running with the config it"
                    " started with (a restart would fail)", where, problem)

    def claim_lost(self, why: str) -> None:
        """Another weftd took this node's public IP while its claim could not be refreshed."""
        if not self.stop.is_set():
            log.error("%s; shutting down", why)
            self.exit_code = 1
            self.stop.set()

    def revoked(self, why: str) -> None:
        if not self.stop.is_set():
            log.error("%s: lease has been revoked, shutting down", why)
            self.exit_code = 1
            self.stop.set()

    # -- status (/healthz, /readyz, /metrics) ---------------------------------------------------
    def status(self, counts: bool = True) -> DaemonStatus:
        """A snapshot of this daemon's state (``controlplane.status``). ``counts=False`` leaves
        out the store's operation counts and the backend's counters (/readyz and /healthz): the
        SQLite store counts under the lock its operations hold, and the data plane's counters
        may take a call into it, so a probe must not wait for either."""
        lease = self.lease
        ready, why = self._readiness()
        sh = self.store_health
        w = self.watcher
        backend = self.backend
        return DaemonStatus(
            set_up=self.ready, ready=ready, ready_reason=why, dead_threads=tuple(self._dead_threads()),
            lease=None if lease is None else LeaseStatus.of(lease),
            peers=len(self.peers), peers_incompatible=len(self.incompatible),
            peers_changed_at=self.peers_changed_at,
            peers_initial_sync_s=None if self.watcher is None else self.watcher.initial_sync_seconds,
            renewals=self.counters["renewals"], renewal_errors=self.counters["renewal_errors"],
            leases_reacquired=self.counters["lease_reacquired"],
            link_up_resyncs=self.counters["link_up_resyncs"],
            store=StoreStatus(sh.url, bool(sh.up), None if sh.up else sh.down_since, dict(sh.errors),
                              sh.outages,
                              dict(self.store.stats()) if self.store is not None and counts else None),
            watch=None if w is None else WatchStatus(
                {k: w.stats[k] for k in WATCH_EVENT_KINDS}, w.stats["resyncs"], w.stats["errors"],
                dict(w.invalid.snapshot())),
            config=None if self.config is None else ConfigStatus(
                self.config_stale, self.counters["config_changes"], self.counters["config_invalid"]),
            backend=None if backend is None else backend.name(),
            backend_stats=dict(backend.stats()) if backend is not None and counts else {},
            backend_gauges=backend.GAUGES if backend is not None else frozenset())

    def _dead_threads(self) -> list[str]:
        """Threads that should run and do not (/healthz)."""
        if self.stop.is_set():
            return []
        return [name for name, t in self.threads.items() if not t.is_alive()]

    def _readiness(self) -> tuple[bool, str]:
        """/readyz: ready once the data plane is programmed, the lease held and subnet.env
        written, and for as long as the lease has not expired and the watch runs. A store outage
        alone does not make it 503 (pod traffic is fine meanwhile; /metrics says so)."""
        if not self.ready:
            return False, "not ready"
        lease = self.lease
        if lease is not None and lease.expiration is not None and lease.expiration <= time.time():
            return False, f"lease {lease.shown} expired (not renewed: the store is unavailable?)"
        watch = self.threads.get("lease-watch")
        if watch is not None and not watch.is_alive() and not self.stop.is_set():
            return False, "the lease watch stopped"
        return True, "ready"

    # -- main -------------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        health = None
        claim = None
        if a.healthz_port:  # first: /metrics shows a store that is not there yet
            health = HealthServer(a.healthz_ip, a.healthz_port, self)
            health.start()
        try:
            store = self.waiter.open_store(a)
            if store is STOPPED:
                return 0
            self.store = store
            manager = LeaseManager(self.store, ttl=a.lease_ttl)
            config = self.waiter.config(manager)
            if config is None:
                return 0
            self.config = config
            config = config.with_dataplane(a.dataplane)
            self.run_config = config
            iface = resolve(a.iface, a.public_ip, a.public_ipv6, config.enable_ipv6, config.enable_ipv4)
            # One running weftd per public IP (IPv6-only: per public IPv6, every node's PublicIP
            # being 0.0.0.0): refused here, before any lease or data plane.
            claim = NodeClaim(self.store, iface.public_ip, a.subnet_file, a.claim_ttl, self.claim_lost,
                              public_ipv6=iface.public_ipv6)
            if not claim.acquire(self.stop):
                return 0
            if claim.thread is not None:
                self.threads["claim-refresh"] = claim.thread
            backend_cls = load_backend(config.backend.name)
            check_source_guard(a.source_guard, backends.declaration(config.backend.name))
            own_flags = {flag.dest: getattr(a, flag.dest) for flag in backends.flag_owners()}
            self.backend = backend_cls(config, iface, BackendOptions(
                ip_masq=a.ip_masq, source_guard=a.source_guard, **own_flags))
            previous = self.waiter.until("list", lambda: find_own_lease(manager, config, iface))
            if previous is STOPPED:
                return 0
            attrs = self.backend.lease_attrs(previous)
            lease = self.waiter.until("acquire", lambda: manager.acquire(
                config, attrs, subnetenv.previous_subnet(a.subnet_file),
                subnetenv.previous_subnet6(a.subnet_file)))
            if lease is STOPPED:
                return 0
            self.lease = lease
            if not lease.has_ipv4:
                log.info("lease %s on %s (%s, public IPv6 %s; IPv6-only), backend %s, MTU %d",
                         lease.shown, iface.name, iface.address6, iface.public_ipv6,
                         config.backend.name, self.backend.mtu)
            else:
                log.info("lease %s on %s (%s, public IP %s), backend %s, MTU %d", lease.subnet,
                         iface.name, iface.address, iface.public_ip, config.backend.name, self.backend.mtu)
            if lease.subnet6 is not None and lease.has_ipv4:
                log.info("lease %s: IPv6 subnet %s (%s, public IPv6 %s)", lease.subnet, lease.subnet6,
                         iface.address6, iface.public_ipv6)
            # What a data plane of this node left running (a userspace engine process, weftd
            # restarted with another backend) would hold its device and UDP port: stopped,
            # unless this backend adopts it.
            backends.clear_leftovers(self.backend)
            self.backend.setup(self.lease)
            self.masq = None
            if a.ip_masq:
                from .masq import Masquerade
                if config.enable_ipv4:  # IPv6-only: no IPv4 rules at all (nothing to masquerade)
                    self.masq = Masquerade()
                    self.masq.setup(config.network, self.lease.subnet)
                if config.enable_ipv6:  # flannel: the same rules with ip6tables for IPv6Network
                    self.masq6 = Masquerade(family=6)
                    self.masq6.setup(config.ipv6_network, self.lease.subnet6)
            subnetenv.write(a.subnet_file, config.network, self.lease.subnet, self.backend.mtu, a.ip_masq,
                            config.ipv6_network, self.lease.subnet6)
            self.ready = True
            notify_systemd("READY=1")
            self.watcher = LeaseWatcher(self.store, self.on_lease_event, config=config,
                                        on_config=self.on_config, config_text=self.config.raw)
            watch_thread = threading.Thread(target=self.watcher.run, args=(self.stop,),
                                            name="lease-watch", daemon=True)
            # Started before it is listed: /readyz and /healthz take a listed thread that is not
            # alive for a stopped watch (READY=1 has been sent: a probe may come at once).
            watch_thread.start()
            self.threads["lease-watch"] = watch_thread
            self.threads["link-watch"] = LinkWatch(iface.index, self.link_up,
                                                   link_is_usable(iface.name)).start(self.stop)
            self.renew_loop(manager)
            watch_thread.join(timeout=5)
            if a.teardown:
                log.info("tearing down the data plane")
                self.backend.teardown()
                for masq in (self.masq, self.masq6):
                    if masq is not None:
                        masq.teardown()
            return self.exit_code
        finally:
            if claim is not None:
                claim.release()
            if health is not None:
                health.stop()
            if self.store is not None:
                self.store.close()

    def link_up(self) -> None:
        """The underlay link came back: the kernel flushed the routes through it (host-gw's,
        DirectRouting's); put them back now rather than at the next periodic resync."""
        self.counters["link_up_resyncs"] += 1
        try:
            self.backend.resync()
        except Exception:
            log.exception("resync after link up failed")

    def renew_loop(self, manager: LeaseManager) -> None:
        margin = self.args.subnet_lease_renew_margin * 60
        next_resync = time.monotonic() + RESYNC_INTERVAL
        renew_at = self._renew_time(margin)
        reacquire_failing = False
        peers_synced = False
        while not self.stop.is_set():
            if not peers_synced and self.watcher is not None and self.watcher.synced.is_set():
                peers_synced = True  # every lease listed went through add_peer: stale state may go
                try:
                    self.backend.peers_synced()
                except Exception:
                    log.exception("peers_synced failed")
            now = time.time()
            if self.restore_own_lease.is_set():  # someone overwrote our key: renew it soon
                self.restore_own_lease.clear()
                renew_at = min(renew_at, now + OWN_LEASE_RESTORE_DELAY)
            if self.lease_gone.is_set():  # the watch saw our lease expire: take it again now
                self.lease_gone.clear()
                renew_at = min(renew_at, now)
            if now >= renew_at and self.lease_expired():
                try:
                    if not self.reacquire(manager):
                        break
                    renew_at = self._renew_time(margin)
                    reacquire_failing = False
                except StoreError as exc:
                    self.counters["renewal_errors"] += 1
                    renew_at = now + 1.0
                    if not reacquire_failing:  # once per streak: the store monitor logs outages
                        log.warning("taking the expired lease %s again failed: %s; retrying every"
                                    " second", self.lease.shown, exc)
                        reacquire_failing = True
            elif now >= renew_at:
                try:
                    self.lease = manager.renew(self.lease)
                    self.counters["renewals"] += 1
                    renew_at = self._renew_time(margin)
                    log.info("renewed lease %s until %s", self.lease.shown,
                             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.lease.expiration))
                             if self.lease.expiration else "forever (reservation)")
                except LeaseRevoked as exc:
                    if self.lease_expired():  # gone because it expired meanwhile: not revoked
                        renew_at = now
                        continue
                    self.revoked(str(exc))
                    break
                except StoreError as exc:
                    self.counters["renewal_errors"] += 1
                    retry = min(RENEW_RETRY, max(1.0, self.lease.remaining() / 4))
                    log.warning("renewing lease failed: %s; retrying in %.0f s", exc, retry)
                    renew_at = now + retry
            if time.monotonic() >= next_resync:
                next_resync = time.monotonic() + RESYNC_INTERVAL
                try:
                    self.backend.resync()
                    for masq in (self.masq, self.masq6):
                        if masq is not None:
                            masq.ensure()  # rules someone flushed come back (flannel: every 5 s)
                except Exception:
                    log.exception("resync failed")
            self.stop.wait(max(0.05, min(renew_at - time.time(), next_resync - time.monotonic(), 1.0)))

    def lease_expired(self) -> bool:
        exp = self.lease.expiration
        return exp is not None and time.time() >= exp - EXPIRY_SLACK

    def reacquire(self, manager: LeaseManager) -> bool:
        """Our lease expired: take it again by the usual order (ours by public IP, else the same
        subnet if free). False (and stopping, status 1) when another node holds the subnet now."""
        old = self.lease
        late = time.time() - old.expiration
        lease = manager.acquire(self.run_config, old.attrs, old.subnet, old.subnet6)
        if lease.key != old.key:
            log.error("lease %s expired %.0f s ago (this node could not renew it: paused, or the"
                      " store unreachable, past its TTL) and %s holds that subnet now; this node took"
                      " %s instead: exiting so that a restart sets up the data plane and subnet.env"
                      " for it (pods here have addresses of the old subnet)", old.shown,
                      max(0.0, late), self._holder_of(old), lease.shown)
            self.lease = lease
            self.exit_code = 1
            self.stop.set()
            return False
        self.lease = lease
        self.counters["lease_reacquired"] += 1
        log.warning("lease %s expired %.0f s ago (this node could not renew it: paused, or the store"
                    " unreachable, past its TTL); took it again, data plane unchanged", old.shown,
                    max(0.0, late))
        return True

    def _holder_of(self, old: Lease) -> str:
        """Who holds a subnet of ``old`` now (its ident, or else its IPv6 subnet)."""
        try:
            records, _ = self.store.list_leases()
        except StoreError:
            return "another node"
        rec = next((r for r in records if r.ident == old.ident), None) or next(
            (r for r in records if old.subnet6 is not None and r.subnet6 == old.subnet6), None)
        if rec is None:
            return "another node"
        try:
            attrs = LeaseAttrs.from_json(rec.value)
        except LeaseFormatError:
            return "another writer"
        kind = "a reservation" if rec.expiration is None else "a lease"
        return f"{kind} of {attrs_address(attrs)}"

    def _renew_time(self, margin: float) -> float:
        remaining = self.lease.remaining()
        if remaining == float("inf"):
            return float("inf")  # a reservation never expires
        wait = remaining - margin
        if wait <= 0:  # the margin is longer than the TTL: renew at half-life
            wait = remaining / 2
        return time.time() + wait


def attrs_address(attrs: LeaseAttrs) -> str:
    """The address that names a node in a log line: its PublicIP, or its PublicIPv6 when the
    PublicIP is flannel's empty 0.0.0.0 (an IPv6-only lease)."""
    if attrs.public_ip == NO_PUBLIC_IP and attrs.public_ipv6 is not None:
        return str(attrs.public_ipv6)
    return str(attrs.public_ip)


def node_address(lease: Lease) -> str:
    return attrs_address(lease.attrs)


def find_own_lease(manager: LeaseManager, config: NetworkConfig, iface) -> Lease | None:
    """This node's lease from before a restart: the one with its PublicIP, or on an IPv6-only
    network (every lease's PublicIP 0.0.0.0) the one with its PublicIPv6."""
    return manager.find_by_ip(iface.public_ip if config.enable_ipv4 else iface.public_ipv6)


def check_source_guard(wanted: bool, dataplane: backends.Dataplane) -> None:
    """--source-guard is an opt-in where the data plane offers one; where it checks every packet
    anyway it is a no-op, and elsewhere (alloc carries no traffic) it is refused."""
    if not wanted or dataplane.source_guard == "optional":
        return
    if dataplane.source_guard == "builtin":
        log.info("--source-guard: %s always checks the outer source of what it receives", dataplane.backend)
        return
    optional = ", ".join(d.backend for d in backends.dataplanes() if d.source_guard == "optional")
    raise flags.UsageError(f"--source-guard: not available on {dataplane.backend}: it has no traffic "
                           f"to guard (the guard is an opt-in of {optional})")


def notify_systemd(state: str) -> None:
    """sd_notify, as flanneld does for its Type=notify unit; nothing when not under systemd."""
    import os
    import socket
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", path, exc)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except flags.UsageError as exc:
        return flags.fail("weftd", str(exc), 2)
    logging.basicConfig(level=logging.DEBUG if args.v else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    daemon = Daemon(args)

    def on_signal(signum, _frame):
        log.info("received %s; stopping (lease and data plane stay in place)", signal.Signals(signum).name)
        daemon.stop.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return daemon.run()
    except (ConfigError, StoreError, BackendError, IfaceError, MasqError, flags.UsageError) as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
