"""Backends by name (``<wire>/<dataplane>``), imported only when used.

Adding a backend: write it in its own folder and add one line here. A name that appears twice is
an error at import time, not a silent override.
"""
from __future__ import annotations

import importlib

from ..config import WIRE_DATAPLANES
from .base import Backend, BackendError, BackendOptions, ExternalInterface

_TABLE = [
    ("alloc/kernel", "controlplane.backends.alloc:AllocBackend"),
    ("vxlan/kernel", "fastpath.vxlan.kernel:VXLANKernelBackend"),
    ("host-gw/kernel", "fastpath.hostgw.kernel:HostGWKernelBackend"),
    ("vxlan/ebpf", "fastpath.vxlan.ebpf:VXLANEBPFBackend"),
    ("udp/fastpath", "fastpath.udp.backend:UDPFastpathBackend"),
    ("udp/python", "fastpath.udp.backend:UDPPythonBackend"),
    ("vxlan/fastpath", "fastpath.vxlan.fastpath:VXLANFastpathBackend"),
]

BACKENDS: dict[str, str] = {}
for _name, _path in _TABLE:
    if _name in BACKENDS:
        raise RuntimeError(f"backend {_name} registered twice")
    _wire, _, _dp = _name.partition("/")
    if _dp not in WIRE_DATAPLANES.get(_wire, ()):
        raise RuntimeError(f"backend {_name} is not a wire/dataplane pair the config accepts")
    BACKENDS[_name] = _path


def load_backend(name: str) -> type[Backend]:
    """The class for ``name``; BackendError if this build does not have it."""
    path = BACKENDS.get(name)
    if path is None:
        have = ", ".join(sorted(BACKENDS))
        raise BackendError(f"backend {name} is not available in this build of weft (available: {have})")
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Backend", "BackendError", "BackendOptions", "ExternalInterface", "BACKENDS", "load_backend"]
