"""The lab: scenario files, and labs built, used and torn down (exactly) in network namespaces.

Lab tests need root and skip without it. Each builds a small lab (about a second) with the real
weftd and removes it; the last checks that nothing of the runs is left behind.
"""
from __future__ import annotations

import glob
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from bench import cli
from bench import scenario as sc
from bench.lab import LAB_ROOT, NETNS_DIR, REPO, Lab, LabError, alive, proc_start_time
from bench.procs import stat_fields

from .conftest import needs_etcd, needs_root

SCENARIOS = sorted(glob.glob(os.path.join(REPO, "scenarios", "*.toml")))
SCHEMA = os.path.join(REPO, "scenarios", "schema.json")
HAVE_DAEMON = os.path.exists(os.path.join(REPO, "controlplane", "daemon.py"))
HAVE_VXLAN = os.path.exists(os.path.join(REPO, "fastpath", "vxlan", "kernel.py"))
needs_daemon = pytest.mark.skipif(not HAVE_DAEMON, reason="needs controlplane/daemon.py (weftd)")

ALLOC3 = """
name = "alloc3"
[lab]
nodes = 3
pods_per_node = 1
[network]
config = {Network = "10.244.0.0/16", Backend = {Type = "alloc"}}
"""


# -- scenario files ---------------------------------------------------------------------------

BAD = [
    ("", "name: missing"),
    ("name = 3", "name: must be a string, got an integer"),
    ("name = 'a b'", "name: 'a b' must be 1-64 letters"),
    ("name = 'x'\nnodes = 3", "nodes: must be a table, got an integer (the node count is [lab] nodes)"),
    ("name = 'x'\ncolour = 3", "colour: unknown key"),
    ("name = 'x'\n[lab]\nnodes = 0", "lab.nodes: 0 is outside 1..500"),
    ("name = 'x'\n[lab]\nnodes = '3'", "lab.nodes: must be an integer, got a string"),
    ("name = 'x'\n[lab]\nnodes = true", "lab.nodes: must be an integer, got a boolean"),
    ("name = 'x'\n[lab]\npods_per_node = -1", "lab.pods_per_node: -1 is outside 0..64"),
    ("name = 'x'\n[lab]\nunderlay = '10.0.0.0/24'", "lab.underlay: 10.0.0.0/24 must lie inside 198.18.0.0/15"),
    ("name = 'x'\n[lab]\nunderlay = '198.18.0.1/24'", "lab.underlay: '198.18.0.1/24' is not an IPv4 CIDR"),
    ("name = 'x'\n[lab]\nunderlay = '198.18.0.0/30'\nnodes = 2", "lab.nodes: 2 nodes and the store do not fit"),
    ("name = 'x'\n[lab]\nmtu = 100", "lab.mtu: 100 is outside 576..65535"),
    ("name = 'x'\n[lab]\nstore = 'consul'", "lab.store: unknown store 'consul'"),
    ("name = 'x'\n[lab]\netcd_tls = true", "lab.etcd_tls: needs store = \"etcd\""),
    ("name = 'x'\n[lab]\nprefix = 'coreos.com'", "lab.prefix: 'coreos.com' must be an absolute key path"),
    ("name = 'x'\n[lab]\nstore_address = '198.18.0.2'", "lab.store_address: 198.18.0.2 is node 2's address"),
    ("name = 'x'\n[lab]\ncolour = 'red'", "lab.colour: unknown key"),
    ("name = 'x'\nlab = 3", "lab: must be a table, got an integer"),
    ("name = 'x'\n[network]\nconfig = '{'", "network.config: config: not valid JSON"),
    ("name = 'x'\n[network]\nconfig = 7", "network.config: must be a table or a JSON string"),
    ("name = 'x'\n[network]\nconfig = {Network = '10.244.0.0/16', Backend = {Type = 'gre'}}",
     "network.config: Backend.Type: unknown backend 'gre'"),
    ("name = 'x'\n[network]\nconfig = {Backend = {Type = 'vxlan'}}", "network.config: Network: missing"),
    ("name = 'x'\n[lab]\nnodes = 5\n[network]\nconfig = {Network = '10.0.0.0/24', SubnetLen = 26}",
     "network.config: Network 10.0.0.0/24 holds 3 subnets of /26, fewer than 5 nodes"),
    ("name = 'x'\n[lab]\npods_per_node = 30\n[network]\nconfig = {Network = '10.0.0.0/22', SubnetLen = 27}",
     "lab.pods_per_node: 30 pods do not fit in a /27 subnet (29 pod addresses"),
    ("name = 'x'\n[nodes.4]\ndataplane = 'kernel'", "nodes.4: node '4' is not a node number in 1..3"),
    ("name = 'x'\n[nodes.one]\ndataplane = 'kernel'", "nodes.one: node 'one' is not a node number"),
    ("name = 'x'\n[nodes.1]\ndataplane = 'python'", "nodes.1.dataplane: vxlan has no 'python' data plane"),
    ("name = 'x'\n[nodes.1]\ndataplane = 'warp'", "nodes.1.dataplane: unknown data plane 'warp'"),
    ("name = 'x'\n[nodes.1]\nspeed = 1", "nodes.1.speed: unknown key"),
    ("name = 'x'\n[weftd]\nflags = '-ip-masq'", "weftd.flags: must be an array, got a string"),
    ("name = 'x'\n[weftd]\nflags = [1]", "weftd.flags[0]: must be a string, got an integer"),
    ("name = 'x'\n[weftd.env]\n'A-B' = 'x'", "weftd.env.A-B: not a valid environment variable name"),
    ("name = 'x'\n[weftd.env]\nLAB_DIR = 'x'", "weftd.env.LAB_DIR: LAB_* names are the lab's own variables"),
    ("name = 'x'\n[weftd.env]\nA = 1", "weftd.env.A: must be a string, got an integer"),
    ("name = 'x'\n[weftd]\nexec_start = 'dockerd -x'", "weftd.exec_start: must start with weftd or flanneld"),
    ("name = 'x'\n[weftd]\nexec_start = 'weftd \"'", "weftd.exec_start: cannot split into words"),
    ("name = 'x'\n[lab\n", "not valid TOML"),
]


@pytest.mark.parametrize("text,expected", BAD, ids=[b[1].split(":")[0] or "empty" for b in BAD])
def test_bad_scenario_is_one_line_naming_file_key_and_rule(text, expected):
    with pytest.raises(sc.ScenarioError) as info:
        sc.loads(text, "bad.toml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("bad.toml: ")
    assert expected in message, message


def test_unreadable_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(sc.ScenarioError, match=r"nope\.toml: cannot read"):
        sc.load(str(missing))


def test_defaults():
    s = sc.loads("name = 'x'", "x.toml")
    assert (s.nodes, s.pods_per_node, str(s.underlay), s.mtu, s.store, s.etcd_tls, s.prefix,
            s.pod_offloads, s.node_cpus) == (3, 1, "198.18.0.0/15", 1500, "sqlite", False, "/coreos.com/network",
                                             True, True)
    assert json.loads(s.config_text) == sc.DEFAULT_NETWORK
    assert s.network.backend.name == "vxlan/kernel"
    assert str(s.node_ip(3)) == "198.18.0.3"
    assert str(s.store_ip) == "198.19.255.254"
    assert s.dataplane(1) == "kernel"


def test_config_as_json_string_and_node_override():
    s = sc.loads("name = 'x'\n[network]\nconfig = '{\"Network\":\"172.30.0.0/16\",\"Backend\":{\"Type\":\"vxlan\"}}'\n"
                 "[nodes.2]\ndataplane = 'fastpath'")
    assert str(s.network.network) == "172.30.0.0/16"
    assert (s.dataplane(1), s.dataplane(2)) == ("kernel", "fastpath")


def test_exec_start_expands_like_systemd():
    env = {"A": "https://x:2379", "OPTS": "-etcd-cafile=/c  -etcd-keyfile=/k", "EMPTY": ""}
    argv = sc.expand_exec_start("weftd -etcd-endpoints=${A} -v=${NOPE}x $OPTS $EMPTY '${A} b'", env)
    assert argv == ["weftd", "-etcd-endpoints=https://x:2379", "-v=x", "-etcd-cafile=/c",
                    "-etcd-keyfile=/k", "https://x:2379 b"]


# -- every shipped scenario and the schema ----------------------------------------------------

def _schema_errors(instance, schema, root, path="$"):
    """A small JSON-schema checker for the keywords schema.json uses (the venv has no jsonschema)."""
    if "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        return _schema_errors(instance, node, root, path)
    errors = []
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool}
    if "type" in schema:
        t = schema["type"]
        ok = (isinstance(instance, int) and not isinstance(instance, bool)) if t == "integer" \
            else isinstance(instance, kinds[t])
        if not ok:
            return [f"{path}: not {t}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} not in {schema['enum']}")
    if "minimum" in schema and instance < schema["minimum"]:
        errors.append(f"{path}: below minimum")
    if "maximum" in schema and instance > schema["maximum"]:
        errors.append(f"{path}: above maximum")
    if "pattern" in schema and not re.search(schema["pattern"], instance):
        errors.append(f"{path}: {instance!r} does not match {schema['pattern']}")
    if "oneOf" in schema:
        matches = sum(not _schema_errors(instance, s, root, path) for s in schema["oneOf"])
        if matches != 1:
            errors.append(f"{path}: matches {matches} of oneOf")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing {key}")
        props = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        for key, value in instance.items():
            sub = props.get(key)
            if sub is None:
                sub = next((s for p, s in patterns.items() if re.search(p, key)), None)
            if sub is None:
                if schema.get("additionalProperties", True) is False:
                    errors.append(f"{path}: unexpected key {key}")
                continue
            errors += _schema_errors(value, sub, root, f"{path}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            errors += _schema_errors(item, schema["items"], root, f"{path}[{i}]")
    return errors


def _validate(doc: dict, schema: dict) -> list[str]:
    try:
        import jsonschema
    except ImportError:
        return _schema_errors(doc, schema, schema)
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]


def test_there_are_scenarios():
    names = {os.path.basename(p) for p in SCENARIOS}
    assert {"default.toml", "seed.toml", "seed-host-gw.toml", "scale-50.toml"} <= names


@pytest.mark.parametrize("path", SCENARIOS, ids=[os.path.basename(p) for p in SCENARIOS])
def test_scenario_file_validates(path):
    s = sc.load(path)  # the loader's rules, including the network config's
    assert s.name == os.path.basename(path)[:-len(".toml")]
    with open(SCHEMA) as f:
        schema = json.load(f)
    with open(path, "rb") as f:
        import tomllib
        doc = tomllib.load(f)
    assert _validate(doc, schema) == []


def test_schema_and_loader_agree_on_keys_and_defaults():
    with open(SCHEMA) as f:
        schema = json.load(f)
    props = schema["properties"]
    assert tuple(props) == sc.TOP_KEYS
    assert tuple(props["lab"]["properties"]) == sc.LAB_KEYS
    assert tuple(props["weftd"]["properties"]) == sc.WEFTD_KEYS
    node_schema = next(iter(props["nodes"]["patternProperties"].values()))
    assert tuple(node_schema["properties"]) == sc.NODE_KEYS
    defaults = sc.loads("name = 'x'")
    for key, spec in props["lab"]["properties"].items():
        if "default" in spec:
            assert str(getattr(defaults, key)) == str(spec["default"]), key
    assert props["network"]["properties"]["config"]["default"] == sc.DEFAULT_NETWORK


def test_seed_scenarios_reproduce_the_walkthrough():
    for name, wire in (("seed", "vxlan"), ("seed-host-gw", "host-gw")):
        s = sc.load(os.path.join(REPO, "scenarios", f"{name}.toml"))
        assert (s.nodes, s.store, s.etcd_tls, s.prefix) == (3, "etcd", True, "/kube-centos/network")
        assert json.loads(s.config_text) == {"Network": "172.30.0.0/16", "SubnetLen": 24,
                                             "Backend": {"Type": wire}}
        assert s.weftd.env["FLANNEL_ETCD_PREFIX"] == "/kube-centos/network"
        variables = {"LAB_STORE_IP": "198.19.255.254", "LAB_PKI": "/pki"}
        env = {k: sc.substitute(v, variables) for k, v in s.weftd.env.items()}
        argv = sc.expand_exec_start(s.weftd.exec_start, env)
        assert argv == ["weftd", "-etcd-endpoints=https://198.19.255.254:2379",
                        "-etcd-prefix=/kube-centos/network", "-etcd-cafile=/pki/ca.pem",
                        "-etcd-certfile=/pki/client.pem", "-etcd-keyfile=/pki/client-key.pem"]
    scale = sc.load(os.path.join(REPO, "scenarios", "scale-50.toml"))
    assert (scale.nodes, scale.pods_per_node, scale.wire) == (50, 0, "alloc")


# -- the CLI without a lab --------------------------------------------------------------------

def test_cli_usage_errors_exit_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["dwon"]) == 2
    assert "maybe: down" in capsys.readouterr().err
    assert cli.main(["down", "w1a2b", "--all"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give one of PREFIX, --dir DIR or --all" in err
    assert cli.main(["up"]) == 2


def test_cli_env_flags(monkeypatch, capsys):
    monkeypatch.setenv("WEFT_BENCH_ALL", "no-way")
    assert cli.main(["down", "wzzzz"]) == 2
    assert "WEFT_BENCH_ALL" in capsys.readouterr().err


def test_cli_bad_scenario_is_one_line_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[lab]\nnodes = 0\n")
    assert cli.main(["up", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lab.nodes: 0 is outside" in err


def test_cli_down_unknown_lab_is_idempotent(capsys):
    assert cli.main(["down", "wzzzz"]) == 0
    assert "no lab wzzzz" in capsys.readouterr().out


def test_cli_down_without_argument_and_no_lab_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("bench.lab.LAB_ROOT", str(tmp_path))  # other labs on this machine stay out of it
    assert cli.main(["down"]) == 0
    assert capsys.readouterr().out == "no labs\n"


# -- labs ----------------------------------------------------------------------------------------

def _lab_namespaces(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix)) if os.path.isdir(NETNS_DIR) else []


def _root_snapshot():
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    routes = subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    return links, routes


def _assert_gone(prefix: str, pids, directory: str):
    assert _lab_namespaces(prefix) == []
    for pid, start in pids:
        assert not alive(pid, start), pid
    assert not os.path.exists(directory)
    assert not os.path.lexists(os.path.join(LAB_ROOT, prefix.rstrip("-")))


def _assert_root_untouched(before, prefix):
    links, routes = _root_snapshot()
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        assert not re.fullmatch(r"w\d+|wst|br0|cni0|veth[0-9a-f]{8}|flannel\.\d+", name) or name in before[0], line
    assert prefix not in links
    for line in routes.splitlines():
        assert "198.18." not in line or line in before[1], line


@needs_root
@needs_daemon
def test_lab_builds_works_and_goes_away(tmp_path):
    before = _root_snapshot()
    lab = Lab(sc.loads(ALLOC3, "alloc3.toml"))
    with lab:
        prefix = lab.prefix
        assert re.fullmatch(r"w[0-9a-f]{4}-", prefix)
        expected = sorted([f"{prefix}wire"] + [f"{prefix}n{n}" for n in (1, 2, 3)] +
                          [f"{prefix}p{n}x1" for n in (1, 2, 3)])
        assert _lab_namespaces(prefix) == expected
        assert lab.dir == os.path.join(LAB_ROOT, prefix[:-1])

        # pods: addresses from their node's subnet, MTU from subnet.env, reach their cni0
        subnets = set()
        for pod in lab.pods:
            node = lab.node(pod.node)
            with open(node.subnet_file) as f:
                env = dict(line.split("=", 1) for line in f.read().split())
            assert env["FLANNEL_SUBNET"] == f"{node.gateway}/24"
            assert pod.ip == str(ipaddress.ip_network(node.subnet).network_address + 2)
            addr = lab.exec(pod.namespace, ["ip", "-o", "-4", "addr", "show", "eth0"], check=True).stdout
            assert f"inet {pod.ip}/24" in addr
            assert f"mtu {node.mtu}" in lab.exec(pod.namespace, ["ip", "-o", "link", "show", "eth0"]).stdout
            route = lab.exec(pod.namespace, ["ip", "route", "show", "default"]).stdout
            assert f"default via {node.gateway}" in route
            assert lab.ping(pod, node.gateway)
            subnets.add(node.subnet)
        assert len(subnets) == 3
        # nodes reach each other on the underlay; sysctls are set inside the namespaces
        assert lab.ping("n1", "198.18.0.3")
        assert lab.exec("n2", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
        assert lab.exec("n2", ["sysctl", "-n", "net.ipv4.conf.eth0.rp_filter"]).stdout.strip() == "0"
        with pytest.raises(LabError, match="not a namespace of lab"):
            lab.exec("someone-elses-ns", ["true"])

        # one CPU per node: its weftd, and RPS on every veth that delivers into node N or its pods
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            def rps(ns, dev):
                out = lab.exec(ns, ["cat", f"/sys/class/net/{dev}/queues/rx-0/rps_cpus"], check=True).stdout
                return int(out.strip().replace(",", ""), 16)
            for node in lab.nodes:
                cpu = cpus[(node.index - 1) % len(cpus)]
                assert lab.node_cpu(node.index) == cpu
                assert os.sched_getaffinity(node.pid) == {cpu}
                pod = next(p for p in lab.pods if p.node == node.index)
                for ns, dev in ((node.namespace, "eth0"), (node.namespace, pod.host_veth),
                                (pod.namespace, "eth0"), (lab.wire, f"w{node.index}")):
                    assert rps(ns, dev) == 1 << cpu, (ns, dev)
            lab.steer_receive(False)
            assert rps(lab.wire, "w2") == 0 and rps(lab.pods[0].namespace, "eth0") == 0
            assert lab.ping(lab.pods[0], lab.node(1).gateway)
            lab.steer_receive(True)
            assert rps(lab.wire, "w2") == 1 << cpus[1]

        # the state file
        with open(os.path.join(lab.dir, "state.json")) as f:
            state = json.load(f)
        assert state["id"] == prefix[:-1] and state["prefix"] == prefix and state["name"] == "alloc3"
        assert [(n["index"], n["namespace"], n["public_ip"], n["dataplane"]) for n in state["nodes"]] == \
            [(n, f"{prefix}n{n}", f"198.18.0.{n}", "kernel") for n in (1, 2, 3)]
        assert all(n["pid"] and n["subnet"].endswith("/24") and n["mtu"] == 1500 for n in state["nodes"])
        assert [(p["namespace"], p["node"]) for p in state["pods"]] == [(f"{prefix}p{n}x1", n) for n in (1, 2, 3)]
        assert state["store"]["kind"] == "sqlite" and os.path.exists(state["store"]["path"])

        # the ledger lists everything, processes with their start times
        with open(os.path.join(lab.dir, "ledger.json")) as f:
            ledger = json.load(f)
        assert {e["name"] for e in ledger["entries"] if e["kind"] == "netns"} == set(expected)
        procs = [(e["pid"], e["start"]) for e in ledger["entries"] if e["kind"] == "process"]
        assert len(procs) == 3 and all(proc_start_time(p) == s for p, s in procs)

        # a node restarted (even after kill -9) keeps its lease; pods still reach its cni0
        node2 = lab.node(2)
        old_pid, old_subnet = node2.pid, node2.subnet
        lab.kill_node(2, signal.SIGKILL)
        assert proc_start_time(old_pid) is None
        lab.start_node(2)
        assert node2.pid != old_pid and node2.subnet == old_subnet and lab.ready(2)
        assert lab.ping(lab.pods[1], node2.gateway)
        directory = lab.dir
        # (the killed weftd is not among them: a dead process proves nothing about down())
        pids = [(n.pid, n.start) for n in lab.nodes]
        assert all(alive(pid, start) for pid, start in pids)

        # pause (SIGSTOP) and resume every daemon; a paused lab still goes away promptly
        state = lambda pid: stat_fields(pid)[0].decode()
        lab.pause()
        assert {state(n.pid) for n in lab.nodes} == {"T"}
        lab.resume()
        assert "T" not in {state(n.pid) for n in lab.nodes} and lab.ready(1)
        lab.pause()
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5
    _assert_gone(prefix, pids, directory)
    assert lab.down() == []  # idempotent
    _assert_root_untouched(before, prefix)


@needs_root
@needs_daemon
@pytest.mark.filterwarnings("ignore:subprocess .* is still running:ResourceWarning")
def test_dropped_lab_is_removed_by_bench_down(capsys):
    lab = Lab(sc.loads(ALLOC3, "alloc3.toml")).up()
    prefix, directory = lab.prefix, lab.dir
    pids = [(n.pid, n.start) for n in lab.nodes]
    del lab  # a "crash": nobody calls down()
    assert len(_lab_namespaces(prefix)) == 7
    assert cli.main(["inspect"]) == 0
    assert prefix[:-1] in capsys.readouterr().out
    assert cli.main(["down", prefix]) == 0
    _assert_gone(prefix, pids, directory)
    assert cli.main(["down", prefix]) == 0  # again: nothing to do


def _bench(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "bench.cli", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@needs_root
@needs_daemon
def test_bench_up_then_down_from_other_processes(tmp_path):
    scenario = tmp_path / "alloc3.toml"
    scenario.write_text(ALLOC3.replace("pods_per_node = 1", "pods_per_node = 1\npod_offloads = false"))
    directory = tmp_path / "lab"
    directory.mkdir()  # an empty --dir is adopted: its contents go at down, the directory stays
    up = _bench("up", str(scenario), "--json", "--dir", str(directory))
    out, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    state = json.loads(out)
    prefix = state["prefix"]
    assert state["dir"] == str(directory)
    assert os.path.realpath(os.path.join(LAB_ROOT, prefix[:-1])) == str(directory)
    pids = [(n["pid"], n["start"]) for n in state["nodes"]]
    assert all(proc_start_time(p) == s for p, s in pids)  # outlived `bench up`
    features = subprocess.run(["ip", "netns", "exec", state["pods"][0]["namespace"], "ethtool", "-k", "eth0"],
                              capture_output=True, text=True, timeout=10).stdout
    assert "tcp-segmentation-offload: off" in features and "generic-segmentation-offload: off" in features
    inspect = _bench("inspect", "--json")
    out, err = inspect.communicate(timeout=30)
    listed = {lab["id"]: lab for lab in json.loads(out)}
    assert listed[prefix[:-1]]["running"] == 3 and listed[prefix[:-1]]["dir"] == str(directory)
    down = _bench("down", prefix)
    out, err = down.communicate(timeout=60)
    assert down.returncode == 0, err
    assert os.listdir(directory) == []
    directory.rmdir()
    _assert_gone(prefix, pids, str(directory))


@needs_root
@needs_daemon
def test_bench_up_killed_mid_build_is_cleaned_up(tmp_path):
    """SIGKILL `bench up` while it waits for weftd: the ledger already lists all it made."""
    scenario = tmp_path / "alloc3.toml"
    # weftd looks for its config under a prefix where there is none, so it never gets ready
    scenario.write_text(ALLOC3 + "\n[weftd]\nflags = ['-etcd-prefix', '/nowhere']\n")
    directory = tmp_path / "lab"
    up = _bench("up", str(scenario), "--dir", str(directory))
    ledger_path = directory / "ledger.json"
    deadline = time.monotonic() + 30
    procs = []
    while time.monotonic() < deadline and up.poll() is None:
        try:
            entries = json.loads(ledger_path.read_text())["entries"]
        except (OSError, ValueError):
            entries = []
        procs = [(e["pid"], e["start"]) for e in entries if e["kind"] == "process" and e["pid"]]
        if len(procs) == 3:
            break
        time.sleep(0.02)
    assert up.poll() is None, "bench up finished before it could be killed"
    up.kill()
    up.communicate(timeout=10)
    ledger = json.loads(ledger_path.read_text())
    prefix = ledger["prefix"]
    assert _lab_namespaces(prefix)
    down = _bench("down", "--dir", str(directory))
    out, err = down.communicate(timeout=60)
    assert down.returncode == 0, err
    _assert_gone(prefix, procs, str(directory))


@needs_root
@needs_daemon
def test_failed_node_fails_up_with_log_tail_and_leaves_nothing(tmp_path):
    bad = sc.loads(ALLOC3 + "\n[weftd]\nflags = ['-subnet-lease-renew-margin', '0']\n", "bad.toml")
    lab = Lab(bad, ready_timeout=15)
    with pytest.raises(LabError) as info:
        lab.up()
    message = str(info.value)
    assert "\n" not in message
    assert "weftd exited with status 2" in message and "subnet-lease-renew-margin" in message
    started = [(n.pid, n.start) for n in lab.nodes if n.pid]
    assert started  # the daemons were started: down() had something to stop
    _assert_gone(lab.prefix, started, lab.dir)


def _all_pairs_ping(lab: Lab) -> list[tuple[str, str]]:
    failed = []
    for src in lab.pods:
        for dst in lab.pods:
            if src is not dst and not lab.ping(src, dst.ip, count=1, timeout=2):
                failed.append((src.namespace, dst.ip))
    return failed


@needs_root
@needs_daemon
@pytest.mark.skipif(not HAVE_VXLAN, reason="needs the vxlan kernel backend (fastpath/vxlan/kernel.py)")
def test_every_pod_pair_pings_in_a_vxlan_lab():
    with Lab(sc.load(os.path.join(REPO, "scenarios", "default.toml"))) as lab:
        assert lab.scenario.network.backend.name == "vxlan/kernel"
        assert all(n.mtu == 1450 for n in lab.nodes)
        assert _all_pairs_ping(lab) == []
        prefix = lab.prefix
    assert _lab_namespaces(prefix) == []


@needs_root
@needs_daemon
@needs_etcd
@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, "controlplane", "store", "etcd.py")),
                    reason="needs the etcd store (controlplane/store/etcd.py)")
def test_seed_scenario_etcd_tls_sysconfig():
    with Lab(sc.load(os.path.join(REPO, "scenarios", "seed.toml"))) as lab:
        assert lab.store["kind"] == "etcd" and lab.store["endpoint"] == "https://198.19.255.254:2379"
        node = lab.node(1)
        assert "-etcd-endpoints=https://198.19.255.254:2379" in node.argv
        assert f"-etcd-cafile={lab.dir}/pki/ca.pem" in node.argv
        assert all(n.subnet.startswith("172.30.") for n in lab.nodes)
        config = lab.exec("st", ["env", "ETCDCTL_API=3", "etcdctl", "--endpoints=https://198.19.255.254:2379",
                                 f"--cacert={lab.dir}/pki/ca.pem", f"--cert={lab.dir}/pki/client.pem",
                                 f"--key={lab.dir}/pki/client-key.pem", "get", "--print-value-only",
                                 "/kube-centos/network/config"], check=True).stdout
        assert json.loads(config)["Network"] == "172.30.0.0/16"
        assert _all_pairs_ping(lab) == []
        prefix, etcd_data = lab.prefix, lab.store["data"]
    assert _lab_namespaces(prefix) == []
    assert not os.path.exists(etcd_data)


@needs_root
def test_no_lab_of_this_run_is_left():
    """Runs last (file order): every lab these tests made is gone."""
    mine = [lab for lab in os.listdir(LAB_ROOT)] if os.path.isdir(LAB_ROOT) else []
    for lab_id in mine:
        ledger = os.path.join(os.path.realpath(os.path.join(LAB_ROOT, lab_id)), "ledger.json")
        try:
            with open(ledger) as f:
                owner = json.load(f)["owner_pid"]
        except (OSError, ValueError, KeyError):
            continue
        assert owner != os.getpid(), f"lab {lab_id} from this test run is still up"


# -- teardown: what is left in the lab's namespaces --------------------------------------------

ALLOC1 = ALLOC3.replace("alloc3", "alloc1").replace("nodes = 3", "nodes = 1").replace("pods_per_node = 1", "pods_per_node = 0")


@needs_root
@needs_daemon
def test_down_stops_every_process_left_in_the_lab_namespaces():
    """Processes no ledger entry names (started with `ip netns exec`, reparented away from us, as
    an engine process weftd started may outlive it) are stopped: one that ignores SIGTERM (SIGKILL
    after the bound) and one that starts a replacement while it stops (the namespace is scanned
    again). Nothing is left running in the namespace once down() returns."""
    from bench.netns import netns_inode, pids_in_netns
    lab = Lab(sc.loads(ALLOC1, "alloc1.toml")).up()
    ns = lab.node(1).namespace
    inode = netns_inode(ns)
    scripts = ["trap '' TERM; exec sleep 600",                                    # SIGKILL only
               "trap 'setsid sleep 600 & exit 0' TERM; while :; do sleep 0.2; done"]  # respawns
    strays = []
    for script in scripts:
        # `sh -c 'X & echo $!'` exits at once: X is nobody's child here and in no ledger
        out = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", f"sh -c \"{script}\" >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        pid = int(out)
        strays.append((pid, proc_start_time(pid)))
    assert all(alive(pid, start) for pid, start in strays)
    recorded = {e["pid"] for e in lab.ledger.of_kind("process")}
    assert not recorded & {pid for pid, _ in strays}
    assert lab.down() == []
    assert not any(alive(pid, start) for pid, start in strays)
    assert pids_in_netns(inode) == []
    assert _lab_namespaces(lab.prefix) == []


# -- bench down without an argument -------------------------------------------------------------

def _gone_under(root, lab_id: str, pids) -> bool:
    return (_lab_namespaces(lab_id + "-") == [] and not os.path.lexists(os.path.join(root, lab_id))
            and not any(alive(pid, start) for pid, start in pids))


@needs_root
@needs_daemon
@pytest.mark.filterwarnings("ignore:subprocess .* is still running:ResourceWarning")
def test_bench_down_without_argument_takes_down_the_one_lab(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "labs")
    monkeypatch.setattr("bench.lab.LAB_ROOT", root)  # other labs on this machine stay out of it
    lab = Lab(sc.loads(ALLOC1, "alloc1.toml"), root=root).up()
    pids = [(n.pid, n.start) for n in lab.nodes]
    assert cli.main(["down"]) == 0
    assert capsys.readouterr().out == f"removed lab {lab.id}\n"
    assert _gone_under(root, lab.id, pids)


@needs_root
@needs_daemon
def test_bench_down_without_argument_lists_several_and_removes_none(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "labs")
    monkeypatch.setattr("bench.lab.LAB_ROOT", root)
    labs = [Lab(sc.loads(ALLOC1, "alloc1.toml"), root=root) for _ in range(2)]
    try:
        for lab in labs:
            lab.up()
        assert cli.main(["down"]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1
        assert "2 labs are up" in err and all(f"{lab.id} (alloc1)" in err for lab in labs)
        assert all(alive(n.pid, n.start) for lab in labs for n in lab.nodes)
        assert all(len(_lab_namespaces(lab.prefix)) == 2 for lab in labs)
    finally:
        for lab in labs:
            lab.down()


# -- pods through CNI (bench.lab_cni) -----------------------------------------------------------

ALLOC2X2 = ALLOC3.replace("alloc3", "alloc2x2").replace("nodes = 3", "nodes = 2").replace(
    "pods_per_node = 1", "pods_per_node = 2")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _links(lab: Lab, ns: str) -> set[str]:
    out = lab.exec(ns, ["ip", "-o", "link", "show"], check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@needs_root
@needs_daemon
def test_pods_come_from_cni_carry_its_state_and_del_releases_it():
    """Every pod is a CNI ADD (the conflist users deploy, weft-cni as flannel, Debian's bridge and
    host-local): flannel's dataDir file and host-local's reservation per container id exist while
    it lives; DEL (what teardown runs) releases both, also with the pod's namespace gone (a crash)
    and twice; a repeated ADD is refused and leaves the pod and its state as they were."""
    from bench import lab_cni
    lab = Lab(sc.loads(ALLOC2X2, "alloc2x2.toml"))
    with lab:
        entries = {e["container_id"]: e for e in lab.ledger.of_kind("cni")}
        fields = lambda e, **kw: {**{k: v for k, v in e.items() if k != "kind"}, **kw}  # noqa: E731
        assert sorted(entries) == sorted(p.namespace for p in lab.pods)
        for node in lab.nodes:  # weftd masquerades, so the bridge plugin must not
            assert "-ip-masq" in node.argv
            assert "FLANNEL_IPMASQ=true" in _read(node.subnet_file).split()
            assert "CNI-" not in lab.exec(node.namespace, ["iptables-save", "-t", "nat"], check=True).stdout
        state = {}
        for pod in lab.pods:
            node, base = lab.node(pod.node), os.path.join(lab.dir, f"n{pod.node}", "cni")
            assert pod.ip == str(ipaddress.ip_network(node.subnet).network_address + 1 + pod.index)
            with open(os.path.join(base, "flannel", pod.namespace)) as f:
                saved = json.load(f)
            assert (saved["type"], saved["ipMasq"], saved["hairpinMode"], saved["isDefaultGateway"]) == \
                ("bridge", False, True, True)
            assert saved["ipam"]["ranges"] == [[{"subnet": node.subnet}]]
            reservation = os.path.join(base, "ipam", "cbr0", pod.ip)
            with open(reservation) as f:
                assert f.read().split() == [pod.namespace, "eth0"]
            port = lab.exec(node.namespace, ["ip", "-d", "link", "show", pod.host_veth], check=True).stdout
            assert "master cni0" in port and "hairpin on" in port
            state[pod.namespace] = (os.path.join(base, "flannel", pod.namespace), reservation, node, pod)
        p1, p2 = (p for p in lab.pods if p.node == 1)
        assert lab.ping(p1, p2.ip) and lab.ping(p2, p1.ip)

        # a repeated ADD: refused (the bridge plugin), the pod keeps its network and saved config
        saved_before = _read(state[p1.namespace][0])
        with pytest.raises(LabError, match=f"pod {p1.namespace}: CNI ADD"):
            lab_cni.add(lab.ledger, fields(entries[p1.namespace], result=os.path.join(lab.dir, "readd.json")))
        assert _read(state[p1.namespace][0]) == saved_before
        assert os.listdir(os.path.join(lab.dir, "n1", "cni", "ipam", "cbr0")).count(p1.ip) == 1
        assert lab.ping(p2, p1.ip)

        # DEL as teardown runs it: both files go, and the veth (host end and pod's eth0)
        datafile, reservation, node, _ = state[p1.namespace]
        assert lab_cni.delete(entries[p1.namespace]) is None
        assert not os.path.exists(datafile) and not os.path.exists(reservation)
        assert p1.host_veth not in _links(lab, node.namespace) and "eth0" not in _links(lab, p1.namespace)
        assert lab_cni.delete(entries[p1.namespace]) is None  # again: the spec's idempotent DEL

        # after a crash: the pod's namespace is gone and the runtime lost its cached result
        datafile, reservation, node, _ = state[p2.namespace]
        subprocess.run(["ip", "netns", "delete", p2.namespace], check=True)
        os.unlink(entries[p2.namespace]["result"])
        assert lab_cni.delete(entries[p2.namespace]) is None
        assert not os.path.exists(datafile) and not os.path.exists(reservation)
        assert p2.host_veth not in _links(lab, node.namespace)

        # a new ADD in the pod's namespace (the pod made again): an address of node 1's subnet
        # (host-local goes on after its last reservation), reachable from its node
        result = lab_cni.add(lab.ledger, fields(entries[p1.namespace]))
        again = lab_cni.address(result)[0]
        assert ipaddress.ip_address(again) in ipaddress.ip_network(node.subnet)
        assert lab.ping(node.namespace, again)

        # teardown's DEL runs from the ledger alone, for every pod (p2's namespace gone, p1's twice)
        assert lab_cni.release(lab.ledger.of_kind("cni")) == []
        assert os.listdir(os.path.join(lab.dir, "n1", "cni", "flannel")) == []
        assert [f for f in os.listdir(os.path.join(lab.dir, "n1", "cni", "ipam", "cbr0"))
                if not f.startswith(("lock", "last_reserved"))] == []
        prefix, directory = lab.prefix, lab.dir
    _assert_gone(prefix, [], directory)


@needs_root
@needs_daemon
@pytest.mark.filterwarnings("ignore:subprocess .* is still running:ResourceWarning")
def test_teardown_after_a_crash_where_del_cannot_run(capsys):
    """A crashed lab whose pods cannot get their DEL (the plugin is gone, a pod's namespace is
    gone): ``bench down`` still removes everything, the CNI stores with the lab directory."""
    lab = Lab(sc.loads(ALLOC2X2, "alloc2x2.toml")).up()
    prefix, directory = lab.prefix, lab.dir
    pids = [(n.pid, n.start) for n in lab.nodes]
    subprocess.run(["ip", "netns", "delete", lab.pods[0].namespace], check=True)
    os.unlink(os.path.join(directory, "cni-bin", "flannel"))
    del lab  # the crash: nobody calls down()
    assert cli.main(["down", prefix]) == 0
    _assert_gone(prefix, pids, directory)


# -- dual-stack scenarios ---------------------------------------------------------------------------

DUALSTACK_NET = ('[network]\nconfig = {Network = "10.244.0.0/16", EnableIPv6 = true, '
                 'IPv6Network = "fd10:244::/56"}\n')


def test_dual_stack_comes_from_the_network_config():
    assert not sc.loads("name = 'x'").dual_stack
    s = sc.load(os.path.join(REPO, "scenarios", "dualstack.toml"))
    assert s.dual_stack and s.network.backend.name == "vxlan/kernel" and s.nodes == 3 and s.store == "sqlite"
    assert str(s.node_ip6(2)) == "2001:db8:198:18::2"
    s = sc.loads("name = 'x'\n[lab]\nunderlay6 = '2001:db8:7::/64'\n" + DUALSTACK_NET)
    assert s.dual_stack and str(s.node_ip6(3)) == "2001:db8:7::3"
    assert sc.from_dict(sc.to_dict(s)).underlay6 == s.underlay6  # a lab's state keeps it (attach)


@pytest.mark.parametrize("lab, net, error", [
    ("underlay6 = '2001:db9::/64'", "", "lab.underlay6: 2001:db9::/64 must lie inside 2001:db8::/32"),
    ("underlay6 = 'fd00::/64'", "", "lab.underlay6: fd00::/64 must lie inside 2001:db8::/32"),
    ("underlay6 = '2001:db8::1/64'", "", "lab.underlay6: '2001:db8::1/64' is not an IPv6 CIDR with no host bits"),
    ("underlay6 = '198.18.0.0/15'", "", "lab.underlay6: '198.18.0.0/15' is not an IPv6 CIDR"),
    ("nodes = 3\nunderlay6 = '2001:db8::/127'", "", "lab.nodes: 3 nodes and the store do not fit in 2001:db8::/127"),
    ("nodes = 5", '[network]\nconfig = {Network = "10.244.0.0/16", EnableIPv6 = true, IPv6Network = "fd10::/62"}\n',
     "network.config: IPv6Network fd10::/62 holds 3 subnets of /64 between IPv6SubnetMin and IPv6SubnetMax, "
     "fewer than 5 nodes"),
    ("", '[network]\nconfig = {Network = "10.244.0.0/16", EnableIPv6 = true, IPv6Network = "fd10::/56", '
         'Backend = {Type = "udp"}}\n', "network.config: EnableIPv6: udp/fastpath carries IPv4 only"),
])
def test_dual_stack_scenario_errors_are_one_line(lab, net, error):
    with pytest.raises(sc.ScenarioError) as exc:
        sc.loads(f"name = 'x'\n[lab]\n{lab}\n{net}", "x.toml")
    assert str(exc.value).startswith(f"x.toml: {error}") and "\n" not in str(exc.value), str(exc.value)


@needs_root
def test_teardown_runs_cni_del_before_the_namespaces_go():
    """``bench down``'s teardown DELs every pod while its namespace still exists (as a runtime
    removes a pod): each pod's host-local reservations (IPv4 and IPv6, a dual-stack testbed) and
    weft-cni's saved config vanish while the pod's namespace is still there. Without the DEL they
    would go only with the lab directory, after the namespaces. (Watched by polling, ~1 s.)"""
    import threading

    from .e2e import Testbed, built
    with built(Testbed(f"wtd{os.getpid() % 100}-", dual_stack=True)) as bed:
        base = bed.topology.dir
        watched = {}  # pod namespace -> files DEL must remove
        for pod in bed.pods:
            cni = os.path.join(base, f"n{pod.node}", "cni")
            watched[pod.namespace] = [os.path.join(cni, "ipam", "cbr0", pod.ip),
                                      os.path.join(cni, "ipam", "cbr0", pod.ip6),
                                      os.path.join(cni, "flannel", pod.namespace)]
        assert all(os.path.exists(f) for files in watched.values() for f in files), watched
        gone: dict[str, int] = {}  # what -> the poll at which it was first seen gone
        stop = threading.Event()

        def poll():
            i = 0
            while not stop.is_set() and len(gone) < 2 * len(watched):
                i += 1
                for ns, files in watched.items():
                    if ("files", ns) not in gone and not any(os.path.exists(f) for f in files):
                        gone[("files", ns)] = i
                    if ("netns", ns) not in gone and not os.path.exists(os.path.join(NETNS_DIR, ns)):
                        gone[("netns", ns)] = i
                time.sleep(0.0005)

        watcher = threading.Thread(target=poll)
        watcher.start()
        try:
            problems = bed.destroy()
        finally:
            stop.set()
            watcher.join(10)
        bed.ledger = None  # destroyed: built() checks that nothing is left
        assert problems == []
        for ns in watched:
            assert ("files", ns) in gone and ("netns", ns) in gone, gone
            assert gone[("files", ns)] < gone[("netns", ns)], f"{ns}: DEL's files outlived its namespace: {gone}"


# -- IPv6-only scenarios (EnableIPv4 false) ---------------------------------------------------------

IPV6ONLY_NET = ('[network]\nconfig = {EnableIPv4 = false, EnableIPv6 = true, '
                'IPv6Network = "fd10:244::/56"}\n')


def test_ipv6_only_comes_from_the_network_config():
    """EnableIPv4 false: the lab builds the IPv6 underlay as dual-stack does, and is not dual-stack."""
    s = sc.load(os.path.join(REPO, "scenarios", "ipv6only.toml"))
    assert s.ipv6_only and s.has_ipv6 and not s.dual_stack and s.network.network is None
    assert s.network.backend.name == "vxlan/kernel" and s.nodes == 3 and str(s.node_ip6(2)) == "2001:db8:198:18::2"
    dual = sc.load(os.path.join(REPO, "scenarios", "dualstack.toml"))
    assert dual.dual_stack and dual.has_ipv6 and not dual.ipv6_only
    plain = sc.loads("name = 'x'")
    assert not (plain.dual_stack or plain.has_ipv6 or plain.ipv6_only)
    # 64 pods fit an IPv6 subnet (the IPv4 rule, a /24's 253, does not apply: there is no IPv4 subnet)
    s = sc.loads("name = 'x'\n[lab]\nnodes = 2\npods_per_node = 64\n" + IPV6ONLY_NET)
    assert s.ipv6_only and sc.from_dict(sc.to_dict(s)).ipv6_only  # a lab's state keeps it (attach)


@pytest.mark.parametrize("lab, net, error", [
    ("nodes = 5", '[network]\nconfig = {EnableIPv4 = false, EnableIPv6 = true, IPv6Network = "fd10::/62"}\n',
     "network.config: IPv6Network fd10::/62 holds 3 subnets of /64 between IPv6SubnetMin and IPv6SubnetMax, "
     "fewer than 5 nodes"),
    ("", '[network]\nconfig = {EnableIPv4 = false, EnableIPv6 = true, IPv6Network = "fd10::/56", '
         'Backend = {Type = "udp"}}\n', "network.config: EnableIPv6: udp/fastpath carries IPv4 only"),
    ("", '[network]\nconfig = {EnableIPv4 = false, EnableIPv6 = true}\n', "network.config: IPv6Network: missing"),
    ("", '[network]\nconfig = {EnableIPv4 = false, Network = "10.244.0.0/16"}\n',
     "network.config: EnableIPv4: false with EnableIPv6 false leaves no network to carry"),
    ("", IPV6ONLY_NET + '[nodes.2]\ndataplane = "python"\n',
     "nodes.2.dataplane: vxlan has no 'python' data plane"),
    ("", '[network]\nconfig = {EnableIPv4 = false, EnableIPv6 = true, IPv6Network = "fd10::/56", '
         'Backend = {Type = "udp", Dataplane = "python"}}\n', "network.config: EnableIPv6: udp/python carries IPv4 only"),
    ("peer_leases = 100", IPV6ONLY_NET,
     "lab.peer_leases: the peer-lease scale run writes IPv4 leases; the network is IPv6-only (EnableIPv4 false)"),
    ("", IPV6ONLY_NET + "[weftd]\nflags = ['--source-guard']\n",
     "weftd.flags: --source-guard is an IPv4 guard; the network is IPv6-only (EnableIPv4 false)"),
])
def test_ipv6_only_scenario_errors_are_one_line(lab, net, error):
    with pytest.raises(sc.ScenarioError) as exc:
        sc.loads(f"name = 'x'\n[lab]\n{lab}\n{net}", "x.toml")
    assert str(exc.value).startswith(f"x.toml: {error}") and "\n" not in str(exc.value), str(exc.value)


@pytest.mark.parametrize("tool, argv", [
    ("bench faults", ["faults", "--scenario", "scenarios/ipv6only.toml", "--backends", "vxlan/kernel"]),
    ("bench flood", ["flood", "--scenario", "scenarios/ipv6only.toml", "--backends", "vxlan/kernel"]),
])
def test_ipv6_only_scenario_is_refused_by_the_ipv4_tools_in_one_line(tmp_path, tool, argv):
    """The fault catalogue and the flood send IPv4 traffic and write IPv4 leases: on an IPv6-only
    scenario each refuses before building anything, in one line naming the scenario and why."""
    r = subprocess.run([sys.executable, "-m", "bench.cli", *argv, "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "scenarios/ipv6only.toml" in lines[0] and f"{tool}: sends IPv4" in lines[0], lines[0]
    assert "IPv6-only (EnableIPv4 false)" in lines[0] and not (tmp_path / "out").exists()


def test_ipv6_only_scenario_is_refused_by_the_scale_runs_in_one_line():
    """The control-plane and peer-lease scale runs write IPv4 leases: refused in one line, not a
    TypeError on the missing IPv4 Network (their run() functions, as bench run calls them)."""
    from bench import scale, scale_peers
    s = sc.load(os.path.join(REPO, "scenarios", "ipv6only.toml"))
    for call, tool in ((lambda: scale.run(s), "bench run (control plane)"),
                       (lambda: scale_peers.run(s, ["vxlan/kernel"], 10), "bench run (peer leases)")):
        with pytest.raises(LabError) as exc:
            call()
        assert str(exc.value).startswith(f"{s.path}: {tool}: writes IPv4 leases") and "\n" not in str(exc.value)
