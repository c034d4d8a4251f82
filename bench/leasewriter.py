"""Write or delete many peer leases at once, as other nodes joining or leaving would (bench's scale
measurements). Run inside a lab namespace, with the store flags weftctl takes::

    python -m bench.leasewriter --store sqlite:///... -etcd-prefix /coreos.com/network \\
        put --count 1000 --first 1 --backend vxlan

Leases are the ones real nodes of that wire format would write: subnet number ``first + i`` of
the config (``NetworkConfig.subnet_at``), PublicIP ``198.19.<i/250>.<i%250+2>`` (on the lab's
198.18.0.0/15 underlay, so a host-gw gateway is on-link; nothing is ever sent to them: no pod
traffic goes to these subnets), a unicast VtepMAC for vxlan. Prints one JSON line of epoch
seconds: ``start_s`` (the first write sent), ``first_s`` (its answer), ``last_start_s`` (the last
write sent) and ``last_s`` (its answer). A watcher may see a write before its writer has the
answer, so delays are counted from when a write was sent.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time

from controlplane import flags
from controlplane.config import parse_config
from controlplane.lease import LeaseAttrs

TTL = 3600.0


def public_ip(i: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"198.19.{i // 250}.{i % 250 + 2}")


def attrs(i: int, wire: str) -> LeaseAttrs:
    if wire == "vxlan":
        mac = "0e:57:" + ":".join(f"{b:02x}" for b in i.to_bytes(4, "big"))
        return LeaseAttrs(public_ip(i), "vxlan", {"VNI": 1, "VtepMAC": mac})
    return LeaseAttrs(public_ip(i), "" if wire == "udp" else wire)


def write_in_lab(lab, action: str, count: int, first: int, wire: str, timeout: float = 120.0) -> dict:
    """Run the writer where the lab's store is reachable (the store namespace for etcd, node 1's
    for SQLite) and return its timestamps (``first_s``, ``last_s``)."""
    from .lab_weftd import venv_python
    ns = lab.store_ns if lab.scenario.store == "etcd" else lab.node(1).namespace
    argv = [venv_python(), "-m", "bench.leasewriter", *lab.store_flags(), action,
            "--count", str(count), "--first", str(first), "--backend", wire]
    out = lab.exec(ns, argv, timeout=timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = flags.Parser(prog="leasewriter")
    flags.add_store_flags(p)
    p.add_argument("action", choices=("put", "delete"))
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--first", type=int, default=1, help="index of the first subnet (0: SubnetMin)")
    p.add_argument("--backend", default="vxlan", help="wire format of the leases")
    args = p.parse_args(flags.normalize(sys.argv[1:] if argv is None else argv, flags.long_flags_of(p)))
    store = flags.open_store_from_args(args, must_exist=True)
    try:
        config = parse_config(store.get_config())
        if args.first + args.count > config.subnet_count:
            raise SystemExit(f"leasewriter: the network holds {config.subnet_count} subnets, "
                             f"not {args.first + args.count}")
        times = []  # (sent, answered) per write
        for i in range(args.first, args.first + args.count):
            subnet = config.subnet_at(i)
            value = attrs(i, args.backend).to_json()
            sent = time.time()
            if args.action == "put":
                store.create_lease(subnet, value, TTL)
            else:
                store.delete_lease(subnet)
            times.append((sent, time.time()))
        print(json.dumps({"count": args.count, "start_s": times[0][0], "first_s": times[0][1],
                          "last_start_s": times[-1][0], "last_s": times[-1][1]}))
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
