"""``--ip-masq``: flanneld's masquerade rules, in chain ``WEFT-POSTRTG`` of the nat table.

The rules (flannel ``pkg/trafficmngr/iptables/iptables.go: masqRules``), for cluster network C and
this node's subnet P:

1. ``-m mark --mark 0x4000/0x4000 -j RETURN``: kube-proxy already marked it for SNAT; no double NAT;
2. ``-s P -d C -j RETURN`` and 3. ``-s C -d P -j RETURN``: pod to pod stays unNATed;
4. ``! -s C -d P -j RETURN``: outside traffic to our pods keeps its source;
5. ``-s C ! -d 224.0.0.0/4 -j MASQUERADE --random-fully``: pods to the outside (not multicast);
6. ``! -s C -d C -j MASQUERADE --random-fully``: the host to remote pods.

The chain is jumped from the top of nat POSTROUTING. With ``iptables`` (Debian's is iptables-nft)
the chain lives in the ``nat`` table; without it ``nft`` gets a table ``ip weft`` of its own, with
a base chain hooked at srcnat that jumps to ``WEFT-POSTRTG``. A dual-stack network gets the same
rules for IPv6Network and the node's IPv6 subnet from a second instance (``family=6``), as flannel
does: ``ip6tables`` (multicast ``ff00::/8``), or the nft table ``ip6 weft``. Both are rewritten whole by
``setup`` (so running it twice leaves the same rules), checked by ``ensure`` and removed whole by
``teardown``, which touches nothing else. iptables-nft may leave the (empty) ``nat`` table behind if
it created it. Every command runs with a timeout; all run in the caller's network namespace.
"""
from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess

log = logging.getLogger("weft.masq")

CHAIN = "WEFT-POSTRTG"
NFT_TABLE = "weft"
COMMENT = "weft masq"
KUBE_PROXY_MARK = "0x4000/0x4000"
TIMEOUT = 15


class MasqError(Exception):
    """A masquerade rule could not be installed; str() is one line."""


class Masquerade:
    def __init__(self, tool: str | None = None, family: int = 4):
        """``tool``: "iptables" or "nft"; None picks iptables if installed, else nft. ``family``
        4 or 6: with "iptables", 6 runs ``ip6tables``."""
        if family not in (4, 6):
            raise MasqError(f"unknown address family {family!r} (4 or 6)")
        self.family = family
        self.iptables = "iptables" if family == 4 else "ip6tables"
        if tool is None:
            tool = "iptables" if shutil.which(self.iptables) else "nft" if shutil.which("nft") else None
            if tool is None:
                raise MasqError(f"--ip-masq needs {self.iptables} or nft, and neither is installed")
        if tool not in ("iptables", "nft"):
            raise MasqError(f"unknown masquerade tool {tool!r} (iptables or nft)")
        self.tool = tool
        self.cluster: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
        self.subnet: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
        self.random_fully = True
        self.multicast = "224.0.0.0/4" if family == 4 else "ff00::/8"
        self.nft_family = "ip" if family == 4 else "ip6"  # nft's table family and address match

    # -- plumbing ---------------------------------------------------------------------------------

    def _run(self, args: list[str], input: str | None = None, check: bool = True):
        try:
            res = subprocess.run(args, input=input, capture_output=True, text=True, timeout=TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MasqError(f"{args[0]}: {exc}") from None
        if check and res.returncode != 0:
            msg = " ".join((res.stderr or res.stdout).split()) or f"exit status {res.returncode}"
            raise MasqError(f"{' '.join(args[:6])}...: {msg}")
        return res

    def _ipt(self, *args: str, check: bool = True):
        return self._run([self.iptables, "-w", "5", "-t", "nat", *args], check=check)

    def _rules(self) -> list[list[str]]:
        c, p = str(self.cluster), str(self.subnet)
        tag = ["-m", "comment", "--comment", COMMENT]
        rnd = ["--random-fully"] if self.random_fully else []
        return [
            ["-m", "mark", "--mark", KUBE_PROXY_MARK, *tag, "-j", "RETURN"],
            ["-s", p, "-d", c, *tag, "-j", "RETURN"],
            ["-s", c, "-d", p, *tag, "-j", "RETURN"],
            ["!", "-s", c, "-d", p, *tag, "-j", "RETURN"],
            ["-s", c, "!", "-d", self.multicast, *tag, "-j", "MASQUERADE", *rnd],
            ["!", "-s", c, "-d", c, *tag, "-j", "MASQUERADE", *rnd],
        ]

    _JUMP = ["-m", "comment", "--comment", COMMENT, "-j", CHAIN]

    def _nft_script(self) -> str:
        c, p, ip, fam = self.cluster, self.subnet, self.nft_family, self.nft_family
        rnd = " fully-random" if self.random_fully else ""
        tag = f'comment "{COMMENT}"'
        return "\n".join([
            f"table {fam} {NFT_TABLE}",
            f"delete table {fam} {NFT_TABLE}",
            f"table {fam} {NFT_TABLE} {{",
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    jump {CHAIN} {tag}",
            "  }",
            f"  chain {CHAIN} {{",
            f"    meta mark & 0x4000 == 0x4000 return {tag}",
            f"    {ip} saddr {p} {ip} daddr {c} return {tag}",
            f"    {ip} saddr {c} {ip} daddr {p} return {tag}",
            f"    {ip} saddr != {c} {ip} daddr {p} return {tag}",
            f"    {ip} saddr {c} {ip} daddr != {self.multicast} masquerade{rnd} {tag}",
            f"    {ip} saddr != {c} {ip} daddr {c} masquerade{rnd} {tag}",
            "  }",
            "}",
            "",
        ])

    # -- the interface ----------------------------------------------------------------------------

    def setup(self, cluster_network, node_subnet) -> None:
        """Install (or rewrite) the rules for ``cluster_network`` and this node's ``node_subnet``."""
        network = ipaddress.IPv4Network if self.family == 4 else ipaddress.IPv6Network
        self.cluster = network(cluster_network)
        self.subnet = network(node_subnet)
        if self.tool == "nft":
            try:
                self._run(["nft", "-f", "-"], input=self._nft_script())
            except MasqError:
                if not self.random_fully:
                    raise
                self.random_fully = False  # an nft without fully-random
                self._run(["nft", "-f", "-"], input=self._nft_script())
            log.info("masquerade: nft table %s %s for %s (node %s)", self.nft_family, NFT_TABLE,
                     self.cluster, self.subnet)
            return
        if self._ipt("-n", "-L", CHAIN, check=False).returncode != 0:
            self._ipt("-N", CHAIN)
        self._ipt("-F", CHAIN)
        for i, rule in enumerate(self._rules()):
            try:
                self._ipt("-A", CHAIN, *rule)
            except MasqError:
                if i < 4 or not self.random_fully:
                    raise
                self.random_fully = False  # an iptables without --random-fully: flannel drops it too
                self._ipt("-F", CHAIN)
                for r in self._rules():
                    self._ipt("-A", CHAIN, *r)
                break
        if self._ipt("-C", "POSTROUTING", *self._JUMP, check=False).returncode != 0:
            self._ipt("-I", "POSTROUTING", "1", *self._JUMP)
        log.info("masquerade: %s nat chain %s for %s (node %s)", self.iptables, CHAIN, self.cluster,
                 self.subnet)

    def ensure(self) -> bool:
        """Re-install the rules if any went missing (flannel rechecks every 5 s); True if it did."""
        if self.cluster is None:
            return False
        if self.tool == "nft":
            res = self._run(["nft", "list", "chain", self.nft_family, NFT_TABLE, CHAIN], check=False)
            ok = res.returncode == 0 and res.stdout.count(COMMENT) == len(self._rules())
            ok = ok and self._run(["nft", "list", "chain", self.nft_family, NFT_TABLE, "postrouting"],
                                  check=False).returncode == 0
        else:
            ok = self._ipt("-C", "POSTROUTING", *self._JUMP, check=False).returncode == 0
            ok = ok and all(self._ipt("-C", CHAIN, *r, check=False).returncode == 0
                            for r in self._rules())
            if ok:  # and nothing else in the chain
                listing = self._ipt("-S", CHAIN).stdout.splitlines()
                ok = sum(1 for line in listing if line.startswith("-A ")) == len(self._rules())
        if ok:
            return False
        log.warning("masquerade rules were changed behind our back; reinstalling them")
        self.setup(self.cluster, self.subnet)
        return True

    def teardown(self) -> None:
        """Remove exactly what ``setup`` added (nothing if it never ran here)."""
        if self.tool == "nft":
            if self._run(["nft", "list", "table", self.nft_family, NFT_TABLE], check=False).returncode == 0:
                self._run(["nft", "delete", "table", self.nft_family, NFT_TABLE])
            return
        for _ in range(100):  # every copy of our jump, however many were added
            if self._ipt("-C", "POSTROUTING", *self._JUMP, check=False).returncode != 0:
                break
            self._ipt("-D", "POSTROUTING", *self._JUMP)
        if self._ipt("-n", "-L", CHAIN, check=False).returncode == 0:
            self._ipt("-F", CHAIN)
            self._ipt("-X", CHAIN)
