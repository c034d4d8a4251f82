"""What a backend declares about itself, in plain data: cheap to import, imports nothing heavy.

A wire format's folder (``fastpath/vxlan/__init__.py`` ...) declares its ``Wire`` and its
``Dataplane`` list with these classes; the registry (``controlplane.backends``) collects them, and
config validation, weftd's flags and help, the scenario schema and ``bench run``'s backend list
are derived from it. The implementation class is named as ``"module:Class"`` and imported only
when a node runs it, so reading the declarations never loads pyroute2, bcc or the compiled engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_KIND_NAMES = {int: "an integer", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class Key:
    """A key under ``Backend`` in the network config that the wire format reads (``VNI`` ...),
    matched case-insensitively; its value becomes ``BackendConfig.<attr>``."""
    name: str  # as written in the JSON, e.g. "VNI"
    attr: str  # the attribute on BackendConfig, e.g. "vni"
    kind: type  # int, bool or str
    default: Any
    minimum: int | None = None  # for int keys: the range a value must lie in
    maximum: int | None = None
    description: str = ""

    @property
    def kind_name(self) -> str:
        return _KIND_NAMES[self.kind]

    def rule_broken(self, value: Any) -> str | None:
        """Why ``value`` (already of ``kind``) is refused, or None."""
        if self.kind is int and self.minimum is not None and self.maximum is not None:
            if not self.minimum <= value <= self.maximum:
                return f"{value} is outside {self.minimum}..{self.maximum}"
        return None


@dataclass(frozen=True)
class Flag:
    """A weftd flag of one data plane's own (``--vxlan-tx-csum-off``); it reaches the backend as
    ``BackendOptions.flags[dest]``. Like every weftd flag, it can come from ``FLANNELD_<NAME>``."""
    name: str  # without dashes in front, e.g. "vxlan-tx-csum-off"
    help: str
    kind: type = bool
    default: Any = False

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


@dataclass(frozen=True)
class Wire:
    """A wire format (flannel's ``Backend.Type``): what every data plane of it shares."""
    name: str  # "vxlan"
    mtu_overhead: int  # bytes of encapsulation: FLANNEL_MTU = interface MTU - this
    default_dataplane: str  # Backend.Dataplane when the config names none
    default_port: int = 0  # Backend.Port when 0 (0: the wire format has no port)
    keys: tuple[Key, ...] = ()  # its own keys under Backend
    summary: str = ""
    # "module:function" judging a peer lease's BackendData (and BackendV6Data) of this wire format
    # before any node acts on it: ``problem(data) -> str | None`` (why it is refused, one line).
    # None: the data is the data plane's own business (host-gw and udp carry none).
    check_backend_data: str | None = None


@dataclass(frozen=True)
class Dataplane:
    """One implementation of a wire format: the backend ``<wire>/<name>``."""
    wire: str
    name: str  # "kernel", "ebpf", "fastpath", "python", ...
    impl: str  # "module:Class", a controlplane.backends.Backend, imported when a node runs it
    summary: str = ""
    flags: tuple[Flag, ...] = ()
    # "module:function" behind ``weftctl peermap``: ``show(dev) -> (document, text)`` for what this
    # data plane (or its opt-in source guard) keeps in maps; LookupError when ``dev`` has none.
    inspect: str | None = None
    bench: bool = True  # measured by a default ``bench run``
    # What weftd --source-guard means here: "builtin" (every packet's outer source is checked
    # anyway), "optional" (the flag attaches a guard: the class is a fastpath.routing.GuardedRouting),
    # "none" (refused: nothing to check).
    source_guard: str = "none"
    requires: tuple[str, ...] = ()  # what the host must have beyond the base install: "bcc"
    source_guard_help: str = ""  # with "optional": what the guard drops
    # "module:function" called with the backend about to be set up (any data plane): stops what
    # this data plane leaves running after weftd exits without --teardown (the engine process),
    # unless the new backend is going to adopt it.
    leftovers: str | None = None
    # Carries IPv6 (a dual-stack network's second family): EnableIPv6 is refused on a data plane
    # without it, with ``no_ipv6_reason`` in the message.
    ipv6: bool = False
    no_ipv6_reason: str = ""

    def __post_init__(self):
        if self.source_guard not in ("builtin", "optional", "none"):
            raise ValueError(f"{self.backend}: source_guard {self.source_guard!r}: "
                             "must be builtin, optional or none")

    @property
    def backend(self) -> str:
        return f"{self.wire}/{self.name}"
