"""The backend registry: a backend declared in one place is learnt by config validation, weftd's
flags and help, the scenario schema, ``bench run``'s list, ``load_backend`` and ``weftctl peermap``,
with no other edit; the committed schema is what the registry makes; config.py stays light."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from controlplane import backends
from controlplane.backends import Backend, BackendOptions, Dataplane, Flag, Key, Wire
from controlplane.backends import schema as schema_mod
from controlplane.config import ConfigError, parse_config

from .daemons import run_tool


class ToyBackend(Backend):
    """A data plane that moves nothing: enough for the registry."""
    wire_type = "toy"
    dataplane = "user"

    def setup(self, lease):
        pass

    def add_peer(self, lease):
        pass

    def remove_peer(self, lease):
        pass


def toy_show(dev: str) -> tuple[dict, str]:
    """The toy's ``weftctl peermap``: only its own device has maps."""
    if dev != "toy0":
        raise LookupError(f"{dev}: no toy maps")
    return {"device": dev, "peers": []}, f"toy maps on {dev}"


TOY_WIRE = Wire("toy", mtu_overhead=16, default_dataplane="user", default_port=7777,
                keys=(Key("Color", "color", int, 3, 0, 7, "the toy's colour"),))
TOY = Dataplane("toy", "user", "tests.test_registry:ToyBackend", "a toy",
                flags=(Flag("toy-turbo", "make the toy go faster"),), inspect="tests.test_registry:toy_show",
                source_guard="optional", source_guard_help="drop what the toy dislikes",
                leftovers="tests.test_registry:toy_leftovers")
LEFTOVERS_SEEN = []


def toy_leftovers(backend) -> None:
    """The toy's leftovers hook: records which backend is about to be set up."""
    LEFTOVERS_SEEN.append(backend)
VXLAN_TOY = Dataplane("vxlan", "toyplane", "tests.test_registry:ToyBackend", "vxlan, by a toy")


@pytest.fixture
def toy():
    backends.register_wire(TOY_WIRE)
    backends.register(TOY)
    backends.register(VXLAN_TOY)
    try:
        yield
    finally:
        backends.unregister("vxlan/toyplane")
        backends.unregister("toy")
    assert "toy" not in backends.wires() and "vxlan/toyplane" not in backends.backend_names()


def test_config_learns_a_registered_backend(toy):
    c = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "toy"}}')
    assert c.backend.name == "toy/user" and c.backend.effective_port == 7777
    assert c.backend.mtu_overhead == 16 and c.backend.color == 3
    assert parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "toy", "color": 5}}').backend.color == 5
    with pytest.raises(ConfigError, match=r"^Backend.Color: 9 is outside 0..7$"):
        parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "toy", "Color": 9}}')
    with pytest.raises(ConfigError, match="toy has no 'kernel' data plane"):
        parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "toy", "Dataplane": "kernel"}}')
    # a data plane added to an existing wire format: its config and weftd --dataplane take it
    vx = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Dataplane": "toyplane"}}')
    assert vx.backend.name == "vxlan/toyplane" and vx.backend.vni == 1
    assert parse_config('{"Network": "10.5.0.0/16"}').with_dataplane("toyplane").backend.name == "vxlan/toyplane"
    assert backends.load_backend("toy/user") is ToyBackend


def test_weftd_flags_and_help_learn_a_registered_backend(toy):
    from controlplane.daemon import build_parser, parse_args
    text = " ".join(build_parser().format_help().split())
    assert "toy: user" in text and "vxlan: kernel, ebpf, fastpath, toyplane" in text  # --dataplane
    assert "--toy-turbo" in text and "toy/user: make the toy go faster" in text
    args = parse_args(["--toy-turbo", "--dataplane", "toyplane"])
    assert args.toy_turbo is True and args.dataplane == "toyplane"
    assert parse_args([]).toy_turbo is False
    assert BackendOptions(toy_turbo=True).flags == {"toy_turbo": True}
    assert "toy/user: drop what the toy dislikes" in text  # --source-guard


def test_leftovers_hooks_run_before_any_backend_is_set_up(toy):
    """weftd calls every declared leftovers hook (the engines' is one) with the new backend."""
    LEFTOVERS_SEEN.clear()
    marker = object()
    hooks = [d.leftovers for d in backends.dataplanes() if d.leftovers]
    assert "tests.test_registry:toy_leftovers" in hooks
    assert "fastpath.engine.control:stop_engines_but_for" in hooks
    assert "fastpath.hostgw.ebpf:clear_programs_but_for" in hooks
    import fastpath.engine.control as control
    import fastpath.hostgw.ebpf as hostgw_ebpf
    calls, cleared = [], []
    real, control.stop_engines_but_for = control.stop_engines_but_for, calls.append
    real_hg, hostgw_ebpf.clear_programs_but_for = hostgw_ebpf.clear_programs_but_for, cleared.append
    try:
        backends.clear_leftovers(marker)
    finally:
        control.stop_engines_but_for = real
        hostgw_ebpf.clear_programs_but_for = real_hg
    # each hook once, however many declare it
    assert LEFTOVERS_SEEN == [marker] and calls == [marker] and cleared == [marker]


def test_source_guard_follows_the_declaration(toy):
    """--source-guard: accepted where the data plane declares a guard, a no-op where it is built
    in, refused (one line naming the data planes that have it) elsewhere; and every "optional"
    declaration is backed by a class that has the guard's machinery."""
    from controlplane.daemon import check_source_guard
    from controlplane.flags import UsageError
    from fastpath.routing import GuardedRouting
    check_source_guard(True, backends.declaration("toy/user"))
    check_source_guard(True, backends.declaration("vxlan/fastpath"))
    check_source_guard(False, backends.declaration("alloc/kernel"))
    with pytest.raises(UsageError, match=r"^--source-guard: not available on alloc/kernel: .*opt-in of "
                       r"host-gw/kernel, host-gw/ebpf, vxlan/kernel, toy/user\)$"):
        check_source_guard(True, backends.declaration("alloc/kernel"))
    for d in backends.dataplanes():
        if d.wire in ("toy",) or d.name == "toyplane" or "bcc" in d.requires:
            continue
        assert (d.source_guard == "optional") == issubclass(backends.load_backend(d.backend),
                                                             GuardedRouting), d.backend
    with pytest.raises(ValueError, match="source_guard 'maybe'"):
        Dataplane("toy", "odd", "x:y", source_guard="maybe")


def test_schema_and_bench_list_learn_a_registered_backend(toy):
    with open(schema_mod.SCHEMA_PATH) as f:
        doc = schema_mod.scenario_schema(json.load(f))
    backend = doc["properties"]["network"]["properties"]["config"]["oneOf"][1]["properties"]["Backend"]
    assert "toy" in backend["properties"]["Type"]["enum"]
    assert {"user", "toyplane"} <= set(backend["properties"]["Dataplane"]["enum"])
    color = backend["properties"]["Color"]
    assert (color["type"], color["minimum"], color["maximum"]) == ("integer", 0, 7)
    node = doc["properties"]["nodes"]["patternProperties"]["^[1-9][0-9]*$"]["properties"]["dataplane"]
    assert {"user", "toyplane"} <= set(node["enum"])
    from bench import runner
    assert runner.default_backends()[-2:] == ["toy/user", "vxlan/toyplane"]  # in registration order
    assert "alloc/kernel" not in runner.default_backends()


def test_weftctl_peermap_asks_the_registered_backends(toy, capsys):
    from controlplane.ctl import main
    assert main(["peermap", "--dev", "toy0"]) == 0
    assert capsys.readouterr().out == "toy maps on toy0\n"
    assert main(["peermap", "--dev", "toy0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"device": "toy0", "peers": []}
    assert main(["peermap", "--dev", "toy1"]) == 1
    assert "weftctl: peermap: toy1: no toy maps" in capsys.readouterr().err


def test_registry_refuses_what_would_be_ambiguous(toy):
    with pytest.raises(RuntimeError, match="registered twice"):
        backends.register(TOY)
    with pytest.raises(RuntimeError, match="wire format nope is not registered"):
        backends.register(Dataplane("nope", "user", "x:Y"))
    with pytest.raises(RuntimeError, match="flag --toy-turbo is declared differently"):
        backends.register(Dataplane("toy", "other", "x:Y", flags=(Flag("toy-turbo", "something else"),)))
    with pytest.raises(TypeError, match="no backend declares the flag"):
        BackendOptions(toy_trubo=True)


def test_committed_schema_is_what_the_registry_makes():
    r = run_tool("controlplane.backends.schema", "--check")
    assert r.returncode == 0, r.stderr


def test_config_import_loads_no_data_plane():
    code = ("import sys, controlplane.config as c; c.parse_config('{\"Network\": \"10.5.0.0/16\"}'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('bcc', 'pyroute2') "
            "or m.startswith(('fastpath.engine', 'fastpath.vxlan.', 'fastpath.bpf'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
