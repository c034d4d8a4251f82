"""``python -m fastpath.bpf.loader FD``: compile and load weft's programs, hand the fds to weftd.

Run by ``fastpath.bpf.Programs`` in a child process so that bcc and LLVM never live in the daemon.
Sends one SCM_RIGHTS message on the SOCK_SEQPACKET socket FD: JSON list of object names, then
the fds in the same order (programs, then maps). On failure: one line on stderr, exit 1.
"""
from __future__ import annotations

import json
import socket
import sys


def main(argv: list[str]) -> int:
    from . import ENTRIES, MAPS, BpfUnavailable, build_in_process
    sock = socket.socket(fileno=int(argv[0]))
    try:
        bpf, fns = build_in_process()
    except BpfUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return 1
    names = list(ENTRIES) + list(MAPS)
    fds = [fns[n].fd for n in ENTRIES] + [bpf[n.encode()].map_fd for n in MAPS]
    socket.send_fds(sock, [json.dumps(names).encode()], fds)
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
