"""weftd's status snapshot (``Daemon.status()``) and how /metrics shows it: names and types are
what the README lists and operators alert on (counters end in ``_total``; levels are gauges)."""
from __future__ import annotations

import dataclasses
import ipaddress
import os

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bench.scale import Sample, parse_samples
from controlplane.daemon import Daemon, parse_args
from controlplane.health import DaemonCollector
from controlplane.status import (ConfigStatus, DaemonStatus, LeaseStatus, StoreStatus,
                                 WatchStatus)

from .conftest import needs_bcc, needs_root
from .daemons import REPO

DEFAULT = os.path.join(REPO, "scenarios", "default.toml")


def exposition(status: DaemonStatus) -> tuple[str, dict[str, str], dict[str, float]]:
    """The /metrics text for ``status``, each family's type, and each sample's value."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(lambda: status))
    text = generate_latest(registry).decode()
    types, samples = {}, {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            types[s.name] = fam.type
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return text, types, samples


def test_a_daemon_that_has_not_started_says_so(tmp_path):
    d = Daemon(parse_args(["--store", f"sqlite://{tmp_path}/weft.db"]))
    st = d.status()
    assert (st.set_up, st.ready, st.ready_reason, st.dead_threads) == (False, False, "not ready", ())
    assert st.lease is st.watch is st.config is st.backend is None
    assert st.store.url == f"sqlite://{tmp_path}/weft.db"
    assert st.store.up is False and st.store.ops is None
    text, types, samples = exposition(st)
    assert samples["weft_ready"] == 0 and samples["weft_store_up"] == 0
    assert "weft_lease_info" not in text and "weft_leases_invalid" not in text  # not known yet
    assert "weft_config_stale" not in text and "weft_store_ops" not in text


def test_metric_names_and_types():
    st = DaemonStatus(
        set_up=True, ready=True, ready_reason="ready", dead_threads=("claim-refresh",),
        lease=LeaseStatus(ipaddress.IPv4Network("10.5.3.0/24"), "198.18.0.1", None),
        peers=2, peers_incompatible=1, peers_changed_at=1700000000.0, peers_initial_sync_s=0.125,
        renewals=4, renewal_errors=1, leases_reacquired=1, link_up_resyncs=2,
        store=StoreStatus("etcd://x", False, 1700000100.0, {"watch": 3}, 2, {"list": 7, "failover": 1}),
        watch=WatchStatus({"added": 3, "renewed": 0, "removed": 1, "expired": 0}, 1, 3, {"bad_key": 2}),
        config=ConfigStatus(True, 2, 1), backend="udp/python",
        backend_stats={"rx_packets": 5, "peers_programmed": 2, "worker0_cpu_seconds": 0.25},
        backend_gauges=frozenset({"peers_programmed"}))
    _, types, samples = exposition(st)
    want = {
        "weft_ready": ("gauge", 1), "weft_peers": ("gauge", 2), "weft_peers_incompatible": ("gauge", 1),
        'weft_lease_info{backend="udp/python",public_ip="198.18.0.1",public_ipv6="",subnet="10.5.3.0/24",'
        'subnet6=""}': ("gauge", 1),
        "weft_lease_expiration_timestamp_seconds": ("gauge", 0),  # a reservation
        "weft_peers_changed_timestamp_seconds": ("gauge", 1700000000.0),
        "weft_peers_initial_sync_seconds": ("gauge", 0.125),
        'weft_watch_events_total{kind="added"}': ("counter", 3),
        'weft_watch_events_total{kind="removed"}': ("counter", 1),
        "weft_watch_resyncs_total": ("counter", 1), "weft_watch_errors_total": ("counter", 3),
        'weft_leases_invalid_total{reason="bad_key"}': ("counter", 2),
        "weft_config_changes_total": ("counter", 2), "weft_config_invalid_total": ("counter", 1),
        "weft_config_stale": ("gauge", 1),
        "weft_store_up": ("gauge", 0), "weft_store_down_since_timestamp_seconds": ("gauge", 1700000100.0),
        'weft_store_errors_total{op="watch"}': ("counter", 3), "weft_store_outages_total": ("counter", 2),
        'weft_store_ops_total{op="failover"}': ("counter", 1),
        'weft_store_ops_total{op="list"}': ("counter", 7),
        "weft_threads_dead": ("gauge", 1),
        "weft_lease_renewals_total": ("counter", 4), "weft_lease_renewal_errors_total": ("counter", 1),
        "weft_lease_reacquired_total": ("counter", 1), "weft_link_up_resyncs_total": ("counter", 2),
        'weft_backend_rx_packets_total{backend="udp/python"}': ("counter", 5),
        'weft_backend_worker0_cpu_seconds_total{backend="udp/python"}': ("counter", 0.25),
        'weft_backend_peers_programmed{backend="udp/python"}': ("gauge", 2),
    }
    got = {k: (types[k.split("{")[0]], samples[k]) for k in want if k in samples}
    assert got == want


def test_an_ipv6_only_lease_shows_its_ipv6_side_and_no_empty_ipv4():
    """An IPv6-only lease (flannel's empty IPv4 part 0.0.0.0/0, PublicIP 0.0.0.0): /metrics names
    its IPv6 subnet and public IPv6, never "0.0.0.0"; /readyz's reason names the IPv6 subnet."""
    import time
    from controlplane.lease import NO_IPV4, NO_PUBLIC_IP, Lease, LeaseAttrs
    d = Daemon(parse_args(["--store", "sqlite:///nonexistent/weft.db"]))
    six = ipaddress.IPv6Network("fd10:244:0:5::/64")
    d.lease = Lease(NO_IPV4, LeaseAttrs(NO_PUBLIC_IP, "alloc", public_ipv6=ipaddress.IPv6Address("2001:db8::5")),
                    time.time() - 5, 1, six)
    d.ready = True
    st = d.status()
    assert st.lease == LeaseStatus(None, None, d.lease.expiration, six, "2001:db8::5")
    assert st.ready_reason == "lease fd10:244:0:5::/64 expired (not renewed: the store is unavailable?)"
    text, _, samples = exposition(st)
    assert samples['weft_lease_info{backend="",public_ip="",public_ipv6="2001:db8::5",subnet="",'
                   'subnet6="fd10:244:0:5::/64"}'] == 1
    assert "0.0.0.0" not in text


# -- the backends' stats: which are counters ------------------------------------------------------
# A backend's stats() is one flat dict; its class declares the levels among them (``GAUGES``), and
# every other stat only grows: /metrics shows it as counter ``weft_backend_<name>_total``.

def test_no_backend_declares_one_of_its_counters_a_level():
    from controlplane import backends
    from fastpath.engine.api import COUNTER_NAMES
    from fastpath.routing import RoutingBackend
    from fastpath.userspace import TunEngineBackend
    for dp in backends.dataplanes():
        cls = backends.load_backend(dp.backend)
        counters = set()
        if issubclass(cls, RoutingBackend):
            counters |= {"peers_bad_backend_data", "peer_errors", cls.RESTORED, *cls.COUNTERS}
        if issubclass(cls, TunEngineBackend):
            counters |= {*COUNTER_NAMES, "rx_socket_drops", "control_errors"}
        assert isinstance(cls.GAUGES, frozenset) and "peers_programmed" in cls.GAUGES, dp.backend
        assert not cls.GAUGES & counters, (dp.backend, cls.GAUGES & counters)


# Labs of real weftds covering every data plane that carries traffic (the source guard on where it
# is an option), each with one more node of the same wire format whose lease the test releases;
# and per data plane a counter that pod traffic must move.
LABS = [
    pytest.param("vxlan", {1: "kernel", 2: "ebpf", 3: "fastpath"}, "kernel", id="vxlan", marks=needs_bcc),
    pytest.param("host-gw", {1: "kernel", 2: "kernel"}, "kernel", id="host-gw", marks=needs_bcc),
    pytest.param("udp", {1: "fastpath", 2: "python"}, "fastpath", id="udp"),
]
MOVED_BY_TRAFFIC = {"vxlan/kernel": "underlay_passed", "vxlan/ebpf": "tx_packets",
                    "vxlan/fastpath": "rx_packets", "host-gw/kernel": "hostgw_passed",
                    "udp/fastpath": "tx_packets", "udp/python": "rx_packets"}


def backend_samples(text: str, backend: str) -> dict[str, Sample]:
    """The ``weft_backend_*`` samples of a /metrics page by stat name; each is labelled ``backend``."""
    out = {}
    for s in parse_samples(text):
        if s.family.startswith("weft_backend_"):
            assert s.labels == {"backend": backend}, s
            out[s.family[len("weft_backend_"):]] = s
    return out


@needs_root
@pytest.mark.parametrize("wire, dataplanes, victim_dataplane", LABS)
def test_backend_counters_are_counters_and_never_go_down(wire, dataplanes, victim_dataplane):
    """On running weftds: each backend stat its class declares a level is the gauge
    ``weft_backend_<name>``, every other one the counter ``weft_backend_<name>_total``. Between a
    scrape with the mesh up and one after pod traffic and a peer's lease released, no counter
    went down (a level declared a counter would: peers_programmed, routes, the maps' sizes ...),
    some level did, and the traffic moved the data plane's counter."""
    from bench.scale import metrics_page
    from bench.scenario import WeftdSpec, load
    from controlplane import backends

    from .e2e import all_pairs_ping, lab_for, lease_removal_propagates, nothing_left
    victim = len(dataplanes) + 1
    scn = dataclasses.replace(load(DEFAULT), nodes=victim, weftd=WeftdSpec(flags=("--source-guard",)))
    lab = lab_for(scn, f"{wire}/{dataplanes[1]}", {**dataplanes, victim: victim_dataplane})
    lab.up()
    try:
        assert all_pairs_ping(lab) == []  # every peer programmed everywhere
        pages = [{n: metrics_page(lab.node(n).namespace) for n in dataplanes}]
        assert all_pairs_ping(lab) == []
        lease_removal_propagates(lab, victim)
        pages.append({n: metrics_page(lab.node(n).namespace) for n in dataplanes})
    finally:
        problems = lab.down()
    assert not problems and not nothing_left(lab)
    for n, dp in dataplanes.items():
        backend = f"{wire}/{dp}"
        gauges = backends.load_backend(backend).GAUGES
        before, after = (backend_samples(page[n], backend) for page in pages)
        assert set(before) == set(after), (backend, set(before) ^ set(after))
        for stat, s in after.items():
            kind = ("gauge", f"weft_backend_{stat}") if stat in gauges else \
                ("counter", f"weft_backend_{stat}_total")
            assert (s.type, s.name) == kind, (backend, s)
        down = {stat: (before[stat].value, s.value) for stat, s in after.items()
                if s.value < before[stat].value}
        assert set(down) <= gauges, (backend, down)
        assert after["peers_programmed"].value == before["peers_programmed"].value - 1, backend
        moved = MOVED_BY_TRAFFIC[backend]
        assert moved not in gauges and after[moved].value > before[moved].value, (backend, moved)
