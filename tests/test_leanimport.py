"""weftd loads the part of pyroute2 it uses, not the whole library (issue 14: its memory), and
code in the same process that wants the whole library still gets it."""
from __future__ import annotations

import subprocess
import sys

from .daemons import REPO

CHECK = """
import importlib.metadata, sys
import controlplane.daemon  # installs the lean pyroute2 before anything imports it
from pyroute2 import IPRoute
lean = sorted(m for m in sys.modules if m.startswith("pyroute2"))
with IPRoute() as ipr:
    assert ipr.get_links(), "no links in this namespace"
import pyroute2
print(len(lean), "pyroute2.ndb.main" in lean, IPRoute.__module__,
      pyroute2.NDB.__name__, pyroute2.__version__ == importlib.metadata.version("pyroute2"))
"""


def test_weftd_imports_only_what_it_uses_of_pyroute2():
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    count, ndb, where, ndb_name, version_ok = r.stdout.split()
    assert ndb == "False" and int(count) < 120, r.stdout  # the whole library is 163 modules
    assert where == "pyroute2.iproute.linux"
    assert (ndb_name, version_ok) == ("NDB", "True")  # the rest loads when asked for


def test_nothing_changes_when_pyroute2_came_first():
    code = ("import pyroute2, sys; from controlplane import leanimport;"
            " print(leanimport.install(), 'pyroute2.ndb.main' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.stdout.split() == ["False", "True"], r
