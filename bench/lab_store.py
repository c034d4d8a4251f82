"""The lab's store, with the network config in it before any weftd starts: a SQLite file in the
lab directory (or on a tmpfs the lab mounts), or an etcd (one member or a cluster of three, with
or without TLS) in its own namespace ``<prefix>st``. Everything is recorded in the run's ledger.

Each builder returns the store's description (``Lab.store``, kept in the state document).
"""
from __future__ import annotations

import atexit
import os

from .errors import LabError
from .ledger import Ledger
from .lab_topology import run
from .lab_weftd import venv_python
from .procs import proc_start_time
from .scenario import Scenario

ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380


def store_flags(scenario: Scenario, store: dict) -> list[str]:
    """The flags weftd and weftctl take for this store, -etcd-prefix included."""
    if scenario.store == "sqlite":
        return ["--store", store["url"], "-etcd-prefix", scenario.prefix]
    flags = ["-etcd-endpoints", store["endpoint"], "-etcd-prefix", scenario.prefix]
    pki = store.get("pki")
    if pki:
        flags += ["-etcd-cafile", pki["ca"], "-etcd-certfile", pki["cert"], "-etcd-keyfile", pki["key"]]
    return flags


def build_sqlite(scenario: Scenario, lab_dir: str, ledger: Ledger, lab_id: str) -> dict:
    """A SQLite store file, the network config put there with weftctl (as an operator would)."""
    s = scenario
    where = lab_dir
    if s.store_tmpfs_mib:   # a disk that can be filled (bench faults' disk-full)
        from .tmpfs import mount_tmpfs
        where = mount_tmpfs(ledger, os.path.join(lab_dir, "store-fs"), s.store_tmpfs_mib,
                            f"weft-lab-{lab_id}-store")
    db = ledger.add_file(os.path.join(where, "store.db"))
    url = f"sqlite://{db}"
    cfg = ledger.add_file(os.path.join(lab_dir, "network-config.json"))
    with open(cfg, "w") as f:
        f.write(s.config_text)
    run([venv_python(), "-m", "controlplane.ctl", "--store", url, "--etcd-prefix", s.prefix,
         "config", "put", cfg], timeout=30)
    return {"kind": "sqlite", "url": url, "path": db, "prefix": s.prefix}


def etcd_members(scenario: Scenario, lab_dir: str, ledger: Ledger, namespace: str, prefix: str) -> list:
    """The EtcdServer members (made, not started) for ``namespace``: one, or a cluster of three,
    member i on ports 2379/2380 + 10000 * i; with TLS, a PKI made for the run."""
    from .etcdserver import EtcdServer
    s = scenario
    pki = None
    if s.etcd_tls:
        from .pki import make_pki
        pki = make_pki(ledger.add_file(os.path.join(lab_dir, "pki")), [str(s.store_ip)])
    members = [EtcdServer(tls=s.etcd_tls, pki=pki, netns=namespace, client_host=str(s.store_ip),
                          client_port=ETCD_CLIENT_PORT + 10000 * i, peer_port=ETCD_PEER_PORT + 10000 * i,
                          name=f"{prefix}etcd" + (f"{i}" if i else ""), start=False,
                          wait_healthy=s.etcd_members == 1)
               for i in range(s.etcd_members)]
    if s.etcd_members > 1:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in members)
        for m in members:
            m.initial_cluster, m.cluster_token = cluster, f"{prefix}etcd-cluster"
    return members


def start_etcd(scenario: Scenario, members: list, ledger: Ledger) -> dict:
    """Start every member, wait until all are healthy, put the network config; returns the
    store's description (the first member's PID and data directory)."""
    from .etcdserver import EtcdServerError
    s = scenario
    etcd = members[0]
    # etcd keeps its data in a temp dir of its own: recorded as soon as it exists; its process
    # runs in <prefix>st, so even a crash before it is recorded leaves nothing down() misses.
    try:
        for m in members:
            try:
                m.start()
                atexit.unregister(m.stop)  # the lab outlives `bench up`; down() stops it (ledger)
            finally:
                if m.tmpdir:
                    ledger.add("file", path=m.tmpdir)
                if m.pid:
                    ledger.add("process", pid=m.pid, start=proc_start_time(m.pid), role="etcd", ns=m.netns)
        for m in members:
            m._wait_healthy()
        etcd.etcdctl("put", f"{s.prefix}/config", s.config_text)
    except EtcdServerError as exc:
        raise LabError(f"etcd in {etcd.netns}: {exc}".replace("\n", " | ")) from None
    pki = etcd.pki
    return {"kind": "etcd", "namespace": etcd.netns, "endpoint": ",".join(m.endpoint for m in members),
            "prefix": s.prefix, "pid": etcd.pid, "data": etcd.tmpdir,
            "pki": ({"ca": pki["ca"], "cert": pki["client"], "key": pki["client_key"]} if pki else None)}
