"""Engine workers by default, and flows spread over them on both ends (fastpath/engine/spread.py).

- ``WEFT_ENGINE_WORKERS``: unset or ``auto`` is one worker per CPU the daemon may run on; a bad
  value is one line naming the variable.
- The send sockets: worker i's on an ephemeral port that is i modulo the worker count.
- The receiving SO_REUSEPORT group with its classic BPF program: a datagram from source port p goes
  to socket p % workers, IPv4 and IPv6, real datagrams in a namespace made for the module.
- The compiled engine sends worker i's batch from worker i's send socket (the source port a peer
  sees), and still receives on the group.
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess

import pytest

from controlplane.backends.base import BackendError
from fastpath.engine.spread import bind_senders, attach_spread
from fastpath.userspace import MAX_AUTO_WORKERS, engine_workers
from tests.conftest import needs_root

IP, IP6 = "198.18.0.1", "2001:db8:198:18::1"


def test_workers_default_to_the_cpus_the_daemon_may_use():
    cpus = len(os.sched_getaffinity(0))
    assert engine_workers("") == engine_workers("auto") == min(cpus, MAX_AUTO_WORKERS)
    assert engine_workers(" 3 ") == 3


def test_workers_follow_the_affinity_of_a_pinned_node():
    """A lab node pinned to one CPU (taskset, as bench does): one worker, in a child so the test
    process keeps its own affinity."""
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " \
           "from fastpath.userspace import engine_workers; print(engine_workers(''))"
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


@pytest.mark.parametrize("value", ["0", "-1", "65", "two", "1.5"])
def test_bad_workers_value_is_one_line(value):
    with pytest.raises(BackendError) as exc:
        engine_workers(value)
    msg = str(exc.value)
    assert "WEFT_ENGINE_WORKERS" in msg and repr(value) in msg and "\n" not in msg


@pytest.fixture(scope="module")
def ns():
    name = f"wfsp{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", f"{IP}/32", "dev", "lo"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", f"{IP6}/128", "dev", "lo", "nodad"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def _in(ns: str, fn):
    from tests.test_engine import in_netns
    return in_netns(ns, fn)


@needs_root
@pytest.mark.parametrize("family,addr", [(socket.AF_INET, IP), (socket.AF_INET6, IP6)], ids=["v4", "v6"])
def test_the_group_takes_a_datagram_by_its_source_port(ns, family, addr):
    workers = 3

    def run():
        group = []
        for _ in range(workers):
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((addr, 0 if not group else group[0].getsockname()[1]))
            s.setblocking(False)
            group.append(s)
        attach_spread(group[0], workers)
        port = group[0].getsockname()[1]
        senders = bind_senders(family, addr, workers)
        try:
            assert [s.getsockname()[1] % workers for s in senders] == list(range(workers))
            for i, s in enumerate(senders):
                for k in range(20):
                    s.sendto(b"%d %d" % (i, k), (addr, port))
            got = []
            for s in group:
                seen = set()
                while True:
                    try:
                        seen.add(int(s.recv(100).split()[0]))
                    except BlockingIOError:
                        break
                got.append(seen)
            return got
        finally:
            for s in senders + group:
                s.close()

    # socket i took exactly sender i's datagrams (without the program: the 4-tuple hash)
    assert _in(ns, run) == [{0}, {1}, {2}]


@needs_root
def test_the_compiled_engine_sends_each_workers_batch_from_its_own_socket(ns):
    engine_mod = pytest.importorskip("fastpath.engine._engine")
    workers = 2

    def run():
        tuns = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(workers)]
        group = []
        for _ in range(workers):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((IP, 8285))
            group.append(s)
        senders = bind_senders(socket.AF_INET, IP, workers)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind((IP, 0))
        peer.settimeout(2)
        engine = engine_mod.Engine([b.fileno() for _, b in tuns], [s.fileno() for s in group],
                                   mode="udp", network="10.244.0.0/16", subnet_len=24,
                                   local_subnet="10.244.1.0/24", port=peer.getsockname()[1],
                                   vnet_hdr=False, send_fd=[s.fileno() for s in senders])
        try:
            engine.set_route("10.244.2.0/24", IP, None)
            engine.start()
            from scapy.all import IP as IPh, UDP, Raw, raw
            sources = []
            for i, (test_end, _) in enumerate(tuns):
                test_end.send(raw(IPh(src="10.244.1.5", dst="10.244.2.5") / UDP(sport=1000 + i, dport=9)
                                  / Raw(b"x" * 100)))
                data, (_, sport) = peer.recvfrom(2000)
                sources.append(sport)
            return sources, [s.getsockname()[1] for s in senders]
        finally:
            engine.close()
            for a, b in tuns:
                a.close()
                b.close()
            for s in group + senders + [peer]:
                s.close()

    sources, ports = _in(ns, run)
    assert sources == ports  # worker i's packet left from worker i's port, not the group's 8285


def test_send_fd_needs_one_socket_per_worker():
    engine_mod = pytest.importorskip("fastpath.engine._engine")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(ValueError, match="send_fd: one UDP socket per TUN queue"):
            engine_mod.Engine([a.fileno(), c.fileno()], [u.fileno()], mode="udp", network="10.244.0.0/16",
                              subnet_len=24, local_subnet="10.244.1.0/24", port=8285, vnet_hdr=False,
                              send_fd=[u.fileno()])
    finally:
        for s in (a, b, c, d, u):
            s.close()
