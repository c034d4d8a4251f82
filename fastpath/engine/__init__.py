"""weft's userspace data plane: a compiled TUN <-> UDP engine and its pure-Python reference.

- ``fastpath.engine._engine.Engine``: Cython, batched and offloaded. One extension module split
  by concern (see _engine.pyx's docstring for the files); its Python API is ``_engine.pyi``.
- ``fastpath.engine.reference.ReferenceEngine``: one packet at a time, the correctness oracle
  and the ``udp/python`` data plane; same API.
- ``api.py``: what both share (the counter names, in the compiled engine's order; MAC parsing);
  ``tun.py``: opening TUN devices.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .tun import open_tun

if TYPE_CHECKING:
    from ._engine import Engine


def load_engine() -> type[Engine]:
    """The compiled Engine class; ImportError with the fix when the extension is not built."""
    try:
        from ._engine import Engine
    except ImportError as exc:
        raise ImportError(f"weft's compiled engine is not built ({exc}); run "
                          "`pip install --no-build-isolation -e .` or "
                          "`python setup.py build_ext --inplace`") from None
    return Engine


__all__ = ["open_tun", "load_engine"]
