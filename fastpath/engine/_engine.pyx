# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled TUN <-> UDP engine: flannel's udp wire format and VXLAN, with batching and offloads.

One extension module, split by concern the way uvloop splits its loop (loop.pxd + the .pyx files
loop.pyx includes): declarations in ``_engine.pxd`` (tunables ``consts.pxi``, counters
``counters.pxi`` made from ``api.COUNTER_NAMES``, the worker's structs), C declarations in
``sock.pxd``/``tun.pxd``/``wire.pxd`` (+ ``wire.h``), and the packet code in the files included
below: ``routes.pxi``, ``tun_io.pxi`` (TUN reads and writes), ``udp_io.pxi`` (the send batch; the
receive checks), ``segment.pxi`` (cutting super-packets, merging segments), ``icmp.pxi``,
``worker.pxi`` (buffers and thread loops). Included, not cimported: the packet path stays one C
unit, so the compiler inlines across the files as before (a cimported module's functions are
called through a pointer table). Here: the Python surface, ``Engine`` (configure, routes,
start/stop, counters; see ``_engine.pyi``); packets never become Python objects.

Per worker (one TUN queue + one UDP socket), one thread runs both directions under ``nogil``
(``duplex_loop``; ``split_threads=True``: one thread per direction):

- tx: ``read`` the TUN until it is empty or TX_BATCH reads are in hand. With IFF_VNET_HDR the TUN
  hands over up to 64 KB TCP (TSO) or UDP (USO) super-packets; each is cut into MSS-sized inner
  packets here (IP total length, id and checksum, TCP sequence, flags and checksum fixed per
  segment), encapsulated, and grouped into ``UDP_SEGMENT`` sends of at most 65,507 bytes (full-size
  segments of consecutive super-packets to one peer share a send). The whole batch leaves in one
  ``sendmmsg``. Segment headers are built in a scratch area and the payload is never copied (two
  iovecs per segment). A read without a route is answered with an ICMP net unreachable written
  back into the TUN (``tx_unreachable``: RFC 1122/1812 exceptions, a token bucket per worker).
- rx: ``recvmmsg`` up to RX_BATCH datagrams; with ``UDP_GRO`` each can hold many same-size segments.
  Every segment is checked (VXLAN header, VNI, destination MAC, IPv4 header, length, checksum,
  outer source holds a lease, inner source inside that peer's subnet) and consecutive in-order TCP
  segments of one flow are merged back into one TSO super-packet written to the TUN with a
  ``virtio_net_hdr`` (GSO_TCPV4, NEEDS_CSUM), payload again by iovec, one ``writev`` per run.
  Kernel VXLAN peers on a veth underlay are special: their GSO packets arrive unsegmented (one
  VXLAN header, one inner super-packet; passed on whole as one GSO write) and their small packets
  carry a partial inner checksum (pseudo-header sum only; passed on as NEEDS_CSUM).
- idle: poll() on the TUN, the socket and a stop eventfd; with ``busy_poll_us`` the thread first
  keeps trying (sched_yield between tries) that long after its last packet, for a shorter RTT.

Dual-stack (vxlan, ``network6``): a TUN read of version 6 takes ``tx_packet6`` (routes6, a hash
of IPv6 subnet prefixes, wire.h) and leaves as VXLAN with inner type 0x86DD from the IPv6 socket
(``sock6_fd``): its messages join the same batch and a batch holding any is sent per run of one
family (``tx_flush_mixed``); TSO6/USO6 super-packets are cut by ``tx_segment6`` (a copy of
``tx_segment`` for IPv6 headers); an unroutable one is answered with ICMPv6 no route
(``tx_unreachable6``). The loops also read the IPv6 socket (``rx_pass6``: same buffers, the same
checks plus IPv6's, TCP segments merged into GSO_TCPV6 writes). IPv4 reads and datagrams never
touch any of it (``tx_packet6`` is called through a pointer, so it is not inlined into
``tx_packet``): the IPv4 path costs what it did.

IPv6-only (flannel's EnableIPv4 false: ``network=None``, ``sock_fd=None``): the IPv4 side is
there but empty (no Network, so every IPv4 read misses the route table at its first test, is
answered net unreachable and counted in ``tx_drop_no_route``; an empty peer set) and there is no
IPv4 socket: the workers' ``sock_fd`` is -1, which poll() skips and ``rx_both`` does not read.

Hostile input: every datagram taken from the socket counts once in ``rx_datagrams`` and once in
``rx_packets`` or one ``rx_drop_*`` (the first check it fails); every TUN read once in
``tx_reads`` and in ``tx_packets`` or one ``tx_drop_*``. No header field is read before the
length that holds it is checked. What the kernel drops before the socket is ``rx_socket_drops``.
"""
from libc.string cimport memcpy, memset, memcmp
from libc.stdlib cimport calloc, free
from libc.errno cimport errno, EAGAIN, EINTR
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from "<sched.h>" nogil:
    int sched_yield()

from fastpath.engine.sock cimport *
from fastpath.engine.tun cimport *
from fastpath.engine.wire cimport *

import atexit
import ipaddress
import os
import threading

from fastpath.engine.api import COUNTER_NAMES, NO_MAC, RX_OUTCOMES, TX_OUTCOMES, mac_bytes
from fastpath.engine.tun import has_vnet_hdr

include "routes.pxi"
include "tun_io.pxi"
include "udp_io.pxi"
include "segment.pxi"
include "icmp.pxi"
include "worker.pxi"

tx_v6 = tx_packet6     # see _engine.pxd

if len(COUNTER_NAMES) != N_COUNTERS:
    raise ImportError(f"fastpath.engine._engine was built with {N_COUNTERS} counters and api.py "
                      f"names {len(COUNTER_NAMES)}: rebuild it (./bootstrap)")

# Engines whose threads run. Their C loops use the Engine's buffers without the GIL, so they must
# be stopped before the interpreter tears objects down: atexit does it for a process that exits
# without calling stop() (weftd on SIGTERM leaves the data plane "in place", i.e. just exits).
_RUNNING = set()


def _stop_all():
    for engine in list(_RUNNING):
        engine.stop()


atexit.register(_stop_all)

cdef enum:                    # what a thread of Engine._run runs
    LOOP_DUPLEX = 0
    LOOP_TX = 1
    LOOP_RX = 2


cdef int _alloc_map6(wf_map6_t *table, uint32_t slots) except -1:
    table.mask = slots - 1
    table.seed = int.from_bytes(os.urandom(4), "little")
    table.slot = <wf_entry6_t *>calloc(slots, sizeof(wf_entry6_t))
    if table.slot == NULL:
        raise MemoryError()
    return 0


def _is_v6(value):
    """Whether an address or subnet argument is IPv6 (its parser then checks it)."""
    if isinstance(value, (ipaddress.IPv6Address, ipaddress.IPv6Network)):
        return True
    return isinstance(value, str) and ":" in value


def _fds(value):
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _send_fds(name, value, sock_fds):
    """The sockets each worker sends from: its receive socket, or one of ``value`` (one per worker;
    only where that family has receive sockets)."""
    if value is None:
        return list(sock_fds)
    fds = _fds(value)
    if len(fds) != len(sock_fds):
        raise ValueError(f"{name}: one UDP socket per TUN queue")
    if -1 in sock_fds:
        raise ValueError(f"{name} without the receive sockets of its family")
    return fds


cdef class Engine:
    """TUN <-> UDP forwarding for one node.

    ``Engine(tun_fd, sock_fd, *, mode="udp"|"vxlan", network=None, subnet_len=None, local_subnet=None, vni=1,
    vtep_mac=b"", port, mtu=0, vnet_hdr=None, split_threads=False, busy_poll_us=0,
    network6=None, subnet6_len=None, local_subnet6=None, vtep_mac6=b"", sock6_fd=None,
    send_fd=None, send6_fd=None)``

    ``tun_fd``/``sock_fd``: an fd or a list of fds, one TUN queue and one UDP socket per worker
    (or one socket for all): as many workers as TUN fds. The caller owns the fds.
    ``send_fd``/``send6_fd``: one UDP socket per worker that its tx batches leave from, each bound
    to a port of its own (None: they leave from ``sock_fd``/``sock6_fd``). A peer's SO_REUSEPORT
    group hashes the outer ports, so datagrams from different workers reach different workers
    there: flows are spread by queue on both ends, not only on the sending one.
    ``split_threads``: two threads per worker (one per direction) instead of one thread doing
    both. ``busy_poll_us``: after forwarding, the duplex thread keeps polling (yielding the CPU
    between tries) this long before it sleeps: lower RTT, some CPU. ``vnet_hdr``: whether the TUN
    fd carries virtio_net_hdr (None: ask the TUN). ``mtu``: the largest inner packet accepted from
    the wire (0: 65535).

    Dual-stack (vxlan only): ``network6`` (flannel's IPv6Network), ``subnet6_len``
    (IPv6SubnetLen), ``local_subnet6`` (this node's), ``vtep_mac6`` (its flannel-v6 VTEP MAC) and
    ``sock6_fd`` (UDP sockets on the IPv6 underlay, IPV6_V6ONLY, as ``sock_fd``: one per worker or
    one for all). TUN reads of version 6 are routed by ``set_route(<IPv6 subnet>, <public IPv6>,
    <its v6 VTEP MAC>)`` and sent as VXLAN (inner type 0x86DD) from ``sock6_fd``; datagrams
    taken from it must hold IPv6 to ``vtep_mac6`` from a source inside the sender's IPv6 subnet.

    IPv6-only (flannel's EnableIPv4 false): ``network``, ``subnet_len``, ``local_subnet``,
    ``sock_fd`` and ``vtep_mac`` None, the IPv6 arguments as for dual-stack. No IPv4 socket, no
    IPv4 route (``set_route`` of an IPv4 subnet: ValueError); the IPv6 route table holds every
    subnet of ``network6`` (at most 65,536).
    """
    cdef Conf conf
    cdef Worker *workers
    cdef int nworkers
    cdef int stop_fd
    cdef object threads
    cdef object network
    cdef object local_subnet
    cdef readonly str mode
    cdef readonly int subnet_len
    cdef dict _peers
    cdef dict _peer_refs      # public IP (network order) -> routes that go to it
    cdef object network6      # IPv6Network or None
    cdef object local_subnet6
    cdef object subnet6_len
    cdef dict _peers6         # str(IPv6 subnet) -> (peer IPv6, mac)
    cdef dict _peer6_refs     # public IPv6 (16 bytes) -> routes that go to it
    cdef uint32_t max_routes6 # IPv6 routes the maps are sized for
    cdef readonly bint split_threads

    def __cinit__(self):
        self.workers = NULL
        self.conf.routes = NULL
        self.conf.peers.slot = NULL
        self.conf.routes6.slot = NULL
        self.conf.peers6.slot = NULL
        self.stop_fd = -1

    def __init__(self, tun_fd, sock_fd, *, mode="udp", network=None, subnet_len=None, local_subnet=None, vni=1,
                 vtep_mac=b"", port=None, mtu=0, vnet_hdr=None, split_threads=False,
                 busy_poll_us=0, network6=None, subnet6_len=None, local_subnet6=None,
                 vtep_mac6=b"", sock6_fd=None, send_fd=None, send6_fd=None):
        tun_fds = _fds(tun_fd)
        if network is None:     # IPv6-only: no IPv4 side, no IPv4 socket (-1: poll skips it)
            if network6 is None:
                raise ValueError("needs network or network6 (an engine carries IPv4, IPv6 or both)")
            if sock_fd is not None:
                raise ValueError("sock_fd without network (an IPv6-only engine has no IPv4 socket)")
            if subnet_len is not None or local_subnet is not None:
                raise ValueError("subnet_len/local_subnet without network")
            sock_fd = -1
        elif sock_fd is None:
            raise ValueError("network needs sock_fd (a UDP socket on the IPv4 underlay)")
        sock_fds = _fds(sock_fd)
        if len(sock_fds) == 1 and len(tun_fds) > 1:
            sock_fds = sock_fds * len(tun_fds)
        if len(tun_fds) != len(sock_fds):
            raise ValueError("one UDP socket per TUN queue (or one for all)")
        sock6_fds = [-1] * len(tun_fds)
        if network6 is not None:
            sock6_fds = self._configure_v6(mode, network6, subnet6_len, local_subnet6, vtep_mac6,
                                           sock6_fd, len(tun_fds))
        elif sock6_fd is not None or local_subnet6 is not None:
            raise ValueError("sock6_fd/local_subnet6 without network6")
        send_fds = _send_fds("send_fd", send_fd, sock_fds)
        send6_fds = _send_fds("send6_fd", send6_fd, sock6_fds)
        if mode not in ("udp", "vxlan"):
            raise ValueError(f"mode {mode!r}: must be 'udp' or 'vxlan'")
        if network is not None:
            net = ipaddress.IPv4Network(network)
            if subnet_len is None or not net.prefixlen <= subnet_len <= 32 or subnet_len - net.prefixlen > 24:
                raise ValueError(f"subnet_len {subnet_len} does not fit Network {net}")
            local = ipaddress.IPv4Network(local_subnet)
            if local.prefixlen != subnet_len or not local.subnet_of(net):
                raise ValueError(f"local subnet {local} is not a /{subnet_len} of {net}")
        else:
            net = local = None
            subnet_len = 0
        if port is None:
            port = 8472 if mode == "vxlan" else 8285
        self.mode = mode
        self.split_threads = bool(split_threads)
        self.subnet_len = subnet_len
        self.network = net
        self.local_subnet = local
        self._peers = {}
        self._peer_refs = {}
        self._peers6 = {}
        self._peer6_refs = {}
        self.threads = []
        self.conf.mode = MODE_VXLAN if mode == "vxlan" else MODE_UDP
        self.conf.encap = VXLAN_ENCAP if mode == "vxlan" else 0
        if vnet_hdr is None:
            vnet_hdr = has_vnet_hdr(tun_fds[0])
        self.conf.vnet = 1 if vnet_hdr else 0
        if net is not None:
            self.conf.net_base = int(net.network_address)
            self.conf.net_mask = int(net.netmask)
            self.conf.shift = 32 - subnet_len
            self.conf.nroutes = 1 << (subnet_len - net.prefixlen)
            self.conf.local_idx = (int(local.network_address) - int(net.network_address)) >> (32 - subnet_len)
        else:
            # no IPv4 Network: (address & 0) is never 1, so route_of answers "no route" at its
            # first test and one_host never takes an address for a subnet's broadcast
            self.conf.net_base = 1
            self.conf.net_mask = 0
            self.conf.shift = 0
            self.conf.nroutes = 0
            self.conf.local_idx = -1
        if not 0 <= vni < 1 << 24:
            raise ValueError(f"VNI {vni} outside 0..16777215")
        self.conf.vni[0] = (vni >> 16) & 0xff
        self.conf.vni[1] = (vni >> 8) & 0xff
        self.conf.vni[2] = vni & 0xff
        mac = mac_bytes(vtep_mac)
        if mode == "vxlan" and mac == NO_MAC and net is not None:
            raise ValueError("vxlan mode needs vtep_mac")
        for i in range(6):
            self.conf.mac[i] = mac[i]
        self.conf.port_n = htons(port)
        self.conf.mtu = mtu if mtu else 65535
        self.conf.busy_poll_ns = int(busy_poll_us) * 1000
        self.conf.routes = <wf_route_t *>calloc(max(self.conf.nroutes, 1), sizeof(wf_route_t))
        if self.conf.routes == NULL:
            raise MemoryError()
        # As many IPv6 routes as IPv4 ones (a lease per IPv4 route slot); IPv6-only: one per
        # subnet of the IPv6 Network, at most 65,536 (flannel's IPv4 side allows 16M, but the IPv6
        # maps are hashes of 20-byte entries: 2 x 2^17 slots are ~10 MB).
        self.max_routes6 = self.conf.nroutes
        if net is None:
            self.max_routes6 = 1 << min(self.subnet6_len - self.network6.prefixlen, 16)
        # peer set: at least twice the slots of the most distinct peers there can be (one per
        # route), so it is never more than half full and never resized under the packet threads
        slots = 16
        while slots < 2 * max(self.conf.nroutes, self.max_routes6):
            slots *= 2
        self.conf.peers.mask = slots - 1
        self.conf.peers.seed = int.from_bytes(os.urandom(4), "little")
        self.conf.peers.slot = <uint32_t *>calloc(slots, sizeof(uint32_t))
        if self.conf.peers.slot == NULL:
            raise MemoryError()
        if self.conf.v6:
            # one IPv6 subnet per lease, and a lease per IPv4 route slot: the same sizing
            _alloc_map6(&self.conf.routes6, slots)
            _alloc_map6(&self.conf.peers6, slots)
        self.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.stop_fd < 0:
            raise OSError(errno, os.strerror(errno))
        self.nworkers = len(tun_fds)
        self.workers = <Worker *>calloc(self.nworkers, sizeof(Worker))
        if self.workers == NULL:
            raise MemoryError()
        for i in range(self.nworkers):
            _alloc_worker(&self.workers[i], &self.conf, tun_fds[i], sock_fds[i], sock6_fds[i],
                          send_fds[i], send6_fds[i], self.stop_fd)
            os.set_blocking(tun_fds[i], False)
        receivers = (set(sock_fds) | set(sock6_fds)) - {-1}
        for fd in receivers:
            self._tune_socket(fd, True)
        for fd in (set(send_fds) | set(send6_fds)) - receivers - {-1}:
            self._tune_socket(fd, False)  # send only: nobody reads it, so no big receive buffer

    def _configure_v6(self, mode, network6, subnet6_len, local_subnet6, vtep_mac6, sock6_fd,
                      int nworkers):
        """Check and store the IPv6 side (dual-stack); the IPv6 sockets, one per worker."""
        cdef int i
        if mode != "vxlan":
            raise ValueError("IPv6 needs vxlan mode (flannel's udp format carries IPv4 only)")
        try:
            net6 = ipaddress.IPv6Network(network6)
        except ValueError:
            raise ValueError(f"network6 {network6!r} is not an IPv6 network") from None
        if subnet6_len is None or not net6.prefixlen < subnet6_len <= 128:
            raise ValueError(f"subnet6_len {subnet6_len} does not fit IPv6 Network {net6}")
        local6 = ipaddress.IPv6Network(local_subnet6) if local_subnet6 is not None else None
        if local6 is None or local6.prefixlen != subnet6_len or not local6.subnet_of(net6):
            raise ValueError(f"local subnet6 {local_subnet6} is not a /{subnet6_len} of {net6}")
        if sock6_fd is None:
            raise ValueError("network6 needs sock6_fd (a UDP socket on the IPv6 underlay)")
        fds6 = _fds(sock6_fd)
        if len(fds6) == 1 and nworkers > 1:
            fds6 = fds6 * nworkers
        if len(fds6) != nworkers:
            raise ValueError("one IPv6 UDP socket per TUN queue (or one for all)")
        mac6 = mac_bytes(vtep_mac6)
        if mac6 == NO_MAC:
            raise ValueError("IPv6 needs vtep_mac6 (the flannel-v6 VTEP MAC)")
        sub_mask = ipaddress.IPv6Network(f"::/{subnet6_len}").netmask.packed
        for i in range(16):
            self.conf.net6[i] = net6.network_address.packed[i]
            self.conf.net6_mask[i] = net6.netmask.packed[i]
            self.conf.sub6_mask[i] = sub_mask[i]
        for i in range(6):
            self.conf.mac6[i] = mac6[i]
        self.conf.v6 = 1
        self.network6 = net6
        self.local_subnet6 = local6
        self.subnet6_len = subnet6_len
        return fds6

    cdef _tune_socket(self, int fd, bint receives):
        cdef int one = 1, size = SOCK_BUF
        if receives:
            if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(int)) != 0:
                setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(int))
            setsockopt(fd, SOL_UDP, UDP_GRO, &one, sizeof(int))   # older kernels: plain datagrams
        if setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(int)) != 0:
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(int))
        os.set_blocking(fd, True)         # sends block (backpressure); receives use MSG_DONTWAIT

    def __dealloc__(self):
        cdef int i
        if self.workers != NULL:
            for i in range(self.nworkers):
                _free_worker(&self.workers[i])
            free(self.workers)
            self.workers = NULL
        if self.conf.routes != NULL:
            free(self.conf.routes)
            self.conf.routes = NULL
        if self.conf.peers.slot != NULL:
            free(self.conf.peers.slot)
            self.conf.peers.slot = NULL
        if self.conf.routes6.slot != NULL:
            free(self.conf.routes6.slot)
            self.conf.routes6.slot = NULL
        if self.conf.peers6.slot != NULL:
            free(self.conf.peers6.slot)
            self.conf.peers6.slot = NULL
        if self.stop_fd >= 0:
            close(self.stop_fd)
            self.stop_fd = -1

    # -- routes --------------------------------------------------------------------------------
    cdef uint32_t _index(self, subnet) except? GSO_AUTO:
        if self.network is None:
            raise ValueError(f"{subnet}: this engine carries no IPv4 (IPv6-only: no network)")
        net = ipaddress.IPv4Network(subnet)
        if net.prefixlen != self.subnet_len or not net.subnet_of(self.network):
            raise ValueError(f"{net} is not a /{self.subnet_len} of {self.network}")
        return (int(net.network_address) - self.conf.net_base) >> self.conf.shift

    def set_route(self, subnet, peer_ip, peer_mac=None):
        """Send packets for ``subnet`` to ``peer_ip`` (VXLAN: inner destination MAC ``peer_mac``).
        An IPv6 subnet (dual-stack): ``peer_ip`` is the peer's public IPv6, ``peer_mac`` its
        flannel-v6 VTEP MAC."""
        if _is_v6(subnet):
            return self._set_route6(subnet, peer_ip, peer_mac)
        cdef uint32_t idx = self._index(subnet)
        cdef uint8_t mac[6]
        if idx == self.conf.local_idx:
            raise ValueError(f"{subnet} is this node's own subnet")
        ip = ipaddress.IPv4Address(peer_ip)
        if int(ip) == 0:
            raise ValueError("peer IP 0.0.0.0")
        m = mac_bytes(peer_mac)
        if self.conf.mode == MODE_VXLAN and m == NO_MAC:
            raise ValueError("vxlan routes need the peer's VTEP MAC")
        for i in range(6):
            mac[i] = m[i]
        wf_route_write(&self.conf.routes[idx], htonl(int(ip)), mac)
        key = str(ipaddress.IPv4Network(subnet))
        old = self._peers.get(key)
        self._peers[key] = (str(ip), m.hex(":"))
        if old is None or old[0] != str(ip):
            self._peer_ref(htonl(int(ip)), 1)
            if old is not None:
                self._peer_ref(htonl(int(ipaddress.IPv4Address(old[0]))), -1)

    def remove_route(self, subnet):
        if _is_v6(subnet):
            return self._remove_route6(subnet)
        cdef uint32_t idx = self._index(subnet)
        cdef uint8_t mac[6]
        memset(mac, 0, 6)
        wf_route_write(&self.conf.routes[idx], 0, mac)
        old = self._peers.pop(str(ipaddress.IPv4Network(subnet)), None)
        if old is not None:
            self._peer_ref(htonl(int(ipaddress.IPv4Address(old[0]))), -1)

    cdef _peer_ref(self, uint32_t ip_n, int change):
        """Count a route to ``ip_n`` in or out; the peer set holds the IPs with at least one."""
        n = self._peer_refs.get(ip_n, 0) + change
        if n > 0:
            self._peer_refs[ip_n] = n
            if n == 1 and change > 0:
                wf_peer_add(&self.conf.peers, ip_n)
        else:
            self._peer_refs.pop(ip_n, None)
            wf_peer_del(&self.conf.peers, ip_n)

    # -- IPv6 routes (dual-stack) ---------------------------------------------------------------
    cdef bytes _key6(self, subnet):
        """The routes6 key of an IPv6 subnet of this engine's IPv6 Network (ValueError if not)."""
        if self.network6 is None:
            raise ValueError(f"{subnet}: this engine carries no IPv6 (no network6)")
        net = ipaddress.IPv6Network(subnet)
        if net.prefixlen != self.subnet6_len or not net.subnet_of(self.network6):
            raise ValueError(f"{net} is not a /{self.subnet6_len} of {self.network6}")
        return net.network_address.packed

    def _set_route6(self, subnet, peer_ip, peer_mac):
        cdef bytes key = self._key6(subnet)
        cdef bytes ip6
        cdef bytes m
        if ipaddress.IPv6Network(subnet) == self.local_subnet6:
            raise ValueError(f"{subnet} is this node's own IPv6 subnet")
        try:
            ip = ipaddress.IPv6Address(peer_ip)
        except ValueError:
            raise ValueError(f"{subnet}: peer {peer_ip} is not an IPv6 address (an IPv6 subnet goes"
                             " over the IPv6 underlay)") from None
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
            raise ValueError(f"peer IPv6 {ip} is not a unicast address")
        m = mac_bytes(peer_mac)
        if m == NO_MAC:
            raise ValueError("IPv6 routes need the peer's flannel-v6 VTEP MAC")
        ip6 = ip.packed
        name = str(ipaddress.IPv6Network(subnet))
        old = self._peers6.get(name)
        if old is None and self.conf.routes6.count >= self.max_routes6:
            raise ValueError(f"{subnet}: more IPv6 routes than this engine holds ({self.max_routes6})")
        if wf_map6_put(&self.conf.routes6, key, ip6, m) != 0:
            raise ValueError(f"{subnet}: the IPv6 route table is full")
        self._peers6[name] = (str(ip), m.hex(":"))
        if old is None or old[0] != str(ip):
            self._peer6_ref(ip6, 1)
            if old is not None:
                self._peer6_ref(ipaddress.IPv6Address(old[0]).packed, -1)

    def _remove_route6(self, subnet):
        cdef bytes key = self._key6(subnet)
        wf_map6_del(&self.conf.routes6, key)
        old = self._peers6.pop(str(ipaddress.IPv6Network(subnet)), None)
        if old is not None:
            self._peer6_ref(ipaddress.IPv6Address(old[0]).packed, -1)

    cdef _peer6_ref(self, bytes ip6, int change):
        n = self._peer6_refs.get(ip6, 0) + change
        if n > 0:
            self._peer6_refs[ip6] = n
            if n == 1 and change > 0:
                wf_map6_put(&self.conf.peers6, ip6, NULL, NULL)   # never full: <= routes6
        else:
            self._peer6_refs.pop(ip6, None)
            wf_map6_del(&self.conf.peers6, ip6)

    def routes(self):
        """{subnet: (peer_ip, peer_mac)} as programmed (IPv6 subnets too, when dual-stack)."""
        out = dict(self._peers)
        out.update(self._peers6)
        return out

    def lookup(self, addr):
        """(peer_ip, peer_mac) that a packet to ``addr`` goes to, read from the packet path's
        route table; None: no route."""
        cdef uint8_t mac[6]
        cdef uint8_t peer6[16]
        cdef bytes a6
        if _is_v6(addr):
            if not self.conf.v6:
                return None
            a6 = ipaddress.IPv6Address(addr).packed
            if not route6_of(&self.conf, a6, peer6, mac):
                return None
            return str(ipaddress.IPv6Address(bytes(peer6[:16]))), bytes(mac[:6]).hex(":")
        cdef uint32_t ip = route_of(&self.conf, htonl(int(ipaddress.IPv4Address(addr))), mac)
        if ip == 0:
            return None
        return str(ipaddress.IPv4Address(ntohl(ip))), bytes(mac[:6]).hex(":")

    # -- running -------------------------------------------------------------------------------
    def _run(self, int i, int loop):
        cdef Worker *w = &self.workers[i]
        with nogil:
            if loop == LOOP_DUPLEX:
                duplex_loop(w)
            else:
                one_way_loop(w, loop == LOOP_TX)

    def start(self):
        if self.threads:
            return
        wf_store_flag(&self.conf.stop, 0)
        loops = (("tx", LOOP_TX), ("rx", LOOP_RX)) if self.split_threads else (("io", LOOP_DUPLEX),)
        for i in range(self.nworkers):
            for name, loop in loops:
                t = threading.Thread(target=self._run, args=(i, loop), name=f"weft-engine-{name}{i}",
                                     daemon=True)
                self.threads.append(t)
                t.start()
        _RUNNING.add(self)

    def stop(self):
        cdef uint64_t one = 1
        if not self.threads:
            return
        wf_store_flag(&self.conf.stop, 1)
        write(self.stop_fd, &one, sizeof(uint64_t))
        for t in self.threads:
            t.join()
        self.threads = []
        _RUNNING.discard(self)
        cdef ssize_t r = read(self.stop_fd, &one, sizeof(uint64_t))

    @property
    def running(self):
        return bool(self.threads)

    def close(self):
        """Stop; the fds stay the caller's."""
        self.stop()

    def stats(self):
        """Counters summed over the workers: {name: int}."""
        cdef int i, k
        cdef uint64_t tot[N_COUNTERS]
        memset(tot, 0, sizeof(tot))
        for i in range(self.nworkers):
            for k in range(N_COUNTERS):
                tot[k] += self.workers[i].tx_cnt[k] + self.workers[i].rx_cnt[k]
        out = {COUNTER_NAMES[k]: tot[k] for k in range(N_COUNTERS)}
        drops = self._socket_drops()
        if drops is not None:
            out["rx_socket_drops"] = drops
        out["routes"] = len(self._peers) + len(self._peers6)
        out["workers"] = self.nworkers
        return out

    def _socket_drops(self):
        """Datagrams the kernel dropped at the engine's sockets before the engine could read
        them (its receive buffer was full: Udp RcvbufErrors): SO_MEMINFO's count since each socket was
        opened, summed; None when a socket cannot tell (closed), never a made-up 0."""
        cdef uint32_t info[SK_MEMINFO_VARS]
        cdef socklen_t size
        cdef int i
        total = 0
        fds = {self.workers[i].sock_fd for i in range(self.nworkers)}
        fds = (fds | {self.workers[i].sock6_fd for i in range(self.nworkers)}) - {-1}
        for fd in fds:
            size = sizeof(info)
            if getsockopt(fd, SOL_SOCKET, SO_MEMINFO, info, &size) != 0 or size < sizeof(info):
                return None
            total += info[SK_MEMINFO_DROPS]
        return total

    # -- test and benchmark hooks (engine not started) -----------------------------------------
    cdef Worker *_hook_worker(self, str hook, bytes data, size_t room) except NULL:
        """Worker 0 for a test or benchmark hook, which runs its packet path on the caller's
        thread: only while the engine is stopped, and ``data`` must fit the buffer (``room``)."""
        if self.threads:
            raise RuntimeError(f"{hook} on a running engine")
        if <size_t>len(data) > room:
            raise ValueError(f"{hook}: {len(data)} bytes do not fit a buffer of {room}")
        return &self.workers[0]

    def _inject_rx(self, bytes datagram, src_ip, int gro=0):
        """Run the receive path on one socket message as if it came from ``src_ip`` with UDP GRO
        size ``gro`` (0: none) and write what passes to the TUN."""
        cdef Worker *w = self._hook_worker("_inject_rx", datagram, RX_BUF)
        cdef uint32_t n = len(datagram)
        cdef uint32_t src = 0
        cdef bytes src6 = b""
        cdef const uint8_t *s6
        cdef bint from6 = _is_v6(src_ip)
        if from6:   # from the IPv6 underlay
            if not self.conf.v6:
                raise ValueError(f"{src_ip}: this engine has no IPv6 socket")
            src6 = ipaddress.IPv6Address(src_ip).packed
        else:
            if self.network is None:
                raise ValueError(f"{src_ip}: this engine has no IPv4 socket (IPv6-only)")
            src = htonl(int(ipaddress.IPv4Address(src_ip)))
        s6 = src6
        memcpy(w.rx_buf, <const char *>datagram, n)
        with nogil:
            if from6:
                rx_datagram6(w, w.rx_buf, n, gro, s6)
            else:
                rx_datagram(w, w.rx_buf, n, gro, src)
            rx_flush_run(w)

    def _is_peer(self, ip):
        """Whether the packet path takes ``ip`` for a peer (the peer set's answer)."""
        cdef bytes ip6
        if _is_v6(ip):
            ip6 = ipaddress.IPv6Address(ip).packed
            return self.conf.v6 != 0 and is_peer6(&self.conf, ip6)
        return is_peer(&self.conf, htonl(int(ipaddress.IPv4Address(ip))))

    def _inject_tx(self, bytes read):
        """Run the transmit path on one TUN read (vnet header included when the engine has one)
        and send what it queued."""
        cdef Worker *w = self._hook_worker("_inject_tx", read, RD_STRIDE)
        cdef uint32_t n = len(read)
        memcpy(w.rd_buf, <const char *>read, n)
        with nogil:
            tx_packet(w, w.rd_buf, n)
            if w.n_msgs:
                tx_flush(w)

    def _bench_encap(self, bytes packet, int count):
        """ns spent queueing ``count`` TUN reads of ``packet`` (vnet header included when the
        engine has one) into send batches, without sending: the tx path's per-batch CPU cost."""
        return self._bench_dry(True, packet, 0, count, 0)

    def _bench_decap(self, bytes datagram, src_ip, int count, int gro=0):
        """ns spent checking and merging ``count`` copies of ``datagram`` (no TUN write); an IPv6
        ``src_ip``: as taken from the IPv6 underlay's socket."""
        if _is_v6(src_ip):
            if not self.conf.v6:
                raise ValueError(f"{src_ip}: this engine has no IPv6 socket")
            return self._bench_dry(False, datagram, 0, count, gro, ipaddress.IPv6Address(src_ip).packed)
        return self._bench_dry(False, datagram, htonl(int(ipaddress.IPv4Address(src_ip))), count, gro)

    cdef int64_t _bench_dry(self, bint tx, bytes data, uint32_t src, int count, int gro,
                            bytes src6=None) except -1:
        """The two above: worker 0's tx or rx path on ``count`` copies of ``data``, on this thread,
        in dry mode (batches built, no system calls); the ns it took."""
        cdef Worker *w = self._hook_worker("_bench_encap" if tx else "_bench_decap", data,
                                           RD_STRIDE if tx else RX_BUF)
        cdef uint32_t n = len(data)
        cdef const uint8_t *p = data
        cdef const uint8_t *s6 = NULL
        cdef int i, j
        cdef timespec t0, t1
        if src6 is not None:
            s6 = src6
        if not tx:
            memcpy(w.rx_buf, p, n)
        self.conf.dry = 1
        try:
            with nogil:
                clock_gettime(CLOCK_MONOTONIC, &t0)
                if tx:
                    for i in range(count):
                        j = i % TX_BATCH
                        memcpy(w.rd_buf + j * RD_STRIDE, p, n)
                        tx_packet(w, w.rd_buf + j * RD_STRIDE, n)
                        if j == TX_BATCH - 1:
                            tx_flush(w)
                    tx_flush(w)
                else:
                    for i in range(count):
                        if s6 != NULL:
                            rx_datagram6(w, w.rx_buf, n, gro, s6)
                        else:
                            rx_datagram(w, w.rx_buf, n, gro, src)
                        if i % RX_BATCH == RX_BATCH - 1:
                            rx_flush_run(w)
                    rx_flush_run(w)
                clock_gettime(CLOCK_MONOTONIC, &t1)
        finally:
            self.conf.dry = 0
        return (t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec)

    def _bench_lookup(self, dst_ip, int count):
        """ns spent on ``count`` route lookups of ``dst_ip``."""
        cdef uint32_t ip = htonl(int(ipaddress.IPv4Address(dst_ip)))
        cdef uint8_t mac[6]
        cdef uint64_t acc = 0
        cdef int i
        cdef timespec t0, t1
        with nogil:
            clock_gettime(CLOCK_MONOTONIC, &t0)
            for i in range(count):
                acc += route_of(&self.conf, ip, mac)
            clock_gettime(CLOCK_MONOTONIC, &t1)
        return (t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec)
