"""VXLAN wire format (flannel's ``vxlan`` backend): data planes that speak it."""
