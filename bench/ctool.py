"""The small C programs bench compiles at run time (the flood and fault-stream tool, the IPv6
request/response probe): one binary per source version, built once and shared by every run."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile


def build_c(source: str, name: str, what: str, error: type[Exception], directory: str | None = None) -> str:
    """Compile ``source`` (once per source version) as ``<name>-<digest>`` under ``directory``
    (default: ``<tmp>/<name>``) and return the binary's path; ``error`` with one line naming
    ``what`` when gcc is missing or the source does not compile."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise error(f"{what} needs gcc (./bootstrap installs it)")
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    directory = directory or os.path.join(tempfile.gettempdir(), name)
    os.makedirs(directory, exist_ok=True)
    binary = os.path.join(directory, f"{name}-{digest}")
    if os.access(binary, os.X_OK):
        return binary
    src = binary + ".c"
    with open(src, "w") as f:
        f.write(source)
    tmp = f"{binary}.{os.getpid()}"
    res = subprocess.run([gcc, "-O2", "-Wall", "-o", tmp, src], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise error(f"cannot compile {what}: {tail}")
    os.replace(tmp, binary)  # atomic: a concurrent run sees the whole binary or none
    return binary
