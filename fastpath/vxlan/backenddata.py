"""The rule a vxlan lease's BackendData (and BackendV6Data) must meet before any weft node acts
on it: an object with a unicast ``VtepMAC`` and, when present, an integer ``VNI`` 0..16777215
(flannel's older leases carry no VNI). Every vxlan data plane reads the MAC the same way
(``vtep.parse_unicast_mac``), so a lease that passes here is one each of them can program.

Named by the wire format's declaration (``Wire.check_backend_data``), so that the control plane
(``controlplane.leasecheck``) judges a wire format's data by that wire format's own rule.
"""
from __future__ import annotations

from .vtep import parse_unicast_mac

VNI_MAX = (1 << 24) - 1


def problem(data) -> str | None:
    """Why ``data`` is not a vxlan BackendData (one line, without the field's name), or None."""
    if not isinstance(data, dict):
        return "must be an object with VtepMAC"
    mac = data.get("VtepMAC")
    if parse_unicast_mac(mac) is None:
        return "VtepMAC " + ("missing" if mac is None else f"{str(mac)[:40]!r} is not a unicast MAC")
    vni = data.get("VNI")
    if vni is not None and (not isinstance(vni, int) or isinstance(vni, bool) or not 0 <= vni <= VNI_MAX):
        return f"VNI {str(vni)[:40]} is not an integer 0..{VNI_MAX}"
    return None
