"""Packaging for weft (flannel-compatible overlay network).

Cython extensions: every ``fastpath/**/*.pyx`` is cythonized (none -> no extensions).
Build switches (environment variables):
  WEFT_CYTHON_ANNOTATE=1  write Cython's annotated HTML next to each .pyx
  WEFT_DEBUG=1            define the WEFT_DEBUG macro and compile with -O0 -g
                          (default: -O2)
"""
from __future__ import annotations

import glob
import os
import re
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

    debug = _flag("WEFT_DEBUG")
    annotate = _flag("WEFT_CYTHON_ANNOTATE")
    if debug:
        macros = [("WEFT_DEBUG", "1")]
        cflags = ["-O0", "-g"]
    else:
        macros = []
        cflags = ["-O2"]

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
                define_macros=macros,
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
        # Cython sources ship in sdists, so that an sdist build (tox) cythonizes too.
        "": ["*.pyx", "*.pxd", "*.pxi"],
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
        "etcd3==0.12.0",
        "protobuf==3.20.3",
        "grpcio",
        "prometheus_client",
        "cryptography",
    ],
    entry_points={
        "console_scripts": [
            "weftd=controlplane.daemon:main",
            "weftctl=controlplane.ctl:main",
            "bench=bench.cli:main",
        ],
    },
    zip_safe=False,
)
