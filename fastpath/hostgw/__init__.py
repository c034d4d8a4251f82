"""host-gw wire format (flannel's ``host-gw`` backend): plain routes to peers on one L2 segment.

This file is the folder's declaration for the registry (``controlplane.backends``).
"""
from controlplane.backends.spec import Dataplane, Wire

WIRE = Wire("host-gw", mtu_overhead=0, default_dataplane="kernel",
            summary="flannel's host-gw: a kernel route per peer, no encapsulation")

DATAPLANES = (
    Dataplane("host-gw", "kernel", "fastpath.hostgw.kernel:HostGWKernelBackend",
              "one kernel route per peer via its PublicIP", inspect="fastpath.peermap:show",
              source_guard="optional",
              source_guard_help="drop packets from a Network address whose source MAC is not that "
                                "of the public IP of the lease holding it",
              ipv6=True),
    Dataplane("host-gw", "ebpf", "fastpath.hostgw.ebpf:HostGWEBPFBackend",
              "host-gw's kernel routes, pod traffic past IP forwarding by tc programs (redirect_neigh "
              "out, redirect_peer in)", inspect="fastpath.peermap:show",
              source_guard="optional",
              source_guard_help="drop packets from a Network address whose source MAC is not that "
                                "of the public IP of the lease holding it",
              requires=("bcc",), no_ipv6_reason="its programs handle IPv4 only",
              leftovers="fastpath.hostgw.ebpf:clear_programs_but_for"),
)

