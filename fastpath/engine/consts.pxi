# Tunables and constants of the engine (uvloop's consts.pxi layout). Included by _engine.pyx.

# Linux UDP socket options (SOL_UDP = IPPROTO_UDP); defined here, not taken from old uapi headers.
cdef enum:
    SOL_UDP = 17
    UDP_SEGMENT = 103
    UDP_GRO = 104
    SO_MEMINFO = 55           # getsockopt: uint32_t[SK_MEMINFO_VARS], the socket's memory and drops
    SK_MEMINFO_VARS = 9
    SK_MEMINFO_DROPS = 8      # datagrams the kernel dropped at the socket (its receive buffer full)
# TUN offloads (TUNSETOFFLOAD); USO4/6 are missing from Debian 12's 6.1 headers.
cdef enum:
    TUN_F_CSUM = 0x01
    TUN_F_TSO4 = 0x02
    TUN_F_TSO6 = 0x04
    TUN_F_USO4 = 0x20
    TUN_F_USO6 = 0x40
    GSO_UDP_L4 = 5            # VIRTIO_NET_HDR_GSO_UDP_L4 (not in 6.1 headers either)
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

# ICMP destination unreachable replies to TUN packets without a route: a token bucket per worker
# (the kernel's icmp_msgs_per_sec / icmp_msgs_burst defaults), so an unroutable flood cannot make
# the engine an amplifier. Credit is kept in nanoseconds: one reply costs ICMP_COST_NS.
cdef enum:
    ICMP_RATE = 1000          # replies per second
    ICMP_BURST = 50           # replies in a burst
    ICMP_COST_NS = 1000000    # 1e9 / ICMP_RATE
    ICMP_QUOTE = 8            # bytes of the offending packet's payload quoted (RFC 792)
    ICMP_BUF = 112            # vnet header (10) + IPv4 (20) + ICMP (8) + IPv4 with options (60) + 8

# Counters, one array per thread; COUNTER_NAMES (in _engine.pyx) is in the same order.
cdef enum Counter:
    C_TX_PACKETS = 0          # inner packets sent (after segmentation)
    C_TX_BYTES
    C_TX_READS                # TUN reads (a super-packet is one read)
    C_TX_SUPER                # reads that were GSO super-packets
    C_TX_DATAGRAM_SENDS       # sendmmsg messages (one may carry up to 64 segments)
    C_TX_BATCHES
    C_TX_BATCH_1
    C_TX_BATCH_2_7
    C_TX_BATCH_8_PLUS
    C_TX_DROP_NO_ROUTE
    C_TX_DROP_NOT_IPV4
    C_TX_DROP_MALFORMED
    C_TX_DROP_GSO_UNSUPPORTED
    C_TX_DROP_SEND_ERROR
    C_TX_READ_ERRORS
    C_TX_ICMP_UNREACH_SENT    # ICMP net unreachable replies written to the TUN (no route)
    C_TX_ICMP_UNREACH_LIMITED # ... withheld by the rate limit
    C_RX_DATAGRAMS            # datagrams taken from the socket (a GRO message: each datagram in it)
    C_RX_PACKETS              # inner packets delivered to the TUN
    C_RX_BYTES
    C_RX_TUN_WRITES
    C_RX_GRO_WRITES           # TUN writes that carried a GSO super-packet
    C_RX_BATCHES
    C_RX_BATCH_1
    C_RX_BATCH_2_7
    C_RX_BATCH_8_PLUS
    C_RX_DROP_SHORT
    C_RX_DROP_BAD_IP
    C_RX_DROP_NOT_IPV4
    C_RX_DROP_OVERSIZED
    C_RX_DROP_BAD_VXLAN
    C_RX_DROP_WRONG_VNI
    C_RX_DROP_WRONG_MAC
    C_RX_DROP_UNKNOWN_PEER
    C_RX_DROP_SPOOFED_SRC
    C_RX_DROP_TUN_WRITE
    C_RX_RECV_ERRORS
    C_RX_SUPER                # kernel VXLAN GSO datagrams (one inner TSO packet) passed on whole
    C_RX_GRO_MESSAGES         # socket messages that held several datagrams (UDP GRO)
    N_COUNTERS
