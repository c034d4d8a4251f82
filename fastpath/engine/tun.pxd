# C declarations: the TUN device's ioctls and the virtio-net header it prefixes packets with.
from libc.stdint cimport uint8_t, uint16_t

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<linux/if.h>" nogil:
    struct ifreq:
        char ifr_name[16]
        short ifr_flags

cdef extern from "<linux/if_tun.h>" nogil:
    unsigned long TUNGETIFF
    int IFF_TUN
    int IFF_NO_PI
    int IFF_VNET_HDR
    int IFF_MULTI_QUEUE

cdef extern from "<linux/virtio_net.h>" nogil:
    # 10 bytes, little endian on x86 (the TUN's default vnet byte order).
    struct virtio_net_hdr:
        uint8_t flags
        uint8_t gso_type
        uint16_t hdr_len
        uint16_t gso_size
        uint16_t csum_start
        uint16_t csum_offset
    int VIRTIO_NET_HDR_F_NEEDS_CSUM
    int VIRTIO_NET_HDR_GSO_NONE
    int VIRTIO_NET_HDR_GSO_TCPV4
    int VIRTIO_NET_HDR_GSO_UDP
    int VIRTIO_NET_HDR_GSO_TCPV6
    int VIRTIO_NET_HDR_GSO_ECN
