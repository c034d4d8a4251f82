"""bench run on a scenario with ``peer_leases``: how fast data planes program many peers
(bench/scale_peers.py, bench/leasewriter.py), on real labs."""
from __future__ import annotations

import json

from tests.conftest import needs_root
from tests.daemons import run_tool

SCENARIO = ('name = "peers-small"\n[lab]\nnodes = 2\npods_per_node = 0\npeer_leases = {n}\n'
            '[network]\nconfig = {{ Network = "{net}", SubnetLen = 24, Backend = {{ Type = "vxlan" }} }}\n')


@needs_root
def test_peer_scale_measures_start_add_and_remove(tmp_path):
    scn = tmp_path / "peers.toml"
    scn.write_text(SCENARIO.format(n=40, net="10.128.0.0/9"))
    r = run_tool("bench.cli", "run", "--scenario", str(scn), "--backends", "vxlan/kernel,vxlan/fastpath",
                 "--out", str(tmp_path / "out"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    peers = json.loads((tmp_path / "out" / "results.json").read_text())["control_plane"]["peers"]
    assert set(peers) == {"vxlan/kernel", "vxlan/fastpath"}
    for backend, row in peers.items():
        assert row["peers"] == 40, backend
        for key in ("start_sync_s", "add_s", "add_from_first_s", "remove_s"):
            assert 0 < row[key] < 60, (backend, key, row[key])
        assert row["add_s"] <= row["add_from_first_s"]
    assert "vxlan/fastpath" in r.stdout and "at start s" in r.stdout


@needs_root
def test_peer_scale_refuses_a_network_too_small_for_the_leases(tmp_path):
    scn = tmp_path / "peers.toml"
    scn.write_text(SCENARIO.format(n=100, net="10.244.0.0/16"))
    r = run_tool("bench.cli", "run", "--scenario", str(scn), "--backends", "vxlan/kernel",
                 "--out", str(tmp_path / "out"), timeout=120)
    assert r.returncode != 0
    assert "holds 255 subnets; 100 peer leases need 302" in r.stderr, r.stderr[-1000:]
