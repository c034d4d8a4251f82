"""The lab's pods, made and removed the way a container runtime does it: CNI ADD and DEL.

Each node has what a kubelet host has, inside the lab directory: the conflist users deploy
(``nN/cni/10-flannel.conflist``: flannel with ``hairpinMode`` and ``isDefaultGateway``, then
``portmap``), flannel's ``dataDir`` (``nN/cni/flannel``, one file per container id), host-local's
store (``nN/cni/ipam``) and the runtime's cache of ADD results (``nN/cni/results``). The plugin is
weft's ``weft-cni`` under the name ``flannel`` in ``<lab>/cni-bin``, followed by Debian's plugins
(``controlplane.cni.runtime.weft_cni_path``); the plugins run inside the node's namespace, so
``cni0``, the host ends of the veths and any rule the bridge plugin adds are the node's.

A pod is a container id (its namespace's name), a network namespace (``/run/netns/<name>``) and
an interface (``eth0``). Its ledger entry (kind ``cni``) is written before its ADD, so
``teardown`` runs its DEL (``release``) before the namespaces go, also for an ADD that died half
way; after a crash DEL may have nothing left to act on, and the namespaces and the lab directory
(which holds every store above) are removed all the same.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from controlplane.cni import runtime

from .errors import LabError
from .netns import NETNS_DIR, netns_inode

NETWORK = "cbr0"         # kube-flannel's network name
CNI_VERSION = "1.0.0"
IFNAME = "eth0"
# What users deploy (kube-flannel's conflist): ipMasq is left to subnet.env's FLANNEL_IPMASQ.
DELEGATE = {"hairpinMode": True, "isDefaultGateway": True}
DEL_TIMEOUT = 15.0       # per plugin call in teardown: a hung plugin must not hold teardown long
PARALLEL_NODES = 4       # nodes are independent (own stores); a node's pods go one by one


def node_dir(lab_dir: str, index: int) -> str:
    return os.path.join(lab_dir, f"n{index}", "cni")


def bin_path(lab_dir: str) -> str:
    """The lab's CNI_PATH: ``<lab>/cni-bin`` (flannel -> weft-cni), then Debian's plugins."""
    try:
        return runtime.weft_cni_path(os.path.join(lab_dir, "cni-bin"))
    except FileNotFoundError as exc:
        raise LabError(str(exc)) from None


def write_conflist(lab_dir: str, node) -> str:
    """Node's conflist file (its subnet.env, dataDir and host-local store); returns its path."""
    base = node_dir(lab_dir, node.index)
    os.makedirs(os.path.join(base, "results"), exist_ok=True)
    conflist = runtime.flannel_conflist(NETWORK, CNI_VERSION, subnet_file=node.subnet_file,
                                        data_dir=os.path.join(base, "flannel"),
                                        ipam_data_dir=os.path.join(base, "ipam"), delegate=dict(DELEGATE))
    path = os.path.join(base, "10-flannel.conflist")
    with open(path, "w") as f:
        json.dump(conflist, f, indent=1)
    return path


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def add(ledger, entry_fields: dict) -> dict:
    """Record the pod in the ledger, then ADD it; returns the ADD result (also cached in the
    entry's ``result`` file, as a runtime caches it for DEL). A plugin error is a LabError."""
    entry = ledger.add("cni", **entry_fields)
    try:
        result = runtime.add_pod(entry["netns"], entry["container_id"], entry["ifname"], _load(entry["conflist"]),
                                 cni_path=entry["cni_path"], host_netns=entry["host_netns"])
    except (runtime.PluginError, OSError, ValueError) as exc:
        raise LabError(f"pod {entry['container_id']}: {exc}") from None
    with open(entry["result"], "w") as f:
        json.dump(result, f)
    return result


def pod_entry(lab_dir: str, node, pod_ns: str, cni_path: str) -> dict:
    """The ledger fields of pod ``pod_ns`` on ``node``: everything DEL needs, from the ledger alone."""
    base = node_dir(lab_dir, node.index)
    return {"netns": os.path.join(NETNS_DIR, pod_ns), "container_id": pod_ns, "ifname": IFNAME,
            "host_netns": node.namespace, "conflist": os.path.join(base, "10-flannel.conflist"),
            "cni_path": cni_path, "result": os.path.join(base, "results", f"{pod_ns}-{IFNAME}.json")}


def host_veth(result: dict) -> str:
    """The host end of the pod's veth (the bridge plugin names it ``vethXXXXXXXX``)."""
    names = [i["name"] for i in result.get("interfaces", [])
             if not i.get("sandbox") and i["name"].startswith("veth")]
    if len(names) != 1:
        raise LabError(f"CNI result names {len(names)} host veths: {result.get('interfaces')}")
    return names[0]


def address(result: dict) -> tuple[str, str]:
    """(pod address, gateway) of the result's IPv4 address."""
    for ip in result.get("ips", []):
        if ":" not in ip["address"]:
            return ip["address"].split("/")[0], ip.get("gateway", "")
    raise LabError(f"CNI result has no IPv4 address: {result.get('ips')}")


def no_address(result: dict, pod: str) -> tuple[str, str]:
    """An IPv6-only network's pod: ("", "") when the result has no IPv4 address, a LabError if it has."""
    v4 = [ip["address"] for ip in result.get("ips", []) if ":" not in ip["address"]]
    if v4:
        raise LabError(f"pod {pod}: CNI gave it IPv4 {', '.join(v4)} on an IPv6-only network "
                       "(does subnet.env have FLANNEL_SUBNET?)")
    return "", ""


def address6(result: dict) -> tuple[str, str]:
    """(pod address, gateway) of the result's IPv6 address (a dual-stack or IPv6-only node's pods have one)."""
    for ip in result.get("ips", []):
        if ":" in ip["address"]:
            return ip["address"].split("/")[0], ip.get("gateway", "")
    raise LabError(f"CNI result has no IPv6 address (is FLANNEL_IPV6_SUBNET in subnet.env?): {result.get('ips')}")


def delete(entry: dict, timeout: float = DEL_TIMEOUT) -> str | None:
    """DEL of one recorded pod; None when done or nothing is left to act on, else why it failed.
    Works from the entry alone, with the pod's namespace gone (a crash) and without a cached
    result; skipped when the node's namespace is gone (its bridge and veths went with it, and the
    stores are files in the lab directory)."""
    if netns_inode(entry["host_netns"]) is None or not os.path.exists(entry["conflist"]):
        return None
    result = None
    try:
        result = _load(entry["result"])
    except (OSError, ValueError):
        pass  # ADD never finished (or the runtime lost its cache): DEL without prevResult
    try:
        runtime.del_pod(entry["netns"], entry["container_id"], entry["ifname"], _load(entry["conflist"]),
                        cni_path=entry["cni_path"], result=result, host_netns=entry["host_netns"],
                        timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - teardown goes on; the caller decides what it means
        return f"CNI DEL {entry['container_id']}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


def release(entries: Sequence[dict]) -> list[str]:
    """DEL of every recorded pod, newest first per node, nodes in parallel; returns the failures."""
    by_node: dict[str, list[dict]] = {}
    for e in reversed(list(entries)):
        by_node.setdefault(e["host_netns"], []).append(e)
    if not by_node:
        return []

    def one_node(items: list[dict]) -> list[str]:
        return [why for why in map(delete, items) if why]

    with ThreadPoolExecutor(max_workers=min(PARALLEL_NODES, len(by_node))) as pool:
        return [why for whys in pool.map(one_node, by_node.values()) for why in whys]
