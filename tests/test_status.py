"""weftd's status snapshot (``Daemon.status()``) and how /metrics shows it: names and types are
what the README lists and operators alert on (counters end in ``_total``; levels are gauges)."""
from __future__ import annotations

import ipaddress

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.daemon import Daemon, parse_args
from controlplane.health import DaemonCollector
from controlplane.status import (ConfigStatus, DaemonStatus, LeaseStatus, StoreStatus,
                                 WatchStatus)


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
        peers=2, peers_incompatible=1, peers_changed_at=1700000000.0,
        renewals=4, renewal_errors=1, leases_reacquired=1, link_up_resyncs=2,
        store=StoreStatus("etcd://x", False, 1700000100.0, {"watch": 3}, 2, {"list": 7, "failover": 1}),
        watch=WatchStatus({"added": 3, "renewed": 0, "removed": 1, "expired": 0}, 1, 3, {"bad_key": 2}),
        config=ConfigStatus(True, 2, 1), backend="udp/python",
        backend_stats={"rx_packets": 5, "peers_programmed": 2})
    _, types, samples = exposition(st)
    want = {
        "weft_ready": ("gauge", 1), "weft_peers": ("gauge", 2), "weft_peers_incompatible": ("gauge", 1),
        'weft_lease_info{backend="udp/python",public_ip="198.18.0.1",subnet="10.5.3.0/24"}': ("gauge", 1),
        "weft_lease_expiration_timestamp_seconds": ("gauge", 0),  # a reservation
        "weft_peers_changed_timestamp_seconds": ("gauge", 1700000000.0),
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
        'weft_backend_rx_packets{backend="udp/python"}': ("gauge", 5),
        'weft_backend_peers_programmed{backend="udp/python"}': ("gauge", 2),
    }
    got = {k: (types[k.split("{")[0]], samples[k]) for k in want if k in samples}
    assert got == want
