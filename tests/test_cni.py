"""weft-cni, the CNI plugin: the spec's commands and errors, run as a runtime runs it.

The installed ``weft-cni`` executable is run under the name ``flannel`` (a symlink in a bin dir,
as users install it) with Debian's real ``bridge``, ``host-local`` and ``portmap`` behind it. Each
test makes its own "node" namespace (where the plugins run: the cni0 bridge, the host ends of the
veths and the masquerade rules go there, never into the root namespace) and pod namespaces, all
named ``wcn<pid%1000>-<n>...`` and deleted afterwards; subnet.env, dataDir and host-local's store
live in the test's tmp_path. The error cases need neither root nor the plugins.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from controlplane.cni import runtime
from controlplane.cni.plugin import SUPPORTED_VERSIONS

from .conftest import needs_root
from .nsagent import ipj, sh

HAVE_PLUGINS = all(os.access(os.path.join(runtime.DEBIAN_PLUGIN_DIR, p), os.X_OK)
                   for p in ("bridge", "host-local", "portmap"))
needs_plugins = pytest.mark.skipif(
    not HAVE_PLUGINS, reason=f"needs Debian's containernetworking-plugins in {runtime.DEBIAN_PLUGIN_DIR} "
                             "(bridge, host-local, portmap; ./bootstrap installs them)")

PREFIX = f"wcn{os.getpid() % 1000}-"
_SEQ = itertools.count()
SUBNET_ENV = ("FLANNEL_NETWORK=10.99.0.0/16\nFLANNEL_SUBNET=10.99.3.1/24\n"
              "FLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n")


def weft_cni(env: dict, stdin: str | bytes = b"") -> tuple[int, dict | None, str]:
    """The installed executable, as a runtime runs it: exit status, stdout JSON (None if empty), stderr."""
    proc = subprocess.run([runtime.weft_cni_executable()], env={"PATH": os.environ["PATH"], **env},
                          input=stdin.encode() if isinstance(stdin, str) else stdin,
                          capture_output=True, timeout=30)
    out = proc.stdout.decode()
    return proc.returncode, (json.loads(out) if out.strip() else None), proc.stderr.decode()


def add_env(**over) -> dict:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/none",
           "CNI_IFNAME": "eth0", "CNI_PATH": runtime.DEBIAN_PLUGIN_DIR}
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def assert_spec_error(rc: int, out: dict | None, code: int, in_msg: str) -> None:
    assert rc != 0, f"exit status 0 on an error: {out}"
    assert out is not None and set(out) == {"cniVersion", "code", "msg", "details"}, out
    assert out["code"] == code, out
    assert in_msg in out["msg"], out
    assert "\n" not in out["msg"], out


# -- without root: VERSION and the spec's errors ----------------------------------------------------

def test_version_lists_the_spec_versions():
    rc, out, _ = weft_cni({"CNI_COMMAND": "VERSION"}, '{"cniVersion": "0.4.0"}')
    assert rc == 0
    assert out == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0"]}


def test_the_plugin_imports_only_the_standard_library():
    """Every pod start pays the plugin's imports: nothing of weft's daemon, netlink, etcd or bcc."""
    code = ("import sys; before = set(sys.modules); import controlplane.cni.plugin; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    loaded = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split()
    assert "controlplane.cni.plugin" in loaded
    heavy = [m for m in loaded if m.split(".")[0] in ("pyroute2", "etcd3", "grpc", "bcc", "google", "subprocess",
                                                      "threading", "ipaddress", "socket", "asyncio")
             or (m.startswith("controlplane.") and m not in ("controlplane.cni", "controlplane.cni.plugin"))]
    assert heavy == []


def test_missing_subnet_env_is_a_try_again_error(tmp_path):
    conf = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
            "subnetFile": str(tmp_path / "subnet.env"), "dataDir": str(tmp_path / "data")}
    rc, out, _ = weft_cni(add_env(), json.dumps(conf))
    assert_spec_error(rc, out, 11, f"{tmp_path / 'subnet.env'} does not exist")
    assert not (tmp_path / "data").exists(), "nothing is saved for a pod that was not added"


def test_incomplete_subnet_env_names_what_is_missing(tmp_path):
    (tmp_path / "subnet.env").write_text("FLANNEL_NETWORK=10.99.0.0/16\nFLANNEL_SUBNET=10.99.3.1/24\n")
    conf = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel", "subnetFile": str(tmp_path / "subnet.env")}
    rc, out, _ = weft_cni(add_env(), json.dumps(conf))
    assert_spec_error(rc, out, 7, "is missing FLANNEL_MTU, FLANNEL_IPMASQ")


@pytest.mark.parametrize("stdin, code, msg", [
    ("{", 6, "network config on stdin is not JSON"),
    ("", 6, "network config on stdin is not JSON"),
    ("[1, 2]", 6, "is a JSON list, not an object"),
    ({"name": None}, 7, "missing network name"),
    ({"name": "a/b"}, 7, "invalid characters found in network name"),
    ({"delegate": {"ipam": {}}}, 7, "must not have 'ipam' field"),
    ({"delegate": {"name": "x"}}, 7, "must not have 'name' field"),
    ({"delegate": {"type": 3}}, 7, "must have (string) 'type' field"),
    ({"delegate": []}, 7, "delegate must be an object"),
    ({"subnetFile": 3}, 7, "subnetFile must be a non-empty string"),
    ({"delegate": {"type": "nosuchplugin"}}, 7, 'failed to find plugin "nosuchplugin"'),
])
def test_bad_network_config_is_a_spec_error(tmp_path, stdin, code, msg):
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    if isinstance(stdin, dict):  # a valid config with these keys changed
        conf = {"cniVersion": "1.0.0", "name": "n", "type": "flannel",
                "subnetFile": str(tmp_path / "subnet.env"), "dataDir": str(tmp_path / "d")}
        conf.update(stdin)
        stdin = json.dumps({k: v for k, v in conf.items() if v is not None})
    rc, out, _ = weft_cni(add_env(), stdin)
    assert_spec_error(rc, out, code, msg)
    if code != 7 or "failed to find" not in msg:
        assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "0.3.0", "1.1.0", "2.0.0", None])
def test_unsupported_version_is_incompatible(version):
    conf = {"name": "cbr0", "type": "flannel"}
    if version:
        conf["cniVersion"] = version
    rc, out, _ = weft_cni(add_env(), json.dumps(conf))
    assert_spec_error(rc, out, 1, "incompatible CNI versions")
    assert f'config is "{version or "0.1.0"}"' in out["details"]
    assert '"0.3.1", "0.4.0", "1.0.0"' in out["details"]


def test_check_is_refused_by_a_0_3_1_config():
    conf = {"cniVersion": "0.3.1", "name": "cbr0", "type": "flannel", "prevResult": {}}
    rc, out, _ = weft_cni(add_env(CNI_COMMAND="CHECK"), json.dumps(conf))
    assert_spec_error(rc, out, 1, "config version does not allow CHECK")


@pytest.mark.parametrize("command", ["GC", "STATUS", "add", "FOO"])
def test_unknown_command(command):
    rc, out, _ = weft_cni(add_env(CNI_COMMAND=command), '{"cniVersion": "1.0.0", "name": "n"}')
    assert_spec_error(rc, out, 4, f"unknown CNI_COMMAND: {command}")


@pytest.mark.parametrize("command, drop, missing", [
    ("ADD", ["CNI_NETNS", "CNI_PATH"], "[CNI_NETNS,CNI_PATH]"),
    ("CHECK", ["CNI_CONTAINERID"], "[CNI_CONTAINERID]"),
    ("DEL", ["CNI_IFNAME"], "[CNI_IFNAME]"),
    (None, [], "[CNI_COMMAND]"),
])
def test_missing_environment_variables(command, drop, missing):
    env = add_env(CNI_COMMAND=command, **{k: None for k in drop})
    rc, out, err = weft_cni(env, '{"cniVersion": "1.0.0", "name": "n"}')
    assert_spec_error(rc, out, 4, f"required env variables {missing} missing")
    if command is None:
        assert "CNI protocol versions supported: 0.3.1, 0.4.0, 1.0.0" in err


@pytest.mark.parametrize("over, msg", [
    ({"CNI_CONTAINERID": "../../etc/x"}, "invalid characters in containerID"),
    ({"CNI_CONTAINERID": "-x"}, "invalid characters in containerID"),
    ({"CNI_IFNAME": "a-very-long-ifname"}, "is longer than 15 characters"),
    ({"CNI_IFNAME": "eth/0"}, "contains / or : or whitespace"),
])
def test_bad_container_id_or_ifname(tmp_path, over, msg):
    """The container id names the saved config's file: nothing outside dataDir is ever written."""
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    conf = {"cniVersion": "1.0.0", "name": "n", "subnetFile": str(tmp_path / "subnet.env"),
            "dataDir": str(tmp_path / "d" / "data")}
    rc, out, _ = weft_cni(add_env(**over), json.dumps(conf))
    assert_spec_error(rc, out, 4, msg)
    assert os.listdir(tmp_path) == ["subnet.env"]


def test_del_of_an_unknown_container_succeeds(tmp_path):
    conf = {"cniVersion": "1.0.0", "name": "n", "dataDir": str(tmp_path / "data")}
    rc, out, _ = weft_cni(add_env(CNI_COMMAND="DEL", CNI_NETNS=None), json.dumps(conf))
    assert (rc, out) == (0, None)


# -- with the real plugins, in namespaces -----------------------------------------------------------

class Node:
    """A node namespace with subnet.env, flannel's dataDir and host-local's store in tmp_path,
    weft-cni installed as ``flannel`` in a bin dir, and pods made in namespaces of their own."""

    def __init__(self, tmp_path, cni_version: str = "1.0.0"):
        self.prefix = f"{PREFIX}{next(_SEQ)}"
        self.created: list[str] = []
        self.subnet_env = tmp_path / "subnet.env"
        self.subnet_env.write_text(SUBNET_ENV)
        self.data_dir = tmp_path / "flannel"
        self.ipam_dir = tmp_path / "ipam"
        self.cni_path = runtime.weft_cni_path(str(tmp_path / "bin"))
        self.conflist = runtime.flannel_conflist(
            "cbr0", cni_version, subnet_file=str(self.subnet_env), data_dir=str(self.data_dir),
            ipam_data_dir=str(self.ipam_dir))
        self.ns = self.netns("n")

    def netns(self, suffix: str) -> str:
        name = self.prefix + suffix
        if name in sh("ip", "netns", "list").split():
            raise RuntimeError(f"namespace {name} already exists; not touching it")
        sh("ip", "netns", "add", name)
        self.created.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def pod(self, suffix: str) -> str:
        return self.netns(suffix)

    def call(self, command: str, pod: str, container_id: str, conf: dict | None = None,
             netns_path: str | None = None, ifname: str = "eth0") -> tuple[int, dict | None, str]:
        """weft-cni alone (the list's first plugin), run inside the node as a runtime would."""
        conf = conf or dict(self.conflist["plugins"][0], name="cbr0",
                            cniVersion=self.conflist["cniVersion"])
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
               "CNI_NETNS": netns_path or f"/run/netns/{pod}", "CNI_IFNAME": ifname,
               "CNI_PATH": self.cni_path}
        flannel = self.cni_path.split(":")[0] + "/flannel"
        proc = subprocess.run(["ip", "netns", "exec", self.ns, flannel], env=env, capture_output=True,
                              input=json.dumps(conf).encode(), timeout=30)
        out = proc.stdout.decode()
        return proc.returncode, (json.loads(out) if out.strip() else None), proc.stderr.decode()

    def add(self, pod: str, container_id: str) -> dict:
        return runtime.add_pod(f"/run/netns/{pod}", container_id, "eth0", self.conflist,
                               cni_path=self.cni_path, host_netns=self.ns)

    def check(self, pod: str, container_id: str, result: dict) -> None:
        runtime.check_pod(f"/run/netns/{pod}", container_id, "eth0", self.conflist, result=result,
                          cni_path=self.cni_path, host_netns=self.ns)

    def delete(self, pod: str, container_id: str, result: dict | None = None) -> None:
        runtime.del_pod(f"/run/netns/{pod}", container_id, "eth0", self.conflist, result=result,
                        cni_path=self.cni_path, host_netns=self.ns)

    def reserved(self) -> list[str]:
        """host-local's reservations (one file per address)."""
        store = self.ipam_dir / "cbr0"
        return sorted(p.name for p in store.iterdir() if p.name != "lock"
                      and not p.name.startswith("last_reserved_ip.")) if store.exists() else []

    def remove(self) -> None:
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    yield n
    n.remove()


def pod_addresses(pod: str, ifname: str = "eth0") -> list[str]:
    links = ipj(pod, "addr", "show", "dev", ifname)
    return [f"{a['local']}/{a['prefixlen']}" for a in links[0]["addr_info"] if a["family"] == "inet"]


def masq_rules(node: Node) -> list[str]:
    return [r for r in sh("iptables", "-t", "nat", "-S", "POSTROUTING", ns=node.ns).splitlines() if "CNI-" in r]


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
@needs_root
@needs_plugins
def test_add_gives_the_subnet_route_and_mtu_of_subnet_env(tmp_path, version):
    node = Node(tmp_path, version)
    try:
        pod = node.pod("a")
        result = node.add(pod, "c1")
        assert result["cniVersion"] == version
        address = result["ips"][0]["address"]
        assert address.startswith("10.99.3.") and address.endswith("/24") and address != "10.99.3.1/24"
        assert pod_addresses(pod) == [address]
        link = ipj(pod, "link", "show", "dev", "eth0")[0]
        assert link["mtu"] == 1400
        routes = {r["dst"]: r.get("gateway") for r in ipj(pod, "route", "show")}
        assert routes["10.99.0.0/16"] == "10.99.3.1"
        assert routes["default"] == "10.99.3.1"  # the delegate's isDefaultGateway
        bridge = ipj(node.ns, "addr", "show", "dev", "cni0")[0]
        assert [f"{a['local']}/{a['prefixlen']}" for a in bridge["addr_info"] if a["family"] == "inet"] \
            == ["10.99.3.1/24"]
        ports = ipj(node.ns, "-d", "link", "show", "master", "cni0")
        assert len(ports) == 1 and ports[0]["linkinfo"]["info_slave_data"]["hairpin"] is True
        assert masq_rules(node), "FLANNEL_IPMASQ=false: the bridge masquerades the pod"
        # flannel's saved delegate config, which DEL uses.
        saved = json.loads((node.data_dir / "c1").read_text())
        assert saved == {"hairpinMode": True, "isDefaultGateway": True, "name": "cbr0", "type": "bridge",
                         "ipMasq": True, "mtu": 1400, "isGateway": True, "cniVersion": version,
                         "ipam": {"dataDir": str(node.ipam_dir), "type": "host-local",
                                  "ranges": [[{"subnet": "10.99.3.0/24"}]],
                                  "routes": [{"dst": "10.99.0.0/16"}]}}
        assert oct((node.data_dir / "c1").stat().st_mode & 0o777) == "0o600"
        node.delete(pod, "c1", result)
        assert not ipj(pod, "link", "show", "type", "veth")
        assert node.reserved() == [] and not (node.data_dir / "c1").exists()
        assert masq_rules(node) == []
    finally:
        node.remove()


@needs_root
@needs_plugins
def test_ipmasq_true_in_subnet_env_leaves_masquerading_to_the_daemon(node):
    node.subnet_env.write_text(SUBNET_ENV.replace("FLANNEL_IPMASQ=false", "FLANNEL_IPMASQ=true"))
    pod = node.pod("a")
    result = node.add(pod, "c1")
    assert json.loads((node.data_dir / "c1").read_text())["ipMasq"] is False
    assert masq_rules(node) == []
    node.delete(pod, "c1", result)


@needs_root
@needs_plugins
def test_check_passes_after_add_and_fails_once_the_address_is_gone(node):
    pod = node.pod("a")
    result = node.add(pod, "c1")
    node.check(pod, "c1", result)
    address = result["ips"][0]["address"]
    sh("ip", "-n", pod, "addr", "del", address, "dev", "eth0")
    with pytest.raises(runtime.PluginError) as err:
        node.check(pod, "c1", result)
    assert err.value.plugin == "flannel" and f"Failed to match addr {address}" in err.value.msg
    node.delete(pod, "c1", result)
    # CHECK of a container never added (or deleted) is "container unknown".
    rc, out, _ = node.call("CHECK", pod, "c1", conf=dict(node.conflist["plugins"][0], name="cbr0",
                                                          cniVersion="1.0.0", prevResult=result))
    assert_spec_error(rc, out, 3, "container c1 was not added")


@needs_root
@needs_plugins
def test_del_is_idempotent(node):
    pod = node.pod("a")
    result = node.add(pod, "c1")
    assert len(node.reserved()) == 1
    for _ in range(2):
        node.delete(pod, "c1", result)
        assert not ipj(pod, "link", "show", "type", "veth")
        assert node.reserved() == [] and not (node.data_dir / "c1").exists()


@needs_root
@needs_plugins
def test_del_after_a_crash_with_the_netns_and_subnet_env_gone(node):
    """The runtime died: no cached result, the pod's namespace is gone, and weftd has not written
    subnet.env yet. DEL still releases the address (from the saved config), and again succeeds."""
    pod = node.pod("a")
    node.add(pod, "c1")
    sh("ip", "netns", "del", pod)
    node.created.remove(pod)
    node.subnet_env.unlink()
    for _ in range(2):
        node.delete(pod, "c1")
        assert node.reserved() == [] and not (node.data_dir / "c1").exists()
    assert not ipj(node.ns, "link", "show", "master", "cni0")


@needs_root
@needs_plugins
def test_repeated_add(node):
    """The spec forbids a runtime to ADD twice without DEL; the plugin refuses it with an error and
    the pod keeps its network. After DEL the same container id is added again."""
    pod = node.pod("a")
    result = node.add(pod, "c1")
    address = result["ips"][0]["address"]
    rc, out, _ = node.call("ADD", pod, "c1")
    assert rc != 0 and out["code"] != 0 and "delegate bridge ADD" in out["msg"], out
    assert pod_addresses(pod) == [address]
    assert node.reserved() == [address.split("/")[0]]
    node.check(pod, "c1", result)
    # Repeated after weftd moved to another subnet: still refused, and what DEL undoes is unchanged.
    saved = (node.data_dir / "c1").read_bytes()
    node.subnet_env.write_text(SUBNET_ENV.replace("10.99.3.1/24", "10.99.4.1/24"))
    rc, out, _ = node.call("ADD", pod, "c1")
    assert rc != 0 and "delegate bridge ADD" in out["msg"], out
    assert (node.data_dir / "c1").read_bytes() == saved
    node.subnet_env.write_text(SUBNET_ENV)
    node.delete(pod, "c1", result)
    again = node.add(pod, "c1")
    assert pod_addresses(pod) == [again["ips"][0]["address"]]
    node.check(pod, "c1", again)
    node.delete(pod, "c1", again)
    assert node.reserved() == []


@needs_root
@needs_plugins
def test_users_conflist_gives_pod_to_pod_traffic_on_one_bridge(node):
    """kube-flannel's conflist (flannel with hairpinMode and isDefaultGateway, then portmap) through
    the chain runner: two pods on the node's bridge ping each other, CHECK passes through the
    list, DEL through it in reverse removes both."""
    assert [p["type"] for p in node.conflist["plugins"]] == ["flannel", "portmap"]
    pods = {c: node.pod(c) for c in ("a", "b")}
    results = {c: node.add(p, f"ctr-{c}") for c, p in pods.items()}
    ips = {c: r["ips"][0]["address"].split("/")[0] for c, r in results.items()}
    assert ips["a"] != ips["b"]
    for src, dst in (("a", "b"), ("b", "a")):
        out = sh("ping", "-c", "2", "-i", "0.2", "-W", "2", ips[dst], ns=pods[src])
        assert " 0% packet loss" in out, out
    for c, p in pods.items():
        node.check(p, f"ctr-{c}", results[c])
    for c, p in pods.items():
        node.delete(p, f"ctr-{c}", results[c])
    assert node.reserved() == [] and os.listdir(node.data_dir) == []
    assert not ipj(node.ns, "link", "show", "master", "cni0")


@needs_root
@needs_plugins
def test_a_failed_del_keeps_what_a_retry_needs(node):
    """A DEL whose delegate cannot run is an error, and the saved config stays for the retry."""
    pod = node.pod("a")
    result = node.add(pod, "c1")
    plugin_conf = dict(node.conflist["plugins"][0], name="cbr0", cniVersion="1.0.0")
    cni_path, node.cni_path = node.cni_path, node.cni_path.split(":")[0]  # no bridge in it
    rc, out, _ = node.call("DEL", pod, "c1", conf=plugin_conf)
    node.cni_path = cni_path
    assert_spec_error(rc, out, 7, 'failed to find plugin "bridge"')
    assert (node.data_dir / "c1").exists() and len(node.reserved()) == 1
    node.delete(pod, "c1", result)
    assert node.reserved() == [] and not (node.data_dir / "c1").exists()


@needs_root
@needs_plugins
def test_dual_stack_subnet_env_gives_both_families(node):
    """subnet.env with FLANNEL_IPV6_NETWORK/SUBNET (flanneld's dual-stack form): one range per
    family, a route to each Network, and two pods reach each other over both."""
    node.subnet_env.write_text(SUBNET_ENV + "FLANNEL_IPV6_NETWORK=fd99::/56\nFLANNEL_IPV6_SUBNET=fd99:0:0:3::1/64\n")
    pods = {c: node.pod(c) for c in ("a", "b")}
    results = {c: node.add(p, f"ctr-{c}") for c, p in pods.items()}
    ipam = json.loads((node.data_dir / "ctr-a").read_text())["ipam"]
    assert ipam["ranges"] == [[{"subnet": "10.99.3.0/24"}], [{"subnet": "fd99:0:0:3::/64"}]]
    assert ipam["routes"] == [{"dst": "10.99.0.0/16"}, {"dst": "fd99::/56"}]
    assert len(node.reserved()) == 4
    v6 = {c: next(i["address"].split("/")[0] for i in r["ips"] if ":" in i["address"])
          for c, r in results.items()}
    assert all(a.startswith("fd99:0:0:3::") for a in v6.values())
    routes6 = {r["dst"]: r.get("gateway") for r in ipj(pods["a"], "-6", "route", "show")}
    assert routes6["fd99::/56"] == "fd99:0:0:3::1"
    for src, dst in (("a", "b"), ("b", "a")):
        out = sh("ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", v6[dst], ns=pods[src])
        assert " 0% packet loss" in out, out
    for c, p in pods.items():
        node.check(p, f"ctr-{c}", results[c])
        node.delete(p, f"ctr-{c}", results[c])
    assert node.reserved() == []


SUBNET_ENV_V6_ONLY = ("FLANNEL_IPV6_NETWORK=fd99::/56\nFLANNEL_IPV6_SUBNET=fd99:0:0:3::1/64\n"
                      "FLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n")


def pod_addresses_of(pod: str, family: str, ifname: str = "eth0") -> list[str]:
    """The pod's addresses of ``family`` ("inet" or "inet6"), link-local ones left out."""
    links = ipj(pod, "addr", "show", "dev", ifname)
    return [f"{a['local']}/{a['prefixlen']}" for a in links[0]["addr_info"]
            if a["family"] == family and a.get("scope") != "link"]


@needs_root
@needs_plugins
def test_ipv6_only_subnet_env_gives_ipv6_only_pods(node):
    """subnet.env of an IPv6-only network (flanneld's EnableIPv4 false: FLANNEL_IPV6_* lines and
    no FLANNEL_NETWORK/FLANNEL_SUBNET): one IPv6 range and one IPv6 route for the delegate, as
    flannel's plugin renders it; the pods have no IPv4 address and no IPv4 route, reach each
    other over IPv6, and CHECK and DEL work through the real bridge and host-local."""
    node.subnet_env.write_text(SUBNET_ENV_V6_ONLY)
    pods = {c: node.pod(c) for c in ("a", "b")}
    results = {c: node.add(p, f"ctr-{c}") for c, p in pods.items()}
    saved = json.loads((node.data_dir / "ctr-a").read_text())
    assert saved["ipam"]["ranges"] == [[{"subnet": "fd99:0:0:3::/64"}]]
    assert saved["ipam"]["routes"] == [{"dst": "fd99::/56"}]
    assert saved["mtu"] == 1400 and saved["ipMasq"] is False
    for c, r in results.items():
        assert [i["address"].split("/")[0].startswith("fd99:0:0:3::") for i in r["ips"]] == [True], r
        assert pod_addresses_of(pods[c], "inet") == [], f"pod {c} has IPv4 on an IPv6-only network"
        assert pod_addresses_of(pods[c], "inet6") == [r["ips"][0]["address"]]
        assert ipj(pods[c], "-4", "route", "show") == []
        routes6 = {r6["dst"]: r6.get("gateway") for r6 in ipj(pods[c], "-6", "route", "show")}
        assert routes6["fd99::/56"] == "fd99:0:0:3::1" and routes6["default"] == "fd99:0:0:3::1"
    cni0 = ipj(node.ns, "addr", "show", "dev", "cni0")[0]["addr_info"]
    assert [a["local"] for a in cni0 if a["family"] == "inet"] == []
    assert "fd99:0:0:3::1" in [a["local"] for a in cni0 if a["family"] == "inet6"]
    assert len(node.reserved()) == 2
    v6 = {c: r["ips"][0]["address"].split("/")[0] for c, r in results.items()}
    for src, dst in (("a", "b"), ("b", "a")):
        out = sh("ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", v6[dst], ns=pods[src])
        assert " 0% packet loss" in out, out
    for c, p in pods.items():
        node.check(p, f"ctr-{c}", results[c])
        node.delete(p, f"ctr-{c}", results[c])
        assert not ipj(p, "link", "show", "type", "veth")
    assert node.reserved() == [] and os.listdir(node.data_dir) == []


def test_ipv6_only_subnet_env_without_an_ipv6_subnet_names_what_is_missing(tmp_path):
    """An IPv6-only subnet.env cut short: the error names both keys that could fill the gap."""
    path = tmp_path / "subnet.env"
    path.write_text("FLANNEL_IPV6_NETWORK=fd99::/56\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n")
    conf = {"cniVersion": "1.0.0", "name": "n", "subnetFile": str(path), "dataDir": str(tmp_path / "d")}
    rc, out, _ = weft_cni(add_env(), json.dumps(conf))
    assert_spec_error(rc, out, 7, "is missing FLANNEL_SUBNET (or FLANNEL_IPV6_SUBNET)")
    assert not (tmp_path / "d").exists()
