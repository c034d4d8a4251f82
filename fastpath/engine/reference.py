"""The reference engine: the compiled engine's semantics in plain Python, one packet at a time.

It is the correctness oracle for ``fastpath.engine._engine.Engine`` (tests run every case against
both and compare bytes and counters) and the ``udp/python`` data plane (the slow baseline): one
``read``/``sendto`` per packet out, one ``recvfrom``/``write`` per packet in, no batching, no
offloads (the TUN is opened without IFF_VNET_HDR, the socket without UDP_GRO).

Same API as the compiled ``Engine``; same counter names (the ones it never moves stay 0).
The checks are made in the same order, so each datagram lands in the same counter in both.
IPv4 only: the compiled engine's IPv6 side (dual-stack vxlan/fastpath) has no counterpart here;
its IPv6 frames are checked in tests against hand-built bytes instead.
"""
from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import threading
import time

from .api import COUNTER_NAMES, NO_MAC, mac_bytes
from .api import RX_OUTCOMES, TX_OUTCOMES  # noqa: F401 (part of this module's API, as before)

SO_MEMINFO = 55                   # getsockopt: 9 x uint32, the 9th the socket's drop count
VXLAN_ENCAP = 22
MAX_DATAGRAM = 65535
# ICMP net unreachable replies: the compiled engine's token bucket (consts.pxi), per engine.
ICMP_BURST = 50
ICMP_COST_NS = 1_000_000          # 1000 replies per second
ICMP_QUOTE = 8
ICMP_ERROR_TYPES = frozenset((3, 4, 5, 11, 12))


def ip_checksum(data: bytes) -> int:
    """The Internet checksum of ``data`` (0 when ``data`` carries a correct checksum)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class ReferenceEngine:
    def __init__(self, tun_fd, sock_fd, *, mode="udp", network=None, subnet_len=None, local_subnet=None, vni=1,
                 vtep_mac=b"", port=None, mtu=0, vnet_hdr=None, split_threads=False,
                 busy_poll_us=0, network6=None, subnet6_len=None, local_subnet6=None,
                 vtep_mac6=b"", sock6_fd=None, send_fd=None, send6_fd=None):
        # split_threads, busy_poll_us: accepted for API parity; one thread, select(), no polling.
        # IPv6 (the compiled engine's dual-stack vxlan): not here. This engine serves udp/python,
        # and flannel's udp format carries IPv4 only.
        if network6 is not None or sock6_fd is not None or local_subnet6 is not None:
            raise ValueError("the reference engine carries IPv4 only (udp/python); IPv6 needs the"
                             " compiled engine (vxlan/fastpath)")
        if network is None:  # the compiled engine's IPv6-only form (network None): not here either
            raise ValueError("the reference engine needs network (it carries IPv4 only)")
        if send_fd is not None or send6_fd is not None:
            raise ValueError("the reference engine runs one worker: it sends from its one socket")
        if not isinstance(tun_fd, int) or not isinstance(sock_fd, int):
            raise ValueError("the reference engine runs one worker on one TUN fd and one socket")
        if vnet_hdr:
            raise ValueError("the reference engine does not take IFF_VNET_HDR TUNs (no offloads)")
        if mode not in ("udp", "vxlan"):
            raise ValueError(f"mode {mode!r}: must be 'udp' or 'vxlan'")
        self.network = ipaddress.IPv4Network(network)
        if subnet_len is None or not self.network.prefixlen <= subnet_len <= 32 or subnet_len - self.network.prefixlen > 24:
            raise ValueError(f"subnet_len {subnet_len} does not fit Network {self.network}")
        self.local_subnet = ipaddress.IPv4Network(local_subnet)
        if self.local_subnet.prefixlen != subnet_len or not self.local_subnet.subnet_of(self.network):
            raise ValueError(f"local subnet {self.local_subnet} is not a /{subnet_len} of {self.network}")
        if not 0 <= vni < 1 << 24:
            raise ValueError(f"VNI {vni} outside 0..16777215")
        self.mode = mode
        self.subnet_len = subnet_len
        self.tun_fd = tun_fd
        self.sock = socket.socket(fileno=os.dup(sock_fd))
        self.sock.setblocking(True)
        self.port = port if port is not None else (8472 if mode == "vxlan" else 8285)
        self.vni = vni
        self.mac = mac_bytes(vtep_mac)
        if mode == "vxlan" and self.mac == NO_MAC:
            raise ValueError("vxlan mode needs vtep_mac")
        self.mtu = mtu or 65535
        self._base = int(self.network.network_address)
        self._mask = int(self.network.netmask)
        self._shift = 32 - subnet_len
        self._nroutes = 1 << (subnet_len - self.network.prefixlen)
        self._local_idx = (int(self.local_subnet.network_address) - self._base) >> self._shift
        self._routes: list[tuple[str, bytes] | None] = [None] * self._nroutes
        self._peers: dict[str, tuple[str, str]] = {}
        self._peer_refs: dict[str, int] = {}     # public IP -> routes that go to it
        self._vxlan_hdr = bytes([0x08, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\0"
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._icmp_id = 0                    # IP ID of the next ICMP reply (deterministic)
        self._icmp_credit_ns = 0
        self._icmp_last_ns: int | None = None
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._stopping = False
        os.set_blocking(tun_fd, False)

    # -- routes -------------------------------------------------------------------------------------
    def _index(self, subnet) -> int:
        net = ipaddress.IPv4Network(subnet)
        if net.prefixlen != self.subnet_len or not net.subnet_of(self.network):
            raise ValueError(f"{net} is not a /{self.subnet_len} of {self.network}")
        return (int(net.network_address) - self._base) >> self._shift

    def set_route(self, subnet, peer_ip, peer_mac=None) -> None:
        idx = self._index(subnet)
        if idx == self._local_idx:
            raise ValueError(f"{subnet} is this node's own subnet")
        ip = ipaddress.IPv4Address(peer_ip)
        if int(ip) == 0:
            raise ValueError("peer IP 0.0.0.0")
        mac = mac_bytes(peer_mac)
        if self.mode == "vxlan" and mac == NO_MAC:
            raise ValueError("vxlan routes need the peer's VTEP MAC")
        self._routes[idx] = (str(ip), mac)  # one reference swap: atomic for the loop thread
        key = str(ipaddress.IPv4Network(subnet))
        old = self._peers.get(key)
        self._peers[key] = (str(ip), mac.hex(":"))
        if old is None or old[0] != str(ip):
            self._peer_ref(str(ip), 1)
            if old is not None:
                self._peer_ref(old[0], -1)

    def remove_route(self, subnet) -> None:
        self._routes[self._index(subnet)] = None
        old = self._peers.pop(str(ipaddress.IPv4Network(subnet)), None)
        if old is not None:
            self._peer_ref(old[0], -1)

    def _peer_ref(self, ip: str, change: int) -> None:
        n = self._peer_refs.get(ip, 0) + change
        if n > 0:
            self._peer_refs[ip] = n
        else:
            self._peer_refs.pop(ip, None)

    def routes(self) -> dict:
        return dict(self._peers)

    def lookup(self, addr):
        """(peer_ip, peer_mac) that a packet to ``addr`` goes to; None: no route."""
        route = self._route(ipaddress.IPv4Address(addr).packed)
        return None if route is None else (route[0], route[1].hex(":"))

    def _route(self, addr: bytes):
        a = int.from_bytes(addr, "big")
        idx = (a - self._base) >> self._shift
        if a & self._mask != self._base or not 0 <= idx < self._nroutes:
            return None
        return self._routes[idx]

    def _is_peer(self, ip: str) -> bool:
        return ip in self._peer_refs

    # -- the two directions, one packet each --------------------------------------------------------
    def encap(self, pkt: bytes):
        """A TUN packet -> (peer IP, datagram), or None (counted as dropped; one without a route
        is also answered with an ICMP net unreachable written to the TUN)."""
        c = self.counters
        c["tx_reads"] += 1
        if len(pkt) < 20:
            c["tx_drop_malformed"] += 1
            return None
        if pkt[0] >> 4 != 4:
            c["tx_drop_not_ipv4"] += 1
            return None
        ihl = (pkt[0] & 15) * 4
        if ihl < 20 or ihl > len(pkt):
            c["tx_drop_malformed"] += 1
            return None
        route = self._route(pkt[16:20])
        if route is None:
            c["tx_drop_no_route"] += 1
            self._send_unreachable(pkt, ihl)
            return None
        tot = int.from_bytes(pkt[2:4], "big")
        if tot < ihl or tot > len(pkt):
            c["tx_drop_malformed"] += 1
            return None
        pkt = pkt[:tot]
        peer, mac = route
        if self.mode == "vxlan":
            return peer, self._vxlan_hdr + mac + self.mac + b"\x08\x00" + pkt
        return peer, pkt

    # -- ICMP net unreachable for a TUN packet without a route (see icmp.pxi, tx_unreachable) ----
    # The reply comes from the offending packet's destination: the engine has no overlay address
    # of its own, and the TUN's address (flannel's choice) is local to the host, so Linux would
    # drop the reply as a martian source; the original destination is routed via the TUN.
    def _one_host(self, a: int) -> bool:
        """Not 0/8, 127/8, 224/4, 240/4 (limited broadcast), nor a subnet's all-ones host."""
        if a >> 24 in (0, 127) or a >= 0xE0000000:
            return False
        if self._shift >= 2 and a & self._mask == self._base:
            host = (1 << self._shift) - 1
            if a & host == host:
                return False
        return True

    def _icmp_allowed(self, pkt: bytes, ihl: int) -> bool:
        tot = int.from_bytes(pkt[2:4], "big")
        if tot < ihl or tot > len(pkt):
            return False                                  # malformed
        if int.from_bytes(pkt[6:8], "big") & 0x1FFF:
            return False                                  # a later fragment
        if not (self._one_host(int.from_bytes(pkt[12:16], "big"))
                and self._one_host(int.from_bytes(pkt[16:20], "big"))):
            return False
        if pkt[9] == 1:                                   # never an ICMP error about an ICMP error
            if tot < ihl + 1:
                return False
            if pkt[ihl] in ICMP_ERROR_TYPES or pkt[ihl] > 18:
                return False
        return True

    def _take_token(self) -> bool:
        now = time.monotonic_ns()
        cap = ICMP_BURST * ICMP_COST_NS
        if self._icmp_last_ns is None:
            credit = cap                                  # first reply: a full bucket
        else:
            credit = min(cap, self._icmp_credit_ns + now - self._icmp_last_ns)
        self._icmp_last_ns = now
        if credit < ICMP_COST_NS:
            self._icmp_credit_ns = credit
            return False
        self._icmp_credit_ns = credit - ICMP_COST_NS
        return True

    def unreachable_reply(self, pkt: bytes, ihl: int) -> bytes:
        """The ICMP 3/0 for ``pkt``: IPv4 (TOS 0xc0 | the offender's TOS bits, the next ID, TTL
        64, from its destination to its source), ICMP header, its IP header + 8 payload bytes."""
        tot = int.from_bytes(pkt[2:4], "big")
        quote = pkt[:ihl + min(ICMP_QUOTE, tot - ihl)]
        icmp = bytearray(b"\x03\x00\x00\x00\x00\x00\x00\x00" + quote)
        icmp[2:4] = ip_checksum(bytes(icmp)).to_bytes(2, "big")
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0 | (pkt[1] & 0x1E), 20 + len(icmp),
                                   self._icmp_id, 0, 64, 1, 0, pkt[16:20], pkt[12:16]))
        ip[10:12] = ip_checksum(bytes(ip)).to_bytes(2, "big")
        self._icmp_id = (self._icmp_id + 1) & 0xFFFF
        return bytes(ip) + bytes(icmp)

    def _send_unreachable(self, pkt: bytes, ihl: int) -> None:
        if not self._icmp_allowed(pkt, ihl):
            return
        if not self._take_token():
            self.counters["tx_icmp_unreachable_limited"] += 1
            return
        try:
            os.write(self.tun_fd, self.unreachable_reply(pkt, ihl))
        except OSError:
            return
        self.counters["tx_icmp_unreachable_sent"] += 1

    def decap(self, d: bytes, src: str):
        """A datagram from ``src`` -> the inner packet, or None; each lands in one counter."""
        c = self.counters
        c["rx_datagrams"] += 1
        p = d
        if self.mode == "vxlan":
            if len(d) < VXLAN_ENCAP:
                c["rx_drop_short"] += 1
                return None
            if d[0:4] != b"\x08\0\0\0" or d[7]:     # I flag; reserved bits clear (as Linux)
                c["rx_drop_bad_vxlan"] += 1
                return None
            if d[4:7] != self._vxlan_hdr[4:7]:
                c["rx_drop_wrong_vni"] += 1
                return None
            if d[8:14] != self.mac:
                c["rx_drop_wrong_mac"] += 1
                return None
            if d[20:22] != b"\x08\x00":
                c["rx_drop_not_ipv4"] += 1
                return None
            p = d[VXLAN_ENCAP:]
        if len(p) < 1:
            c["rx_drop_short"] += 1
            return None
        if p[0] >> 4 != 4:
            c["rx_drop_not_ipv4"] += 1
            return None
        if len(p) < 20:
            c["rx_drop_short"] += 1
            return None
        ihl = (p[0] & 15) * 4
        tot = int.from_bytes(p[2:4], "big")
        if ihl < 20 or tot < ihl or tot > len(p) or ip_checksum(p[:ihl]) != 0:
            c["rx_drop_bad_ip"] += 1
            return None
        if tot > self.mtu:
            c["rx_drop_oversized"] += 1
            return None
        route = self._route(p[12:16])
        if route is None or route[0] != src:
            c["rx_drop_spoofed_src" if self._is_peer(src) else "rx_drop_unknown_peer"] += 1
            return None
        return p[:tot]

    @staticmethod
    def complete_partial_checksum(pkt: bytes) -> bytes:
        """A TCP/UDP checksum field that holds only the pseudo-header sum (what a kernel VXLAN
        sender on a veth leaves behind) is completed; anything else is left alone."""
        if len(pkt) < 20 or int.from_bytes(pkt[6:8], "big") & 0x3FFF:
            return pkt
        ihl = (pkt[0] & 15) * 4
        off = 16 if pkt[9] == 6 and len(pkt) >= ihl + 20 else 6 if pkt[9] == 17 and len(pkt) >= ihl + 8 else 0
        if not off:
            return pkt
        pseudo = pkt[12:20] + bytes([0, pkt[9]]) + (len(pkt) - ihl).to_bytes(2, "big")
        field = int.from_bytes(pkt[ihl + off:ihl + off + 2], "big")
        ps = ~ip_checksum(pseudo) & 0xFFFF
        if field != ps or field == 0 or ip_checksum(pseudo + pkt[ihl:]) == 0:
            return pkt
        full = ip_checksum(pkt[ihl:])
        return pkt[:ihl + off] + full.to_bytes(2, "big") + pkt[ihl + off + 2:]

    def _deliver(self, pkt: bytes) -> None:
        c = self.counters
        pkt = self.complete_partial_checksum(pkt)
        try:
            os.write(self.tun_fd, pkt)
        except OSError:
            c["rx_drop_tun_write"] += 1
            return
        c["rx_tun_writes"] += 1
        c["rx_packets"] += 1
        c["rx_bytes"] += len(pkt)

    # -- loop ---------------------------------------------------------------------------------------
    def _tx_one(self) -> bool:
        try:
            pkt = os.read(self.tun_fd, MAX_DATAGRAM)
        except BlockingIOError:
            return False
        except OSError:
            self.counters["tx_read_errors"] += 1
            return False
        c = self.counters
        c["tx_batches"] += 1
        c["tx_batch_1"] += 1
        self._tx_packet(pkt)
        return True

    def _tx_packet(self, pkt: bytes) -> None:
        c = self.counters
        out = self.encap(pkt)
        if out is None:
            return
        peer, dgram = out
        try:
            self.sock.sendto(dgram, (peer, self.port))
        except OSError:
            c["tx_drop_send_error"] += 1
            return
        c["tx_datagram_sends"] += 1
        c["tx_packets"] += 1
        c["tx_bytes"] += len(dgram) - (VXLAN_ENCAP if self.mode == "vxlan" else 0)

    def _rx_one(self) -> bool:
        try:
            d, addr = self.sock.recvfrom(MAX_DATAGRAM, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            self.counters["rx_recv_errors"] += 1
            return False
        self.counters["rx_batches"] += 1
        self.counters["rx_batch_1"] += 1
        pkt = self.decap(d, addr[0])
        if pkt is not None:
            self._deliver(pkt)
        return True

    def _loop(self) -> None:
        rlist = [self.tun_fd, self.sock.fileno(), self._stop_r]
        while not self._stopping:
            ready, _, _ = select.select(rlist, [], [])
            if self._stop_r in ready:
                break
            if self.tun_fd in ready:
                self._tx_one()
            if self.sock.fileno() in ready:
                self._rx_one()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="weft-reference-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        os.write(self._stop_w, b"x")
        self._thread.join()
        os.read(self._stop_r, 64)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def close(self) -> None:
        self.stop()
        self.sock.close()
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def stats(self) -> dict:
        out = dict(self.counters)
        try:   # datagrams the kernel dropped at the socket (its receive buffer full)
            info = self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36)
            out["rx_socket_drops"] = struct.unpack("9I", info)[8]
        except OSError:
            pass                      # closed: no number rather than a made-up 0
        out["routes"] = len(self._peers)
        out["workers"] = 1
        return out

    # -- test hooks -----------------------------------------------------------------------------
    def _inject_tx(self, read: bytes) -> None:
        """Run the transmit path on one TUN read, as the loop does."""
        if self._thread is not None:
            raise RuntimeError("_inject_tx on a running engine")
        self._tx_packet(read)

    def _is_kernel_gso(self, d: bytes, gro: int) -> bool:
        """The compiled engine's test (is_kernel_gso): a kernel VXLAN sender's unsegmented GSO
        packet is one datagram, never cut at the GRO size."""
        n = len(d)
        if self.mode != "vxlan" or n <= VXLAN_ENCAP + 20 or n - VXLAN_ENCAP <= self.mtu:
            return False
        p = d[VXLAN_ENCAP:]
        if p[0] >> 4 != 4 or int.from_bytes(p[2:4], "big") != n - VXLAN_ENCAP:
            return False
        return (p[9] == 6 and gro == 0) or (p[9] == 17 and 0 < gro < n)

    def _inject_rx(self, datagram: bytes, src_ip, gro: int = 0) -> None:
        """One socket message from ``src_ip``, with UDP GRO size ``gro`` (0: none) as the
        compiled engine gets them (this engine's socket has no GRO: each datagram comes alone)."""
        if self._thread is not None:
            raise RuntimeError("_inject_rx on a running engine")
        src = str(ipaddress.IPv4Address(src_ip))
        n = len(datagram)
        if self._is_kernel_gso(datagram, gro):
            gro = n
        gro = gro if 0 < gro <= n else n
        if n == 0:
            pkt = self.decap(datagram, src)
            if pkt is not None:
                self._deliver(pkt)
            return
        if gro < n:
            self.counters["rx_gro_messages"] += 1
        for off in range(0, n, gro):
            pkt = self.decap(datagram[off:off + gro], src)
            if pkt is not None:
                self._deliver(pkt)
