"""Shared test switches: tests that need root or bcc skip with a reason elsewhere, and run in CI."""
from __future__ import annotations

import os
import shutil

import pytest


def _have_bcc() -> bool:
    try:
        import bcc  # noqa: F401
    except Exception:
        return False
    return True


IS_ROOT = os.geteuid() == 0
HAVE_BCC = _have_bcc()
HAVE_ETCD = shutil.which("etcd") is not None and shutil.which("etcdctl") is not None

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (network namespaces)")
needs_bcc = pytest.mark.skipif(not HAVE_BCC, reason="needs bcc (Debian python3-bpfcc) and kernel headers")
needs_etcd = pytest.mark.skipif(not HAVE_ETCD, reason="needs etcd and etcdctl (Debian etcd-server, etcd-client)")


REQUIRE_ALL = os.environ.get("WEFT_REQUIRE_ALL") == "1"


def _required(report, reason: str) -> None:
    report.outcome = "failed"
    report.longrepr = f"skipped in CI (WEFT_REQUIRE_ALL=1), which must run everything: {reason}"


def _skip_reason(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (WEFT_REQUIRE_ALL=1) a skipped test is a failure: the bootstrap must provide root,
    bcc, etcd and the rest, and a skip would hide that it did not."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        _required(report, _skip_reason(report))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a skip while collecting (a module-level ``pytest.importorskip`` or
    ``pytest.skip(allow_module_level=True)``): it skips a whole module before any test report
    exists, so only its collect report can fail the run (pytest then stops with a collection
    error, exit status 2)."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped:
        _required(report, f"{collector.nodeid}: {_skip_reason(report)}")
