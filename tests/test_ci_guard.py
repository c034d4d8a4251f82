"""The CI switch cannot be passed by a test that did not run: with WEFT_REQUIRE_ALL=1 every skip
fails the run, whether it happens while a test runs (skipif, pytest.skip in a test or a fixture)
or while a module is collected (a module-level ``pytest.importorskip`` or
``pytest.skip(allow_module_level=True)``: no test report is ever made for those).

Each case writes a throwaway test module next to one passing test in a temp dir and runs pytest
on it in a subprocess, with this repo's tests/conftest.py loaded as a plugin (``-p tests.conftest``):
without the variable the run passes (the skip is a skip), with it the run fails and says why.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from .daemons import REPO

MISSING = "weft_no_such_module_for_the_ci_guard"

COLLECTION_SKIPS = {
    "importorskip": f"""
        import pytest
        pytest.importorskip("{MISSING}")

        def test_never_collected():
            pass
    """,
    "module-level-skip": """
        import pytest
        pytest.skip("weft-guard: module skipped while collected", allow_module_level=True)

        def test_never_collected():
            pass
    """,
    "unittest-skiptest": """
        import unittest
        raise unittest.SkipTest("weft-guard: unittest.SkipTest while collected")
    """,
    "importorskip-in-class": f"""
        import pytest

        class TestGroup:
            dep = pytest.importorskip("{MISSING}")

            def test_never_collected(self):
                pass
    """,
}

RUN_SKIPS = {
    "skipif-marker": """
        import pytest

        @pytest.mark.skipif(True, reason="weft-guard: skipif marker")
        def test_marked():
            pass
    """,
    "skip-in-test": """
        import pytest

        def test_skips():
            pytest.skip("weft-guard: skipped inside the test")
    """,
    "skip-in-fixture": """
        import pytest

        @pytest.fixture
        def needs_something():
            pytest.skip("weft-guard: skipped by a fixture")

        def test_uses(needs_something):
            pass
    """,
}

REASONS = {
    "importorskip": MISSING, "importorskip-in-class": MISSING,
    "module-level-skip": "module skipped while collected",
    "unittest-skiptest": "unittest.SkipTest while collected",
    "skipif-marker": "skipif marker", "skip-in-test": "skipped inside the test",
    "skip-in-fixture": "skipped by a fixture",
}

PASSING = """
    def test_passes():
        assert 1 + 1 == 2
"""


def run_pytest(directory, require_all: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WEFT_REQUIRE_ALL"}
    env["PYTHONPATH"] = REPO
    if require_all:
        env["WEFT_REQUIRE_ALL"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "-q", "-rA", str(directory)],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=60)


def write_case(tmp_path, source: str):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this dir is the rootdir: no repo config
    (tmp_path / "test_guard_case.py").write_text(textwrap.dedent(source))
    (tmp_path / "test_guard_passing.py").write_text(textwrap.dedent(PASSING))
    return tmp_path


@pytest.mark.parametrize("case", sorted(COLLECTION_SKIPS) + sorted(RUN_SKIPS))
def test_a_skip_fails_the_run_only_under_require_all(tmp_path, case):
    directory = write_case(tmp_path, {**COLLECTION_SKIPS, **RUN_SKIPS}[case])
    # without the variable a skip is a skip and the run passes
    plain = run_pytest(directory, require_all=False)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "1 passed, 1 skipped" in plain.stdout, plain.stdout
    # with it the same run fails (so .ci/run exits non-zero), naming the switch and the reason
    ci = run_pytest(directory, require_all=True)
    assert ci.returncode not in (0, 5), (ci.returncode, ci.stdout + ci.stderr)
    assert "skipped in CI (WEFT_REQUIRE_ALL=1)" in ci.stdout, ci.stdout
    assert REASONS[case] in ci.stdout, ci.stdout
    assert "skipped" not in ci.stdout.splitlines()[-1], ci.stdout  # the summary line counts no skip


def test_require_all_passes_a_run_that_skips_nothing(tmp_path):
    directory = write_case(tmp_path, PASSING.replace("test_passes", "test_passes_too"))
    ci = run_pytest(directory, require_all=True)
    assert ci.returncode == 0, ci.stdout + ci.stderr
    assert "2 passed" in ci.stdout.splitlines()[-1], ci.stdout
