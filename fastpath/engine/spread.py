"""Flows spread over the engine's workers on the receiving side too, not only on the sending one.

Between two userspace nodes every datagram had the same outer addresses and ports (both ends send
from the wire format's port), so the kernel's SO_REUSEPORT hash handed all traffic from one peer to
one worker, however many the peer used. With several workers:

- each worker sends from a UDP socket of its own, bound to an ephemeral port whose remainder
  modulo the worker count is the worker's index (``bind_senders``);
- the receiving group (one socket per worker on the wire format's port) carries a classic BPF
  program that picks socket ``source port % workers`` (``attach_spread``).

So worker i of a node is received by worker i of its peer, and a flow stays on one worker each
way (the TUN hands a flow to the queue its last packet was written from). A kernel VXLAN peer
sends from a port derived from the inner flow's hash (RFC 7348), so its flows spread as well.
flanneld's udp proxy and the kernel read datagrams from any source port: nothing on the wire
changes but the outer source port, and with one worker not even that.
"""
from __future__ import annotations

import ctypes
import socket

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_NET_OFF = -0x100000  # classic BPF: offsets from the network header
# classic BPF opcodes
_LD_H_ABS = 0x28   # A = ntohs(packet[k:k+2])
_ALU_MOD_K = 0x94  # A %= k
_RET_A = 0x16      # return A
# where the UDP source port is, from the network header (no IPv4 options, no IPv6 extension
# headers: what a UDP tunnel datagram has; any other reads some other two bytes, still a valid index)
_SPORT_OFFSET = {socket.AF_INET: 20, socket.AF_INET6: 40}
MAX_BIND_TRIES = 64  # per worker: an ephemeral port has the wanted remainder every `workers` tries


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def spread_program(family: int, workers: int) -> list[tuple[int, int, int, int]]:
    """The classic BPF program: the index of the socket that takes a datagram, source port % workers."""
    return [(_LD_H_ABS, 0, 0, (SKF_NET_OFF + _SPORT_OFFSET[family]) & 0xFFFFFFFF),
            (_ALU_MOD_K, 0, 0, workers),
            (_RET_A, 0, 0, 0)]


def attach_spread(sock: socket.socket, workers: int) -> None:
    """Attach the program to the SO_REUSEPORT group ``sock`` belongs to (it applies to the group)."""
    prog = spread_program(sock.family, workers)
    insns = (_SockFilter * len(prog))(*[_SockFilter(*i) for i in prog])
    fprog = _SockFprog(len(prog), insns)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def bind_senders(family: int, address: str, workers: int) -> list[socket.socket]:
    """One UDP socket per worker, bound to ``address`` on an ephemeral port that is worker i's index
    modulo ``workers``. OSError when no such port comes within MAX_BIND_TRIES binds."""
    made: list[socket.socket] = []
    try:
        for index in range(workers):
            for _ in range(MAX_BIND_TRIES):
                s = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                try:
                    if family == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s.bind((address, 0))
                except OSError:
                    s.close()
                    raise
                if s.getsockname()[1] % workers == index:
                    made.append(s)
                    break
                s.close()
            else:
                raise OSError(f"no ephemeral port with remainder {index} modulo {workers} "
                              f"in {MAX_BIND_TRIES} tries")
    except BaseException:
        for s in made:
            s.close()
        raise
    return made

