"""bench: the command line. Labs (up, down, inspect: here) and measurements over them (run, report,
compare, gate, baseline, micro: bench.commands; flood: bench.flood; faults: bench.faults).

    bench up SCENARIO [--json] [--dir DIR]     build a lab, print its state, leave it running
    bench down [PREFIX | --dir DIR | --all]    tear labs down from their ledgers (none: the one lab up)
    bench inspect [--json]                     list the labs recorded under /run/weft-lab

``bench`` with no command lists them all (``COMMANDS``). Commands are looked up there (name ->
"module:Class", summary) and imported only when used, as pip does; adding one is one line there
plus a ``Command`` subclass anywhere. Every flag can also come from the environment:
``WEFT_BENCH_<CMD>_<FLAG>`` or ``WEFT_BENCH_<FLAG>`` (e.g. ``WEFT_BENCH_DIR=/tmp/lab``,
``WEFT_BENCH_JSON=1``); the command line wins.

Exit codes: 0 ok, 1 failure, 2 usage. Errors are one line on stderr (``--debug``: traceback too).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import signal
import sys
import traceback

SUCCESS, ERROR, USAGE = 0, 1, 2

# name -> ("module:Class", one-line summary). Extend here; nothing is imported until used.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("bench.cli:UpCommand", "build a lab from a scenario and leave it running"),
    "down": ("bench.cli:DownCommand", "tear down labs exactly, from their ledgers"),
    "inspect": ("bench.cli:InspectCommand", "list the labs on this machine"),
    "run": ("bench.commands:RunCommand", "measure every backend pod to pod; tables, JSON, charts"),
    "report": ("bench.commands:ReportCommand", "re-render tables and charts from a results.json"),
    "compare": ("bench.commands:CompareCommand", "two results side by side, with the change"),
    "gate": ("bench.commands:GateCommand", "exit 1 when a result regressed against a baseline"),
    "baseline": ("bench.commands:BaselineCommand", "merge consecutive runs into a baseline (medians)"),
    "micro": ("bench.commands:MicroCommand", "micro-benchmarks (pytest-benchmark), compared as ratios"),
    "flood": ("bench.flood:FloodCommand", "flood each data plane with hostile datagrams; count every one"),
    "faults": ("bench.faults:FaultsCommand", "inject and heal faults under traffic; what was lost, what recovered"),
}

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


class UsageError(Exception):
    """A bad command line; one line."""


class Failure(Exception):
    """A command that could not do its job; one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(message)


class Command:
    """A subcommand: ``add_arguments`` declares flags, ``run`` returns an exit code."""

    name = ""
    summary = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def env_names(command: str, flag: str) -> list[str]:
    key = flag.lstrip("-").upper().replace("-", "_")
    return [f"WEFT_BENCH_{command.upper().replace('-', '_')}_{key}", f"WEFT_BENCH_{key}"]


def apply_env(parser: argparse.ArgumentParser, command: str, environ=os.environ) -> None:
    """Let every optional flag default to its WEFT_BENCH_* variable."""
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest == "help":
            continue
        for name in env_names(command, longs[0]):
            if name not in environ:
                continue
            text = environ[name]
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                low = text.strip().lower()
                if low not in _TRUE | _FALSE:
                    raise UsageError(f"{name}={text!r}: not a boolean (1/0, true/false)")
                value = (low in _TRUE) == isinstance(action, argparse._StoreTrueAction)
            elif action.type is not None:
                try:
                    value = action.type(text)
                except (TypeError, ValueError, argparse.ArgumentTypeError):
                    raise UsageError(f"{name}={text!r}: not a valid value for {longs[0]}") from None
            else:
                value = text
            parser.set_defaults(**{action.dest: value})
            action.required = False
            break
        if action.help and action.help != argparse.SUPPRESS:
            action.help += f" [env {env_names(command, longs[0])[1]}]"


def load_command(name: str) -> Command:
    path, summary = COMMANDS[name]
    module, _, cls = path.partition(":")
    command = getattr(importlib.import_module(module), cls)()
    command.name, command.summary = name, summary
    return command


def _top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: bench [--debug] COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "bench COMMAND -h for a command's flags; every flag also as WEFT_BENCH_<FLAG>."]
    return "\n".join(lines)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a `timeout` around `bench run`, a cancelled CI job, a closed terminal):
    unwound like ^C, so the labs a command built come down on the way out instead of leaving
    their daemons running."""


def _terminate(signum, frame):
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a second one must not cut the teardown short
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    debug = os.environ.get("WEFT_BENCH_DEBUG", "").lower() in _TRUE
    while argv and argv[0] == "--debug":
        debug = True
        argv.pop(0)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return SUCCESS if argv else USAGE
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (maybe: {near[0]})" if near else ""
        print(f"bench: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return USAGE
    try:
        command = load_command(name)
        parser = Parser(prog=f"bench {name}", description=command.summary)
        command.add_arguments(parser)
        apply_env(parser, name)
        try:
            args = parser.parse_args(rest)
        except SystemExit as exc:  # -h
            return int(exc.code or 0)
        return command.run(args)
    except UsageError as exc:
        print(f"bench {name}: usage: {exc}", file=sys.stderr)
        return USAGE
    except Terminated as exc:
        print(f"bench {name}: terminated ({exc}); what it built is down", file=sys.stderr)
        return ERROR
    except KeyboardInterrupt:
        print(f"bench {name}: interrupted", file=sys.stderr)
        return ERROR
    except Exception as exc:  # the one place failures become exit codes
        if debug:
            traceback.print_exc()
        known = _known_errors()
        text = str(exc).replace("\n", " | ") if isinstance(exc, known) else f"internal error: {exc!r}"
        print(f"bench {name}: {text}", file=sys.stderr)
        return ERROR


def _known_errors() -> tuple[type, ...]:
    out: list[type] = [Failure, OSError]
    for module, cls in (("bench.lab", "LabError"), ("bench.scenario", "ScenarioError")):
        mod = sys.modules.get(module)
        if mod is not None:
            out.append(getattr(mod, cls))
    return tuple(out)


# -- up / down / inspect --------------------------------------------------------------------------

def format_state(state: dict) -> str:
    """A lab's state as a readable table."""
    store = state.get("store", {})
    where = store.get("endpoint") or store.get("path", "")
    lines = [f"lab {state['id']} ({state['name']}): {len(state['nodes'])} nodes, "
             f"{state['backend']}, store {store.get('kind', '?')} {where}, dir {state['dir']}"]
    rows = [("NODE", "NAMESPACE", "PUBLIC IP", "SUBNET", "MTU", "DATAPLANE", "PID")]
    # an IPv6-only lab's nodes and pods have no IPv4 subnet or address: "–", never a blank (its
    # nodes' IPv4 underlay addresses serve the store and the harness; their leases say 0.0.0.0)
    rows += [(str(n["index"]), n["namespace"], n["public_ip"] if n["subnet"] else "–",
              n["subnet"] or "–", str(n["mtu"]),
              n["dataplane"], str(n["pid"])) for n in state["nodes"]]
    lines += _table(rows)
    dual = any(n.get("public_ipv6") for n in state["nodes"])  # dual-stack or IPv6-only: the IPv6 side too
    if dual:
        rows = [("NODE", "PUBLIC IPV6", "SUBNET6")]
        rows += [(str(n["index"]), n["public_ipv6"], n.get("subnet6", "")) for n in state["nodes"]]
        lines += [""] + _table(rows)
    if state["pods"]:
        rows = [("POD", "IP", "NODE", "GATEWAY") + (("IPV6",) if dual else ())]
        rows += [(p["namespace"], p["ip"] or "–", str(p["node"]), p["gateway"] or "–") + ((p.get("ip6", ""),) if dual else ())
                 for p in state["pods"]]
        lines += [""] + _table(rows)
    lines += ["", f"tear down: bench down {state['id']}"]
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


class UpCommand(Command):
    def add_arguments(self, p):
        p.add_argument("scenario", nargs="?", default=os.environ.get("WEFT_BENCH_SCENARIO"),
                       help="scenario file (TOML), e.g. scenarios/default.toml [env WEFT_BENCH_SCENARIO]")
        p.add_argument("--json", action="store_true", help="print the lab state as JSON")
        p.add_argument("--dir", help="lab directory (must not exist or be empty); default /run/weft-lab/<id>")
        p.add_argument("--timeout", type=float, help="seconds to wait for every node to be ready")
        p.add_argument("--keep-on-failure", action="store_true",
                       help="leave a lab that failed to come up in place, for debugging (bench down it)")

    def run(self, args):
        from .lab import Lab
        from .scenario import load
        if not args.scenario:
            raise UsageError("give a SCENARIO file (or WEFT_BENCH_SCENARIO)")
        lab = Lab(load(args.scenario), directory=args.dir, ready_timeout=args.timeout,
                  keep_on_failure=args.keep_on_failure)
        lab.up()
        state = lab.state()
        print(json.dumps(state, indent=1) if args.json else format_state(state))
        return SUCCESS


class DownCommand(Command):
    def add_arguments(self, p):
        p.add_argument("prefix", nargs="?",
                       help="the lab's id or prefix (w1a2b or w1a2b-); none: the one lab that is up")
        p.add_argument("--dir", help="the lab's directory")
        p.add_argument("--all", action="store_true", help="every lab recorded under /run/weft-lab (only those)")

    def run(self, args):
        from . import lab
        given = [x for x in (args.prefix, args.dir, args.all or None) if x]
        if len(given) > 1:
            raise UsageError("give one of PREFIX, --dir DIR or --all (or none: the one lab that is up)")
        labs = lab.list_labs(lab.LAB_ROOT) if not (args.prefix or args.dir) else []
        if args.all:
            targets = [x["id"] for x in labs]
        elif given:
            targets = [args.prefix or args.dir]
        else:
            targets = self._the_one_lab(labs)
        failed = 0
        for target in targets:
            try:
                problems = lab.down(target, lab.LAB_ROOT)
            except lab.LabNotFound:
                if args.all:
                    continue
                print(f"no lab {target} (nothing to remove)")
                continue
            for problem in problems:
                print(f"bench down: {target}: {problem}", file=sys.stderr)
            failed += bool(problems)
            print(f"removed lab {target}" if not problems else f"lab {target}: partly removed")
        if not targets:
            print("no labs")
        return ERROR if failed else SUCCESS

    @staticmethod
    def _the_one_lab(labs: list[dict]) -> list[str]:
        """Without an argument: the lab that is up, when it is the only one (what `bench up`
        printed); several are listed, and none is taken down."""
        if len(labs) > 1:
            listed = ", ".join(f"{x['id']} ({(x['state'] or {}).get('name', 'no state')})" for x in labs)
            raise Failure(f"{len(labs)} labs are up: {listed}; name one (bench down ID) or give --all")
        return [x["id"] for x in labs]


class InspectCommand(Command):
    def add_arguments(self, p):
        p.add_argument("--json", action="store_true", help="print JSON")

    def run(self, args):
        from .lab import LAB_ROOT, alive, list_labs
        labs = list_labs(LAB_ROOT)
        rows = []
        for lab in labs:
            state = lab["state"] or {}
            nodes = state.get("nodes", [])
            running = sum(1 for n in nodes if n.get("pid") and alive(n["pid"], n.get("start")))
            lab["running"] = running
            rows.append((lab["id"], state.get("name", "?"), str(len(nodes)), str(len(state.get("pods", []))),
                         f"{running}/{len(nodes)}", state.get("backend", "?"),
                         lab["dir"] + ("" if lab["state"] else "  (no state: building or crashed)")))
        if args.json:
            print(json.dumps(labs, indent=1))
        elif not labs:
            print("no labs")
        else:
            print("\n".join(_table([("ID", "NAME", "NODES", "PODS", "WEFTD UP", "BACKEND", "DIR")] + rows)))
        return SUCCESS


if __name__ == "__main__":
    # run as the module ``bench.cli`` (not ``__main__``) so its classes are the ones commands import
    from bench.cli import main as _main
    sys.exit(_main())
