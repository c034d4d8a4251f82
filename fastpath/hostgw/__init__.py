"""host-gw wire format (flannel's ``host-gw`` backend): plain routes to peers on one L2 segment."""
