"""weft's userspace data plane: a compiled TUN <-> UDP engine and its pure-Python reference.

- ``fastpath.engine._engine.Engine``: Cython, batched and offloaded (see _engine.pyx).
- ``fastpath.engine.reference.ReferenceEngine``: one packet at a time, the correctness oracle
  and the ``udp/python`` data plane; same API.
"""
from .tun import open_tun


def load_engine():
    """The compiled Engine class; ImportError with the fix when the extension is not built."""
    try:
        from ._engine import Engine
    except ImportError as exc:
        raise ImportError(f"weft's compiled engine is not built ({exc}); run "
                          "`pip install --no-build-isolation -e .` or "
                          "`python setup.py build_ext --inplace`") from None
    return Engine


__all__ = ["open_tun", "load_engine"]
