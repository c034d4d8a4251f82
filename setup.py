"""Packaging for weft (flannel-compatible overlay network).

Cython extensions: every ``fastpath/**/*.pyx`` is cythonized (none -> no extensions); the
``.pxi``/``.pxd`` files they include or cimport are not modules of their own. Before that,
``fastpath/engine/counters.pxi`` (the engine's counter enum) is written from
``fastpath/engine/api.py``'s ``COUNTER_NAMES``, their one source.
Build switches (environment variables):
  WEFT_CYTHON_ANNOTATE=1  write Cython's annotated HTML next to each .pyx
  WEFT_DEBUG=1            compile with -O0 -g (default: -O2)
"""
from __future__ import annotations

import glob
import os
import re
import runpy
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CYTHON_MIN = (3, 0)
CYTHON_MAX = (4, 0)  # exclusive


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric release components: "3.1.0a1" -> (3, 1, 0), "3.0b2" -> (3, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def _find_pyx() -> list[str]:
    paths = glob.glob(os.path.join(HERE, "fastpath", "**", "*.pyx"), recursive=True)
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _write_counters_pxi() -> None:
    """fastpath/engine/counters.pxi from api.COUNTER_NAMES: ``C_<NAME>`` is the counter's index.
    Rewritten only when its text changes, so that an unchanged list rebuilds nothing."""
    engine = os.path.join(HERE, "fastpath", "engine")
    api = os.path.join(engine, "api.py")
    if not os.path.exists(api):
        return
    names = runpy.run_path(api)["COUNTER_NAMES"]
    text = ("# Written by setup.py from api.py's COUNTER_NAMES (their one source): do not edit.\n"
            "# The index of each counter in a worker's tx_cnt/rx_cnt arrays.\n"
            "cdef enum Counter:\n"
            + "".join(f"    C_{name.upper()} = {i}\n" for i, name in enumerate(names))
            + f"    N_COUNTERS = {len(names)}\n")
    path = os.path.join(engine, "counters.pxi")
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _extensions() -> list:
    pyx_files = _find_pyx()
    if not pyx_files:
        return []

    try:
        import Cython
        from Cython.Build import cythonize
    except ImportError:
        sys.exit(
            "weft setup.py: Cython %d.x is required to build %s "
            "(pip install 'cython>=3,<4', or run ./bootstrap)"
            % (CYTHON_MIN[0], ", ".join(pyx_files))
        )
    have = _version_tuple(Cython.__version__)
    if not (CYTHON_MIN <= have < CYTHON_MAX):
        sys.exit(
            "weft setup.py: Cython >=3,<4 is required, found Cython %s at %s "
            "(pip install 'cython>=3,<4', or run ./bootstrap)"
            % (Cython.__version__, os.path.dirname(Cython.__file__))
        )

    from setuptools import Extension

    annotate = _flag("WEFT_CYTHON_ANNOTATE")
    cflags = ["-O0", "-g"] if _flag("WEFT_DEBUG") else ["-O2"]
    _write_counters_pxi()

    include_dirs: list[str] = []
    try:  # only used if a .pyx cimports numpy; harmless otherwise
        import numpy

        include_dirs.append(numpy.get_include())
    except ImportError:
        pass

    extensions = []
    for path in pyx_files:
        module = os.path.splitext(path)[0].replace(os.sep, ".")
        extensions.append(
            Extension(
                module,
                [path],
                include_dirs=include_dirs,
                extra_compile_args=cflags,
            )
        )

    return cythonize(
        extensions,
        compiler_directives={"language_level": 3},
        annotate=annotate,
        force=annotate,  # regenerate C (and the HTML) even if the .c is up to date
        quiet=True,
    )


setup(
    name="weft",
    version="0.1.0",
    description="flannel-compatible overlay network with an eBPF/Cython fast path",
    python_requires=">=3.11",
    packages=find_packages(where=HERE, include=["controlplane*", "fastpath*", "bench*"]),
    package_data={
        # Cython sources ship in sdists, so that an sdist build (tox) cythonizes too; the .pyi
        # stubs, so that editors see the compiled engine's API.
        "": ["*.pyx", "*.pxd", "*.pxi", "*.pyi"],
        # bpf/ may or may not be a package of its own: cover both layouts.
        "fastpath": ["bpf/*.c", "bpf/*.h"],
        "fastpath.bpf": ["*.c", "*.h"],
        # C helpers the engine's .pyx includes (wire.h).
        "fastpath.engine": ["*.h"],
    },
    include_package_data=False,
    ext_modules=_extensions(),
    install_requires=[
        "pyroute2>=0.9.5",
        "prometheus_client",
        "cryptography",
    ],
    entry_points={
        "console_scripts": [
            "weftd=controlplane.daemon:main",
            "weftctl=controlplane.ctl:main",
            "weft-cni=controlplane.cni.plugin:main",
            "bench=bench.cli:main",
        ],
    },
    zip_safe=False,
)
