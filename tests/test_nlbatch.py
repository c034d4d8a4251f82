"""fastpath.nlbatch: the per-peer entry writer, against the real kernel in a namespace of ours.
The entries must be exactly what the kernel backends wrote through pyroute2 before (the same
flags, protocol and state), every failure named with its request, a delete of what is gone fine."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from .conftest import needs_root
from .nsagent import ipj


def _run(ns: str, code: str) -> str:
    """Run python ``code`` inside ``ns`` (the writer's socket must live in that namespace)."""
    res = subprocess.run(["ip", "netns", "exec", ns, os.path.realpath(os.sys.executable), "-c", code],
                         capture_output=True, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture
def ns():
    name = f"wnb{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                    ["link", "set", "eth0", "up"], ["link", "set", "eth1", "up"],
                    ["addr", "add", "198.18.0.1/15", "dev", "eth0"],
                    ["addr", "add", "2001:db8:198:18::1/64", "dev", "eth0", "nodad"],
                    ["link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", "198.18.0.1",
                     "dstport", "8472", "nolearning", "dev", "eth0"],
                    ["link", "set", "flannel.1", "up"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


WRITE = """
from fastpath.nlbatch import Batch, NetlinkBatchError
import socket
idx = socket.if_nametoindex("flannel.1"); eth0 = socket.if_nametoindex("eth0")
b = Batch()
b.neigh(True, idx, "10.244.2.0", "0e:00:00:00:00:02")
b.fdb(True, idx, "0e:00:00:00:00:02", "198.18.0.2")
b.route(True, "10.244.2.0/24", "10.244.2.0", idx, onlink=True)
b.route(True, "fd10:244:0:2::/64", "2001:db8:198:18::2", eth0)
b.commit()
"""


@needs_root
def test_entries_are_the_ones_the_backends_write(ns):
    _run(ns, WRITE)
    [route] = ipj(ns, "-d", "route", "show", "10.244.2.0/24")
    assert (route["gateway"], route["dev"], route["protocol"], route["flags"]) == \
        ("10.244.2.0", "flannel.1", "static", ["onlink"])
    [neigh] = ipj(ns, "neigh", "show", "10.244.2.0", "dev", "flannel.1")
    assert (neigh["lladdr"], neigh["state"]) == ("0e:00:00:00:00:02", ["PERMANENT"])
    fdb = subprocess.run(["bridge", "-n", ns, "-j", "fdb", "show", "dev", "flannel.1"],
                         capture_output=True, text=True, check=True).stdout
    assert '"mac":"0e:00:00:00:00:02","dst":"198.18.0.2"' in fdb and '"state":"permanent"' in fdb
    [route6] = ipj(ns, "-6", "route", "show", "fd10:244:0:2::/64")
    assert (route6["gateway"], route6["dev"]) == ("2001:db8:198:18::2", "eth0")


@needs_root
def test_a_failure_is_named_the_rest_of_the_batch_still_applies_and_gone_is_fine(ns):
    out = _run(ns, WRITE + """
b.route(True, "10.244.3.0/24", "10.244.3.0", 99999, onlink=True)   # no such device
b.route(True, "10.244.4.0/24", "10.244.4.0", idx, onlink=True)
try:
    b.commit()
except NetlinkBatchError as exc:
    print("error:", exc.errno, exc)
b.route(False, "10.244.9.0/24", "10.244.9.0", idx)   # never there: fine
b.neigh(False, idx, "10.244.9.0")
b.fdb(False, idx, "0e:00:00:00:00:09", "198.18.0.9")
b.commit()
for put in (False,):
    b.route(put, "10.244.2.0/24", "10.244.2.0", idx); b.fdb(put, idx, "0e:00:00:00:00:02", "198.18.0.2")
    b.neigh(put, idx, "10.244.2.0")
b.commit()
print("done")
""")
    assert "error: 19 route 10.244.3.0/24 via 10.244.3.0: No such device" in out and "done" in out
    assert [r["dst"] for r in ipj(ns, "route", "show", "dev", "flannel.1")] == ["10.244.4.0/24"]
    assert ipj(ns, "neigh", "show", "dev", "flannel.1") == []
