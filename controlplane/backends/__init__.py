"""The backend registry: every wire format and data plane weft has, and what each declares.

A backend is ``<wire>/<dataplane>`` (``vxlan/kernel``, ``udp/fastpath`` ...). Each wire format's
folder declares itself in its ``__init__.py``: ``WIRE`` (a ``spec.Wire``: MTU overhead, default
port, default data plane, its own config keys) and ``DATAPLANES`` (``spec.Dataplane``s: the
implementation class as ``"module:Class"``, its own weftd flags, what ``weftctl peermap`` shows).
Config validation (``controlplane.config``), weftd's flags and help, the scenario schema
(``controlplane.backends.schema``) and ``bench run``'s backend list all read this registry, so

- a new data plane of an existing wire format is a module in that folder plus one ``Dataplane``
  line in the folder's ``__init__.py``;
- a new wire format is a new folder plus one line in ``FOLDERS`` below.

The folders are read on first use, and reading them imports only their declarations; the class
is imported by ``load_backend`` when a node runs it. A name declared twice is an error, never a
silent override.
"""
from __future__ import annotations

import importlib
import threading

from .base import Backend, BackendError, BackendOptions, ExternalInterface
from .spec import Dataplane, Flag, Key, Wire

# The folders that declare WIRE and DATAPLANES, in the order lists show them (bench run measures
# the data planes in this order, simplest first).
FOLDERS = ("fastpath.hostgw", "fastpath.vxlan", "fastpath.udp", "controlplane.backends.alloc")

_wires: dict[str, Wire] = {}
_dataplanes: dict[str, Dataplane] = {}  # by backend name
_loaded = False
_lock = threading.RLock()


def register_wire(wire: Wire) -> None:
    """Add a wire format; its data planes are added with ``register``."""
    with _lock:
        _load()
        _add_wire(wire)


def register(dataplane: Dataplane) -> None:
    """Add a data plane of a registered wire format."""
    with _lock:
        _load()
        _add_dataplane(dataplane)


def unregister(name: str) -> None:
    """Remove a backend (``wire/dataplane``), or a wire format with all its data planes."""
    with _lock:
        if "/" in name:
            _dataplanes.pop(name, None)
            return
        _wires.pop(name, None)
        for key in [k for k, d in _dataplanes.items() if d.wire == name]:
            del _dataplanes[key]


def _add_wire(wire: Wire) -> None:
    if not wire.name or "/" in wire.name:
        raise RuntimeError(f"wire format {wire.name!r}: a name without '/' is needed")
    if wire.name in _wires:
        raise RuntimeError(f"wire format {wire.name} registered twice")
    attrs = [k.attr for k in wire.keys]
    from ..config import BackendConfig  # (here: config.py imports this package)
    taken = {name for name in dir(BackendConfig) if not name.startswith("_")} | {"raw"}
    if len(set(attrs)) != len(attrs) or taken & set(attrs):
        raise RuntimeError(f"wire format {wire.name}: a config key attribute is declared twice "
                           f"or names a BackendConfig field")
    _wires[wire.name] = wire


def _add_dataplane(dp: Dataplane) -> None:
    if dp.wire not in _wires:
        raise RuntimeError(f"backend {dp.backend}: wire format {dp.wire} is not registered")
    if dp.backend in _dataplanes:
        raise RuntimeError(f"backend {dp.backend} registered twice")
    if not dp.name or "/" in dp.name or ":" not in dp.impl:
        raise RuntimeError(f"backend {dp.backend}: needs a data plane name and impl 'module:Class'")
    declared = flag_owners()
    for flag in dp.flags:
        if any(other.name == flag.name and other != flag for other in declared):
            raise RuntimeError(f"backend {dp.backend}: flag --{flag.name} is declared "
                               "differently by another backend")
    _dataplanes[dp.backend] = dp


def _load() -> None:
    """Read the folders' declarations once (on first use, so that importing a folder that itself
    imports this package never finds it half done)."""
    global _loaded
    with _lock:
        if _loaded:
            return
        _loaded = True
        for folder in FOLDERS:
            module = importlib.import_module(folder)
            _add_wire(module.WIRE)
            for dp in module.DATAPLANES:
                _add_dataplane(dp)


def wires() -> dict[str, Wire]:
    """Every wire format, by name, in FOLDERS order."""
    _load()
    return dict(_wires)


def wire(name: str) -> Wire | None:
    _load()
    return _wires.get(name)


def dataplanes(wire_name: str | None = None) -> list[Dataplane]:
    """Every data plane (of one wire format), in declaration order."""
    _load()
    return [d for d in _dataplanes.values() if wire_name is None or d.wire == wire_name]


def dataplane_names() -> list[str]:
    """Each data plane name once (``kernel``, ``ebpf`` ...), in declaration order."""
    return list(dict.fromkeys(d.name for d in dataplanes()))


def declaration(name: str) -> Dataplane | None:
    """The declaration of backend ``name`` (``wire/dataplane``)."""
    _load()
    return _dataplanes.get(name)


def backend_names() -> list[str]:
    _load()
    return list(_dataplanes)


def bench_backends() -> list[str]:
    """What a default ``bench run`` measures (after the bare underlay)."""
    return [d.backend for d in dataplanes() if d.bench]


def flag_owners() -> dict[Flag, list[str]]:
    """Each data plane's own weftd flags, and the backends that declare each."""
    out: dict[Flag, list[str]] = {}
    for d in dataplanes():
        for f in d.flags:
            out.setdefault(f, []).append(d.backend)
    return out


def dataplane_help() -> str:
    """Which data planes each wire format has, for help texts: ``vxlan: kernel, ebpf; ...``."""
    return "; ".join(f"{w}: {', '.join(d.name for d in dataplanes(w))}" for w in wires())


def source_guard_help() -> str:
    """weftd's --source-guard help, from what each data plane declares."""
    optional = [f"{d.backend}: {d.source_guard_help}" for d in dataplanes() if d.source_guard == "optional"]
    builtin = [d.backend for d in dataplanes() if d.source_guard == "builtin"]
    return ("; ".join(optional) + (f" (a tc program on -iface; needs bcc). Built into {', '.join(builtin)}"
                                   " (the flag is a no-op there)" if builtin else ""))


def clear_leftovers(backend: Backend) -> None:
    """Before ``backend`` is set up: every data plane that leaves something running in this
    network namespace (a userspace engine process) stops it unless ``backend`` will adopt it."""
    for path in dict.fromkeys(d.leftovers for d in dataplanes() if d.leftovers):
        module, _, fn = path.partition(":")
        getattr(importlib.import_module(module), fn)(backend)


def load_backend(name: str) -> type[Backend]:
    """The class for ``name``; BackendError if this build does not have it."""
    dp = declaration(name)
    if dp is None:
        have = ", ".join(sorted(backend_names()))
        raise BackendError(f"backend {name} is not available in this build of weft (available: {have})")
    module, _, cls = dp.impl.partition(":")
    return getattr(importlib.import_module(module), cls)


def show_node(dev: str) -> tuple[dict, str]:
    """What ``weftctl peermap`` prints: the first data plane whose inspector finds its maps on
    ``dev`` in this network namespace answers (document, text); LookupError (one line) if none."""
    paths = list(dict.fromkeys(d.inspect for d in dataplanes() if d.inspect))
    if not paths:
        raise LookupError("no backend of this build keeps maps that weftctl can show")
    last: LookupError | None = None
    for path in paths:
        module, _, fn = path.partition(":")
        try:
            return getattr(importlib.import_module(module), fn)(dev)
        except LookupError as exc:
            last = exc
    raise last


__all__ = ["Backend", "BackendError", "BackendOptions", "ExternalInterface", "Dataplane", "Flag",
           "Key", "Wire", "FOLDERS", "register", "register_wire", "unregister", "wires", "wire",
           "dataplanes", "dataplane_names", "declaration", "backend_names", "bench_backends",
           "flag_owners", "dataplane_help", "source_guard_help", "clear_leftovers", "load_backend", "show_node"]
