"""How the bench reads weftd's /metrics (bench.scale.parse_metrics, prometheus_client's parser):
on a real daemon's page, and on pages that are not Prometheus text."""
from __future__ import annotations

import pytest

from bench.scale import by_label, parse_metrics, parse_samples

from .daemons import Weftd, run_tool


def test_a_real_weftd_page_by_sample_name_with_label_sets_summed(tmp_path):
    args = ["--store", f"sqlite://{tmp_path}/weft.db"]
    r = run_tool("controlplane.ctl", *args, "config", "put", "-",
                 input='{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}')
    assert r.returncode == 0, r.stderr
    d = Weftd(str(tmp_path), 1, args).start()
    try:
        d.wait_ready()
        status, text = d.get("/metrics")
    finally:
        d.stop()
    assert status == 200
    got = parse_metrics(text)
    lines = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    assert set(got) == {name.partition("{")[0] for name, _ in lines}
    events = [float(v) for name, v in lines if name.startswith("weft_watch_events_total{")]
    assert len(events) == 4 and got["weft_watch_events_total"] == sum(events) >= 1  # its own lease: added
    assert got["weft_ready"] == 1.0 and got["weft_peers"] == 0.0 and got["weft_lease_info"] == 1.0
    assert got["weft_lease_expiration_timestamp_seconds"] > 1.7e9
    # the same parser, with families and types, and one label's values
    samples = {s.name: s for s in parse_samples(text)}
    assert (samples["weft_lease_renewals_total"].family, samples["weft_lease_renewals_total"].type) == \
        ("weft_lease_renewals", "counter")
    assert (samples["weft_peers"].family, samples["weft_peers"].type) == ("weft_peers", "gauge")
    assert samples["weft_backend_peers_programmed"].labels == {"backend": "alloc/kernel"}
    kinds = by_label(text, "weft_watch_events_total", "kind")
    assert set(kinds) == {"added", "renewed", "removed", "expired"} and sum(kinds.values()) == sum(events)


def test_a_page_that_is_not_prometheus_text_is_an_error_not_fewer_metrics():
    with pytest.raises(ValueError, match="could not convert string to float: 'abc'"):
        parse_metrics("weft_ready 1.0\nweft_peers abc\n")
    with pytest.raises(ValueError, match="Invalid labels"):
        parse_metrics('weft_peers{kind=added} 1\n')
