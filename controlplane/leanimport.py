"""pyroute2 without its package ``__init__``: 6 MB less for weftd (docs/weftd.md, "The etcd client").

``pyroute2/__init__.py`` imports the whole library to offer every name at the top (163 modules:
NDB, IPDB, conntrack, nftables, WireGuard, 9P, asyncio...), and any ``import pyroute2.x`` runs it
first. weftd uses ``IPRoute`` and ``pyroute2.ethtool``: that costs it 31 MB instead of 25 (bare
python 3.11 + pyroute2 0.9.7), and a weftd 33 MB instead of 39.

``install()`` registers the package module without running its ``__init__``, so submodules import
on their own, and names asked of the package (``from pyroute2 import IPRoute``) come from the
module that defines them. Any other name (``pyroute2.NDB``, ``pyroute2.__version__``) runs the real
``__init__`` into the same module first, so code that wants the whole library still gets it: the
shortcut changes what is loaded, never what works. It must run before anything imports pyroute2;
when pyroute2 is already imported it does nothing.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading

# The names weft asks of the package, and the module that defines each.
NAMES = {
    "IPRoute": "pyroute2.iproute.linux",
    "NetNS": "pyroute2.iproute.linux",
    "NetlinkError": "pyroute2.netlink.exceptions",
}


def install() -> bool:
    """True when the lean package module was installed (pyroute2 not imported before)."""
    if "pyroute2" in sys.modules:
        return False
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:
        return False  # not installed: the import that needs it will say so
    module = importlib.util.module_from_spec(spec)
    lock = threading.RLock()
    state = {"init": None}  # None, "running", "done"

    def full_init() -> None:
        with lock:
            if state["init"] is None:
                state["init"] = "running"
                try:
                    spec.loader.exec_module(module)  # the real __init__, into this same module
                finally:
                    state["init"] = "done"

    def __getattr__(name: str):
        if name in NAMES:
            return getattr(importlib.import_module(NAMES[name]), name)
        if not name.startswith("__") and any(
                os.path.exists(os.path.join(d, name + ".py")) or os.path.isdir(os.path.join(d, name))
                for d in module.__path__):
            # a submodule (``from pyroute2 import config``): import just that one
            return importlib.import_module(f"pyroute2.{name}")
        with lock:
            if state["init"] is None:
                full_init()
            elif state["init"] == "running":  # asked while the real __init__ runs: not there yet
                raise AttributeError(f"module 'pyroute2' has no attribute {name!r}")
        try:
            return module.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'pyroute2' has no attribute {name!r}") from None

    module.__getattr__ = __getattr__
    sys.modules["pyroute2"] = module
    return True
