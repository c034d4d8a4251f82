"""Quick pod-to-pod comparison of data planes in the lab (until ``bench run`` covers the engines).

    python -m fastpath.engine.measure [--rounds 3] [--seconds 5] [BACKEND ...]

For each round and each backend (interleaved, so machine noise spreads evenly): a fresh 2-node lab
(bench.lab; 1 pod per node), ping RTT (``ping -c 200 -i 0.005``, p50/p99 of the per-packet times),
one TCP stream ``iperf3 -t N -J`` pod 1 -> pod 2: Gbit/s, retransmits, whole-machine busy cores
from /proc/stat and core-seconds per Gbit. Prints a table of medians over rounds and ratios to
vxlan/kernel and udp/python. Every load is bounded (-t, -c); the lab removes what it created.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

DEFAULT = ["vxlan/kernel", "udp/fastpath", "vxlan/fastpath", "udp/python"]


def _cpu() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:]))
    return sum(v), v[3] + v[4]


def one(backend: str, seconds: int, env: dict | None = None) -> dict:
    from bench import scenario
    from bench.lab import Lab
    wire, _, dp = backend.partition("/")
    doc = {"name": "measure", "lab": {"nodes": 2, "pods_per_node": 1},
           "network": {"config": {"Network": "10.244.0.0/16", "Backend": {"Type": wire, "Dataplane": dp}}}}
    if env:
        doc["weftd"] = {"env": dict(env)}
    lab = Lab(scenario.from_dict(doc))
    out: dict = {"backend": backend}
    with lab:
        p1, p2 = lab.pods[0], lab.pods[1]
        r = lab.exec(p1.namespace, ["ping", "-c", "200", "-i", "0.005", "-n", p2.ip],
                     timeout=30)
        rtts = sorted(float(m) for m in re.findall(r"time=([0-9.]+) ms", r.stdout))
        if rtts:
            out["rtt_p50_us"] = 1000 * rtts[len(rtts) // 2]
            out["rtt_p99_us"] = 1000 * rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
        lab.spawn(p2.namespace, ["iperf3", "-s", "-1", "-B", p2.ip], role="iperf-server")
        time.sleep(0.5)
        c0 = _cpu()
        r = lab.exec(p1.namespace, ["iperf3", "-c", p2.ip, "-t", str(seconds), "-J"], timeout=seconds + 30)
        c1 = _cpu()
        try:
            end = json.loads(r.stdout)["end"]
            gbit = end["sum_received"]["bits_per_second"] / 1e9
            out["gbit"] = gbit
            out["retrans"] = end["sum_sent"].get("retransmits", 0)
            total, idle = c1[0] - c0[0], c1[1] - c0[1]
            ncpu = os.cpu_count() or 1
            out["busy_cores"] = ncpu * (total - idle) / total if total else 0.0
            out["core_s_per_gbit"] = out["busy_cores"] / gbit if gbit else float("inf")
        except (ValueError, KeyError) as exc:
            out["error"] = f"iperf3: {exc}: {r.stderr[-200:]}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastpath.engine.measure")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--env", action="append", default=[], help="K=V for weftd (e.g. WEFT_ENGINE_BUSY_POLL_US=200)")
    p.add_argument("backends", nargs="*", default=DEFAULT)
    a = p.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in a.env)
    runs: dict[str, list[dict]] = {b: [] for b in a.backends}
    for rnd in range(a.rounds):
        for b in a.backends:
            res = one(b, a.seconds, env)
            runs[b].append(res)
            print(f"round {rnd + 1} {b}: " + ", ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items() if k != "backend"),
                file=sys.stderr, flush=True)

    def med(b, k):
        vals = [r[k] for r in runs[b] if k in r]
        return statistics.median(vals) if vals else float("nan")
    kern = med("vxlan/kernel", "gbit") if "vxlan/kernel" in runs else float("nan")
    py = med("udp/python", "gbit") if "udp/python" in runs else float("nan")
    print("| backend | TCP x1 Gbit/s (runs) | x vxlan/kernel | x udp/python | retrans | busy cores "
          "| core-s/Gbit | ping p50 / p99 us |")
    print("|---|---|---|---|---|---|---|---|")
    for b in a.backends:
        g = med(b, "gbit")
        each = ", ".join(f"{r['gbit']:.2f}" for r in runs[b] if "gbit" in r)
        print(f"| {b} | **{g:.2f}** ({each}) | {g / kern:.2f} | {g / py:.1f} | {med(b, 'retrans'):.0f} "
              f"| {med(b, 'busy_cores'):.2f} | {med(b, 'core_s_per_gbit'):.3f} "
              f"| {med(b, 'rtt_p50_us'):.0f} / {med(b, 'rtt_p99_us'):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
