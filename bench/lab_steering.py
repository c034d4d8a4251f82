"""One CPU per node: which CPU stands for node N's host, and RPS that processes every packet
received into node N's realm on that CPU (see bench.lab for why a lab needs it).

Node N's realm is its eth0 and its pods' ports on cni0 (the host ends of their veths, named by
the bridge CNI plugin: ``Pod.host_veth``, from the ADD result), its pods' eth0, and the wire's
port wN, which stands for node N's NIC.
"""
from __future__ import annotations

import os
import subprocess
from typing import Callable, Sequence

from .errors import LabError

# run argv in a lab namespace, bounded: Lab.exec
Exec = Callable[..., subprocess.CompletedProcess]


def node_cpu(node_cpus: bool, n: int) -> int | None:
    """The CPU that stands for node n's host, or None (node_cpus off, or a single CPU)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not node_cpus or len(cpus) < 2:
        return None
    return cpus[(n - 1) % len(cpus)]


def cpu_mask(cpu: int) -> str:
    """A sysfs CPU bitmap (hex, a comma between 32-bit words) with only ``cpu`` set."""
    digits = f"{1 << cpu:x}"
    digits = digits.zfill(-(-len(digits) // 8) * 8)
    return ",".join(digits[i:i + 8] for i in range(0, len(digits), 8))


def steer_receive(exec: Exec, wire: str, nodes: Sequence, pods: Sequence,
                  cpu_of: Callable[[int], int | None], on: bool = True) -> None:
    """RPS: every packet received into node N's realm is processed on ``cpu_of(N)`` (on), or on
    the CPU that sent it (off: a probe pinned to one CPU keeps the whole path there)."""
    if cpu_of(1) is None:
        return
    wire_ports = []
    for node in nodes:
        mask = cpu_mask(cpu_of(node.index)) if on else "0"
        mine = [p for p in pods if p.node == node.index]
        set_rps(exec, node.namespace, ["eth0"] + [p.host_veth for p in mine if p.host_veth], mask)
        for pod in mine:
            set_rps(exec, pod.namespace, ["eth0"], mask)
        wire_ports.append((f"w{node.index}", mask))
    for port, mask in wire_ports:
        set_rps(exec, wire, [port], mask)


def set_rps(exec: Exec, ns: str, devices: list[str], mask: str) -> None:
    # `ip netns exec` mounts the namespace's own sysfs, so these paths are the namespace's devices
    script = "; ".join(f"for q in /sys/class/net/{d}/queues/rx-*; do echo {mask} > $q/rps_cpus; done"
                       for d in devices)
    result = exec(ns, ["sh", "-ec", script], timeout=15)
    if result.returncode != 0:
        raise LabError(f"{ns}: cannot set RPS CPUs ({(result.stderr.strip() or 'failed').splitlines()[-1]}); "
                       f"set lab.node_cpus = false in the scenario")
