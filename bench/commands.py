"""``bench run``, ``report``, ``compare``, ``gate`` and ``baseline`` (registered in bench.cli.COMMANDS)."""
from __future__ import annotations

import json
import os
import sys
import time

from .cli import Command, Failure, UsageError

DEFAULT_SCENARIO = "scenarios/default.toml"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as exc:
        raise Failure(f"{path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise Failure(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("weft-bench/"):
        raise Failure(f"{path}: not a bench result (no weft-bench schema)")
    return doc


def _scenario_path(text: str) -> str:
    if os.path.exists(text):
        return text
    alt = os.path.join(REPO, text)
    return alt if os.path.exists(alt) else text


class RunCommand(Command):
    def add_arguments(self, p):
        p.add_argument("--scenario", default=DEFAULT_SCENARIO, help="scenario file (TOML)")
        p.add_argument("--backends", default="", help="comma-separated wire/dataplane list, or 'bare'")
        p.add_argument("--quick", action="store_true", help="TCP 1 stream and ping only (CI gate)")
        p.add_argument("--repeat", type=int, default=0, help="runs per backend (median); default 3")
        p.add_argument("--out", default="", help="directory for results.json, results.md and charts")
        p.add_argument("--json", default="", help="also write the result document here")
        p.add_argument("--throttle", action="append", default=[], metavar="BACKEND=RATE",
                       help="tbf rate limit on BACKEND's sending pod (the gate's self-test)")

    def run(self, args) -> int:
        from . import report, runner
        from .scenario import load
        scenario = load(_scenario_path(args.scenario))
        backends = [b.strip() for b in args.backends.split(",") if b.strip()] or runner.default_backends(scenario)
        from controlplane.backends import backend_names
        for b in backends:
            if b != runner.BARE and b not in backend_names():
                raise UsageError(f"--backends: {b!r} is not a wire/dataplane pair (e.g. vxlan/kernel)")
        if args.repeat < 0:
            raise UsageError("--repeat must be at least 1")
        plan = runner.Plan.quick(args.repeat or 3) if args.quick else runner.Plan(repeat=args.repeat or 3)
        for item in args.throttle:
            name, _, rate = item.partition("=")
            if not rate:
                raise UsageError(f"--throttle {item!r}: use BACKEND=RATE, e.g. vxlan/kernel=1gbit")
            plan.throttle[name] = rate
        if scenario.nodes < 2:
            raise UsageError(f"{scenario.path}: a benchmark needs at least 2 nodes")
        out = args.out or os.path.join("results", time.strftime("%Y%m%d-%H%M%S"))
        if scenario.pods_per_node == 0 and scenario.network.backend.type == "alloc":
            return self.run_control_plane(scenario, plan, out, args.json)
        if scenario.peer_leases:
            return self.run_peer_scale(scenario, [b for b in backends if b != runner.BARE], plan,
                                       out, args.json)
        named = backends if args.backends.strip() else ()
        doc = runner.run(scenario, backends, plan)
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "results.json")
        for target in filter(None, [path, args.json]):
            with open(target, "w") as f:
                json.dump(doc, f, indent=1)
        files = report.write_all(doc, out)
        print(report.terminal(doc))
        print(f"\nwrote {path}" + "".join(f", {os.path.basename(x)}" for x in files))
        failures, skips = runner.verdict(doc, named)
        for note in skips:
            print(f"bench run: {note}", file=sys.stderr)
        if failures:  # every backend asked for must be measured; the numbers taken are written above
            raise Failure("; ".join(failures))
        if not any(b.get("status") == "ok" for b in doc["backends"].values()):
            raise Failure("no backend could be measured")
        return 0


    @staticmethod
    def run_peer_scale(scenario, backends, plan, out, json_path) -> int:
        """A scenario with ``peer_leases``: how fast each data plane programs that many peers."""
        from . import scale_peers
        from .runner import unavailable
        for b in backends:
            if unavailable(b):
                print(f"bench run: {b} skipped: {unavailable(b)}", file=sys.stderr)
        runnable = [b for b in backends if unavailable(b) is None]
        return RunCommand._control_plane_run(
            scenario, plan, out, json_path, "start_sync_s", scale_peers.table,
            lambda progress: {"peers": scale_peers.run(scenario, runnable, scenario.peer_leases,
                                                       progress=progress)}, "peers")

    @staticmethod
    def run_control_plane(scenario, plan, out, json_path) -> int:
        """A scenario with no pods and the alloc backend measures the control plane alone."""
        from . import scale
        return RunCommand._control_plane_run(scenario, plan, out, json_path, "converge_p50_s",
                                             scale.table, lambda progress: scale.run(scenario, progress=progress))

    @staticmethod
    def _control_plane_run(scenario, plan, out, json_path, done_key, table, measure, part=None) -> int:
        """Measure ``control_plane`` (``measure(progress)``), write the document, print ``table``
        of it (of its ``part``), and fail naming every row without ``done_key``."""
        from . import results
        from .runner import Progress
        progress = Progress(1)
        doc = results.new_document(scenario, plan)
        doc["control_plane"] = measure(progress)
        progress.close()
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "results.json")
        for target in filter(None, [path, json_path]):
            with open(target, "w") as f:
                json.dump(doc, f, indent=1)
        rows = doc["control_plane"][part] if part else doc["control_plane"]
        print(table(rows))
        print(f"\nwrote {path}")
        failed = [f"{name} failed: {r.get('reason', '')}" for name, r in rows.items() if done_key not in r]
        if failed:
            raise Failure("; ".join(failed))
        return 0


class ReportCommand(Command):
    def add_arguments(self, p):
        p.add_argument("file", help="a results.json from bench run")
        p.add_argument("--out", default="", help="directory for results.md and charts (default: beside FILE)")

    def run(self, args) -> int:
        from . import report
        doc = _load(args.file)
        out = args.out or os.path.dirname(os.path.abspath(args.file))
        files = report.write_all(doc, out)
        print(report.terminal(doc))
        print("\nwrote " + ", ".join(files))
        return 0


class CompareCommand(Command):
    def add_arguments(self, p):
        p.add_argument("a", help="results.json A (before)")
        p.add_argument("b", help="results.json B (after)")
        p.add_argument("--metrics", default="tcp1_gbps,ratio_to_bare,ratio_to_vxlan_kernel,tcp4_gbps,"
                       "rtt_p50_us,rr_p50_us,core_s_per_gbit",
                       help="comma-separated metrics to show")

    def run(self, args) -> int:
        from .gate import compare_table
        a, b = _load(args.a), _load(args.b)
        print(compare_table(a, b, [m.strip() for m in args.metrics.split(",") if m.strip()]))
        return 0


class GateCommand(Command):
    def add_arguments(self, p):
        from .gate import DEFAULT_LATENCY_TOLERANCE, DEFAULT_LOSS_TOLERANCE, DEFAULT_TOLERANCE
        p.add_argument("result", help="results.json of the run to judge")
        p.add_argument("--baseline", required=True, help="baseline results.json (bench/baselines/)")
        p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                       help=f"allowed relative fall of ratio_to_bare (default {DEFAULT_TOLERANCE})")
        p.add_argument("--latency-tolerance", type=float, default=DEFAULT_LATENCY_TOLERANCE,
                       help=f"allowed relative rise of latency_ratio_to_bare (default {DEFAULT_LATENCY_TOLERANCE})")
        p.add_argument("--loss-tolerance", type=float, default=DEFAULT_LOSS_TOLERANCE,
                       help="allowed rise of ping loss over the baseline's, in percentage points "
                            f"(default {DEFAULT_LOSS_TOLERANCE})")
        p.add_argument("--backends", help="judge only these backends of the baseline (comma-separated; "
                                          "default: every one, and one missing from the run fails)")

    def run(self, args) -> int:
        from .gate import gate
        if not 0 < args.tolerance < 1:
            raise UsageError("--tolerance must be between 0 and 1")
        if args.latency_tolerance <= 0 or args.loss_tolerance < 0:
            raise UsageError("--latency-tolerance must be above 0 and --loss-tolerance at least 0")
        only = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
        try:
            findings, notes = gate(_load(args.baseline), _load(args.result), args.tolerance,
                                   args.latency_tolerance, args.loss_tolerance, only)
        except ValueError as exc:
            raise UsageError(f"--backends: {exc}") from None
        for f in findings:
            print(f.line())
        for n in notes:
            print(f"note {n}")
        failed = [f for f in findings if f.failed]
        if not findings:
            raise Failure("nothing to compare: the baseline has no backend it can judge")
        if failed:
            print(f"gate: FAIL: {len(failed)} problem(s): " + "; ".join(f.summary() for f in failed),
                  file=sys.stderr)
            return 1
        print(f"gate: ok ({len(findings)} checks, tolerance {args.tolerance:.0%} throughput, "
              f"{args.latency_tolerance:.0%} latency, {args.loss_tolerance:g} pp ping loss"
              + (f"; {len(notes)} note(s) above" if notes else "") + ")")
        return 0


class BaselineCommand(Command):
    def add_arguments(self, p):
        p.add_argument("results", nargs="+", help="results.json of consecutive runs of the same plan (the committed baseline merges 3)")
        p.add_argument("--out", required=True, help="the baseline to write (e.g. bench/baselines/quick.json)")

    def run(self, args) -> int:
        from .gate import BaselineError, merge_baseline
        try:
            base = merge_baseline([_load(path) for path in args.results])
        except BaselineError as exc:
            raise Failure(str(exc)) from None
        with open(args.out, "w") as f:
            json.dump(base, f, indent=1)
            f.write("\n")
        for name, b in base["backends"].items():
            spread = b.get("baseline_spread")
            if not spread:  # never measured in these runs: the gate will note it cannot judge it
                print(f"bench baseline: {name}: {b.get('status')} in every run ({b.get('reason', '')}): "
                      "the baseline cannot judge it", file=sys.stderr)
                continue
            ratio = b.get("ratio_to_bare")
            print(f"{name:16} ratio_to_bare {'–' if ratio is None else f'{ratio:.3f}'}  "
                  f"runs {spread['ratio_to_bare']}  ping loss % {spread['ping_loss_pct']}"
                  + (f"  (ok in {b['baseline_runs']} of {len(args.results)} runs)"
                     if b["baseline_runs"] < len(args.results) else ""))
        print(f"wrote {args.out} ({base['baseline']['method']})")
        return 0


class MicroCommand(Command):
    """pytest-benchmark micro-benchmarks, compared as ratios to a calibration workload."""

    def add_arguments(self, p):
        p.add_argument("--json", default="", help="write pytest-benchmark's JSON here")
        p.add_argument("--baseline", default="", help="a previous --json to compare against")
        p.add_argument("--tolerance", type=float, default=1.0,
                       help="allowed relative rise of a benchmark's time/calibration ratio (default 1.0 = 2x)")
        p.add_argument("-k", dest="select", default="", help="only benchmarks matching this pytest -k")

    def run(self, args) -> int:
        import subprocess
        import tempfile
        from .micro import compare_micro
        out = args.json or os.path.join(tempfile.mkdtemp(prefix="weft-micro-"), "micro.json")
        argv = [sys.executable, "-m", "pytest", os.path.join(REPO, "benchmarks"), "-q", "-p", "no:cacheprovider",
                f"--benchmark-json={out}", "--benchmark-columns=min,median,iqr,ops,rounds"]
        if args.select:
            argv += ["-k", args.select]
        r = subprocess.run(argv, cwd=REPO)
        if r.returncode != 0:
            raise Failure(f"micro-benchmarks failed (pytest exit {r.returncode})")
        with open(out) as f:
            cur = json.load(f)
        for b in cur.get("benchmarks", []):
            b["stats"].pop("data", None)  # every round's timing: megabytes nobody compares
        with open(out, "w") as f:
            json.dump(cur, f, indent=1)
        if not args.baseline:
            print(f"wrote {out}")
            return 0
        with open(args.baseline) as f:
            base = json.load(f)
        # With -k only the benchmarks it selects are expected; a baselined one that no longer
        # exists at all is expected too (and fails: it did not run).
        selected = None
        if args.select:
            every = _collected(None)
            selected = _collected(args.select) | {b["name"] for b in base.get("benchmarks", [])
                                                  if b["name"] not in every}
        try:
            lines, failed = compare_micro(base, cur, args.tolerance, selected=selected)
        except ValueError as exc:  # no calibration benchmark: nothing to divide by
            raise Failure(str(exc)) from None
        print("\n".join(lines))
        if failed:
            print(f"micro: FAIL: {', '.join(failed)}", file=sys.stderr)
            return 1
        print(f"micro: ok (tolerance {args.tolerance:.0%} on time/calibration)")
        return 0


def _collected(select: str | None) -> set[str]:
    """The benchmark names pytest collects in benchmarks/ (with ``-k select``)."""
    import subprocess
    argv = [sys.executable, "-m", "pytest", os.path.join(REPO, "benchmarks"), "-q", "-p", "no:cacheprovider",
            "--collect-only"] + (["-k", select] if select else [])
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if r.returncode not in (0, 5):  # 5: nothing selected
        raise Failure(f"micro-benchmarks: pytest --collect-only exit {r.returncode}")
    return {line.split("::", 1)[1] for line in r.stdout.splitlines() if "::" in line}
