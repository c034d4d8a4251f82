"""VXLAN wire format (flannel's ``vxlan`` backend): the data planes that speak it.

This file is the folder's declaration for the registry (``controlplane.backends``): it imports
nothing but the declaration classes, so that reading it loads no data plane.
"""
from controlplane.backends.spec import Dataplane, Flag, Key, Wire

WIRE = Wire(
    "vxlan", mtu_overhead=50, default_dataplane="kernel", default_port=8472,
    summary="flannel's vxlan: VXLAN over UDP, one VTEP per node",
    keys=(Key("VNI", "vni", int, 1, 0, (1 << 24) - 1, "VXLAN network identifier"),
          Key("DirectRouting", "direct_routing", bool, False,
              description="route peers on the same L2 subnet directly, without VXLAN "
                          "(kernel and fastpath data planes)")),
    check_backend_data="fastpath.vxlan.backenddata:problem")  # BackendData and BackendV6Data

BPF_MAPS = "fastpath.peermap:show"  # weftctl peermap: the programs' maps on a device

ENGINE_PROCESS = "fastpath.engine.control:stop_engines_but_for"  # outlives weftd: see fastpath/userspace.py

DATAPLANES = (
    Dataplane("vxlan", "kernel", "fastpath.vxlan.kernel:VXLANKernelBackend",
              "the kernel's VXLAN device, static neighbour/FDB/route entries per peer",
              flags=(Flag("vxlan-tx-csum-off", "turn off tx checksum offload on the VXLAN device "
                          "(kernel bug workaround)"),),
              inspect=BPF_MAPS, source_guard="optional",
              source_guard_help="drop VXLAN datagrams whose outer source is not the public IP of "
                                "the lease holding the inner source", ipv6=True),
    Dataplane("vxlan", "ebpf", "fastpath.vxlan.ebpf:VXLANEBPFBackend",
              "tc eBPF programs on an external VXLAN device, peers in a BPF map", inspect=BPF_MAPS,
              source_guard="builtin", requires=("bcc",), ipv6=True),
    Dataplane("vxlan", "fastpath", "fastpath.vxlan.fastpath:VXLANFastpathBackend",
              "the compiled userspace engine between a TUN and a UDP socket", source_guard="builtin",
              leftovers=ENGINE_PROCESS, ipv6=True),
)
