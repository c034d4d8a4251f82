"""flannel's ``udp`` wire format in userspace: ``udp/fastpath`` (compiled engine) and ``udp/python``.

This file is the folder's declaration for the registry (``controlplane.backends``).
"""
from controlplane.backends.spec import Dataplane, Wire

WIRE = Wire("udp", mtu_overhead=28, default_dataplane="fastpath", default_port=8285,
            summary="flannel's udp: the bare inner IPv4 packet as a UDP payload")

ENGINE_PROCESS = "fastpath.engine.control:stop_engines_but_for"  # outlives weftd: see fastpath/userspace.py

NO_IPV6 = "flannel's udp wire format has no IPv6"  # EnableIPv6 is refused with this reason

DATAPLANES = (
    Dataplane("udp", "fastpath", "fastpath.udp.backend:UDPFastpathBackend",
              "the compiled userspace engine between a TUN and a UDP socket", source_guard="builtin",
              leftovers=ENGINE_PROCESS, no_ipv6_reason=NO_IPV6),
    Dataplane("udp", "python", "fastpath.udp.backend:UDPPythonBackend",
              "the pure-Python reference engine, one packet per system call", source_guard="builtin",
              leftovers=ENGINE_PROCESS, no_ipv6_reason=NO_IPV6),
)
