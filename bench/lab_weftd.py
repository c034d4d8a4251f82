"""weftd as the lab runs it: its command line and environment for one node, the LAB_* variables a
scenario's ``[weftd]`` may use, and what it leaves for the lab to read (subnet.env, its log).
"""
from __future__ import annotations

import ipaddress
import os
import sys
from typing import Sequence

from .errors import LabError
from .scenario import Scenario, expand_exec_start, substitute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEALTHZ_PORT = 9180


def venv_python() -> str:
    candidate = os.path.join(REPO, ".venv", "bin", "python")
    return candidate if os.access(candidate, os.X_OK) else sys.executable


def default_daemon() -> list[str]:
    """weftd as the lab runs it: the venv's Python on the repo's controlplane.daemon."""
    return [venv_python(), "-m", "controlplane.daemon"]


def log_tail(path: str, lines: int = 8, limit: int = 800) -> str:
    """The last lines of a log as one line (' | ' between lines), for one-line errors."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    tail = " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())
    return (tail[-limit:] if len(tail) > limit else tail) or "(log is empty)"


def variables(scenario: Scenario, lab_dir: str, store: dict, node) -> dict[str, str]:
    """The LAB_* variables ``[weftd].env`` values may use (see bench.scenario)."""
    return {"LAB_DIR": lab_dir, "LAB_PREFIX": scenario.prefix, "LAB_NODE": str(node.index),
            "LAB_NODE_IP": node.public_ip, "LAB_STORE_IP": str(scenario.store_ip),
            "LAB_STORE_ENDPOINT": store.get("endpoint", store.get("url", "")),
            "LAB_PKI": os.path.join(lab_dir, "pki")}


def daemon_command(scenario: Scenario, daemon: Sequence[str], store_flags: list[str],
                   lab_variables: dict[str, str], node) -> tuple[list[str], dict[str, str]]:
    """weftd's argv and environment for ``node``: the scenario's ExecStart line (expanded as systemd
    does) or the store's flags, then what the lab itself needs, then the scenario's extra flags."""
    s = scenario
    sysconfig = {k: substitute(v, lab_variables) for k, v in s.weftd.env.items()}
    if s.weftd.exec_start:
        words = expand_exec_start(s.weftd.exec_start, {**lab_variables, **sysconfig})
        argv = list(daemon) + words[1:]
    else:
        argv = list(daemon) + store_flags
    # IPv6-only: no -public-ip (weftd would ignore it: its leases say 0.0.0.0, as flanneld's do);
    # eth0 keeps its IPv4 address all the same, for the store and the harness
    public_ip = [] if s.ipv6_only else ["-public-ip", node.public_ip]
    argv += ["-iface", "eth0", *public_ip, "-subnet-file", node.subnet_file,
             "-healthz-ip", "0.0.0.0", "-healthz-port", str(HEALTHZ_PORT)]
    if getattr(node, "public_ipv6", ""):  # dual-stack or IPv6-only (eth0 has it; said as -public-ip is)
        argv += ["-public-ipv6", node.public_ipv6]
    if s.node(node.index).dataplane:
        argv += ["--dataplane", s.node(node.index).dataplane]
    if not sets_ip_masq(argv + list(s.weftd.flags), sysconfig):
        # as flannel deployments run flanneld: subnet.env says FLANNEL_IPMASQ=true, so the CNI
        # conflist users deploy (ipMasq unset) makes the bridge plugin add no NAT of its own,
        # which with FLANNEL_IPMASQ=false would masquerade pod to pod across nodes
        argv.append("-ip-masq")
    argv += list(s.weftd.flags)
    # the caller's FLANNEL*/WEFT* settings must not leak into a reproducible lab
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLANNELD_", "FLANNEL_", "WEFT_"))}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(sysconfig)
    return argv, env


def sets_ip_masq(argv: Sequence[str], env: dict[str, str]) -> bool:
    """True when the scenario itself chose ``-ip-masq`` (a flag, or FLANNELD_IP_MASQ)."""
    return "FLANNELD_IP_MASQ" in env or any(
        w.lstrip("-").split("=", 1)[0] == "ip-masq" for w in argv if w.startswith("-"))


def read_subnet(node) -> None:
    """Fill node.subnet, .gateway and .mtu (IPv6: .subnet6, .gateway6) from the subnet.env its
    weftd wrote. On an IPv6-only network (``node.ipv6_only``) an IPv4 line there is an error."""
    env = {}
    with open(node.subnet_file) as f:
        for line in f:
            key, _, value = line.strip().partition("=")
            env[key] = value.strip().strip('"')
    try:
        node.mtu = int(env["FLANNEL_MTU"])
    except (KeyError, ValueError):
        raise LabError(f"node {node.index}: {node.subnet_file} lacks a valid FLANNEL_MTU") from None
    if getattr(node, "ipv6_only", False):
        v4 = [k for k in ("FLANNEL_NETWORK", "FLANNEL_SUBNET") if k in env]
        if v4:
            raise LabError(f"node {node.index}: {node.subnet_file} has {' and '.join(v4)} on an IPv6-only "
                           "network (EnableIPv4 false)")
        node.subnet = node.gateway = ""
    else:
        try:
            iface = ipaddress.IPv4Interface(env["FLANNEL_SUBNET"])
        except (KeyError, ValueError):
            raise LabError(f"node {node.index}: {node.subnet_file} lacks a valid FLANNEL_SUBNET") from None
        node.subnet = str(iface.network)
        node.gateway = str(iface.ip)
    if getattr(node, "public_ipv6", ""):  # dual-stack or IPv6-only: weftd writes the IPv6 part
        try:
            iface6 = ipaddress.IPv6Interface(env["FLANNEL_IPV6_SUBNET"])
        except (KeyError, ValueError):
            raise LabError(f"node {node.index}: {node.subnet_file} lacks a valid FLANNEL_IPV6_SUBNET "
                           "(the network config enables IPv6)") from None
        node.subnet6 = str(iface6.network)
        node.gateway6 = str(iface6.ip)
