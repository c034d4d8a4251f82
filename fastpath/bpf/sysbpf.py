"""The few bpf(2) commands weft needs without bcc: run a program on a packet, find a loaded
program's maps, read a map. Used by ``weftctl peermap`` (which must work from any process in the
node's network namespace, with no compile and no bpffs pin) and by the tests.
"""
from __future__ import annotations

import ctypes
import os
import platform

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    rc = _libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return rc


def _ptr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


class _TestRun(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


def test_run(prog_fd: int, packet: bytes, ctx: bytes | None = None, repeat: int = 1) -> tuple[int, bytes, int]:
    """BPF_PROG_TEST_RUN: (return code, packet as the program left it, ns per run)."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    attr = _TestRun(prog_fd=prog_fd, data_size_in=len(packet), data_size_out=len(data_out),
                    data_in=_ptr(data_in), data_out=_ptr(data_out), repeat=repeat)
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(ctx, len(ctx))
        attr.ctx_in, attr.ctx_size_in = _ptr(ctx_in), len(ctx)
    _bpf(BPF_PROG_TEST_RUN, attr)
    return attr.retval, data_out.raw[:attr.data_size_out], attr.duration


class _ById(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _Info(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class ProgInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * 16)]


class MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16)]


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _ById(id=prog_id))


def map_fd_by_id(map_id: int) -> int:
    return _bpf(BPF_MAP_GET_FD_BY_ID, _ById(id=map_id))


def prog_info(fd: int) -> tuple[ProgInfo, list[int]]:
    info = ProgInfo()
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _Info(fd, ctypes.sizeof(info), ctypes.addressof(info)))
    n = info.nr_map_ids
    ids = (ctypes.c_uint32 * max(n, 1))()
    info2 = ProgInfo(nr_map_ids=n, map_ids=ctypes.addressof(ids))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _Info(fd, ctypes.sizeof(info2), ctypes.addressof(info2)))
    return info2, list(ids[:min(n, info2.nr_map_ids)])


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _Info(fd, ctypes.sizeof(info), ctypes.addressof(info)))
    return info


class _Elem(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


PERCPU_MAP_TYPES = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH


def possible_cpus() -> int:
    """How many values a per-CPU map lookup returns (the kernel's possible CPUs)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def map_items(fd: int, key_size: int, value_size: int, limit: int = 1 << 20,
              percpu: bool = False) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a map, via GET_NEXT_KEY from no key (LPM tries accept that).
    For a per-CPU map, ``value`` is the CPUs' values, each padded to 8 bytes, one after another."""
    if percpu:
        value_size = (value_size + 7) // 8 * 8 * possible_cpus()
    out = []
    key = None
    nxt = ctypes.create_string_buffer(key_size)
    val = ctypes.create_string_buffer(value_size)
    while len(out) < limit:
        attr = _Elem(map_fd=fd, key=_ptr(key), value=_ptr(nxt))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except OSError as exc:
            if exc.errno == 2:  # ENOENT: no more keys
                break
            raise
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, _Elem(map_fd=fd, key=_ptr(nxt), value=_ptr(val)))
        except OSError as exc:
            if exc.errno != 2:  # deleted meanwhile
                raise
        else:
            out.append((nxt.raw, val.raw))
        key = ctypes.create_string_buffer(nxt.raw, key_size)
    return out


def maps_of_prog(prog_id: int) -> dict[str, tuple[int, MapInfo]]:
    """name -> (fd, info) for every map a loaded program uses. The caller closes the fds."""
    pfd = prog_fd_by_id(prog_id)
    try:
        _, ids = prog_info(pfd)
    finally:
        os.close(pfd)
    out = {}
    for mid in ids:
        fd = map_fd_by_id(mid)
        info = map_info(fd)
        out[info.name.decode()] = (fd, info)
    return out


def map_update(fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, _Elem(map_fd=fd, key=_ptr(k), value=_ptr(v)))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, _Elem(map_fd=fd, key=_ptr(k), value=_ptr(v)))
    except OSError as exc:
        if exc.errno == 2:
            return None
        raise
    return v.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete one key; False when it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _Elem(map_fd=fd, key=_ptr(k)))
    except OSError as exc:
        if exc.errno == 2:
            return False
        raise
    return True
