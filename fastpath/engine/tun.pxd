# C declarations: the virtio-net header a TUN opened with IFF_VNET_HDR prefixes packets with.
# (Opening the TUN and asking its flags is Python: tun.py.)
from libc.stdint cimport uint8_t, uint16_t

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
    int VIRTIO_NET_HDR_GSO_TCPV6
    int VIRTIO_NET_HDR_GSO_ECN
