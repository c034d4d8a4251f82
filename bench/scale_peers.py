"""Data-plane scale: how long a node takes to program many peers (``scenarios/peers-1000.toml``).

For each data plane a two-node lab is built with no pods. Node 1 is the one measured:
- ``start_sync_s``: the store already holds N peer leases when weftd starts; the time from its
  first listing of the leases until every one of them went through the data plane
  (weftd's ``weft_peers_initial_sync_seconds``: listing, judging and programming included);
- ``add_s``: N more leases are written while it runs (by ``bench.leasewriter`` in the store's
  namespace, as fast as the store takes them); the time from the last write being sent until the
  data plane holds them all (weftd's ``weft_peers_changed_timestamp_seconds``, stamped after the
  data plane took the peer); ``add_from_first_s`` counts from the first write instead (it
  includes the writer's own time);
- ``remove_s``: the 2N leases deleted at once; from the last delete until none is left.
Each figure needs the backend's ``weft_backend_peers_programmed`` to reach the count exactly,
with no failed peer: a data plane that drops one fails the measurement instead of giving a time.
"""
from __future__ import annotations

import dataclasses
import time

from .errors import LabError
from .leasewriter import write_in_lab as _write
from .procs import peak_rss_mb
from .scale import metrics, render

WAIT_TIMEOUT = 120.0
POLL_S = 0.05


def _wait_programmed(lab, want: int, label: str, progress=None) -> dict[str, float]:
    """Poll node 1's /metrics until its data plane holds exactly ``want`` peers and the daemon
    knows as many; LabError when a peer failed or the time ran out."""
    ns = lab.node(1).namespace
    deadline = time.monotonic() + WAIT_TIMEOUT
    m: dict[str, float] = {}
    while time.monotonic() < deadline:
        try:
            m = metrics(ns)
        except LabError:
            time.sleep(POLL_S)
            continue
        if "weft_backend_peers_programmed" not in m:
            raise LabError(f"{label}: weft_backend_peers_programmed is not exported")
        failed = m.get("weft_backend_peers_failed", 0.0)
        if failed:
            raise LabError(f"{label}: {failed:.0f} peers failed to program")
        have = m["weft_backend_peers_programmed"]
        if have == want and m.get("weft_peers") == want:
            return m
        if progress:
            progress.show(f"{label}: {have:.0f}/{want} peers programmed")
        time.sleep(POLL_S)
    raise LabError(f"{label}: {m.get('weft_backend_peers_programmed')} of {want} peers programmed "
                   f"after {WAIT_TIMEOUT:.0f} s")


def measure(scenario, backend: str, count: int, lab_factory, progress=None) -> dict:
    from .runner import scenario_for
    scn = dataclasses.replace(scenario_for(scenario, backend), nodes=2, pods_per_node=0)
    # The peers take the top of the range: the nodes allocate among the first 100 free subnets.
    base = scn.network.subnet_count - 2 * count
    if base < 100 + scn.nodes:
        raise LabError(f"{scenario.path}: Network {scn.network.network} holds {scn.network.subnet_count}"
                       f" subnets; {count} peer leases need {2 * count + 100 + scn.nodes} (a larger Network)")
    wire = backend.partition("/")[0]
    lab = lab_factory(scn)
    # The leases are in the store before any weftd starts (Lab.before_start).
    lab.before_start = lambda lab: _write(lab, "put", count, base, wire)
    lab.up()
    try:
        m = _wait_programmed(lab, count + 1, f"{backend} start", progress)
        deadline = time.monotonic() + 5.0  # the listing's last steps after the last peer
        while "weft_peers_initial_sync_seconds" not in m and time.monotonic() < deadline:
            time.sleep(POLL_S)
            m = metrics(lab.node(1).namespace)
        sync = m.get("weft_peers_initial_sync_seconds")
        if sync is None:
            raise LabError(f"{backend}: weft_peers_initial_sync_seconds is not exported")
        added = _write(lab, "put", count, base + count, wire)
        m = _wait_programmed(lab, 2 * count + 1, f"{backend} add", progress)
        t_added = m["weft_peers_changed_timestamp_seconds"]
        removed = _write(lab, "delete", 2 * count, base, wire)
        m = _wait_programmed(lab, 1, f"{backend} remove", progress)
        t_removed = m["weft_peers_changed_timestamp_seconds"]
        return {
            "backend": backend, "peers": count, "store": scn.store,
            "start_sync_s": sync,
            "add_s": t_added - added["last_start_s"],
            "add_from_first_s": t_added - added["start_s"],
            "writer_s": added["last_s"] - added["start_s"],
            "remove_s": t_removed - removed["last_start_s"],
            "daemon_rss_mb": peak_rss_mb(lab.node(1).pid),
        }
    finally:
        lab.down()


def run(scenario, backends: list[str], count: int, lab_factory=None, progress=None) -> dict:
    from .errors import refuse_ipv6_only
    from .lab import Lab
    refuse_ipv6_only(scenario, "bench run (peer leases)", "writes IPv4 leases")
    lab_factory = lab_factory or (lambda scn: Lab(scn))
    out = {}
    for backend in backends:
        try:
            out[backend] = measure(scenario, backend, count, lab_factory, progress)
        except Exception as exc:
            out[backend] = {"status": "failed", "backend": backend,
                            "reason": str(exc).splitlines()[0] if str(exc) else repr(exc)}
    return out


def table(doc: dict) -> str:
    return render(doc, ["backend", "peers", "at start s", "added s", "from 1st write s", "removed s"],
                  [("peers", "{}"), ("start_sync_s", "{:.3f}"), ("add_s", "{:.3f}"),
                   ("add_from_first_s", "{:.3f}"), ("remove_s", "{:.3f}")], "start_sync_s")
