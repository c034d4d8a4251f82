"""The ledger: every resource a lab run creates, recorded *before* it is created, and the teardown
that removes exactly those (see bench.lab for the whole story).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import threading
import time

from .errors import LabError, LabNotFound
from .netns import NETNS_DIR, netns_inode, pids_in_netns
from .procs import alive, stop_processes

LAB_ROOT = "/run/weft-lab"
LEDGER = "ledger.json"
STATE = "state.json"


def _write_json(path: str, obj) -> None:
    """Atomic, durable: a reader (or a crash) sees the old file or the new one, never half."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Ledger:
    """Resources a run created, saved before each is created. Entries are plain dicts:

    ``{"kind": "dir", "path", "created"}`` (created False: an empty --dir we adopted, whose
    contents go but which stays), ``{"kind": "link", "path"}``, ``{"kind": "file", "path"}``,
    ``{"kind": "netns", "name", "inode"}``, ``{"kind": "process", "pid", "start", "role", "ns"}``,
    ``{"kind": "mount", "path", "source"}`` (bench.tmpfs), ``{"kind": "cni", "netns",
    "container_id", "ifname", "host_netns", "conflist", "cni_path", "result"}`` (bench.lab_cni).
    """

    def __init__(self, path: str, header: dict, entries: list[dict] | None = None):
        self.path = path
        self.header = header
        self.entries: list[dict] = entries or []
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str) -> "Ledger":
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            raise LabError(f"{path}: no ledger (not a lab directory, or already torn down)") from None
        except (OSError, ValueError) as exc:
            raise LabError(f"{path}: unreadable ledger ({exc})") from None
        entries = doc.pop("entries", [])
        return cls(path, doc, entries)

    def save(self) -> None:
        if os.path.isdir(os.path.dirname(self.path)):
            _write_json(self.path, {**self.header, "entries": self.entries})

    def add(self, kind: str, **fields) -> dict:
        with self._lock:
            entry = {"kind": kind, **fields}
            self.entries.append(entry)
            self.save()
            return entry

    def update(self, entry: dict, **fields) -> None:
        with self._lock:
            entry.update(fields)
            self.save()

    def add_file(self, path: str) -> str:
        """Record a file (or a directory) the run is about to create; returns ``path``."""
        self.add("file", path=path)
        return path

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.entries if e["kind"] == kind]


def claim(root: str, requested_dir: str | None, scenario_path: str) -> tuple[str, str, Ledger]:
    """Pick a free lab id and claim it atomically (mkdir, or a symlink to ``requested_dir``, under
    ``root``), then start the run's ledger in its directory. Returns (id, directory, ledger)."""
    os.makedirs(root, exist_ok=True)
    existing = set(os.listdir(NETNS_DIR)) if os.path.isdir(NETNS_DIR) else set()
    for _ in range(64):
        lab_id = "w" + secrets.token_hex(2)
        if any(name.startswith(lab_id + "-") for name in existing):
            continue
        entry = os.path.join(root, lab_id)
        try:
            if requested_dir:
                os.symlink(requested_dir, entry)
            else:
                os.mkdir(entry, 0o755)
        except FileExistsError:
            continue
        break
    else:
        raise LabError(f"no free lab id under {root}")
    header = {"version": 1, "id": lab_id, "prefix": lab_id + "-", "created": time.time(),
              "owner_pid": os.getpid(), "scenario": scenario_path}
    if not requested_dir:
        ledger = Ledger(os.path.join(entry, LEDGER), header)
        ledger.add("dir", path=entry, created=True)
        return lab_id, entry, ledger
    created = not os.path.exists(requested_dir)
    if not created and (not os.path.isdir(requested_dir) or os.listdir(requested_dir)):
        os.unlink(entry)
        raise LabError(f"--dir {requested_dir}: exists and is not an empty directory")
    if created:
        os.makedirs(requested_dir, 0o755)
    ledger = Ledger(os.path.join(requested_dir, LEDGER), header)
    ledger.add("link", path=entry)
    ledger.add("dir", path=requested_dir, created=created)
    return lab_id, requested_dir, ledger


def teardown(ledger: Ledger, children: dict[int, subprocess.Popen] | None = None) -> list[str]:
    """Remove exactly what ``ledger`` lists; returns problems (empty when all went)."""
    problems: list[str] = []
    # 1. recorded processes, newest first; each only while its start time still matches
    procs = [(e["pid"], e.get("start")) for e in reversed(ledger.of_kind("process")) if e.get("pid")]
    stop_processes(procs)
    # 2. anything still running inside the run's own namespaces (started with ip netns exec, or
    #    by a daemon and outliving it), until none is left
    namespaces = [e for e in reversed(ledger.of_kind("netns"))]
    problems += _stop_strays(namespaces)
    for proc in (children or {}).values():
        with contextlib.suppress(Exception):
            proc.wait(timeout=0.1)
    # 2b. pods made through CNI: DEL each, as a runtime removes a pod, while the namespaces are
    #     still there (bench.lab_cni). A DEL that cannot run (a crash took a namespace) leaves
    #     nothing behind: the namespaces and the lab directory (the CNI stores) go below.
    if ledger.of_kind("cni"):
        from .lab_cni import release
        release(ledger.of_kind("cni"))
    # 3. namespaces, by exact recorded name (veths and bridges go with them)
    for e in namespaces:
        inode = netns_inode(e["name"])
        if inode is None:
            continue
        if e.get("inode") not in (None, inode):
            problems.append(f"namespace {e['name']} is not the one this run made (inode changed); left alone")
            continue
        res = subprocess.run(["ip", "netns", "delete", e["name"]], capture_output=True, text=True,
                             timeout=15, stdin=subprocess.DEVNULL)
        if res.returncode != 0 and netns_inode(e["name"]) is not None:
            problems.append(f"ip netns delete {e['name']}: {res.stderr.strip()}")
    # 3b. mounts the run made (a store's tmpfs), before the files under them go
    if ledger.of_kind("mount"):
        from .tmpfs import unmount_recorded
        problems += unmount_recorded(ledger.of_kind("mount"))
    # 4. files and links, then directories
    for e in reversed(ledger.entries):
        if e["kind"] in ("file", "link"):
            with contextlib.suppress(FileNotFoundError):
                if e["kind"] == "file" and os.path.isdir(e["path"]) and not os.path.islink(e["path"]):
                    shutil.rmtree(e["path"])
                else:
                    os.unlink(e["path"])
    for e in reversed(ledger.of_kind("dir")):
        path = e["path"]
        if not os.path.isdir(path):
            continue
        if e.get("created", True):
            shutil.rmtree(path, ignore_errors=True)
        else:  # adopted while empty: everything in it is the run's
            for name in os.listdir(path):
                p = os.path.join(path, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)
        if os.path.exists(path) and e.get("created", True):
            problems.append(f"{path}: could not be removed")
    return problems


STRAY_ROUNDS = 5  # scans of the namespaces: a process may start another while it stops


def _strays(namespaces: list[dict]) -> list[tuple[int, int | None, str]]:
    """(pid, start time, namespace) of every process in one of the run's namespaces, as
    ``ip netns pids`` finds them: by the namespace's inode (the one recorded), never by name."""
    out = []
    for e in namespaces:
        inode = netns_inode(e["name"])
        if inode is not None and e.get("inode") in (None, inode):
            out += [(pid, start, e["name"]) for pid, start in pids_in_netns(inode)
                    if pid != os.getpid() and alive(pid, start)]  # a zombie holds nothing
    return out


def _stop_strays(namespaces: list[dict]) -> list[str]:
    """SIGTERM every process left in the namespaces, SIGKILL after the bound (bench.procs), and
    scan again, up to STRAY_ROUNDS times; a process still there is a problem (its namespace would
    outlive ``ip netns delete``)."""
    for _ in range(STRAY_ROUNDS):
        stray = _strays(namespaces)
        if not stray:
            return []
        stop_processes([(pid, start) for pid, start, _ in stray])
    return [f"namespace {ns}: process {pid} still running after SIGKILL" for pid, _, ns in _strays(namespaces)]


def list_labs(root: str = LAB_ROOT) -> list[dict]:
    """Every lab recorded under ``root``: id, dir, and its state (or why it has none)."""
    out = []
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return out
    for name in names:
        entry = os.path.join(root, name)
        if not (os.path.isdir(entry) or os.path.islink(entry)):
            continue
        directory = os.path.realpath(entry)
        info = {"id": name, "dir": directory, "state": None, "ledger": os.path.exists(os.path.join(directory, LEDGER))}
        try:
            with open(os.path.join(directory, STATE)) as f:
                info["state"] = json.load(f)
        except (OSError, ValueError):
            pass
        out.append(info)
    return out


def resolve_lab(target: str, root: str = LAB_ROOT) -> str:
    """A lab directory from a lab id/prefix (``w1a2b`` or ``w1a2b-``) or a directory path."""
    if os.sep in target or target.startswith("."):
        path = os.path.abspath(target)
        if not os.path.isdir(path):
            raise LabNotFound(f"{target}: no such lab directory")
        return path
    entry = os.path.join(root, target.rstrip("-"))
    if not (os.path.isdir(entry) or os.path.islink(entry)):
        raise LabNotFound(f"{target}: no lab with that prefix under {root} (see: bench inspect)")
    return entry


def down(target: str, root: str = LAB_ROOT) -> list[str]:
    """Tear down the lab at a directory or with an id, from its ledger alone; idempotent."""
    path = resolve_lab(target, root)
    directory = os.path.realpath(path)
    ledger_path = os.path.join(directory, LEDGER)
    if not os.path.exists(ledger_path):
        # a crash between claiming the id and writing the ledger leaves an empty registry
        # directory, or a registry symlink (to a --dir that then stays where it is)
        if os.path.islink(path):
            os.unlink(path)
        elif os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        if os.path.lexists(path):
            raise LabError(f"{path}: has no {LEDGER}; not removing what it cannot account for")
        return []
    return teardown(Ledger.load(ledger_path))
