"""``bench faults``' store rows in CI: the SQLite disk filled under running daemons, and a 3-member
etcd cluster's leader killed (``--short`` durations, one backend: vxlan/kernel).

sqlite-full: the store on a 16 MiB tmpfs the lab mounts (``lab.store_tmpfs_mib``), filled by a
filler file, held, then freed. Nothing is lost, every weftd says so once (log, ``weft_store_up``
0, ``weft_store_errors_total``), ``/readyz`` and ``/healthz`` stay 200, the store is up again
once there is space, and teardown unmounts exactly the lab's tmpfs.

etcd-leader: the leader (made the first endpoint weftd is given) killed (-9) and restarted
later. Nothing is lost, no weftd exits, a release made after the kill reaches every node, and
``weft_store_up`` is 1 on every node from 2 s after a survivor was elected until the member
comes back (the cluster answered all along).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.lab import REPO, Lab
from bench.ledger import down
from bench.scenario import ScenarioError, loads
from bench.tmpfs import mounted

from .conftest import needs_etcd, needs_root


def _bench_faults(tmp_path, *args) -> dict:
    out = tmp_path / "faults"
    res = subprocess.run([sys.executable, "-m", "bench.cli", "faults", "--short", "--backends", "vxlan/kernel",
                          "--out", str(out), *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode in (0, 1), res.stderr[-2000:]
    with open(out / "faults.json") as f:
        doc = json.load(f)
    (row,) = doc["rows"]
    assert row["status"] == "ok", row.get("reason")
    assert (res.returncode == 1) == (row["verdict"] == "missed"), res.stderr[-2000:]
    return row


def _lost_in_and_after_the_fault(row) -> int:
    return sum(s["lost_by_phase"]["fault"] + s["lost_by_phase"]["recovery"]
               for s in row["data_plane"]["streams"].values())


def _check(row, prefix: str) -> dict:
    return next(c for c in row["checks"] if c["name"].startswith(prefix))


def test_store_tmpfs_mib_is_checked():
    assert loads('name = "a"\n[lab]\nstore_tmpfs_mib = 8\n', "x").store_tmpfs_mib == 8
    assert loads('name = "a"\n', "x").store_tmpfs_mib == 0
    with pytest.raises(ScenarioError, match=r"^x: lab.store_tmpfs_mib: 2000 is outside 0..1024$"):
        loads('name = "a"\n[lab]\nstore_tmpfs_mib = 2000\n', "x")
    with pytest.raises(ScenarioError, match=r"^x: lab.store_tmpfs_mib: needs store = \"sqlite\"$"):
        loads('name = "a"\n[lab]\nstore = "etcd"\nstore_tmpfs_mib = 8\n', "x")


@needs_root
def test_store_tmpfs_is_mounted_and_torn_down_from_the_ledger():
    lab = Lab(loads('name = "tmpfs"\n[lab]\nnodes = 1\npods_per_node = 0\nstore_tmpfs_mib = 4\n', "x"))
    lab.up()
    mnt, source = os.path.join(lab.dir, "store-fs"), f"weft-lab-{lab.id}-store"
    try:
        assert mounted(mnt, source)
        assert os.path.dirname(lab.store["path"]) == mnt and os.path.exists(lab.store["path"])
        assert os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize == 4 << 20
        assert lab.ready(1)
    finally:
        problems = down(lab.dir)          # as `bench down` does: from the ledger alone
        for child in lab._children.values():
            child.wait(timeout=5)
    assert problems == []
    assert not mounted(mnt, source) and not os.path.exists(lab.dir)


@needs_root
def test_sqlite_disk_full(tmp_path):
    row = _bench_faults(tmp_path, "--faults", "sqlite-full")
    disk = row["notes"]["disk"]
    assert disk["free_after_fill_bytes"] == 0 and disk["filled_bytes"] > 0, disk
    assert disk["free_after_heal_bytes"] >= disk["filled_bytes"], disk
    assert _lost_in_and_after_the_fault(row) == 0
    assert row["exits"] == [] and row["pids_before"] == row["pids_after"]
    for n, phases in row["health"].items():
        fault = phases["fault"]
        assert fault["metrics"]["weft_store_up"][0] == 0, (n, fault["metrics"])
        # weftd writes no weft_store_errors_total line before the first error
        before = phases["baseline"]["metrics"].get("weft_store_errors_total", [0, 0])[1]
        assert fault["metrics"]["weft_store_errors_total"][1] > before >= 0, (n, phases)
        assert set(fault["readyz"]) == {"200"}, (n, fault["readyz"])
        # one line when the store goes, naming SQLite's reason; one when it is back
        log = row["log"][n]
        assert len([l for l in log if "WARNING weft.store" in l and "database or disk is full" in l]) == 1, log
        assert len([l for l in log if "INFO weft.store" in l and "is back after" in l]) == 1, log
    for when in ("healthz_mid_fault", "healthz_after"):
        assert {n: v[0] for n, v in row["notes"][when].items()} == {"1": 200, "2": 200, "3": 200}, when
    assert row["notes"]["store_up_again_s"] is not None
    assert row["leases_before"] == row["leases_after"]
    assert row["verdict"] == "met", row["why"]
    # teardown unmounted the lab's tmpfs and removed its directory
    lab_dir = os.path.join("/run/weft-lab", row["lab"]["id"])
    assert not mounted(os.path.join(lab_dir, "store-fs"), f"weft-lab-{row['lab']['id']}-store")
    assert not os.path.exists(lab_dir)


@needs_root
@needs_etcd
def test_etcd_leader_killed(tmp_path):
    row = _bench_faults(tmp_path, "--scenario", "scenarios/seed-etcd3.toml", "--faults", "etcd-leader")
    notes = row["notes"]
    assert notes["leader_is_first_endpoint"] is True, notes.get("moved_leader")
    assert notes["new_leader_after_s"] is not None
    assert _lost_in_and_after_the_fault(row) == 0
    assert row["exits"] == [] and row["pids_before"] == row["pids_after"]
    # an event after the failover (the release, made once a survivor leads) is seen by every node
    assert notes["extra_lease_released"]["status"] == 0, notes["extra_lease_released"]
    assert notes["release_seen_by_all_s"] is not None and notes["release_seen_by_all_s"] <= 2.0
    assert row["data_plane"]["tcp"]["error"] is None and row["data_plane"]["tcp"]["intact"]
    # the cluster answered all along: weft_store_up is 1 within 2 s of the election, and stays 1
    # until the killed member is back
    window = notes["store_up_after_failover"]
    assert set(window) == {"1", "2", "3"}
    for n, w in window.items():
        assert w["samples"] >= 2 and w["values"] == [1.0], (n, window)
    assert row["leases_before"] == row["leases_after"]
    assert row["verdict"] == "met", row["why"]
