# Tunables and constants of the engine (uvloop's consts.pxi layout). Included by _engine.pxd.
# The counters' enum is counters.pxi, written by setup.py from api.COUNTER_NAMES.

# Linux UDP socket options (SOL_UDP = IPPROTO_UDP); defined here, not taken from old uapi headers.
cdef enum:
    SOL_UDP = 17
    UDP_SEGMENT = 103
    UDP_GRO = 104
    SO_MEMINFO = 55           # getsockopt: uint32_t[SK_MEMINFO_VARS], the socket's memory and drops
    SK_MEMINFO_VARS = 9
    SK_MEMINFO_DROPS = 8      # datagrams the kernel dropped at the socket (its receive buffer full)
# virtio-net header values missing from Debian 12's 6.1 headers.
cdef enum:
    GSO_UDP_L4 = 5            # VIRTIO_NET_HDR_GSO_UDP_L4 (USO, Linux 6.2)
    VNET_HDR_LEN = 10         # sizeof(struct virtio_net_hdr)
    GSO_AUTO = 0xffff         # rx: a super-packet came without a GRO size; derive it from the MTU

# Wire formats.
cdef enum:
    MODE_UDP = 0              # flannel udp: the inner IPv4 packet is the whole UDP payload
    MODE_VXLAN = 1            # VXLAN header (8) + inner Ethernet (14) + IPv4
    VXLAN_HDR = 8
    ETH_HDR = 14
    VXLAN_ENCAP = 22          # VXLAN_HDR + ETH_HDR
    MAX_UDP_PAYLOAD = 65507   # one UDP send: 65535 - IPv4 header - UDP header
    UDP_MAX_SEGS = 64         # segments per UDP_SEGMENT send (kernel's UDP_MAX_SEGMENTS)

# Batches and buffers (per worker).
cdef enum:
    TX_BATCH = 32             # TUN reads per batch (each up to a 64 KB super-packet)
    RD_STRIDE = 65600         # one TUN read buffer: vnet header + up to 64 KB packet
    TX_MAX_MSGS = 256         # datagram messages per sendmmsg
    TX_MAX_IOV = 4096         # iovecs per sendmmsg batch
    TX_MAX_HDRS = 2048        # per-segment header scratch slots
    HDR_STRIDE = 160          # one slot: VXLAN+Ethernet (22) + IPv4 (<=60) + TCP (<=60), rounded
    CTRL_SPACE = 32           # CMSG_SPACE(sizeof(uint16_t)) rounded up
    RX_BATCH = 64             # datagrams per recvmmsg (each up to 64 KB with UDP GRO)
    RX_BUF = 65536
    RUN_MAX_SEGS = 64         # inner TCP segments merged into one GSO write to the TUN
    SOCK_BUF = 8 * 1024 * 1024
    IDLE_POLL_MS = 200        # poll timeout after an I/O error (never spin, never stall stop())
    SPIN_MAX_PACKETS = 4      # a pass that moved more packets is bulk: no busy poll for BULK_QUIET_NS
    BULK_QUIET_NS = 1000000   # after it (a stream sleeps in poll() and its batches gather); 1 ms

# ICMP destination unreachable replies to TUN packets without a route: a token bucket per worker
# (the kernel's icmp_msgs_per_sec / icmp_msgs_burst defaults), so an unroutable flood cannot make
# the engine an amplifier. Credit is kept in nanoseconds: one reply costs ICMP_COST_NS.
cdef enum:
    ICMP_RATE = 1000          # replies per second
    ICMP_BURST = 50           # replies in a burst
    ICMP_COST_NS = 1000000    # 1e9 / ICMP_RATE
    ICMP_QUOTE = 8            # bytes of the offending packet's payload quoted (RFC 792)
    ICMP_BUF = 112            # vnet header (10) + IPv4 (20) + ICMP (8) + IPv4 with options (60) + 8
    ICMP6_MAX = 1280          # an ICMPv6 error: at most the IPv6 minimum MTU (RFC 4443 2.4(c))
    ICMP6_BUF = 1290          # vnet header (10) + ICMP6_MAX
