"""The runtime's side of CNI: run a conflist's plugins for a pod as containerd or CRI-O do.

The lab and the tests make their pods through this, so they exercise the path a cluster does:
``add_pod`` runs every plugin of the list in order with ADD (each given the previous one's result
as ``prevResult``), ``check_pod`` runs CHECK in order with the ADD result, ``del_pod`` runs DEL in
reverse order (spec 1.0.0, "Network configuration lists"). Plugins are found in ``cni_path``; a
"node" that is itself a network namespace runs them inside it (``host_netns``), which is where
the bridge, the host side of each veth and the masquerade rules go.

    conflist = flannel_conflist(subnet_file=..., data_dir=..., ipam_data_dir=...)
    result = add_pod("/run/netns/pod1", "pod1", "eth0", conflist,
                     host_netns="node1", cni_path=weft_cni_path(bin_dir))
    check_pod(..., result=result); del_pod(..., result=result)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

DEBIAN_PLUGIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins


class PluginError(RuntimeError):
    """A plugin's error JSON (or a crash), in one line."""

    def __init__(self, plugin: str, command: str, code: int, msg: str, details: str = ""):
        self.plugin, self.command, self.code, self.msg, self.details = plugin, command, code, msg, details
        super().__init__(f"CNI {command} {plugin}: code {code}: {msg}" + (f" ({details})" if details else ""))


def weft_cni_executable() -> str:
    """The installed ``weft-cni`` next to this Python (the venv's bin), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weft-cni")
    if os.access(here, os.X_OK):
        return here
    for d in os.environ.get("PATH", "").split(":"):
        path = os.path.join(d, "weft-cni")
        if d and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("weft-cni is not installed (run ./bootstrap, or pip install weft)")


def weft_cni_path(bin_dir: str) -> str:
    """A CNI_PATH as a user sets it up: ``bin_dir`` holds weft-cni under the name ``flannel``
    (a symlink), followed by Debian's plugin directory for bridge, host-local and portmap."""
    os.makedirs(bin_dir, exist_ok=True)
    link = os.path.join(bin_dir, "flannel")
    target = weft_cni_executable()
    if os.path.realpath(link) != os.path.realpath(target):
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(target, link)
    return f"{bin_dir}:{DEBIAN_PLUGIN_DIR}"


def flannel_conflist(name: str = "cbr0", cni_version: str = "1.0.0", *, subnet_file: str | None = None,
                     data_dir: str | None = None, ipam_data_dir: str | None = None,
                     delegate: dict | None = None, portmap: bool = True) -> dict:
    """kube-flannel's conflist (flannel with hairpin and default gateway, then portmap). The
    paths are flannel's options; several nodes on one machine each need their own three."""
    flannel: dict = {"type": "flannel",
                     "delegate": delegate if delegate is not None
                     else {"hairpinMode": True, "isDefaultGateway": True}}
    if subnet_file:
        flannel["subnetFile"] = subnet_file
    if data_dir:
        flannel["dataDir"] = data_dir
    if ipam_data_dir:
        flannel["ipam"] = {"dataDir": ipam_data_dir}  # host-local's store, merged by the plugin
    plugins = [flannel]
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return {"name": name, "cniVersion": cni_version, "plugins": plugins}


def exec_plugin(command: str, conf: dict, *, container_id: str, netns: str, ifname: str, cni_path: str,
                host_netns: str | None = None, cni_args: str = "", timeout: float = 30) -> dict | None:
    """One plugin, one command (libcni's invoke): the result JSON for ADD, None otherwise."""
    plugin = conf.get("type", "")
    path = next((os.path.join(d, plugin) for d in cni_path.split(":")
                 if d and os.access(os.path.join(d, plugin), os.X_OK)), None)
    if path is None:
        raise PluginError(plugin, command, 0, f"plugin {plugin!r} not found in CNI_PATH {cni_path}")
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
           "CNI_ARGS": cni_args, "CNI_PATH": cni_path}
    argv = ["ip", "netns", "exec", host_netns, path] if host_netns else [path]
    proc = subprocess.run(argv, input=json.dumps(conf).encode(), env=env, capture_output=True,
                          timeout=timeout)
    if proc.returncode != 0:
        try:
            err = json.loads(proc.stdout)
            raise PluginError(plugin, command, int(err["code"]), err["msg"], err.get("details") or "")
        except (ValueError, KeyError, TypeError):
            raise PluginError(plugin, command, 0, f"exit status {proc.returncode}, no error JSON",
                              (proc.stdout + proc.stderr).decode(errors="replace").strip()) from None
    if command == "ADD":
        return json.loads(proc.stdout)
    return None


def _plugin_conf(conflist: dict, plugin: dict, prev_result: dict | None, capability_args: dict) -> dict:
    conf = dict(plugin)
    conf["name"] = conflist["name"]
    conf["cniVersion"] = conflist["cniVersion"]
    runtime_config = {cap: capability_args[cap] for cap, on in (plugin.get("capabilities") or {}).items()
                      if on and cap in capability_args}
    if runtime_config:
        conf["runtimeConfig"] = runtime_config
    if prev_result is not None:
        conf["prevResult"] = prev_result
    return conf


def add_pod(netns: str, container_id: str, ifname: str, conflist: dict, *, cni_path: str,
            host_netns: str | None = None, capability_args: dict | None = None, cni_args: str = "",
            timeout: float = 30) -> dict:
    """ADD through the list; the final result (keep it for CHECK and DEL, as a runtime caches it).
    ``timeout`` bounds each plugin call."""
    result = None
    for plugin in conflist["plugins"]:
        result = exec_plugin("ADD", _plugin_conf(conflist, plugin, result, capability_args or {}),
                             container_id=container_id, netns=netns, ifname=ifname, cni_path=cni_path,
                             host_netns=host_netns, cni_args=cni_args, timeout=timeout)
    return result


def check_pod(netns: str, container_id: str, ifname: str, conflist: dict, *, result: dict, cni_path: str,
              host_netns: str | None = None, capability_args: dict | None = None, cni_args: str = "") -> None:
    """CHECK through the list (spec 0.4.0 and later); raises PluginError for the first failure."""
    if conflist["cniVersion"] == "0.3.1":  # libcni refuses too: CHECK came with 0.4.0
        raise ValueError('configuration version "0.3.1" does not support the CHECK command')
    if conflist.get("disableCheck"):
        return
    for plugin in conflist["plugins"]:
        exec_plugin("CHECK", _plugin_conf(conflist, plugin, result, capability_args or {}),
                    container_id=container_id, netns=netns, ifname=ifname, cni_path=cni_path,
                    host_netns=host_netns, cni_args=cni_args)


def del_pod(netns: str, container_id: str, ifname: str, conflist: dict, *, cni_path: str,
            result: dict | None = None, host_netns: str | None = None,
            capability_args: dict | None = None, cni_args: str = "", timeout: float = 30) -> None:
    """DEL through the list in reverse. ``result`` is the cached ADD result when there is one (a
    runtime that crashed has none); ``netns`` may name a namespace that is gone. ``timeout``
    bounds each plugin call."""
    prev = result if conflist["cniVersion"] != "0.3.1" else None  # prevResult on DEL from 0.4.0
    for plugin in reversed(conflist["plugins"]):
        exec_plugin("DEL", _plugin_conf(conflist, plugin, prev, capability_args or {}),
                    container_id=container_id, netns=netns, ifname=ifname, cni_path=cni_path,
                    host_netns=host_netns, cni_args=cni_args, timeout=timeout)
