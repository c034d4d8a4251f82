# Declarations of the engine module (uvloop's loop.pxd layout): its constants and the state the
# worker threads run on. The code is _engine.pyx and the files it includes, one per concern.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

from fastpath.engine.sock cimport iovec, mmsghdr, sockaddr_in, sockaddr_in6
from fastpath.engine.tun cimport virtio_net_hdr
from fastpath.engine.wire cimport wf_map6_t, wf_peers_t, wf_route_t

include "consts.pxi"
include "counters.pxi"   # written by setup.py from api.COUNTER_NAMES


cdef struct Conf:
    int mode
    int vnet                  # the TUN fd carries a virtio_net_hdr before each packet
    int stop
    int dry                   # benchmarks: build batches, skip the system calls
    uint32_t net_base         # host order
    uint32_t net_mask
    int shift                 # 32 - subnet_len
    uint32_t nroutes
    int64_t local_idx
    wf_route_t *routes
    wf_peers_t peers          # the public IPs that hold a route (is_peer)
    uint8_t vni[3]            # network order, as on the wire
    uint8_t mac[6]            # our VTEP MAC
    uint16_t port_n           # peers' UDP port, network order
    uint32_t mtu              # largest inner packet accepted from the wire
    int64_t busy_poll_ns      # duplex loop: keep polling this long after the last packet
    int encap                 # bytes before the inner IPv4 header in a datagram
    # IPv6 (dual-stack vxlan): inner IPv6 packets go over the IPv6 underlay (a second socket)
    int v6                    # 1: this engine carries IPv6 (Network6 configured)
    uint8_t net6[16]          # the IPv6 Network's prefix (host bits clear)
    uint8_t net6_mask[16]
    uint8_t sub6_mask[16]     # the mask of one node's IPv6 subnet (IPv6SubnetLen)
    uint8_t mac6[6]           # our flannel-v6 VTEP MAC
    wf_map6_t routes6         # subnet prefix -> peer (public IPv6, VTEP MAC)
    wf_map6_t peers6          # the public IPv6 addresses that hold a route (is_peer6)


cdef struct Run:              # inner TCP segments being merged for one GSO write
    int nseg
    uint8_t *first            # first segment (its headers are the template)
    uint32_t hl               # IP + TCP header length
    bint v6                   # the run's segments are IPv6 (rx_pass6)
    uint32_t gso              # payload size of the first segment (= gso_size)
    uint32_t last_pay
    uint32_t total_pay
    uint32_t next_seq
    uint8_t flags_or


cdef struct Worker:
    Conf *conf
    int tun_fd
    int sock_fd
    int sock6_fd              # the IPv6 underlay's socket (-1: none)
    int send_fd               # the socket the tx batch leaves from (sock_fd, or a worker's own port)
    int send6_fd              # the same for IPv6 (sock6_fd, or a worker's own port; -1: none)
    int stop_fd
    # tx
    uint8_t *rd_buf
    mmsghdr *tx_msgs
    iovec *tx_iov
    uint8_t *tx_hdr
    sockaddr_in *tx_names
    sockaddr_in6 *tx_names6   # a message to an IPv6 peer names one of these (msg_namelen tells)
    int n_v6                  # messages in the batch to IPv6 peers (0: one sendmmsg, IPv4 only)
    uint8_t *tx_ctrl
    uint32_t *tx_msg_segs
    uint32_t *tx_msg_bytes
    int n_msgs
    int n_iov
    int n_hdr
    int open_msg              # last message, still taking full-size segments (-1: none)
    uint32_t open_peer        # 0: the open message goes to open_peer6
    uint8_t open_peer6[16]
    uint32_t open_segsize
    uint32_t open_count
    # rx
    mmsghdr *rx_msgs
    iovec *rx_iov
    uint8_t *rx_buf
    sockaddr_in6 *rx_names    # room for either family's address (IPv4: read as sockaddr_in)
    uint8_t *rx_ctrl
    iovec *wr_iov
    uint8_t *wr_hdr
    Run run
    # ICMP net unreachable (tx path). Its own buffer: with split_threads the rx thread owns wr_hdr.
    uint8_t icmp_buf[ICMP_BUF]
    uint8_t *icmp6_buf        # ICMP6_BUF bytes: the IPv6 reply quotes up to 1232 bytes
    uint16_t icmp_id          # IP ID of the next reply (per worker, deterministic)
    int64_t icmp_credit_ns    # token bucket: ICMP_COST_NS per reply, at most ICMP_BURST replies
    int64_t icmp_last_ns      # when the credit was last topped up (0: never, a full bucket)
    uint64_t tx_cnt[N_COUNTERS]
    uint64_t rx_cnt[N_COUNTERS]


# tx_packet hands an IPv6 read to tx_packet6 through this pointer (set once at import): a call
# the compiler cannot inline, so the IPv4 path's function stays as small as it was (inlined, the
# IPv6 code made every IPv4 small-packet read ~10 % dearer in benchmarks/test_engine_micro.py).
ctypedef void (*tx6_fn)(Worker *w, virtio_net_hdr *vh, uint8_t *pkt, uint32_t plen, int gso) noexcept nogil
cdef tx6_fn tx_v6
