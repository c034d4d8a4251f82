"""weft's BPF programs (tc, loaded with bcc) and their Python mirrors.

Layout, after Cilium's ``bpf/``:

- one C file per hook, entry named after the direction relative to its device:
  ``to_overlay.c`` (tc egress of flannel.<VNI>), ``from_overlay.c`` (tc ingress of flannel.<VNI>),
  ``from_pods.c`` (tc ingress of the pod bridge, cni0), ``from_underlay.c`` (tc ingress of the
  underlay interface: every datagram to the VXLAN port checked and counted before the kernel),
  ``hostgw_guard.c`` (host-gw's source guard, tc ingress of the underlay interface);
- ``maps.h`` declares every map once, ``types.h`` every key/value struct and the counter indexes,
  ``drop_reasons.h`` the drop reasons; ``common.h`` holds the shared steps.

The structs, counters and drop reasons below mirror the headers; tests/test_bpf_programs.py checks
them (sizes and offsets against what bcc compiled, enum values against the header text).

bcc only rewrites map accesses (``map.lookup(&k)``) in the *main* file of a compile, so the loader
hands it one text in which the local ``#include "..."`` lines are expanded in place. All five
programs share one compile (about 0.3 s) and therefore one set of maps. The compile runs in a
child process (``fastpath.bpf.loader``); ``Programs`` holds only fds and uses bpf(2) via sysbpf.
"""
from __future__ import annotations

import ctypes
import enum
import ipaddress
import json
import os
import re
import socket
import struct

BPF_DIR = os.path.dirname(os.path.abspath(__file__))
PROGRAM_FILES = ("to_overlay.c", "from_pods.c", "from_overlay.c", "from_underlay.c", "hostgw_guard.c",
                 "hostgw.c")
FIX = "install python3-bpfcc and linux-headers-amd64; run ./bootstrap"


class BpfUnavailable(RuntimeError):
    """bcc, kernel headers or the kernel cannot run weft's programs; str() is one line with the fix."""


# -- mirrors of types.h / drop_reasons.h ------------------------------------------------------------

class PeerKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint32)]  # addr: network order


class Peer(ctypes.Structure):
    _fields_ = [("remote_ipv4", ctypes.c_uint32),  # host order
                ("vni", ctypes.c_uint32),
                ("vtep_mac", ctypes.c_uint8 * 6),
                ("flags", ctypes.c_uint16)]


class IP6(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint32 * 4)]  # network order


class Peer6Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]  # addr: network order


class Peer6(ctypes.Structure):
    _fields_ = [("remote_ipv6", ctypes.c_uint8 * 16),  # network order (C: __u32[4])
                ("vni", ctypes.c_uint32),
                ("vtep_mac", ctypes.c_uint8 * 6),
                ("flags", ctypes.c_uint16)]


PEER_LOCAL = 1 << 0


class Endpoint(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32),
                ("mac", ctypes.c_uint8 * 6),
                ("bridge_mac", ctypes.c_uint8 * 6)]


class Config(ctypes.Structure):
    _fields_ = [("vtep_mac", ctypes.c_uint8 * 6),
                ("vxlan_port", ctypes.c_uint16),  # network order
                ("vxlan_ifindex", ctypes.c_uint32),
                ("local_ipv4", ctypes.c_uint32),  # host order
                ("network", ctypes.c_uint32),  # network order
                ("netmask", ctypes.c_uint32),  # network order; all zero: no IPv4 (IPv6-only)
                ("mtu", ctypes.c_uint32),
                ("flags", ctypes.c_uint32),
                ("vni", ctypes.c_uint32),
                ("public_ipv4", ctypes.c_uint32),  # host order
                # IPv6 (dual-stack); netmask6 all zero: no IPv6
                ("vtep_mac6", ctypes.c_uint8 * 6),
                ("mtu6", ctypes.c_uint16),
                ("network6", ctypes.c_uint8 * 16),  # network order (C: __u32[4])
                ("netmask6", ctypes.c_uint8 * 16),
                ("local_ipv6", ctypes.c_uint8 * 16),
                ("public_ipv6", ctypes.c_uint8 * 16),
                ("underlay_ifindex", ctypes.c_uint32)]  # host-gw/ebpf


def ip6_bytes(addr) -> "ctypes.Array":
    """An IPv6 address (or None: ::) as the 16 network-order bytes of a Config/Peer6 field."""
    return (ctypes.c_uint8 * 16)(*(addr.packed if addr is not None else bytes(16)))


CFG_RX_REDIRECT = 1 << 0
CFG_RX_NEIGH = 1 << 1
CFG_TTL_DEC = 1 << 2
CFG_PODS_REDIRECT = 1 << 3
CFG_RX_PEER = 1 << 4
CFG_OUTER_CSUM = 1 << 5
CFG_RX_CHECK = 1 << 6
CFG_POD_PORT = 1 << 7
CFG_DEFAULT = (CFG_RX_REDIRECT | CFG_TTL_DEC | CFG_PODS_REDIRECT | CFG_RX_PEER | CFG_OUTER_CSUM
               | CFG_RX_CHECK | CFG_POD_PORT)


class Counter(enum.IntEnum):
    TX_PACKETS = 0
    TX_BYTES = 1
    RX_PACKETS = 2
    RX_BYTES = 3
    RX_REDIRECT = 4
    RX_STACK = 5
    MAP_MISS = 6
    PODS_REDIRECT = 7
    PODS_STACK = 8
    RX_PEER = 9
    UNDERLAY_PASSED = 10
    HOSTGW_PASSED = 11
    MAX = 12


class DropReason(enum.IntEnum):
    NONE = 0
    SHORT = 1
    NOT_IPV4 = 2
    NOT_OVERLAY = 3
    NO_PEER = 4
    TUNNEL_KEY = 5
    NO_CONFIG = 6
    FRAGMENT = 7
    MALFORMED = 8
    UNKNOWN_PEER = 9
    TRUNCATED = 10
    BAD_VXLAN = 11
    WRONG_VNI = 12
    WRONG_MAC = 13
    INNER_NOT_IPV4 = 14
    ECN = 15
    SPOOFED_SRC = 16
    GSO_BATCH = 17
    HOSTGW_OWN_SUBNET = 18
    HOSTGW_NO_PEER = 19
    HOSTGW_NOT_ROUTED = 20
    HOSTGW_NO_NEIGH = 21
    HOSTGW_SPOOFED = 22
    MAX = 23


# The drop reasons weft_from_underlay uses: with counter UNDERLAY_PASSED they partition every
# datagram to our VXLAN port that arrives on the underlay interface.
UNDERLAY_REASONS = (DropReason.FRAGMENT, DropReason.MALFORMED, DropReason.UNKNOWN_PEER,
                    DropReason.TRUNCATED, DropReason.BAD_VXLAN, DropReason.WRONG_VNI,
                    DropReason.WRONG_MAC, DropReason.INNER_NOT_IPV4, DropReason.ECN,
                    DropReason.SPOOFED_SRC, DropReason.GSO_BATCH)

# The drop reasons weft_hostgw_guard uses: with counter HOSTGW_PASSED they partition every IPv4
# packet with a source in the Network that arrives on the underlay interface (host-gw).
HOSTGW_REASONS = (DropReason.HOSTGW_OWN_SUBNET, DropReason.HOSTGW_NO_PEER, DropReason.HOSTGW_NOT_ROUTED,
                  DropReason.HOSTGW_NO_NEIGH, DropReason.HOSTGW_SPOOFED)


def header_enum(header: str, prefix: str) -> dict[str, int]:
    """``NAME = value`` pairs of a header's enum whose names start with ``prefix`` (for the tests)."""
    with open(os.path.join(BPF_DIR, header)) as f:
        text = f.read()
    return {m.group(1): int(m.group(2)) for m in re.finditer(rf"\b{prefix}(\w+)\s*=\s*(\d+)", text)}


# -- encoding ---------------------------------------------------------------------------------------

def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.replace("-", ":").split(":"))


def mac_text(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


def peer_key(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> PeerKey | Peer6Key:
    """The weft_peers key of an IPv4 subnet, or the weft_peers6 key of an IPv6 one."""
    if subnet.version == 6:
        return Peer6Key(subnet.prefixlen, (ctypes.c_uint8 * 16)(*subnet.network_address.packed))
    return PeerKey(subnet.prefixlen, struct.unpack("=I", subnet.network_address.packed)[0])


def peer_value(public_ip: ipaddress.IPv4Address | ipaddress.IPv6Address, vni: int, mac: str,
               flags: int = 0) -> Peer | Peer6:
    """The weft_peers value (PublicIP), or the weft_peers6 one (PublicIPv6)."""
    if public_ip.version == 6:
        return Peer6(ip6_bytes(public_ip), vni, (ctypes.c_uint8 * 6)(*mac_bytes(mac)), flags)
    return Peer(int(public_ip), vni, (ctypes.c_uint8 * 6)(*mac_bytes(mac)), flags)


def decode_peer(key: bytes, value: bytes) -> dict:
    """A weft_peers or weft_peers6 entry (told apart by the key's size) as a dict."""
    if len(key) >= ctypes.sizeof(Peer6Key):
        k6 = Peer6Key.from_buffer_copy(key[:ctypes.sizeof(Peer6Key)])
        v6 = Peer6.from_buffer_copy(value[:ctypes.sizeof(Peer6)])
        return {"subnet": f"{ipaddress.IPv6Address(bytes(k6.addr))}/{k6.prefixlen}",
                "public_ip": str(ipaddress.IPv6Address(bytes(v6.remote_ipv6))), "vni": v6.vni,
                "vtep_mac": mac_text(v6.vtep_mac), "local": bool(v6.flags & PEER_LOCAL)}
    k = PeerKey.from_buffer_copy(key[:ctypes.sizeof(PeerKey)])
    v = Peer.from_buffer_copy(value[:ctypes.sizeof(Peer)])
    addr = socket.inet_ntoa(struct.pack("=I", k.addr))
    return {"subnet": f"{addr}/{k.prefixlen}", "public_ip": str(ipaddress.IPv4Address(v.remote_ipv4)),
            "vni": v.vni, "vtep_mac": mac_text(v.vtep_mac), "local": bool(v.flags & PEER_LOCAL)}


def peer_sort_key(entry: dict) -> tuple:
    """IPv4 entries first, then IPv6, each by address and length."""
    net = ipaddress.ip_network(entry["subnet"])
    return (net.version, int(net.network_address), net.prefixlen)


# -- building ---------------------------------------------------------------------------------------

def program_text(files=PROGRAM_FILES) -> str:
    """The programs as one C text, local includes expanded once each (their guards allow that)."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        out = []
        with open(os.path.join(BPF_DIR, name)) as f:
            for line in f:
                m = re.match(r'\s*#include\s+"([^"]+)"', line)
                out.append(expand(m.group(1)) if m else line)
        return "".join(out)

    return "".join(expand(f) for f in files)


def check_toolchain(import_bcc: bool = True):
    """The bcc BPF class (None when ``import_bcc`` is false: only check that it can be found,
    without loading libbcc and LLVM into this process); BpfUnavailable, one line naming the fix,
    when bcc or the kernel headers are missing."""
    if import_bcc:
        try:
            from bcc import BPF  # Debian's python3-bpfcc (PyPI's "bcc" is an unrelated package)
        except Exception as exc:  # ImportError, or a broken libbcc
            raise BpfUnavailable(f"vxlan/ebpf needs bcc ({type(exc).__name__}: {exc}): {FIX}") from None
    else:
        import importlib.util
        import sys
        try:
            found = sys.modules.get("bcc", False) is not None and importlib.util.find_spec("bcc") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise BpfUnavailable(f"vxlan/ebpf needs bcc (no module named 'bcc'): {FIX}")
        BPF = None
    release = os.uname().release
    build = f"/lib/modules/{release}/build"
    if not os.path.exists(os.path.join(build, "include")):
        raise BpfUnavailable(f"vxlan/ebpf needs kernel headers at {build} (missing): {FIX}")
    return BPF


ENTRIES = ("weft_to_overlay", "weft_from_pods", "weft_from_overlay", "weft_from_underlay", "weft_hostgw_guard",
           "weft_from_pod_port", "weft_hostgw_from_pods", "weft_hostgw_from_underlay",
           "weft_hostgw_from_pod_port")
MAPS = ("weft_peers", "weft_config", "weft_counters", "weft_drops", "weft_endpoints", "weft_peer_ips",
        "weft_peers6", "weft_peer_ips6", "weft_endpoints6")
LOAD_TIMEOUT = 60.0  # seconds a compile + load may take before the loader is killed


def build_in_process():
    """Compile and load with bcc in this process: (bcc.BPF, {entry: bcc function}).

    The loader child (``python -m fastpath.bpf.loader``) does this for weftd; tests call it to
    compare the layouts bcc compiled with the Python mirrors."""
    BPF = check_toolchain()
    import contextlib
    import io
    err = io.StringIO()
    try:
        # bcc prints compiler diagnostics on stderr itself; keep them for the error line.
        with contextlib.redirect_stderr(err):
            bpf = BPF(text=program_text().encode())
            fns = {name: bpf.load_func(name.encode(), BPF.SCHED_CLS) for name in ENTRIES}
    except Exception as exc:
        first = next((l for l in err.getvalue().splitlines() if "error" in l), "")
        raise BpfUnavailable(f"vxlan/ebpf: compiling or loading the BPF programs failed ({exc}"
                             f"{'; ' + first.strip() if first else ''}): {FIX}") from None
    return bpf, fns


class _Map:
    """A map by fd, read and written with plain bpf(2) calls (fastpath.bpf.sysbpf)."""

    def __init__(self, name: str, fd: int):
        from . import sysbpf
        self.name, self.fd = name, fd
        info = sysbpf.map_info(fd)
        self.key_size, self.value_size, self.type = info.key_size, info.value_size, info.type
        self.percpu = info.type in sysbpf.PERCPU_MAP_TYPES

    def update(self, key: bytes, value: bytes) -> None:
        from . import sysbpf
        sysbpf.map_update(self.fd, key, value)

    def delete(self, key: bytes) -> bool:
        from . import sysbpf
        return sysbpf.map_delete(self.fd, key)

    def lookup(self, key: bytes) -> bytes | None:
        from . import sysbpf
        size = self.value_size
        if self.percpu:
            size = (size + 7) // 8 * 8 * sysbpf.possible_cpus()
        return sysbpf.map_lookup(self.fd, key, size)

    def items(self) -> list[tuple[bytes, bytes]]:
        from . import sysbpf
        return sysbpf.map_items(self.fd, self.key_size, self.value_size, percpu=self.percpu)

    def sum_u64(self, index: int) -> int:
        """A per-CPU u64 array slot, summed over the CPUs."""
        raw = self.lookup(struct.pack("=I", index)) or b""
        return sum(int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8))

    def clear_u64(self, count: int) -> None:
        from . import sysbpf
        zero = bytes((self.value_size + 7) // 8 * 8 * (sysbpf.possible_cpus() if self.percpu else 1))
        for i in range(count):
            self.update(struct.pack("=I", i), zero)


class _Fn:
    def __init__(self, name: str, fd: int):
        self.name, self.fd = name, fd


class Programs:
    """weft's programs, loaded once, and the maps they share; no compiler in this process.

    bcc (and the LLVM it carries, some 120 MB) runs in a short-lived child, ``python -m
    fastpath.bpf.loader``, which compiles, loads and hands the program and map fds back over a
    socketpair (SCM_RIGHTS). The daemon then only holds fds and talks bpf(2): its memory stays
    small, a compiler crash cannot take it down, and the compile is bounded (LOAD_TIMEOUT)."""

    def __init__(self, timeout: float = LOAD_TIMEOUT):
        import socket
        import subprocess
        import sys
        check_toolchain(import_bcc=False)  # fail fast with the one-line fix; bcc stays out of here
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds: list[int] = []
        try:
            env = dict(os.environ)
            root = os.path.dirname(os.path.dirname(BPF_DIR))
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            proc = subprocess.Popen([sys.executable, "-m", "fastpath.bpf.loader", str(child.fileno())],
                                    pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
            child.close()
            parent.settimeout(timeout)
            try:
                msg, fds, _, _ = socket.recv_fds(parent, 65536, len(ENTRIES) + len(MAPS))
            except (socket.timeout, OSError) as exc:
                msg = b""
                why = f"no answer in {timeout:.0f} s" if isinstance(exc, socket.timeout) else str(exc)
            try:
                _, err = proc.communicate(timeout=10 if msg else 1)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if not msg:
                line = (err or b"").decode(errors="replace").strip().splitlines()[-1:] or [why]
                raise BpfUnavailable(line[0] if "vxlan/ebpf" in line[0] else
                                     f"vxlan/ebpf: the BPF loader failed ({line[0]}): {FIX}")
            names = json.loads(msg.decode())
            if len(names) != len(fds):
                raise BpfUnavailable(f"vxlan/ebpf: the BPF loader sent {len(fds)} fds for "
                                     f"{len(names)} objects: {FIX}")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        finally:
            parent.close()
        objs = dict(zip(names, fds))
        self.fns = {name: _Fn(name, objs[name]) for name in ENTRIES}
        self.maps = {name: _Map(name, objs[name]) for name in MAPS}
        self.peers = self.maps["weft_peers"]
        self.config = self.maps["weft_config"]
        self.counters = self.maps["weft_counters"]
        self.drops = self.maps["weft_drops"]
        self.endpoints = self.maps["weft_endpoints"]
        self.peer_ips = self.maps["weft_peer_ips"]
        self.peers6 = self.maps["weft_peers6"]
        self.peer_ips6 = self.maps["weft_peer_ips6"]
        self.endpoints6 = self.maps["weft_endpoints6"]
        # PublicIP (4 network-order bytes) or PublicIPv6 (16) -> subnets it holds
        self._ip_refs: dict[bytes, int] = {}

    def set_config(self, cfg: Config) -> None:
        self.config.update(struct.pack("=I", 0), bytes(cfg))

    def get_config(self) -> Config:
        return Config.from_buffer_copy(self.config.lookup(struct.pack("=I", 0)))

    def put_peer(self, key: PeerKey | Peer6Key, value: Peer | Peer6) -> None:
        """Put a weft_peers (weft_peers6 for a Peer6Key) entry and keep weft_peer_ips (weft_peer_ips6),
        the receive check's peer set, in step."""
        peers = self.peers6 if isinstance(key, Peer6Key) else self.peers
        old = self._peer_ip(peers.lookup(bytes(key)))
        peers.update(bytes(key), bytes(value))
        new = self._peer_ip(bytes(value))
        if old != new:
            self._ip_ref(new, +1)
            self._ip_ref(old, -1)

    def delete_peer(self, key: PeerKey | Peer6Key) -> bool:
        peers = self.peers6 if isinstance(key, Peer6Key) else self.peers
        old = self._peer_ip(peers.lookup(bytes(key)))
        gone = peers.delete(bytes(key))
        if gone:
            self._ip_ref(old, -1)
        return gone

    @staticmethod
    def _peer_ip(raw: bytes | None) -> bytes | None:
        """The PublicIP (4 network-order bytes) of a weft_peers value, or the PublicIPv6 (16) of a
        weft_peers6 one (told apart by size); None for none or our own entry."""
        if raw is None:
            return None
        if len(raw) >= ctypes.sizeof(Peer6):
            v6 = Peer6.from_buffer_copy(raw[:ctypes.sizeof(Peer6)])
            return None if v6.flags & PEER_LOCAL else bytes(v6.remote_ipv6)
        v = Peer.from_buffer_copy(raw[:ctypes.sizeof(Peer)])
        return None if v.flags & PEER_LOCAL else struct.pack("!I", v.remote_ipv4)

    def _ip_ref(self, ip: bytes | None, delta: int) -> None:
        if ip is None:
            return
        n = self._ip_refs.get(ip, 0) + delta
        ips = self.peer_ips6 if len(ip) == 16 else self.peer_ips
        if n > 0:
            self._ip_refs[ip] = n
            ips.update(ip, struct.pack("=I", n))
        else:
            self._ip_refs.pop(ip, None)
            ips.delete(ip)

    def peer_ip_entries(self) -> dict[str, int]:
        """weft_peer_ips and weft_peer_ips6 as {PublicIP(v6): subnets it holds}, read from the maps."""
        out = {socket.inet_ntoa(k[:4]): int.from_bytes(v[:4], "little") for k, v in self.peer_ips.items()}
        out.update({str(ipaddress.IPv6Address(k[:16])): int.from_bytes(v[:4], "little")
                    for k, v in self.peer_ips6.items()})
        return out

    def set_endpoints(self, want: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, tuple[int, str, str]]) -> int:
        """Make weft_endpoints (IPv4 pods) and weft_endpoints6 (IPv6 pods) exactly ``{pod IP:
        (ifindex, pod MAC, bridge MAC)}``; returns changes."""
        changes = 0
        for version, endpoints in ((4, self.endpoints), (6, self.endpoints6)):
            have = dict(endpoints.items())
            wanted = {}
            for ip, (ifindex, mac, bmac) in want.items():
                if ip.version != version:
                    continue
                value = bytes(Endpoint(ifindex, (ctypes.c_uint8 * 6)(*mac_bytes(mac)),
                                       (ctypes.c_uint8 * 6)(*mac_bytes(bmac))))
                wanted[ip.packed] = value
                if have.get(ip.packed) != value:
                    endpoints.update(ip.packed, value)
                    changes += 1
            for key in set(have) - set(wanted):
                endpoints.delete(key)
                changes += 1
        return changes

    def endpoint_count(self) -> int:
        return len(self.endpoints.items()) + len(self.endpoints6.items())

    def peer_entries(self) -> list[dict]:
        """weft_peers, then weft_peers6, decoded."""
        return [decode_peer(k, v) for k, v in self.peers.items() + self.peers6.items()]

    def counter_sums(self) -> dict[str, int]:
        return {c.name.lower(): self.counters.sum_u64(int(c)) for c in Counter if c is not Counter.MAX}

    def drop_sums(self) -> dict[str, int]:
        return {r.name.lower(): self.drops.sum_u64(int(r)) for r in DropReason
                if r not in (DropReason.NONE, DropReason.MAX)}

    def clear_counters(self) -> None:
        self.counters.clear_u64(int(Counter.MAX))
        self.drops.clear_u64(int(DropReason.MAX))

    def close(self) -> None:
        for obj in (*self.fns.values(), *self.maps.values()):
            if obj.fd >= 0:
                os.close(obj.fd)
                obj.fd = -1
