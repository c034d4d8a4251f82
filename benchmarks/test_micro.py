"""Micro-benchmarks of the control plane's hot code (pytest-benchmark).

Run with ``bench micro`` (which also compares against a baseline), or directly:
``pytest benchmarks --benchmark-json=out.json``. ``test_calibration`` is a fixed pure-Python
workload: ``bench micro`` divides every other time by it, so results from different machines
compare as ratios. The data-plane engines add their own benchmarks in this folder.
"""
from __future__ import annotations

import ipaddress
import json
import random

from controlplane.config import parse_config
from controlplane.lease import LeaseAttrs, parse_lease_key, subnet_key
from controlplane.manager import LeaseManager, LeaseWatcher
from controlplane.store.base import LeaseRecord, StoreEvent

CONFIG = json.dumps({"Network": "10.244.0.0/16", "SubnetLen": 24, "SubnetMin": "10.244.1.0",
                     "SubnetMax": "10.244.250.0", "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472,
                                                               "DirectRouting": False, "Dataplane": "kernel"}})
LEASE = LeaseAttrs(ipaddress.IPv4Address("198.18.0.7"), "vxlan", {"VNI": 1, "VtepMAC": "5e:bb:b4:14:2b:45"})


def test_calibration(benchmark):
    def work():
        total = 0
        for i in range(20000):
            total += (i * 7) % 13
        return total
    benchmark(work)


def test_config_parse(benchmark):
    benchmark(parse_config, CONFIG)


def test_lease_encode_decode(benchmark):
    text = LEASE.to_json()
    benchmark(lambda: LeaseAttrs.from_json(LEASE.to_json()) and parse_lease_key(subnet_key(
        ipaddress.IPv4Network("10.244.7.0/24"))) and text)


def test_pick_free_subnet_in_crowded_network(benchmark):
    """Allocation when 200 of 250 subnets are taken (the scan flannel does)."""
    config = parse_config(CONFIG)
    taken = {config.subnet_at(i) for i in range(200)}
    manager = LeaseManager(store=None, rng=random.Random(1))
    benchmark(manager._random_free, taken, config.network, config.subnet_len, config.subnet_min,
              config.subnet_max, config.subnet_count)


def test_watch_event_apply(benchmark):
    """Decoding and dispatching one lease event (every daemon does this per peer change)."""
    seen = []
    watcher = LeaseWatcher(store=None, on_event=seen.append)
    value = LEASE.to_json()
    subnets = [ipaddress.IPv4Network(f"10.244.{i}.0/24") for i in range(1, 251)]
    events = [StoreEvent("put", s, i + 1, LeaseRecord(s, value, 1e12, i + 1)) for i, s in enumerate(subnets)]

    def apply_all():
        for e in events:
            watcher._apply(e)
        seen.clear()
    benchmark(apply_all)
