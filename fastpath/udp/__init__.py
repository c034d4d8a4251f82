"""flannel's ``udp`` wire format in userspace: ``udp/fastpath`` (compiled engine) and ``udp/python``."""
